"""
Optimizers: Muon for the hidden matrices (attention, MLP, experts), AdamW for the rest.

Muon (Keller Jordan, 2024): SGD-momentum whose update is replaced by its nearest
semi-orthogonal matrix, computed with a quintic Newton-Schulz iteration. Expert weights are
stacked (E, out, in) tensors; the iteration is batched over the leading dimension, so each
expert's matrix is orthogonalised on its own (one expert's gradient never rescales another's).

nanochat's recipe (each piece a Muon option, off by default): Polar Express coefficients
(Amsel et al. 2025), MuonEq row equilibration before and Muon+ renormalisation after the
iteration, NorMuon's per-neuron second moment (Li et al. 2025) and cautious weight decay
(Chen et al. 2024). Every one of them works per matrix, so per expert for stacked experts.
"""

import torch
import torch.distributed as dist

from nanochat.common import print0

# Polar Express (Amsel et al. 2025, arXiv:2505.16932): a different (a, b, c) per iteration,
# each the minimax-optimal odd quintic for the interval the previous one left, so 5 steps land
# closer to the polar factor than 5 steps of one fixed polynomial. nanochat's table (computed
# for 5 iterations, safety factor 2e-2, cushion 2).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
MUON_COEFFS = ("quintic", "polar")


def odd_polynomial_iteration(G, coeffs, norm_margin, eps):
    """X <- a X + (b A + c A^2) X with A = X X^T, one (a, b, c) per step, on the last two dims of
    G (batched over leading dims), after scaling X to Frobenius norm < 1 / norm_margin (which
    bounds the spectral norm): pushes every singular value toward 1. Runs on the short side
    (X X^T is the cheap Gram matrix), in bf16 on GPUs (fast), fp32 on CPUs."""
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * norm_margin + eps)
    for a, b, c in coeffs:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def zeropower_via_newtonschulz5(G, steps=5):
    """Approximately orthogonalise the last two dims of G (batched over leading dims), Muon's
    quintic Newton-Schulz: coefficients (3.4445, -4.7750, 2.0315) maximise the slope at zero."""
    return odd_polynomial_iteration(G, [(3.4445, -4.7750, 2.0315)] * steps, 1.0, 1e-7)


def zeropower_via_polar_express(G, steps=5):
    """Polar Express: the same iteration with POLAR_EXPRESS_COEFFS[i] at step i. The
    coefficients assume singular values in (0, 1]; the extra 1% on the norm is the table's
    safety margin for bf16 rounding."""
    assert 1 <= steps <= len(POLAR_EXPRESS_COEFFS), f"Polar Express has coefficients for {len(POLAR_EXPRESS_COEFFS)} steps"
    return odd_polynomial_iteration(G, POLAR_EXPRESS_COEFFS[:steps], 1.01, 1e-6)


def equilibrate_rows(G):
    """MuonEq: every row of each matrix rescaled to the matrix's RMS row norm (the Frobenius
    norm kept). Rows of very different size make an ill-conditioned input, which 5 iterations
    orthogonalise poorly; equal rows condition it."""
    target = G.float().norm(dim=(-2, -1), keepdim=True) / G.size(-2) ** 0.5
    row_norm = G.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return G * (target / row_norm).to(G.dtype)


def renormalize(U):
    """Muon+: each matrix's Frobenius norm snapped to sqrt(min(m, n)), an exactly
    semi-orthogonal matrix's, undoing the iteration's under- or over-shoot of the singular values."""
    target = min(U.size(-2), U.size(-1)) ** 0.5
    norm = U.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return U * (target / norm).to(U.dtype)


def normuon_dim(shape):
    """The dim NorMuon averages over: -1 (one statistic per row, i.e. per output neuron) when the
    matrix has at least as many rows as columns, else -2 (one per column): the statistic lives
    along the longer side."""
    return -1 if shape[-2] >= shape[-1] else -2


