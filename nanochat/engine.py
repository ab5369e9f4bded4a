"""
Inference: sampling with a KV cache, for dense and MoE models alike.

Without a cache, every new token re-runs the model over the whole context: step t costs a
forward over t tokens. With a cache, each layer keeps the keys and values of the tokens it
has already seen, so the prompt is run once (prefill) and each later step runs the model
over one new token per row (decode), attending to the cached keys (Mamba layers carry their
recurrent state instead; Mixture-of-Depths layers keep only the tokens they processed). MoE
layers need nothing special: routing is per token, so a token is routed the same whether it
arrives alone or inside the full context.

    from nanochat.engine import generate
    rows = generate(model, tokenizer.encode("Once", prepend_bos=True), max_tokens=64,
                    num_samples=4, temperature=0.8, top_k=50)   # 4 lists of new token ids

Sampling (sample_next_token): repetition penalty, then temperature (0 = greedy argmax),
top-k, top-p (nucleus), then one draw from a torch.Generator seeded by `seed`, so the same
seed gives the same samples.
"""

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from nanochat.common import UserError, sync_device
from nanochat.tokenizer import SPECIAL_TOKENS, BOS


class KVCache:
    """Per-layer keys and values of shape (B, n_kv_head, max_len, head_dim), and `pos`, the
    number of positions filled (the same for every row: rows are prompts of equal length
    generating in lockstep). The model's rotary offset for new tokens is get_pos().

    Mixture-of-Depths blocks (routed_layers) keep only the tokens they processed, packed to
    the left of each row (their keys were rotated at their absolute positions before they
    were stored, so the packing loses nothing), with a per-row count; their storage starts at
    routed_len slots and doubles when a row needs more (up to max_len).

    Mamba layers (mamba_layers) keep no keys at all: their recurrent state (a fixed-size
    conv window and SSM state per row, nanochat/mamba.py) is the whole memory of the past,
    so a hybrid's cache grows only with its attention layers."""

    def __init__(self, batch_size, n_layer, n_kv_head, head_dim, max_len, routed_layers=(), routed_len=None,
                 mamba_layers=()):
        self.batch_size, self.n_layer, self.n_kv_head, self.head_dim = batch_size, n_layer, n_kv_head, head_dim
        self.max_len = max_len
        self.pos = 0
        # Allocated on first insert so that dtype and device follow the activations (bf16
        # under CUDA autocast, fp32 on CPU) rather than having to be guessed here.
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.routed = set(routed_layers)
        self.routed_len = routed_len or max_len
        self.lengths = {}  # routed layer -> (B,) tokens stored per row
        self.filled = {}   # routed layer -> max over rows of lengths (a host int: slices need one)
        self.mamba_layers = set(mamba_layers)
        self.mamba = {}    # Mamba layer -> its state tuple (None before the first forward)
        # smear: the last consumed token's normed embedding (B, 1, d), the previous token of the
        # next forward's first one (set by GPT.forward)
        self.prev_embedding = None

    def get_pos(self):
        return self.pos

    def advance(self, n):
        """Called by the model after each forward: n positions were consumed."""
        assert self.pos + n <= self.max_len, f"KV cache full: {self.pos + n} positions > max_len {self.max_len}"
        self.pos += n

    def _allocate(self, like, slots):
        shape = (self.batch_size, self.n_kv_head, slots, self.head_dim)
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def insert_kv(self, layer_idx, k, v):
        """Store k, v (B, n_kv_head, T, head_dim) at positions pos..pos+T of this layer and
        return all keys and values so far, (B, n_kv_head, pos+T, head_dim). The position
        advances when the model's forward is done (advance), so every layer of one forward
        sees the same offset."""
        t0, t1 = self.pos, self.pos + k.size(2)
        assert t1 <= self.max_len, f"KV cache full: {t1} positions > max_len {self.max_len}"
        assert layer_idx not in self.routed, "a routed (MoD) layer stores with append_routed"
        assert layer_idx not in self.mamba_layers, "a Mamba layer keeps a state, not keys"
        if self.k[layer_idx] is None:
            self.k[layer_idx] = self._allocate(k, self.max_len)
            self.v[layer_idx] = self._allocate(v, self.max_len)
        self.k[layer_idx][:, :, t0:t1] = k
        self.v[layer_idx][:, :, t0:t1] = v
        return self.k[layer_idx][:, :, :t1], self.v[layer_idx][:, :, :t1]

    def routed_kv(self, layer_idx):
        """(keys, values, lengths) of a routed layer: (B, n_kv_head, max(lengths), head_dim),
        row b valid in its first lengths[b] slots; (None, None, None) before any token."""
        if self.k[layer_idx] is None:
            return None, None, None
        n = self.filled[layer_idx]
        return self.k[layer_idx][:, :, :n], self.v[layer_idx][:, :, :n], self.lengths[layer_idx]

    def append_routed(self, layer_idx, k, v, select):
        """Append the selected new tokens' k, v (B, n_kv_head, T, head_dim), select (B, T) bool,
        after each row's stored ones, in order. lengths is replaced, not updated in place (a
        caller may still hold the old one)."""
        assert layer_idx in self.routed, f"layer {layer_idx} is not a routed (MoD) layer"
        old = self.lengths.get(layer_idx)
        if old is None:
            old = torch.zeros(self.batch_size, dtype=torch.long, device=k.device)
        new = old + select.sum(dim=1)
        need = int(new.max())
        if self.k[layer_idx] is None or need > self.k[layer_idx].size(2):
            slots = self.routed_len if self.k[layer_idx] is None else 2 * self.k[layer_idx].size(2)
            slots = min(self.max_len, max(slots, need))
            grown_k, grown_v = self._allocate(k, slots), self._allocate(v, slots)
            if self.k[layer_idx] is not None:
                n = self.filled[layer_idx]
                grown_k[:, :, :n], grown_v[:, :, :n] = self.k[layer_idx][:, :, :n], self.v[layer_idx][:, :, :n]
            self.k[layer_idx], self.v[layer_idx] = grown_k, grown_v
        rows, cols = select.nonzero(as_tuple=True)
        slot = (old[:, None] + select.long().cumsum(dim=1) - 1)[rows, cols]
        self.k[layer_idx][rows, :, slot] = k[rows, :, cols]
        self.v[layer_idx][rows, :, slot] = v[rows, :, cols]
        self.lengths[layer_idx], self.filled[layer_idx] = new, need

    def mamba_state(self, layer_idx):
        return self.mamba.get(layer_idx)

    def set_mamba_state(self, layer_idx, state):
        assert layer_idx in self.mamba_layers, f"layer {layer_idx} is not a Mamba layer"
        self.mamba[layer_idx] = state

    def repeat_rows(self, n):
        """Each row becomes n consecutive rows (row r -> rows r*n .. r*n+n-1): one prefilled
        prompt, then n samples that diverge from there. Copies, as the rows will differ."""
        if n == 1:
            return
        self.batch_size *= n
        self.k = [None if t is None else t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [None if t is None else t.repeat_interleave(n, dim=0) for t in self.v]
        self.lengths = {i: t.repeat_interleave(n, dim=0) for i, t in self.lengths.items()}
        self.mamba = {i: tuple(t.repeat_interleave(n, dim=0) for t in s) for i, s in self.mamba.items()}
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding.repeat_interleave(n, dim=0)

    def nbytes(self):
        tensors = [t for t in self.k + self.v if t is not None] + [t for s in self.mamba.values() for t in s]
        return sum(t.numel() * t.element_size() for t in tensors)


def new_kv_cache(model, batch_size, max_len):
    from nanochat.mod import routed_cache_capacity
    cfg = model.config
    return KVCache(batch_size, cfg.n_layer, cfg.n_kv_head, cfg.n_embd // cfg.n_head, max_len,
                   routed_layers=model.mod_layers(), routed_len=routed_cache_capacity(cfg.mod_capacity, max_len),
                   mamba_layers=model.mamba_layers())


def apply_repetition_penalty(logits, history, penalty):
    """CTRL's repetition penalty (Keskar et al. 2019): for every token id in the row's history
    (prompt and generated), divide its logit by `penalty` if positive, multiply if negative,
    so penalty > 1 always makes it less likely. logits (B, V); history (B, T) ids. Each id is
    penalised once, however often it occurred (as in CTRL and Hugging Face)."""
    seen = torch.gather(logits, 1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)  # duplicates in history write the same value


def sample_next_token(logits, rng=None, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                      history=None):
    """One next token per row. logits (B, V) fp32 -> (B, 1) long.
    Order: repetition penalty, temperature (0 = greedy argmax, no randomness), top-k (keep the
    k largest; None/0 = off), top-p (keep the smallest set of most likely tokens whose
    probability sums to >= top_p; None/1 = off), then a draw with `rng` (a torch.Generator)."""
    if repetition_penalty != 1.0 and history is not None and history.numel():
        logits = apply_repetition_penalty(logits, history, repetition_penalty)
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the more likely ones already reach top_p (so the top one stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_ids, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


def max_positions(model):
    """How many positions the model can encode: the length of its rotary table."""
    return model.cos.size(1)


@torch.inference_mode()
def generate_batch(model, prompts, max_tokens, num_samples=1, temperature=1.0, top_k=None, top_p=None,
                   repetition_penalty=1.0, seed=42, use_kv_cache=True, stop_at_bos=True, bos_token_id=None,
                   timings=None):
    """Continue each prompt (a list of equal-length token lists) num_samples times, all rows in
    one batch. Returns len(prompts) * num_samples lists of new token ids (prompt r's samples
    are rows r*num_samples ...), without the prompt and without the BOS that ended a row.

    With the KV cache the prompts are prefilled once, the cache replicated num_samples times,
    then one token per row per step is decoded; without it, each step re-runs the model over
    the full context (the reference the cache is tested against; sliding-window layers apply
    the same window on both paths). A row stops at BOS (end of document) when stop_at_bos;
    generation stops early once every row has. bos_token_id: pass tokenizer.get_bos_token_id();
    None = the tokenizer's convention (special tokens follow the merged ones, in SPECIAL_TOKENS
    order) applied to the model's vocabulary size. Prompt plus continuation never exceed the
    model's rotary table: the prompt must fit, and max_tokens is cut to what is left.
    timings: an optional dict, filled with prefill_s, decode_s, steps, kv_cache_bytes."""
    device = model.lm_head.weight.device
    if bos_token_id is None:
        bos_token_id = model.config.vocab_size - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(BOS)
    if not prompts or any(len(p) != len(prompts[0]) for p in prompts) or not prompts[0]:
        raise ValueError("prompts must be a non-empty list of non-empty token lists of equal length")
    T, limit = len(prompts[0]), max_positions(model)
    if T >= limit:
        raise UserError(f"the prompt is {T} tokens: the model encodes at most {limit} positions (its rotary table)")
    max_tokens = min(max_tokens, limit - T)
    rows = len(prompts) * num_samples
    rng = torch.Generator(device=device).manual_seed(seed)
    # bf16 on CUDA, as in training; CPU stays fp32. A cast_weights model runs in its own
    # compute_dtype (GPT.set_compute_dtype), without autocast, as it trains
    cuda_autocast = device.type == "cuda" and not model.config.cast_weights
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda_autocast else nullcontext()
    prompt = torch.tensor(prompts, dtype=torch.long, device=device)
    ids = prompt.repeat_interleave(num_samples, dim=0)  # (rows, T): the history, for the penalty
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    out = []
    cache = None
    t_start = time.perf_counter()
    with autocast:
        if use_kv_cache:
            cache = new_kv_cache(model, len(prompts), T + max_tokens)
            logits = model(prompt, kv_cache=cache)[:, -1, :]
            cache.repeat_rows(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)
        else:
            logits = model(ids)[:, -1, :]
        sync_device(device)
        t_prefill = time.perf_counter()
        for step in range(max_tokens):
            next_ids = sample_next_token(logits.float(), rng, temperature, top_k, top_p, repetition_penalty, ids)
            if stop_at_bos:
                done = done | (next_ids[:, 0] == bos_token_id)
                next_ids = next_ids.masked_fill(done.unsqueeze(1), bos_token_id)  # finished rows idle on BOS
            out.append(next_ids)
            ids = torch.cat([ids, next_ids], dim=1)
            if step == max_tokens - 1 or (stop_at_bos and bool(done.all())):
                break
            if use_kv_cache:
                logits = model(next_ids, kv_cache=cache)[:, -1, :]
            else:
                logits = model(ids)[:, -1, :]
    sync_device(device)
    t_end = time.perf_counter()
    if timings is not None:
        timings.update(prefill_s=t_prefill - t_start, decode_s=t_end - t_prefill, steps=len(out),
                       kv_cache_bytes=cache.nbytes() if cache is not None else 0)
    if not out:
        return [[] for _ in range(rows)]
    result = []
    for row in torch.cat(out, dim=1).tolist():
        if stop_at_bos and bos_token_id in row:
            row = row[:row.index(bos_token_id)]
        result.append(row)
    return result


def generate(model, prompt_ids, max_tokens, num_samples=1, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, seed=42, use_kv_cache=True, stop_at_bos=True, bos_token_id=None,
             timings=None):
    """num_samples continuations of one prompt (a list of token ids; nanochat prompts start
    with BOS), in one batch. Returns num_samples lists of new token ids. See generate_batch."""
    return generate_batch(model, [list(prompt_ids)], max_tokens, num_samples, temperature, top_k, top_p,
                          repetition_penalty, seed, use_kv_cache, stop_at_bos, bos_token_id, timings)
