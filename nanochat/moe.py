"""
Token-choice top-k Mixture-of-Experts in four small steps:

    route      logits = x @ gate.T -> softmax (or sigmoid) scores -> top-k experts per token
    dispatch   sort the N*k (token, expert) assignments by expert -> one permutation + offsets
    experts    two grouped matrix multiplies over the sorted rows (stacked expert weights)
    combine    un-permute and take each token's weighted sum over its k expert outputs

Dropless by default: every tensor has a shape fixed by (tokens, k, experts), nothing depends
on how many tokens an expert got, experts that receive no token are fine and torch.compile
sees static shapes. With a capacity factor, each expert takes at most C tokens (the overflow
skips that expert and keeps only the residual path) and runs as one padded batched matmul.
There is no Python loop over experts on the hot path; `naive_moe_forward` (a loop with
boolean masks, the approach this project replaces) is the reference for tests/benchmarks.

Options (GPTConfig): router softmax|sigmoid (DeepSeek-V3), route_scale, shared experts,
an auxiliary-loss-free balancing bias (DeepSeek-V3, Wang et al. 2024), capacity factor
(Switch). Losses returned for the trainer to weight: Switch balance loss (Fedus et al. 2021,
eq. 4-6) and router z-loss (ST-MoE, Zoph et al. 2022, eq. 5).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

# Layout of MoE.stats after the per-expert counts: running sums since the last read.
STAT_FIELDS = ("entropy", "tokens", "dropped", "balance_loss", "z_loss", "forwards")


def route(x, gate_weight, topk, router="softmax", bias=None, route_scale=1.0, expert_ids=None):
    """x: (N, d), gate_weight: (E, d). Returns
    weights (N, k) fp32: how much each chosen expert's output counts (sum = route_scale; for
                         top-1 the raw score times route_scale, as in Switch),
    expert_ids (N, k),   column 0 is each token's first choice, column 1 its second, ...
    probs (N, E) fp32:   each token's normalised affinity to every expert (for balance/entropy),
    logits (N, E) fp32:  for the z-loss.
    `bias` (E,) shifts only which experts are chosen, never the weights (aux-free balancing).
    `expert_ids` (N, k), when given, are used instead of choosing: growth verification forces a
    grown model to make its source's choices (nanochat/grow.py), since rounding can flip a tie.
    Router math is fp32 even inside a bf16 autocast region: near-equal logits are where low
    precision flips top-k choices (measured: 0.38% of 16k tokens changed their top-2 of 8 under
    CPU bf16 autocast; bf16 operands with fp32 accumulation flip 0.3-0.6%, TF32 0.04-0.07% at
    init, dev/LOG.md). Casting the operands is not enough, linear is on autocast's list and
    would be cast back to bf16, so autocast is switched off here; and the logits are
    fp32-accurate where fp32 matmuls run as TF32 (fp32_linear)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = fp32_linear(x.float(), gate_weight.float())
        if router == "sigmoid":
            # DeepSeek-V3: independent per-expert affinities; weights are the chosen affinities
            # renormalised, so experts do not compete through a softmax denominator.
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            scores = probs = torch.softmax(logits, dim=-1)
        choice = scores if bias is None else scores + bias.float()
        if expert_ids is None:
            expert_ids = torch.topk(choice, topk, dim=-1).indices
        chosen = scores.gather(1, expert_ids)
        if topk == 1:
            weights = chosen  # renormalising one weight gives 1 and the gate would get no gradient
        else:
            weights = chosen / chosen.sum(dim=-1, keepdim=True)
        return weights * route_scale, expert_ids, probs, logits


def tf32_round(x):
    """fp32 -> the nearest value with TF32's 10 mantissa bits (round to nearest even): what a
    TF32 tensor core reads of an fp32 operand."""
    i = x.contiguous().view(torch.int32)
    i = (i + (0xFFF + ((i >> 13) & 1))) & ~0x1FFF
    return i.view(torch.float32)