def normuon_scale(U, second_moment, beta2):
    """NorMuon (Li et al. 2025, arXiv:2510.05491): an orthogonalised update has equal singular
    values but not equal rows; an EMA (beta2, no bias correction) of each row's mean square
    divides each row by its RMS, then the whole matrix is rescaled back to the Frobenius norm
    it had, so only the distribution over neurons changes, not the step size. Per matrix (the
    sums run over the last two dims). Returns (scaled U, new second moment)."""
    dim = normuon_dim(U.shape)
    n = U.size(dim)
    v_mean = U.float().square().mean(dim=dim, keepdim=True)
    norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment = second_moment.lerp(v_mean.to(second_moment.dtype), 1 - beta2)
    step = second_moment.clamp_min(1e-10).rsqrt()
    new_norm = (v_mean * n * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return U * (step * (norm / new_norm.clamp_min(1e-10))).to(U.dtype), second_moment


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights and stacked (E, out, in) expert weights, nn.Linear layout.

    Idle experts do not move. Newton-Schulz normalises whatever is in the momentum buffer, so
    an expert that got no token would otherwise take a full-size step in a stale direction
    every step for as long as it stays idle (measured before this rule: update RMS 1.2e-3 on
    every one of 40 idle steps, as large as an active expert's; dev/LOG.md). step() takes
    `active_experts` {stacked expert weight: (E,) bool, from moe.active_expert_masks}: an idle
    expert's gradient is ignored (it may be garbage on some GPU kernels), its momentum decays
    as if the gradient were zero, its NorMuon second moment is kept as it is (an idle step
    measures nothing), and its weights are left exactly as they are (no weight decay either).

    Options per group (defaults: plain Muon): coeffs "quintic" | "polar" (Polar Express),
    row_equil (MuonEq), renorm (Muon+), normuon with beta2, weight_decay (decoupled,
    lr x wd x p, at the lr of the update) and cautious_wd (decay only where the update and
    the weight have the same sign). The order is nanochat's: momentum, MuonEq, orthogonalise,
    Muon+, NorMuon, decay and update."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, coeffs="quintic", row_equil=False,
                 renorm=False, normuon=False, beta2=0.9, weight_decay=0.0, cautious_wd=False):
        assert coeffs in MUON_COEFFS, f"Muon coeffs must be one of {MUON_COEFFS} (got {coeffs!r})"
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, coeffs=coeffs,
                                      row_equil=row_equil, renorm=renorm, normuon=normuon, beta2=beta2,
                                      weight_decay=weight_decay, cautious_wd=cautious_wd))

    def load_state_dict(self, state_dict):
        """torch restores the saved groups' settings; a checkpoint from before an option
        existed lacks its key, and gets this optimizer's own group value (the off default unless
        asked). Only the keys the groups had before loading: torch adds internal ones to
        self.defaults on the first step, which a saved group must not grow."""
        before = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, settings in zip(self.param_groups, before):
            for key, value in settings.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, active_experts=None):
        active_experts = active_experts or {}
        for group in self.param_groups:
            zeropower = zeropower_via_polar_express if group["coeffs"] == "polar" else zeropower_via_newtonschulz5
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                active = active_experts.get(p)
                if active is not None:  # (E,) -> (E, 1, 1); where(), not a product: 0 * NaN = NaN
                    active = active.view(-1, *([1] * (g.dim() - 1)))
                    g = torch.where(active, g, torch.zeros((), dtype=g.dtype, device=g.device))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - group["momentum"])
                g = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                if group["row_equil"]:
                    g = equilibrate_rows(g)
                update = zeropower(g, steps=group["ns_steps"])
                if group["renorm"]:
                    update = renormalize(update)
                if group["normuon"]:
                    if "second_momentum_buffer" not in state:
                        shape = list(p.shape)
                        shape[normuon_dim(shape)] = 1
                        state["second_momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    v = state["second_momentum_buffer"]
                    update, v_new = normuon_scale(update, v, group["beta2"])
                    v.copy_(v_new if active is None else torch.where(active, v_new, v))
                if active is not None:
                    update = torch.where(active, update, torch.zeros((), dtype=update.dtype, device=update.device))
                # Orthogonal updates have unit singular values; scale tall matrices (out > in)
                # up so the per-element update size does not shrink with their aspect ratio.
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                lr, wd = group["lr"] * scale, group["weight_decay"]
                if wd == 0:
                    p.add_(update, alpha=-lr)
                    continue
                # Decoupled decay at the update's own lr. Cautious (Chen et al. 2024,
                # arXiv:2411.16085): only where the update pulls the weight towards zero too
                # (update and weight of the same sign; p -= lr * update), so decay never fights
                # the gradient. A zero update counts as agreeing (nanochat's >= 0).
                decay = (update * p >= 0) if group["cautious_wd"] else torch.ones_like(p, dtype=torch.bool)
                if active is not None:
                    decay = decay & active
                p.sub_(lr * update + lr * wd * p * decay)


# AdamW settings per parameter role (GPT.param_roles), per recipe. lr: the setup_optimizers
# argument it scales (or a number), times mult, times 1/sqrt(d_model/768) where dmodel_scale
# (nanochat's muP-style transfer from its d=768 reference to other widths); betas, eps and
# weight_decay default to the adam_betas, 1e-10 and weight_decay arguments. A role the model
# does not have, or has no parameter of, gets no group.
_TODAY = dict(
    lm_head=dict(lr="unembedding_lr", dmodel_scale=True),
    embedding=dict(lr="embedding_lr", dmodel_scale=True),
    router=dict(lr="router_lr"),
    conv=dict(lr="scalar_lr"),
    no_decay=dict(lr="scalar_lr", weight_decay=0.0),
)
# nanochat's groups (gpt.py setup_optimizer at 92d63d4). Its architecture's parameters only
# exist with nanochat's settings, so both recipes give them these.
_NANOCHAT_ONLY = dict(
    value_embedding=dict(lr="embedding_lr", mult=0.5, dmodel_scale=True, betas=(0.8, 0.995), weight_decay=0.01),
    resid_lambdas=dict(lr="lambda_lr", mult=0.01, betas=(0.8, 0.95), weight_decay=0.05),
    x0_lambdas=dict(lr="lambda_lr", betas=(0.96, 0.95), weight_decay=0.0),  # high beta1: nanochat's sweep, a cliff at 0.97
    smear_backout=dict(lr=0.2, betas=(0.8, 0.95), weight_decay=0.0),
)
ADAMW_GROUPS = {
    "default": {**_TODAY, **_NANOCHAT_ONLY},
    # roles nanochat has not (routers, Mamba) keep ours
    "nanochat": {**_TODAY, **_NANOCHAT_ONLY,
                 "lm_head": dict(lr="unembedding_lr", dmodel_scale=True, betas=(0.8, 0.96), weight_decay=0.01),
                 "embedding": dict(lr="embedding_lr", dmodel_scale=True, betas=(0.8, 0.995), weight_decay=0.001)},
}


def setup_optimizers(model, *, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, router_lr=0.004,
                     scalar_lr=0.004, lambda_lr=0.5, weight_decay=0.0, adam_betas=(0.8, 0.95), adamw_groups="default",
                     muon_coeffs="quintic", muon_row_equil=False, muon_renorm=False, normuon=False, normuon_beta2=0.9,
                     muon_weight_decay=0.0, cautious_wd=False, device_type="cpu", owners=None, rank=0, world_size=1):
    """Return [adamw, muon]: Muon for the "matrix" role, one AdamW group per other role of
    model.param_roles() (the model says which parameter is what) with the settings
    ADAMW_GROUPS[adamw_groups] gives it; each group remembers its base lr in 'initial_lr'.
    owners (shard_owners): a sharded optimizer; this rank's optimizers hold only the
    parameters it owns (the groups keep their lrs; a group may be empty on a rank).

    - Muon ("matrix"): every matrix inside the blocks (attention, dense MLP, experts, Mamba-2's
      projections), MTP heads' blocks included. muon_*, normuon*, cautious_wd: Muon's options.
    - AdamW ("embedding", "lm_head"): lookups/classifier, not hidden transforms, with
      nanochat's 1/sqrt(d_model/768) scaling of their lrs.
    - AdamW ("router") at router_lr: the MoE gate is a small classifier (n_experts x d) whose rows
      should move at the rate their own gradients ask for. Muon would give every expert's
      logit the same update magnitude (all singular values 1), which amplifies the small,
      noisy early gradients of rarely chosen experts and fights the balance loss. The
      Mixture-of-Depths routers (a 1 x d row each) join them.
    - AdamW ("conv", "no_decay") at scalar_lr: Mamba-2's depthwise conv, and its per-head A_log,
      D and dt_bias, which are never weight-decayed (the reference marks them no-decay).
    - AdamW (nanochat's "value_embedding", "resid_lambdas", "x0_lambdas", "smear_backout"):
      value embeddings at half the embedding lr, the per-layer lambdas at lambda_lr (nanochat's
      scalar_lr: x0 at 1x, resid at 0.01x), the smear gate and smear/backout lambdas at 0.2.

    Muon's step runs the model's per-step bookkeeping first (a pre-step hook: step_bookkeeping),
    so a plain muon.step() leaves experts that got no token in this step where they are.
    world_size: the processes whose token counts the bookkeeping sums.
    """
    assert adamw_groups in ADAMW_GROUPS, f"adamw_groups must be one of {sorted(ADAMW_GROUPS)} (got {adamw_groups!r})"
    settings = ADAMW_GROUPS[adamw_groups]
    lrs = dict(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr, router_lr=router_lr, scalar_lr=scalar_lr,
               lambda_lr=lambda_lr)
    lr_scale = (model.config.n_embd / 768) ** -0.5
    roles = model.param_roles()
    unknown = [role for role, params in roles.items() if params and role != "matrix" and role not in settings]
    assert not unknown, f"parameter role(s) {unknown} have no optimizer settings (nanochat/optim.py ADAMW_GROUPS)"
    mine = (lambda p: True) if owners is None else (lambda p: owners.get(p, rank) == rank)  # unlisted: local (EP experts)
    adam_groups = []
    for role, s in settings.items():  # the table's order: the same groups, in the same order, on every rank
        if not roles.get(role):
            continue
        lr = (lrs[s["lr"]] if isinstance(s["lr"], str) else s["lr"]) * s.get("mult", 1.0)
        adam_groups.append(dict(params=[p for p in roles[role] if mine(p)], role=role,
                                lr=lr * lr_scale if s.get("dmodel_scale") else lr, betas=s.get("betas", adam_betas),
                                eps=s.get("eps", 1e-10), weight_decay=s.get("weight_decay", weight_decay)))
    n_assigned = sum(len(params) for params in roles.values())
    matrix_params = [p for p in roles.get("matrix", []) if mine(p)]
    n_mine = sum(len(g["params"]) for g in adam_groups) + len(matrix_params)
    adamw = torch.optim.AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay,
                              fused=(device_type == "cuda"))
    muon = Muon([dict(params=matrix_params)], lr=matrix_lr, momentum=0.95, coeffs=muon_coeffs, row_equil=muon_row_equil,
                renorm=muon_renorm, normuon=normuon, beta2=normuon_beta2, weight_decay=muon_weight_decay,
                cautious_wd=cautious_wd)
    muon.register_step_pre_hook(lambda opt, args, kwargs: step_bookkeeping(model, world_size, args, kwargs))
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    n_mamba = len(roles.get("conv", [])) + len(roles.get("no_decay", []))
    extra = [f"{len(roles[r])} {r}" for r in _NANOCHAT_ONLY if roles.get(r)]
    muon_opts = [name for name, on in (("Polar Express", muon_coeffs == "polar"), ("MuonEq", muon_row_equil),
                                       ("Muon+", muon_renorm), ("NorMuon", normuon)) if on]
    if muon_weight_decay:
        muon_opts.append(f"{'cautious ' if cautious_wd else ''}wd {muon_weight_decay:g}")
    print0(f"Optimizers: AdamW ({adamw_groups} groups: embedding, lm_head, {len(roles.get('router', []))} router tensors"
           + (f", {n_mamba} Mamba scalars/convs" if n_mamba else "") + "".join(f", {e}" for e in extra)
           + f"), Muon ({len(roles.get('matrix', []))} matrices" + "".join(f", {o}" for o in muon_opts) + ")"
           + (f"; states sharded over {max(owners.values()) + 1} ranks (rank {rank}: {n_mine} of {n_assigned} tensors)"
              if owners else ""))
    return [adamw, muon]


