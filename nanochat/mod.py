"""
Mixture-of-Depths (Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating compute in
transformer-based language models"): a routed block processes only some of the tokens; the
others pass it through the residual stream untouched. The block keeps all its parameters
(MoD saves compute, not parameters: every weight is active, each on fewer tokens).

    training   router score r = w . norm(x) per token; the block runs on the top k = C*T
               tokens of each sequence (static shapes: k is fixed by the sequence length),
               gathered in position order with their own rotary positions, attending causally
               among themselves; the results are scattered back.
    gate       the chosen tokens' residual branches are multiplied by a straight-through
               router weight 1 + (s - stopgrad(s)), s = sigmoid(r): exactly 1 in the forward
               pass, so the router is trained by the gradient of the block's output (as with
               Raposo's r * f(x)) but the output is not rescaled. Capacity 1.0 is therefore
               exactly the dense model (tested bit for bit), and a token's block output does
               not depend on how confident the router was.
    causal     top-k over the sequence lets later tokens decide for earlier ones, which an
               evaluation or a sampler cannot do. A token's own score is causal; only the
               per-sequence cut (the k-th largest score) is not. So in eval mode and in
               generation a token is processed when its score is above a calibrated threshold:
               the score above which C of the training tokens fall (the cut of the top C·B·T
               scores of each micro-batch, averaged per optimizer step over micro-batches and
               ranks, then a running mean; a buffer saved with the weights), so the rule
               processes about C of the tokens, as training did. Val bpb is reported under
               this rule; its agreement with the top-k choice is logged. (The mean of the
               per-sequence cuts, tried first, processed only 4-7% at C = 12.5%: the score
               distributions of sequences differ, and the mean cut is not the batch's.)
               Raposo et al.'s own proposals, a predictor (or router) trained by binary
               cross-entropy on the top-k labels and thresholded at probability 0.5, were
               tried first (a linear predictor on the detached input): at 12.5% capacity on
               techmix its probability stayed under 0.5 for almost every token for the first
               ~150 steps (the rule processed < 1% of the tokens), and at the end of the run
               it processed 6-7% of them, not 12.5% (dev/LOG.md): BCE-trained probabilities
               of a rare label rarely clear 0.5. A calibrated threshold processes C by
               construction, and needs no extra weights.
    cache      the KV cache of a routed block holds only the tokens it processed, packed per
               row (engine.KVCache.append_routed), their keys rotated at their absolute
               positions; a decode step whose token is skipped by every row skips the block.

The pieces (scores, top-k positions, gather/scatter, the gate, the threshold and its
statistics, the routed attention mask) are small functions here; nanochat/gpt.py's Block
wires them.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from nanochat.moe import fp32_linear


def mod_tokens(seq_len, capacity):
    """Tokens a routed block processes per sequence of seq_len in training: round(C*T), >= 1."""
    return max(1, int(round(capacity * seq_len)))


class MoDRouter(nn.Module):
    """The per-block router (d -> 1 score, trained with AdamW like the MoE routers:
    nanochat/optim.py sends every parameter under a block's `mod` to AdamW) and the causal
    rule's threshold."""

    ROUTER_INIT_LOGIT_STD = 0.1  # as the MoE router: small random scores, no token favoured
    THRESHOLD_RATE = 0.05        # EMA rate of the threshold per optimizer step (~20-step memory)

    def __init__(self, d):
        super().__init__()
        self.router = nn.Linear(d, 1, bias=False)
        # the causal rule's threshold and how many updates made it (saved with the weights)
        self.register_buffer("threshold", torch.zeros(()), persistent=True)
        self.register_buffer("updates", torch.zeros(()), persistent=True)
        # training-time accumulator since the last update: [sum of micro-batch cuts, count]
        self.register_buffer("kth_sum", torch.zeros(2), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        d = self.router.in_features
        nn.init.normal_(self.router.weight, std=self.ROUTER_INIT_LOGIT_STD * d**-0.5)
        for buf in (self.threshold, self.updates, self.kth_sum):
            buf.zero_()

    def param_roles(self):
        """{role: [parameters]} for the optimizer: the router row goes with the MoE routers."""
        return {"router": list(self.parameters())}

    def scores(self, xn):
        """(B, T, d) normed input -> (B, T) router scores, in fp32 even under autocast (as the
        MoE router: bf16 would tie and flip near-equal scores, and a bf16 score makes a bf16
        gate). Casting the operands is not enough: linear is on autocast's list and would run
        in bf16 anyway, so autocast is switched off here (as in moe.route); and fp32-accurate
        where fp32 matmuls run as TF32 (moe.fp32_linear)."""
        with torch.autocast(device_type=xn.device.type, enabled=False):
            return fp32_linear(xn.float(), self.router.weight.float()).squeeze(-1)

    @torch.no_grad()
    def record_cut(self, scores, k):
        """Training: accumulate the micro-batch's cut, the (B*k)-th largest of its B*T scores
        (the score above which a fraction k/T of its tokens fall)."""
        cut = scores.flatten().topk(k * scores.size(0), sorted=False).values.min()
        self.kth_sum += torch.stack([cut, torch.ones_like(cut)])

    def flops_per_token(self):
        """Training FLOPs per token of the router: 6 per weight (its input gets a gradient
        through the gate)."""
        return 6 * self.router.weight.numel()


@torch.no_grad()
def update_mod_thresholds(model, world_size=1):
    """After each optimizer step: every routed block's threshold moves toward the mean cut of
    the step's micro-batches (all micro-steps, all ranks): the first update sets it, later ones
    average with rate max(THRESHOLD_RATE, 1 / (updates + 1)). No-op for a model without MoD."""
    for block in model.transformer.h:
        mod = block.mod
        if mod is None:
            continue
        acc = mod.kth_sum.clone()
        if world_size > 1:
            dist.all_reduce(acc, op=dist.ReduceOp.SUM)
        # on the device, no host sync per step: a step without cuts (none recorded) changes nothing
        rate = (1.0 / (mod.updates + 1)).clamp(min=mod.THRESHOLD_RATE)
        seen = acc[1] > 0
        mean = acc[0] / acc[1].clamp(min=1)
        mod.threshold.copy_(torch.where(seen, mod.threshold + rate * (mean - mod.threshold), mod.threshold))
        mod.updates += seen.float()
        mod.kth_sum.zero_()


def topk_positions(scores, k):
    """(B, T) scores -> (B, k) positions of the k highest per row, ascending (position order,
    so causal attention among the chosen tokens is a plain causal mask)."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def gather_positions(x, positions):
    """x (B, T, ...) -> (B, k, ...) at positions (B, k)."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def scatter_positions(x, positions, values):
    """x with x[b, positions[b, j]] = values[b, j] (out of place; gradients flow to both)."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.scatter(1, index, values)


def gather_rotary(cos_sin, positions):
    """The rotary tables (1, T, 1, D/2) of a sequence -> (B, k, 1, D/2) at the chosen tokens'
    absolute positions: a routed token keeps its position in the sequence."""
    return tuple(t[0][positions] for t in cos_sin)


def straight_through_gate(scores):
    """1 + (s - stopgrad(s)), s = sigmoid(scores): value exactly 1, gradient ds/dscore.
    The parentheses matter: s - stopgrad(s) is exactly 0, while (1 + s) - s rounds 1 + s
    first and gives 1 - ulp for some scores (about a fifth of them in fp32, and 0.996 in bf16),
    which would make capacity 1.0 differ from the dense model."""
    s = torch.sigmoid(scores)
    return 1.0 + (s - s.detach())


def causal_stats(scores, positions, threshold):
    """The causal rule against the top-k choice: (2,) = [fraction of tokens it processes,
    agreement (accuracy) with the top-k]. scores (B, T), positions (B, k)."""
    with torch.no_grad():
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(1, positions, True)
        rule = scores > threshold
        return torch.stack([rule.float().mean(), (rule == chosen).float().mean()])


def routed_attention_mask(select, n_cached=None, cached_lengths=None):
    """Boolean attention mask (B, 1, T, n_cached + T) of a routed block under the causal rule.
    Query i (processed or not) sees: cached keys j < cached_lengths[b] (all earlier, all
    processed), and new key m if m <= i and token m is processed. A skipped query's output is
    thrown away, but it must see some key (an all-masked row gives NaN), so it sees itself."""
    B, T = select.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=select.device).tril()
    itself = torch.eye(T, dtype=torch.bool, device=select.device)
    mask = causal & (select[:, None, :] | itself)  # (B, T, T)
    if n_cached:
        seen = torch.arange(n_cached, device=select.device)[None, :] < cached_lengths[:, None]  # (B, L)
        mask = torch.cat([seen[:, None, :].expand(B, T, n_cached), mask], dim=2)
    return mask[:, None]


def routed_cache_capacity(capacity, max_len):
    """Initial per-row slots of a routed layer's KV cache: C * max_len with a margin (the causal
    rule may process more than C of the tokens; the cache grows when it does)."""
    return min(max_len, max(16, math.ceil(1.25 * capacity * max_len)))
