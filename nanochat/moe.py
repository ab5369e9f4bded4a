"""
Token-choice top-k Mixture-of-Experts, dropless, in four small steps:

    route      logits = x @ gate.T -> softmax -> top-k experts per token (+ renormalised weights)
    dispatch   sort the N*k (token, expert) assignments by expert -> one permutation + offsets
    experts    two grouped matrix multiplies over the sorted rows (stacked expert weights)
    combine    un-permute and take each token's weighted sum over its k expert outputs

Every tensor has a shape fixed by (tokens, k, experts): nothing depends on how many tokens an
expert got, so experts that receive no token are fine and torch.compile sees static shapes.
There is no Python loop over experts on the hot path; `naive_moe_forward` (a loop with boolean
masks, the approach this project replaces) is kept only as the reference for tests/benchmarks.

Balance loss: Switch Transformer (Fedus et al. 2021, eq. 4-6), N * sum_i f_i * P_i.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def route(x, gate_weight, topk):
    """Softmax router. x: (N, d), gate_weight: (E, d).
    Returns weights (N, k) fp32 summing to 1 per token, expert ids (N, k), probs (N, E) fp32.
    Router math is fp32 even under bf16 autocast: softmax over near-equal logits is where
    low precision flips top-k choices."""
    logits = F.linear(x.float(), gate_weight.float())
    probs = torch.softmax(logits, dim=-1)
    topk_probs, expert_ids = torch.topk(probs, topk, dim=-1)
    # Renormalise over the chosen k (as in Mixtral) so the MoE output has the scale of one
    # dense MLP regardless of k and E; with k=1 the weight is 1 and the gate would get no
    # gradient, so for top-1 keep the raw probability (Switch).
    weights = topk_probs / topk_probs.sum(dim=-1, keepdim=True) if topk > 1 else topk_probs
    return weights, expert_ids, probs


def switch_balance_loss(probs, expert_ids, n_experts):
    """Switch balance loss N * sum_i f_i * P_i. f_i: fraction of the N*k assignments that went
    to expert i (counts, no gradient); P_i: mean router probability of expert i (carries the
    gradient). Equals 1 whenever P is uniform, and is minimised (=1) by balanced routing."""
    counts = torch.bincount(expert_ids.flatten(), minlength=n_experts)
    f = counts.to(probs.dtype) / expert_ids.numel()
    p = probs.mean(dim=0)
    return n_experts * torch.sum(f * p)


def dispatch(expert_ids, n_experts):
    """Sort assignments by expert. Returns
    order (N*k,)    : permutation of the flattened assignments, grouped by expert
    token_ids (N*k,): the token each sorted row comes from
    offsets (E,)    : int32 end offset of each expert's group (the grouped_mm convention)
    All on device, no host sync."""
    flat = expert_ids.flatten()
    order = torch.argsort(flat, stable=True)
    token_ids = order // expert_ids.size(1)
    counts = torch.bincount(flat, minlength=n_experts)
    offsets = torch.cumsum(counts, dim=0).to(torch.int32)
    return order, token_ids, offsets


def _grouped_mm_ok(x, w):
    """Can torch's grouped_mm run these operands here? Measured on torch 2.13 (shared/FACTS.md):
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
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    chunks = torch.split(x, counts, dim=0)
    return torch.cat([F.linear(chunk, w[e]) for e, chunk in enumerate(chunks)], dim=0)


def expert_mlp(x_sorted, w_fc, w_proj, offsets):
    """The experts, all at once: relu(x W_fc^T)^2 W_proj^T per expert group (same form as the
    dense MLP). Under autocast the operands are cast explicitly, since grouped_mm is not on
    autocast's op list and the CUDA kernel wants bf16."""
    dtype = x_sorted.dtype
    if x_sorted.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    elif torch.compiler.is_compiling() and x_sorted.device.type == "cpu":
        dtype = torch.bfloat16  # see _grouped_mm_ok: compiled grouped_mm wants bf16
    h = grouped_linear(x_sorted.to(dtype), w_fc.to(dtype), offsets)
    h = F.relu(h).square()
    return grouped_linear(h, w_proj.to(dtype), offsets)


def combine(y_sorted, order, weights):
    """Undo the sort and take each token's weighted sum over its k expert outputs.
    y_sorted: (N*k, d) in dispatch order, weights: (N, k). A scatter to the original
    assignment order, then a batched (1 x k) @ (k x d) product: deterministic, no atomics."""
    n_tokens, k = weights.shape
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y.view(n_tokens, k, -1)).squeeze(1)


class MoE(nn.Module):
    """Drop-in replacement for the dense MLP: (B, T, d) -> ((B, T, d), balance_loss)."""

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.n_experts = config.n_experts
        self.topk = config.expert_topk
        self.hidden = expert_hidden_dim(config)
        self.router = nn.Linear(d, config.n_experts, bias=False)
        # Stacked expert weights in nn.Linear layout (out, in): one tensor per matrix kind, so
        # the optimizer sees a (E, out, in) batch and Muon orthogonalises each expert separately.
        self.w_fc = nn.Parameter(torch.empty(config.n_experts, self.hidden, d))
        self.w_proj = nn.Parameter(torch.empty(config.n_experts, d, self.hidden))

    def forward(self, x):
        B, T, d = x.shape
        x_flat = x.reshape(B * T, d)
        weights, expert_ids, probs = route(x_flat, self.router.weight, self.topk)
        balance_loss = switch_balance_loss(probs, expert_ids, self.n_experts)
        order, token_ids, offsets = dispatch(expert_ids, self.n_experts)
        y_sorted = expert_mlp(x_flat[token_ids], self.w_fc, self.w_proj, offsets)
        out = combine(y_sorted, order, weights)
        return out.to(x.dtype).view(B, T, d), balance_loss


def expert_hidden_dim(config):
    """Hidden width of one expert: expert_hidden_mult x n_embd (fractions allowed, e.g. 0.5 for
    fine-grained experts), rounded to an integer."""
    return max(1, int(round(config.expert_hidden_mult * config.n_embd)))


def naive_moe_forward(x, gate_weight, w_fc, w_proj, topk):
    """REFERENCE ONLY, never on the training path: the per-expert Python loop with boolean
    masks that earlier MoE code used. Host syncs and data-dependent shapes per expert make it
    slow on GPUs and hostile to torch.compile. x: (N, d). Returns (N, d)."""
    weights, expert_ids, _ = route(x, gate_weight, topk)
    out = torch.zeros_like(x)
    for e in range(w_fc.size(0)):
        mask = expert_ids == e                      # (N, k)
        token_mask = mask.any(dim=-1)               # tokens that chose e
        if not token_mask.any():
            continue
        w_e = (weights * mask).sum(dim=-1)[token_mask]
        h = F.relu(x[token_mask] @ w_fc[e].T).square()
        out[token_mask] += w_e.unsqueeze(-1).to(x.dtype) * (h @ w_proj[e].T)
    return out