@torch.no_grad()
def step_bookkeeping(model, world_size, args, kwargs):
    """The model's once-per-optimizer-step bookkeeping, run by Muon's pre-step hook (torchtitan
    registers its expert-bias update the same way), so whoever steps the optimizer gets it:
    the tokens each expert got in this step (all micro-steps, all ranks; then reset) decide
    which experts Muon leaves alone (an idle expert is not moved) and move the aux-loss-free
    bias (at the config's rate; 0 = not moved); the MoD blocks' causal thresholds take the
    step's cuts. Returns Muon.step's (args, kwargs) with active_experts filled in."""
    from nanochat.moe import collect_step_loads, active_expert_masks, update_expert_bias
    from nanochat.mod import update_mod_thresholds
    loads = collect_step_loads(model, world_size)
    if loads is not None and model.config.aux_free_bias > 0:
        update_expert_bias(model, model.config.aux_free_bias, loads)
    update_mod_thresholds(model, world_size)
    if len(args) < 2 and "active_experts" not in kwargs:  # args[0] is the optimizer itself
        kwargs = dict(kwargs, active_experts=active_expert_masks(model, loads))
    return args, kwargs


def shard_owners(model, world_size, params=None):
    """A sharded optimizer (ZeRO-1, Rajbhandari et al. 2020): the rank that keeps each
    parameter's optimizer state and updates it. Whole tensors, since Muon orthogonalises whole
    matrices; balanced by size, largest first to the least-loaded rank. Deterministic (sorted
    is stable: ties keep model order), so every rank computes the same map."""
    loads, owners = [0] * world_size, {}
    for p in sorted(params if params is not None else model.parameters(), key=lambda p: -p.numel()):
        r = loads.index(min(loads))
        owners[p] = r
        loads[r] += p.numel()
    return owners