def fp32_linear(x, w, split=None):
    """x @ w.T to fp32 accuracy. On CUDA with TF32 matmuls allowed (nanochat.common turns them
    on), a plain fp32 matmul rounds its operands to 10 mantissa bits; then each operand is split
    into its TF32 part and the remainder and three TF32 products are summed (the "3xTF32"
    scheme: the dropped remainder x remainder term is below fp32's precision). Elsewhere (CPU,
    TF32 off) one fp32 matmul. For routers: tiny (E x d) matmuls whose top-k flips at TF32.
    split: force the three-product form (True) or the plain matmul (False); None = as above."""
    if split is None:
        split = x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    if not split:
        return F.linear(x, w)
    x_hi, w_hi = tf32_round(x), tf32_round(w)
    return F.linear(x_hi, w_hi) + (F.linear(x - x_hi, w_hi) + F.linear(x_hi, w - w_hi))


def expert_counts(expert_ids, n_experts):
    """Assignments per expert, (E,) int64. A scatter-add into a fixed (E,) buffer rather than
    bincount: bincount's output length depends on the data, which breaks the torch.compile graph
    (measured: 11 graph breaks in a 2-layer MoE); this shape never changes."""
    flat = expert_ids.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def group_sizes(offsets):
    """Rows per expert from grouped_mm end offsets: (E,) int64."""
    ends = offsets.long()
    return torch.diff(ends, prepend=ends.new_zeros(1))


def switch_balance_loss(probs, expert_ids, n_experts, counts=None):
    """Switch balance loss N * sum_i f_i * P_i. f_i: fraction of the N*k assignments that went
    to expert i (counts, no gradient; pass them when already known); P_i: mean router
    probability of expert i (carries the gradient). Equals 1 whenever P is uniform, and is
    minimised (=1) by balanced routing."""
    if counts is None:
        counts = expert_counts(expert_ids, n_experts)
    f = counts.to(probs.dtype) / expert_ids.numel()
    p = probs.mean(dim=0)
    return n_experts * torch.sum(f * p)


def router_z_loss(logits):
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2. Keeps router logits small, where
    bf16 rounding and softmax saturation do no harm."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def sort_keys(ids, n_values):
    """ids in [0, n_values) as the narrowest integers that hold them (uint8 up to 256): a radix
    sort passes over every bit of its key type, so 8-bit keys take one pass where int64 takes
    eight; the stable order is the same (7-9x faster on our CPU, dev/LOG.md)."""
    return ids.to(torch.uint8 if n_values <= 256 else torch.int32)


def dispatch(expert_ids, n_experts, choice_major=False):
    """Sort assignments by expert. Returns
    order (N*k,)    : permutation of the flattened (token-major) assignments, grouped by expert
    token_ids (N*k,): the token each sorted row comes from
    offsets (E,)    : int32 end offset of each expert's group (the grouped_mm convention)
    Inside an expert's group, rows are in token order (choice_major=False), or all first
    choices in token order, then all second choices, ... (choice_major=True: the priority a
    capacity limit needs, GShard). All on device, no host sync.
    The sort keys are narrow (sort_keys)."""
    n_tokens, k = expert_ids.shape
    keys = sort_keys(expert_ids, n_experts)
    if choice_major:
        by_choice = torch.argsort(keys.t().flatten(), stable=True)  # index j = choice * N + token
        order = (by_choice % n_tokens) * k + by_choice // n_tokens  # back to token-major indices
    else:
        order = torch.argsort(keys.flatten(), stable=True)
    token_ids = order // k
    counts = expert_counts(expert_ids, n_experts)
    offsets = torch.cumsum(counts, dim=0).to(torch.int32)
    return order, token_ids, offsets


