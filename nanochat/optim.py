"""
Optimizers: Muon for the hidden matrices (attention, MLP, experts), AdamW for the rest.

Muon (Keller Jordan, 2024): SGD-momentum whose update is replaced by its nearest
semi-orthogonal matrix, computed with a quintic Newton-Schulz iteration. Expert weights are
stacked (E, out, in) tensors; the iteration is batched over the leading dimension, so each
expert's matrix is orthogonalised on its own (one expert's gradient never rescales another's).
"""

import torch
import torch.distributed as dist

from nanochat.common import print0


def zeropower_via_newtonschulz5(G, steps=5):
    """Approximately orthogonalise the last two dims of G (batched over leading dims).
    Coefficients (3.4445, -4.7750, 2.0315) maximise the slope at zero, as in Muon."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()  # bf16 is fast on GPUs; CPUs prefer fp32
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights and stacked (E, out, in) expert weights, nn.Linear layout.

    Idle experts do not move. Newton-Schulz normalises whatever is in the momentum buffer, so
    an expert that got no token would otherwise take a full-size step in a stale direction
    every step for as long as it stays idle (measured before this rule: update RMS 1.2e-3 on
    every one of 40 idle steps, as large as an active expert's; dev/LOG.md). step() takes
    `active_experts` {stacked expert weight: (E,) bool, from moe.active_expert_masks}: an idle
    expert's gradient is ignored (it may be garbage on some GPU kernels), its momentum decays
    as if the gradient were zero, and its weights are left exactly as they are."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, active_experts=None):
        active_experts = active_experts or {}
        for group in self.param_groups:
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
                update = zeropower_via_newtonschulz5(g, steps=group["ns_steps"])
                if active is not None:
                    update = torch.where(active, update, torch.zeros((), dtype=update.dtype, device=update.device))
                # Orthogonal updates have unit singular values; scale tall matrices (out > in)
                # up so the per-element update size does not shrink with their aspect ratio.
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * scale)


def setup_optimizers(model, *, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, router_lr=0.004,
                     scalar_lr=0.004, weight_decay=0.0, adam_betas=(0.8, 0.95), device_type="cpu", owners=None, rank=0,
                     world_size=1):
    """Return [adamw, muon], one param group per role of model.param_roles() (the model says
    which parameter is what); each group remembers its base lr in 'initial_lr'.
    owners (shard_owners): a sharded optimizer; this rank's optimizers hold only the
    parameters it owns (the groups keep their lrs; a group may be empty on a rank).

    - Muon ("matrix"): every matrix inside the blocks (attention, dense MLP, experts, Mamba-2's
      projections), MTP heads' blocks included.
    - AdamW ("embedding", "lm_head"): lookups/classifier, not hidden transforms, with
      nanochat's 1/sqrt(d_model/768) scaling of their lrs.
    - AdamW ("router") at router_lr: the MoE gate is a small classifier (n_experts x d) whose rows
      should move at the rate their own gradients ask for. Muon would give every expert's
      logit the same update magnitude (all singular values 1), which amplifies the small,
      noisy early gradients of rarely chosen experts and fights the balance loss. The
      Mixture-of-Depths routers (a 1 x d row each) join them.
    - AdamW ("conv", "no_decay") at scalar_lr: Mamba-2's depthwise conv, and its per-head A_log,
      D and dt_bias, which are never weight-decayed (the reference marks them no-decay).

    Muon's step runs the model's per-step bookkeeping first (a pre-step hook: step_bookkeeping),
    so a plain muon.step() leaves experts that got no token in this step where they are.
    world_size: the processes whose token counts the bookkeeping sums.
    """
    lr_scale = (model.config.n_embd / 768) ** -0.5
    roles = model.param_roles()
    mine = (lambda p: True) if owners is None else (lambda p: owners.get(p, rank) == rank)  # unlisted: local (EP experts)
    adam_groups = [dict(params=roles["lm_head"], lr=unembedding_lr * lr_scale),
                   dict(params=roles["embedding"], lr=embedding_lr * lr_scale),
                   dict(params=roles["router"], lr=router_lr),
                   dict(params=roles["conv"], lr=scalar_lr),
                   dict(params=roles["no_decay"], lr=scalar_lr, weight_decay=0.0)]
    adam_groups = [g for g in adam_groups if g["params"]]
    n_assigned = sum(len(params) for params in roles.values())
    for g in adam_groups:
        g["params"] = [p for p in g["params"] if mine(p)]
    matrix_params = [p for p in roles["matrix"] if mine(p)]
    n_mine = sum(len(g["params"]) for g in adam_groups) + len(matrix_params)
    adamw = torch.optim.AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay,
                              fused=(device_type == "cuda"))
    muon = Muon([dict(params=matrix_params)], lr=matrix_lr, momentum=0.95)
    muon.register_step_pre_hook(lambda opt, args, kwargs: step_bookkeeping(model, world_size, args, kwargs))
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    n_mamba = len(roles["conv"]) + len(roles["no_decay"])
    print0(f"Optimizers: AdamW (embedding, lm_head, {len(roles['router'])} router tensors"
           + (f", {n_mamba} Mamba scalars/convs" if n_mamba else "") + f"), Muon ({len(roles['matrix'])} matrices)"
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