def reduce_grads_to_owners(model, owners, rank, world_size):
    """Sharded optimizer, after gradient accumulation: each gradient is summed onto its owner
    (a reduce-scatter at tensor granularity) and averaged there; other ranks' copies are
    scratch from here on (gloo may use them as buffers)."""
    work = [(dist.reduce(p.grad, dst=owners[p], op=dist.ReduceOp.SUM, async_op=True), p)
            for p in model.parameters() if p.grad is not None and p in owners]
    for handle, p in work:
        handle.wait()
        if owners[p] == rank:
            p.grad.div_(world_size)


def broadcast_from_owners(model, owners):
    """Sharded optimizer, after the update: every parameter from the rank that updated it (the
    all-gather), so all ranks hold the same weights for the next forward."""
    for handle in [dist.broadcast(p.data, src=owners[p], async_op=True) for p in model.parameters() if p in owners]:
        handle.wait()


def optimizer_state_bytes(optimizers):
    """Bytes of optimizer state (momenta, Adam moments) this rank holds."""
    return sum(t.numel() * t.element_size() for opt in optimizers for state in opt.state.values()
               for t in state.values() if torch.is_tensor(t))


def optimizer_state_mib_per_rank(optimizers, world_size, device):
    """[MiB of optimizer state on rank r for r in ranks] (a collective under torchrun)."""
    mine = torch.tensor([float(optimizer_state_bytes(optimizers))], device=device)
    every = [mine] if world_size == 1 else [torch.zeros_like(mine) for _ in range(world_size)]
    if world_size > 1:
        dist.all_gather(every, mine)
    return [round(t.item() / 2**20, 3) for t in every]


def all_reduce_grads(model, world_size, params=None):
    """Average gradients over ranks once per optimizer step (after gradient accumulation).
    gloo has no AVG op, so SUM then divide; all launched asynchronously, then awaited.
    params: the replicated parameters (default all; expert parallelism leaves out the experts)."""
    if world_size == 1:
        return
    grads = [p.grad for p in (params if params is not None else model.parameters()) if p.grad is not None]
    handles = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
    for h, g in zip(handles, grads):
        h.wait()
        g.div_(world_size)