def inverse_permutation(order):
    """inverse[order[i]] = i: where each assignment (token-major) sits in the sorted order."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


class _GatherRows(torch.autograd.Function):
    """out = x[index] whose backward is a gather too: grad_x = grad_out[inverse], summed over the
    `repeats` consecutive rows that came from the same x row. Plain indexing would backpropagate
    with a scatter-add (index_put with accumulate): slower on CPU (measured in dev/LOG.md) and
    atomic, hence non-deterministic, on GPUs. Valid because every x row is used exactly `repeats`
    times and `inverse` lists them token-major."""

    @staticmethod
    def forward(ctx, x, index, inverse, repeats):
        ctx.save_for_backward(inverse)
        ctx.repeats = repeats
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        grad = grad_out.index_select(0, inverse)
        if ctx.repeats > 1:
            grad = grad.view(-1, ctx.repeats, grad.size(-1)).sum(dim=1)
        return grad, None, None, None


def gather_tokens(x, token_ids, inverse, topk):
    """Dispatch: the sorted (N*k, d) expert inputs, row i = x[token_ids[i]] (one permutation)."""
    return _GatherRows.apply(x, token_ids, inverse, topk)


def capacity_slots(expert_ids, order, offsets, capacity):
    """For capacity-limited routing: the slot (expert * C + position in the expert's group) of
    each sorted assignment, or E * C (an overflow slot that is thrown away) when the expert is
    full. Who wins a full expert is decided by `order` (dispatch with choice_major=True: first
    choices before second choices, then earlier tokens). Returns (slots, kept mask)."""
    n_experts = offsets.numel()
    sorted_experts = expert_ids.flatten()[order]
    starts = offsets.long() - group_sizes(offsets)
    position = torch.arange(order.numel(), device=order.device) - starts[sorted_experts]
    kept = position < capacity
    slots = torch.where(kept, sorted_experts * capacity + position, n_experts * capacity)
    return slots, kept


def _grouped_mm_ok(x, w):
    """Can torch's grouped_mm run these operands here? Measured on torch 2.13 (CPU, dev/LOG.md):
    on CPU it runs fp32/bf16 eagerly but needs 16-byte aligned row strides; under
    torch.compile its meta kernel only accepts bf16; on CUDA it needs bf16 and sm80+."""
    if not hasattr(F, "grouped_mm"):
        return False
    if (x.size(-1) * x.element_size()) % 16 or (w.size(-2) * w.element_size()) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if torch.compiler.is_compiling():
        return x.dtype == torch.bfloat16
    return x.device.type == "cpu"


def grouped_linear(x, w, offsets):
    """Rows x[offsets[e-1]:offsets[e]] @ w[e].T for each expert e. x: (M, in), w: (E, out, in)
    in nn.Linear layout. Uses torch's grouped GEMM when it can, else a loop over slices
    (one host sync for the counts; correct, just slower)."""
    if _grouped_mm_ok(x, w):
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    chunks = torch.split(x, group_sizes(offsets).tolist(), dim=0)
    return torch.cat([F.linear(chunk, w[e]) for e, chunk in enumerate(chunks)], dim=0)


def _autocast_dtype(x):
    """The dtype CUDA autocast runs x's matmuls in (bf16 in training), else x's own: what the
    MoE gathers its tokens in."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def _compute_dtype(x):
    """Under autocast, cast expert operands explicitly: grouped_mm and bmm on stacked weights are
    not all on autocast's op lists, and the CUDA grouped kernel wants bf16."""
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return torch.bfloat16  # see _grouped_mm_ok: compiled grouped_mm wants bf16
    return _autocast_dtype(x)


def relu2(x):
    """The MLP nonlinearity, dense and experts alike: relu(x)^2 (So et al. 2021, Primer)."""
    return F.relu(x).square()


def expert_mlp(x_sorted, w_fc, w_proj, offsets):
    """The experts, all at once: relu2(x W_fc^T) W_proj^T per expert group (same form as the
    dense MLP), over rows sorted by expert."""
    dtype = _compute_dtype(x_sorted)
    h = relu2(grouped_linear(x_sorted.to(dtype), w_fc.to(dtype), offsets))
    return grouped_linear(h, w_proj.to(dtype), offsets)


def expert_mlp_padded(x_slots, w_fc, w_proj):
    """The experts on a fixed (E, C, d) buffer: two batched matmuls, no jagged shapes."""
    dtype = _compute_dtype(x_slots)
    h = relu2(torch.bmm(x_slots.to(dtype), w_fc.to(dtype).transpose(1, 2)))
    return torch.bmm(h, w_proj.to(dtype).transpose(1, 2))


def combine(y_sorted, order, inverse, weights):
    """Undo the sort and take each token's weighted sum over its k expert outputs, in fp32.
    y_sorted: (N*k, d) in dispatch order, weights: (N, k) fp32 -> (N, d) fp32. A gather back to
    token-major order (its backward is the gather by `order`: deterministic, no atomics, no
    scatter), then a product with the weights and a sum over k: elementwise work that
    torch.compile fuses into one kernel. Not a batched (1 x k) @ (k x d) matmul per token:
    cuBLAS runs such tiny batched products far below memory bandwidth."""
    n_tokens, k = weights.shape
    y = _GatherRows.apply(y_sorted, inverse, order, 1).view(n_tokens, k, -1)
    return (y.float() * weights.unsqueeze(-1)).sum(dim=1)


def expert_hidden_dim(config):
    """Hidden width of one expert: expert_hidden_mult x n_embd (fractions allowed, e.g. 0.5 for
    fine-grained experts), rounded to an integer."""
    return max(1, int(round(config.expert_hidden_mult * config.n_embd)))


class MoE(nn.Module):
    """Drop-in replacement for the dense MLP: (B, T, d) -> ((B, T, d), {balance_loss, z_loss})."""

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.n_experts = config.n_experts
        self.topk = config.expert_topk
        self.router_kind = config.router
        self.route_scale = config.route_scale
        self.capacity_factor = config.capacity_factor
        self.hidden = expert_hidden_dim(config)
        self.router = nn.Linear(d, config.n_experts, bias=False)
        # Stacked expert weights in nn.Linear layout (out, in): one tensor per matrix kind, so
        # the optimizer sees a (E, out, in) batch and Muon orthogonalises each expert separately.
        self.w_fc = nn.Parameter(torch.empty(config.n_experts, self.hidden, d))
        self.w_proj = nn.Parameter(torch.empty(config.n_experts, d, self.hidden))
        # Shared experts are always on for every token. n of them of width h are one MLP of
        # width n*h (relu^2 acts per hidden unit), so they are held as one pair of linears.
        self.n_shared = config.n_shared_experts
        if self.n_shared:
            self.shared_fc = nn.Linear(d, self.n_shared * self.hidden, bias=False)
            self.shared_proj = nn.Linear(self.n_shared * self.hidden, d, bias=False)
        # Aux-loss-free balancing bias: used only to choose experts, moved once per optimizer step
        # at the rate config.aux_free_bias (update_expert_bias; 0 = never moved), saved with the
        # weights (persistent buffer). Always used to choose: a trained bias is part of the
        # function the weights compute, whatever the rate of a run that continues from them;
        # an untrained one is zero and changes nothing.
        self.register_buffer("expert_bias", torch.zeros(config.n_experts), persistent=True)
        # Verification only (nanochat/grow.py): (B*T, k) expert ids to use instead of choosing.
        self.forced_expert_ids = None
        # Which implementation runs the dropless experts (run_experts): "grouped" (expert_mlp
        # here), "fp8" (set by nanochat.fp8.convert_to_fp8) or "expert_parallel" (set by
        # nanochat.expert_parallel.enable_expert_parallel, with ep_group/ep_size).
        self.expert_path = "grouped"
        self.ep_group, self.ep_size = None, 1
        # Expert parallelism (nanochat/expert_parallel.py): the block of global experts this
        # rank holds, or None (all of them)
        self.local_experts = None
        # Training-time accumulators, read and reset by the trainer (no host sync in forward):
        # assignments per expert since the last optimizer step (always kept: the optimizer
        # must know which experts got no token, and the aux-free bias reads it too), and stats
        # since the last log.
        self.register_buffer("load_since_step", torch.zeros(config.n_experts), persistent=False)
        self.register_buffer("stats", torch.zeros(config.n_experts + len(STAT_FIELDS)), persistent=False)

    # Router init: logit std ROUTER_INIT_LOGIT_STD on the unit-RMS (normed) input. A zero gate
    # ties every logit, so top-k sends every token to the same k experts and only k experts
    # learn at step 0 (measured: 62 of 64 experts dead at step 0, ~25 still dead at step 20).
    # Small random weights give every token its own top-k while the scores stay near uniform,
    # so no expert starts favoured (the same idea as the 0.02-std gates of Mixtral/torchtitan,
    # but independent of the width).
    ROUTER_INIT_LOGIT_STD = 0.1

    @torch.no_grad()
    def init_weights(self):
        """Experts like the dense MLP (uniform input projection with a unit-variance fan-in
        std, zero output projection, so the layer starts as zero), a small random router,
        zeroed buffers (the model is built on the meta device, they are uninitialised)."""
        d = self.router.in_features
        s = 3**0.5 * d**-0.5  # uniform(-s, s) has std d^-0.5
        if self.local_experts is None:
            nn.init.uniform_(self.w_fc, -s, s)
        else:  # draw every expert (the same random stream as one process), keep this rank's block
            every = torch.empty(self.n_experts, *self.w_fc.shape[1:], device=self.w_fc.device, dtype=self.w_fc.dtype)
            self.w_fc.copy_(nn.init.uniform_(every, -s, s)[self.local_experts])
        nn.init.zeros_(self.w_proj)
        nn.init.normal_(self.router.weight, std=self.ROUTER_INIT_LOGIT_STD * d**-0.5)
        if self.n_shared:
            nn.init.uniform_(self.shared_fc.weight, -s, s)
            nn.init.zeros_(self.shared_proj.weight)
        for buf in (self.expert_bias, self.load_since_step, self.stats):
            buf.zero_()

    def keep_local_experts(self, ep_rank, ep_size):
        """Expert parallelism: keep only the contiguous block of E/N experts this rank holds.
        On the meta device (gpt.build_model's expert_shard) nothing is ever allocated for the
        others; init_weights then draws one layer's experts at a time and keeps the block."""
        assert self.n_experts % ep_size == 0, "n_experts must be a multiple of the EP size"
        n_local = self.n_experts // ep_size
        self.local_experts = slice(ep_rank * n_local, (ep_rank + 1) * n_local)
        self.w_fc = nn.Parameter(self.w_fc.detach()[self.local_experts].clone())
        self.w_proj = nn.Parameter(self.w_proj.detach()[self.local_experts].clone())

    def param_roles(self):
        """Optimizer roles (GPT.param_roles): the gate is a router (AdamW), the rest matrices."""
        return {"router": [self.router.weight], "matrix": [p for p in self.parameters() if p is not self.router.weight]}

    def run_experts(self, x_sorted, offsets):
        """The dropless experts on rows sorted by expert, by self.expert_path (the seam other
        implementations plug into by name; imported here, where used, since they import this
        module): y_sorted (M, d)."""
        if self.expert_path == "fp8":
            from nanochat.fp8 import expert_mlp_fp8
            return expert_mlp_fp8(x_sorted, self.w_fc, self.w_proj, offsets)
        if self.expert_path == "expert_parallel":
            from nanochat.expert_parallel import exchange_experts
            return exchange_experts(x_sorted, self.w_fc, self.w_proj, offsets, self.ep_group, self.ep_size)
        assert self.expert_path == "grouped", f"unknown expert path {self.expert_path!r}"
        return expert_mlp(x_sorted, self.w_fc, self.w_proj, offsets)

    def param_counts(self):
        """{experts, shared_experts, router, inactive}: inactive = the routed experts a token
        does not use, (n_experts - topk) of them. Shared experts run for every token."""
        experts = self.w_fc.numel() + self.w_proj.numel()
        shared = self.shared_fc.weight.numel() + self.shared_proj.weight.numel() if self.n_shared else 0
        return dict(experts=experts, shared_experts=shared, router=self.router.weight.numel(),
                    inactive=(self.n_experts - self.topk) * experts // self.n_experts)

    def forward(self, x):
        B, T, d = x.shape
        x_flat = x.reshape(B * T, d)
        n_tokens = B * T
        weights, expert_ids, probs, logits = route(x_flat, self.router.weight, self.topk, self.router_kind,
                                                   self.expert_bias, self.route_scale,
                                                   self.forced_expert_ids)
        # Capacity is a training-time device (it regularises and bounds memory); evaluation and
        # inference are dropless, so a sequence's output never depends on its batch mates.
        use_capacity = self.capacity_factor > 0 and self.training
        order, token_ids, offsets = dispatch(expert_ids, self.n_experts, choice_major=use_capacity)
        counts = group_sizes(offsets)  # assignments per expert, counted once (in dispatch)
        balance_loss = switch_balance_loss(probs, expert_ids, self.n_experts, counts)
        z_loss = router_z_loss(logits)
        inverse = inverse_permutation(order)
        # dispatch in the experts' dtype: under bf16 autocast the gather (and the expert-parallel
        # exchange) moves bf16 rows, half the bytes of the fp32 residual stream
        x_sorted = gather_tokens(x_flat.to(_autocast_dtype(x_flat)), token_ids, inverse, self.topk)
        if use_capacity:
            capacity = math.ceil(self.capacity_factor * n_tokens * self.topk / self.n_experts)
            slots, kept = capacity_slots(expert_ids, order, offsets, capacity)
            x_slots = x_sorted.new_zeros(self.n_experts * capacity + 1, d).index_copy(0, slots, x_sorted)
            y_slots = expert_mlp_padded(x_slots[:-1].view(self.n_experts, capacity, d), self.w_fc, self.w_proj)
            y_slots = torch.cat([y_slots.reshape(-1, d), y_slots.new_zeros(1, d)])  # overflow slot reads 0
            y_sorted = y_slots[slots]
            n_dropped = (~kept).sum()
        else:
            y_sorted = self.run_experts(x_sorted, offsets)
            n_dropped = x.new_zeros((), dtype=torch.float32)
        out = combine(y_sorted, order, inverse, weights)
        if self.n_shared:
            out = out + self.shared_proj(relu2(self.shared_fc(x_flat))).to(out.dtype)
        if self.training:
            with torch.no_grad():
                counts = counts.float()
                self.load_since_step += counts
                entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum()
                # filled on the device: torch.tensor(python number, device=cuda) would be a blocking copy
                extra = torch.stack([entropy, entropy.new_full((), n_tokens), n_dropped.float(),
                                     balance_loss.detach(), z_loss.detach(), entropy.new_ones(())])
                self.stats += torch.cat([counts, extra])
        return out.to(x.dtype).view(B, T, d), {"balance_loss": balance_loss, "z_loss": z_loss}


# ---------------------------------------------------------------------------------------------
# Trainer-side helpers: the aux-free bias update and the routing statistics of every MoE layer

def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


def _all_reduce_sum(t, world_size):
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def collect_step_loads(model, world_size=1):
    """Once per optimizer step: assignments per expert of every MoE layer, (L, E) float, summed
    over the gradient-accumulation micro-steps (the buffers accumulate) and over ranks, so
    every rank sees the same numbers; then reset. None for a dense model."""
    layers = moe_layers(model)
    if not layers:
        return None
    loads = _all_reduce_sum(torch.stack([m.load_since_step for m in layers]), world_size)
    for m in layers:
        m.load_since_step.zero_()
    return loads


def active_expert_masks(model, loads):
    """{expert weight tensor: (E,) bool, True for experts that received at least one token in
    this optimizer step}, for Muon (optim.Muon.step skips the others). Counting tokens, not
    testing gradients for zero: a GPU grouped GEMM may return garbage gradients for empty
    groups (pytorch/pytorch#172439, bf16 grouped_mm on Blackwell)."""
    if loads is None:
        return {}
    masks = {}
    for m, load in zip(moe_layers(model), loads):
        active = load > 0
        if m.local_experts is not None:  # expert parallelism: this rank's block of experts
            active = active[m.local_experts]
        masks[m.w_fc] = active
        masks[m.w_proj] = active
    return masks


@torch.no_grad()
def update_expert_bias(model, rate, loads):
    """After each optimizer step: bias += rate * sign(mean_load - load), mean-centred so the
    biases do not drift together. `loads` from collect_step_loads (all micro-steps, all
    ranks), so every rank applies the same update."""
    for m, load in zip(moe_layers(model), loads):
        step = torch.sign(load.mean() - load)
        m.expert_bias += rate * (step - step.mean())


@torch.no_grad()
def collect_moe_stats(model, world_size=1):
    """Routing statistics of every MoE layer since the last call (then reset), summed over
    ranks: one list of dicts (one per layer). One host sync for all layers."""
    layers = moe_layers(model)
    if not layers:
        return []
    stacked = _all_reduce_sum(torch.stack([m.stats for m in layers]), world_size)
    for m in layers:
        m.stats.zero_()
    out = []
    for m, row in zip(layers, stacked.tolist()):
        counts, extra = row[:m.n_experts], dict(zip(STAT_FIELDS, row[m.n_experts:]))
        total = sum(counts)
        forwards = max(extra["forwards"], 1.0)
        load = [c / total if total else 0.0 for c in counts]
        mean = total / m.n_experts
        std = math.sqrt(sum((c - mean) ** 2 for c in counts) / m.n_experts)
        out.append(dict(
            load=[round(v, 5) for v in load],
            cv=std / mean if mean else 0.0,                  # coefficient of variation of the load
            max_load=max(counts) / mean if mean else 0.0,    # x the balanced load
            min_load=min(counts) / mean if mean else 0.0,
            dead=sum(1 for c in counts if c == 0),           # experts that got no token at all
            entropy=extra["entropy"] / max(extra["tokens"], 1.0),  # nats per token
            dropped=extra["dropped"] / max(total, 1.0),      # fraction of assignments dropped
            balance_loss=extra["balance_loss"] / forwards,
            z_loss=extra["z_loss"] / forwards,
        ))
    return out


def format_moe_stats(step, layers):
    """One step-log line summarising collect_moe_stats over the layers."""
    n = len(layers)
    return (f"  moe   | step {step:05d} | load cv {sum(s['cv'] for s in layers) / n:.3f} "
            f"| max/min load {max(s['max_load'] for s in layers):.2f}/{min(s['min_load'] for s in layers):.2f} "
            f"| dead {sum(s['dead'] for s in layers)} | entropy {sum(s['entropy'] for s in layers) / n:.3f} "
            f"| dropped {sum(s['dropped'] for s in layers) / n:.4f} | z {sum(s['z_loss'] for s in layers) / n:.3f}")


def newly_dead_experts(streaks, layers, intervals=3):
    """Count, per (layer, expert), the consecutive stats intervals without a single token
    (`streaks` is updated in place); return the experts that just reached `intervals`."""
    dead = []
    for i, s in enumerate(layers):
        for e, share in enumerate(s["load"]):
            streaks[i, e] = streaks.get((i, e), 0) + 1 if share == 0 else 0
            if streaks[i, e] == intervals:
                dead.append((i, e))
    return dead


def naive_moe_forward(x, gate_weight, w_fc, w_proj, topk, router="softmax"):
    """REFERENCE ONLY, never on the training path: the per-expert Python loop with boolean
    masks that earlier MoE code used (dropless, no bias). Host syncs and data-dependent
    shapes per expert make it slow on GPUs and hostile to torch.compile. x: (N, d) -> (N, d)."""
    weights, expert_ids, _, _ = route(x, gate_weight, topk, router)
    out = torch.zeros_like(x)
    for e in range(w_fc.size(0)):
        mask = expert_ids == e                      # (N, k)
        token_mask = mask.any(dim=-1)               # tokens that chose e
        if not token_mask.any():
            continue
        w_e = (weights * mask).sum(dim=-1)[token_mask]
        h = relu2(x[token_mask] @ w_fc[e].T)
        out[token_mask] += w_e.unsqueeze(-1).to(x.dtype) * (h @ w_proj[e].T)
    return out
