"""
Causal self-attention and what only attention needs: rotary embeddings, the per-layer
sliding window, value embeddings (ResFormer) and a linear that computes in its input's dtype.

Sliding windows (window_pattern): the pattern is tiled over the layers, "L" = full context,
"S" = a short window; the last layer is always "L". The short window is nanochat's: a quarter
of sequence_len rounded UP to a multiple of 128 (FA3's tile): 128 * ceil(T / 512), so 2048 ->
512, 1024 -> 256, 513 -> 256, anything <= 512 -> 128 (its comment says 2048 -> 768, and
base_train's help "half context": the code computes a quarter).
Convention (FA3's window_size=(W, 0), and nanochat's SDPA fallback, which builds the same
mask): a window of W lets the query at position i see keys i-W .. i, that is W + 1 keys (its
own and the W before it). nanochat's FLOPs estimate counts min(W, T) keys per query, one
fewer than are attended; we count as nanochat does (GPT.estimate_flops).
"L" here is unbounded. nanochat writes it as the window (sequence_len, 0), which is the same
for every sequence of at most sequence_len + 1 tokens, i.e. for training and evaluation; it
would differ only when generating past the training context (nanochat then slides the "L"
layers too, we keep attending to everything).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.mod import routed_attention_mask

VE_GATE_CHANNELS = 12   # the value-embedding gate reads the first 12 channels of the block input


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


class CastLinear(nn.Linear):
    """A linear that runs in its input's dtype: the fp32 master weight is cast to x.dtype for
    the matmul (nanochat's replacement for autocast: bf16 activations from the embedding on,
    fp32 weights for the optimizer). In fp32 the cast is a no-op."""

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))


def linear_class(config):
    return CastLinear if config.cast_weights else nn.Linear


def has_value_embed(layer_idx, n_layer):
    """Value embeddings on alternating layers, counted from the last one (which always has one):
    layers n_layer-1, n_layer-3, ... (nanochat's rule)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def short_window(sequence_len):
    """nanochat's short window: a quarter of the context rounded up to a multiple of 128, i.e.
    ceil(ceil(T / 4) / 128) * 128 = 128 * ceil(T / 512) (its `-(-T // 4 // 128) * 128`)."""
    return 128 * -(-sequence_len // 512)


def layer_windows(config):
    """Per layer: None (full causal attention) or W (the query at i sees keys i-W..i).
    The pattern tiles over the layers; the last layer is always full, and so are the layers
    where a window has no clear meaning: Mamba layers (no attention) and Mixture-of-Depths
    routed blocks (their attention sees only the routed tokens)."""
    pattern = config.window_pattern.upper()
    windows = [short_window(config.sequence_len)
               if pattern[i % len(pattern)] == "S" and not config.is_mamba_layer(i) and not config.is_mod_layer(i) else None
               for i in range(config.n_layer)]
    windows[-1] = None
    return windows


def window_mask(n_queries, n_keys, window, device):
    """(n_queries, n_keys) bool: query i (absolute position n_keys - n_queries + i) sees key j
    when j <= its position and its position - j <= window (window None: no lower limit)."""
    pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    key = torch.arange(n_keys, device=device)[None, :]
    mask = key <= pos
    if window is not None:
        mask = mask & (pos - key <= window)
    return mask


def apply_rotary_emb(x, cos, sin):
    # x: (B, T, H, D); rotate the two halves of the head dimension as complex pairs.
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


def precompute_rotary(seq_len, head_dim, base=10000, device=None):
    channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (base ** (channel / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx=0, value_embed=False, window=None):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KV cache this layer writes
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.window = window          # None = full causal; W = keys i-W..i (W + 1 keys)
        self.qk_scale = config.qk_scale
        d = config.n_embd
        Linear = linear_class(config)
        self.c_q = Linear(d, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(d, d, bias=False)
        # ResFormer (Zhou et al. 2024) value residual, as modded-nanogpt/nanochat gate it: a token's
        # value embedding is added to v per kv-head, weighted by 3 * sigmoid(W x[:12]) in (0, 3)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if value_embed else None

    def forward(self, x, cos_sin, kv_cache=None, select=None, ve=None):
        """select (B, T) bool: a routed (MoD) block under the causal rule; only the selected
        tokens are keys, and with a cache only they are stored (nanochat/mod.py).
        ve (B, T, n_kv_head * head_dim): this layer's value embeddings of the tokens."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.ve_gate is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm: keeps attention logits bounded without a softcap
        if self.qk_scale != 1.0:
            # QK-norm fixes |q| = |k| = sqrt(head_dim); nanochat sharpens attention by 1.2 on each
            # (1.44 on the logits) instead of learning a temperature
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = self.n_kv_head != self.n_head
        window = self.window
        if select is not None:
            assert window is None, "a routed (MoD) block attends with full context"
            n_cached, lengths = 0, None
            if kv_cache is not None:
                old_k, old_v, lengths = kv_cache.routed_kv(self.layer_idx)
                new_k, new_v = k, v
                if old_k is not None:  # read (copied) before this call's tokens are appended
                    n_cached = old_k.size(2)
                    k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
                kv_cache.append_routed(self.layer_idx, new_k, new_v, select)
            mask = routed_attention_mask(select, n_cached, lengths)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif kv_cache is None:  # training / full-context path
            if window is None or window + 1 >= T:  # the window holds every earlier key
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                mask = window_mask(T, T, window, q.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            # Inference: the new tokens attend to the cached keys plus the new ones (within the window)
            t0 = kv_cache.get_pos()
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
            n_keys = t0 + T
            if window is not None and window + 1 >= n_keys:
                window = None  # nothing falls out of the window yet: the full-context paths below
            if window is not None and T == 1:  # one decode step: the last W + 1 keys, no mask
                y = F.scaled_dot_product_attention(q, k[:, :, -(window + 1):], v[:, :, -(window + 1):], enable_gqa=gqa)
            elif window is not None:
                mask = window_mask(T, n_keys, window, q.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            elif t0 == 0:  # prefill into an empty cache: plain causal attention
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            elif T == 1:  # one decode step: the token sees everything, nothing to mask
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # a chunk after a cached prefix: new token i (position t0+i) sees keys 0..t0+i
                mask = torch.ones(T, t0 + T, dtype=torch.bool, device=q.device).tril(diagonal=t0)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))
