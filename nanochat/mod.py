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
               router weight 1 + s - stopgrad(s), s = sigmoid(r): exactly 1 in the forward
               pass, so the router is trained by the gradient of the block's output (as with
               Raposo's r * f(x)) but the output is not rescaled. Capacity 1.0 is therefore
               exactly the dense model (tested bit for bit), and a token's block output does
               not depend on how confident the router was.
    causal     top-k over the sequence lets later tokens decide for earlier ones, which an
               evaluation or a sampler cannot do. Raposo et al.'s second method: a small
               predictor (here linear, with a bias) reads the router's input with a stop
               gradient and learns, by binary cross-entropy, whether the token was in the
               top-k. In eval mode and in generation a token is processed when the predictor's
               logit is > 0; val bpb is reported under that rule. The predictor's loss
               trains only the predictor (its input is detached), so it leaves the language
               model's training untouched.
    cache      the KV cache of a routed block holds only the tokens it processed, packed per
               row (engine.KVCache.append_routed), their keys rotated at their absolute
               positions; a decode step whose token is skipped by every row skips the block.

The pieces (scores, top-k positions, gather/scatter, the gate, the predictor's loss and the
routed attention mask) are small functions here; nanochat/gpt.py's Block wires them.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def mod_tokens(seq_len, capacity):
    """Tokens a routed block processes per sequence of seq_len in training: round(C*T), >= 1."""
    return max(1, int(round(capacity * seq_len)))


class MoDRouter(nn.Module):
    """The per-block router (d -> 1 score) and the causal predictor (d -> 1 logit, with bias).
    Both are small classifiers, trained with AdamW like the MoE routers (nanochat/optim.py
    sends every parameter under a block's `mod` to AdamW)."""

    ROUTER_INIT_LOGIT_STD = 0.1  # as the MoE router: small random scores, no token favoured

    def __init__(self, d):
        super().__init__()
        self.router = nn.Linear(d, 1, bias=False)
        self.predictor = nn.Linear(d, 1, bias=True)

    @torch.no_grad()
    def init_weights(self):
        d = self.router.in_features
        nn.init.normal_(self.router.weight, std=self.ROUTER_INIT_LOGIT_STD * d**-0.5)
        nn.init.zeros_(self.predictor.weight)  # predicts "skip" (logit 0 is not > 0) until it learns
        nn.init.zeros_(self.predictor.bias)

    def scores(self, xn):
        """(B, T, d) normed input -> (B, T) router scores, in fp32 even under autocast (as the
        MoE router: bf16 would tie and flip near-equal scores)."""
        return F.linear(xn.float(), self.router.weight.float()).squeeze(-1)

    def predict(self, xn):
        """(B, T) causal predictor logits from the detached input: the predictor's loss must
        not move the model."""
        return F.linear(xn.detach().float(), self.predictor.weight.float(), self.predictor.bias.float()).squeeze(-1)

    def flops_per_token(self):
        """Training FLOPs per token of the two classifiers: the router 6 per weight (its input
        gets a gradient through the gate), the predictor 4 per weight (forward and weight
        gradient only: its input is detached). Bias adds are not matmul FLOPs."""
        return 6 * self.router.weight.numel() + 4 * self.predictor.weight.numel()


def topk_positions(scores, k):
    """(B, T) scores -> (B, k) positions of the k highest per row, ascending (position order,
    so causal attention among the chosen tokens is a plain causal mask)."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def gather_tokens(x, positions):
    """x (B, T, ...) -> (B, k, ...) at positions (B, k)."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def scatter_tokens(x, positions, values):
    """x with x[b, positions[b, j]] = values[b, j] (out of place; gradients flow to both)."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.scatter(1, index, values)


def gather_rotary(cos_sin, positions):
    """The rotary tables (1, T, 1, D/2) of a sequence -> (B, k, 1, D/2) at the chosen tokens'
    absolute positions: a routed token keeps its position in the sequence."""
    return tuple(t[0][positions] for t in cos_sin)


def straight_through_gate(scores):
    """1 + s - stopgrad(s), s = sigmoid(scores): value 1, gradient ds/dscore."""
    s = torch.sigmoid(scores)
    return 1.0 + s - s.detach()


def predictor_stats(pred_logits, positions):
    """The causal predictor against the top-k choice: (3,) = [binary cross-entropy (its
    training loss), fraction of tokens it would process, agreement (accuracy) with the top-k].
    pred_logits (B, T), positions (B, k)."""
    chosen = torch.zeros_like(pred_logits).scatter(1, positions, 1.0)
    bce = F.binary_cross_entropy_with_logits(pred_logits, chosen)
    would = (pred_logits > 0).float()
    return torch.stack([bce, would.mean(), (would == chosen).float().mean()])


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
