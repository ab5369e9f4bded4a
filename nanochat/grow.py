"""
Grow a trained model instead of starting over: function-preserving transforms, each a plain
function (model) -> new model with a new GPTConfig, and the check that proves it.

    upcycle      dense MLP -> MoE whose experts are all copies of the MLP (Komatsuzaki et al.
                 2022, "Sparse upcycling"): whatever the router picks, the combine weights of
                 the top-k sum to 1, so the layer computes the MLP.
    grow_width   x -> [x, x, ...] (mult copies of the residual stream), heads and hidden units
                 copied, the weights that read copied units split so the sums are unchanged
                 (Net2Net, Chen et al. 2016; bert2BERT, Chen et al. 2022).
    grow_depth   +n blocks, copies of a chosen block with their output projections zeroed:
                 each new block starts as the identity on the residual stream. (G_stack, Du et
                 al. 2024, stacks whole models and is NOT function-preserving; this is our
                 function-preserving variant, so their speed-ups are not ours to claim.)
    verify       max |logits(grown) - logits(source)| on real batches, fp32; for an MoE source
                 with the source's expert choices forced, plus how many choices flip unforced.
    verify_autocast  the same under bf16 autocast (how CUDA trains), next to the source's own
                 bf16-vs-fp32 gap: a report, since bf16 rounding is not preserved exactly.

Why the width growth is exact here: every weight that writes the residual stream writes the
same thing into each copy, so the stream stays [x, x]; RMSNorm without weights gives
norm([x, x]) = [norm(x), norm(x)] (the mean square is unchanged); heads keep their head_dim, so
rotary, per-head QK-norm, the 1/sqrt(head_dim) scale and the softcap see the same numbers.
Zero-padding would not be exact: the norm would average over the new zeros.
Symmetry: a weight reading k copies gets W * s_1, ..., W * s_k with random per-input-column
fractions s_1 + ... + s_k = 1 (different for each output copy). The copies then receive
different gradients and drift apart in training, while the function is unchanged (to fp32
rounding, ~1e-7); noise added to the weights would break the < 1e-4 check.
"""

from dataclasses import replace

import torch

from nanochat.common import UserError
from nanochat.gpt import build_model
from nanochat.moe import MoE, route

TOLERANCE = 1e-4  # max abs logit difference (fp32) for a grown model to count as the same function


def _new_model(model, **changes):
    if model.config.mod_capacity:  # a routed block's router and threshold would need their own rules
        raise UserError("scripts.grow: growing a Mixture-of-Depths model (--mod-capacity) is not supported")
    if model.mamba_layers():  # widening or stacking a Mamba layer exactly is its own piece of work
        raise UserError("scripts.grow: growing a hybrid model with Mamba layers (--layer-pattern) is not supported")
    return build_model(replace(model.config, **changes), model.cos.device)


# --------------------------------------------------------------------------------- upcycle

def upcycle(model, n_experts=8, topk=2, n_shared=0, moe_freq=1, router="sigmoid", route_scale=1.0,
            aux_free_bias=0.0, capacity_factor=0.0, seed=0):
    """Dense model -> MoE: in every layer that `moe_freq` makes MoE, the routed experts (and
    shared experts) are copies of that layer's MLP at its width (expert_hidden_mult 4); the
    other layers keep their MLP. The router starts small and random (MoE.init_weights).
    Preserved exactly: top-k >= 2 (the combine weights sum to route_scale, softmax or sigmoid;
    the experts' output projections are divided by route_scale); shared experts (they and the
    routed experts split the MLP's output in proportion s : k). Refused: top-1 (its combine
    weight is the router score, < 1, so the output would be scaled per token by p)."""
    cfg = model.config
    if cfg.use_moe:
        raise UserError("--upcycle: the source is already an MoE (upcycling turns a dense model's MLPs into experts)")
    if topk < 2:
        raise UserError(f"--upcycle needs --expert-topk >= 2: a top-1 token's output is its router score (< 1) times "
                        f"the expert, so top-1 cannot start as the dense model (got --expert-topk {topk})")
    if not 1 <= topk <= n_experts:
        raise UserError(f"--expert-topk {topk} must be in 1..--n-experts {n_experts}")
    if not 1 <= moe_freq <= cfg.n_layer:
        raise UserError(f"--moe-freq {moe_freq} must be in 1..{cfg.n_layer} (the source's depth)")
    if route_scale <= 0 or n_shared < 0:
        raise UserError("--route-scale must be > 0 and --n-shared-experts >= 0")
    torch.manual_seed(seed)  # the routers' random init
    new = _new_model(model, use_moe=True, n_experts=n_experts, expert_topk=topk, n_shared_experts=n_shared,
                     moe_freq=moe_freq, expert_hidden_mult=4, router=router, route_scale=route_scale,
                     aux_free_bias=aux_free_bias, capacity_factor=capacity_factor)
    state = {k: v for k, v in model.state_dict().items() if not (k.startswith("transformer.h.") and ".mlp." in k)}
    new.load_state_dict(state, strict=False)
    routed_share = topk / (topk + n_shared)  # the routed experts' part of the MLP's output
    with torch.no_grad():
        for old_block, block in zip(model.transformer.h, new.transformer.h):
            fc, proj = old_block.mlp.c_fc.weight, old_block.mlp.c_proj.weight
            if not block.is_moe:
                block.mlp.load_state_dict(old_block.mlp.state_dict())
                continue
            moe = block.mlp
            moe.w_fc.copy_(fc.expand_as(moe.w_fc))
            moe.w_proj.copy_((proj * (routed_share / route_scale)).expand_as(moe.w_proj))
            if n_shared:  # n_shared copies side by side, each giving 1/n_shared of the shared part
                moe.shared_fc.weight.copy_(fc.repeat(n_shared, 1))
                moe.shared_proj.weight.copy_(proj.repeat(1, n_shared) * ((1 - routed_share) / n_shared))
    return new


# --------------------------------------------------------------------------------- width

def _split_fractions(generator, mult, n, device):
    """(mult_out, mult_in, n) random fractions, summing to 1 over mult_in: how much of a weight
    column each input copy carries, different for each output copy (breaks the symmetry)."""
    u = torch.rand(mult, mult, n, generator=generator) + 0.5  # in [0.5, 1.5): no copy gets ~0
    return (u / u.sum(dim=1, keepdim=True)).to(device)


def _widen(w, mult, generator, dup_out=True, split_in=True):
    """w (..., out, in) -> (..., mult*out, mult*in): output rows copied mult times (copy-major:
    [rows, rows]) and input columns split over the mult input copies."""
    out_copies = mult if dup_out else 1
    n_in = w.size(-1)
    if split_in:
        frac = _split_fractions(generator, mult, n_in, w.device)[:out_copies]  # (oc, mult, in)
        rows = [torch.cat([w * frac[o, i] for i in range(mult)], dim=-1) for o in range(out_copies)]
    else:
        rows = [w] * out_copies
    return torch.cat(rows, dim=-2)


def grow_width(model, mult, seed=0):
    """Width x mult (integer): n_embd, heads (same head_dim) and MLP/expert hidden units all
    x mult; the function is unchanged (see the module docstring)."""
    cfg = model.config
    if not isinstance(mult, int) or mult < 1:
        raise UserError(f"--width-mult must be an integer >= 1 (got {mult})")
    if mult == 1:
        return model
    g = torch.Generator().manual_seed(seed)
    new = _new_model(model, n_embd=cfg.n_embd * mult, n_head=cfg.n_head * mult, n_kv_head=cfg.n_kv_head * mult)
    old_state = model.state_dict()
    role_of = {id(p): role for role, params in model.param_roles().items() for p in params}
    roles = {name: role_of[id(p)] for name, p in model.named_parameters()}  # buffers have none
    new_state = {}
    for name, w in old_state.items():
        leaf = name.rsplit(".", 1)[-1]
        if roles.get(name) == "embedding":            # (V, d): writes the stream, copied
            new_state[name] = torch.cat([w] * mult, dim=1)
        elif roles.get(name) == "value_embedding":    # (V, kv width): added to v, whose heads are copied
            new_state[name] = torch.cat([w] * mult, dim=1)
        elif name.endswith("attn.ve_gate.weight"):     # (n_kv_head, 12): one row per (copied) kv head; it
            new_state[name] = torch.cat([w] * mult, dim=0)  # reads the first 12 channels, the same in copy 0
        elif roles.get(name) in ("resid_lambdas", "x0_lambdas", "smear_backout"):
            new_state[name] = w  # scalars, and the smear gate reading the first 24 channels: unchanged
        elif roles.get(name) in ("lm_head", "router"):  # read the stream, split
            new_state[name] = _widen(w, mult, g, dup_out=False)
        elif leaf == "expert_bias":                    # per expert: unchanged
            new_state[name] = w
        elif w.dim() >= 2:  # every other matrix reads copied units and writes copied units
            new_state[name] = _widen(w, mult, g)
        else:
            raise AssertionError(f"grow_width does not know how to widen {name} {tuple(w.shape)}")
    new.load_state_dict(new_state, strict=True)
    return new


# --------------------------------------------------------------------------------- depth

def depth_layer_map(n_layer, n, source_layer):
    """Where each old layer goes when n layers are inserted after source_layer."""
    return {i: i if i <= source_layer else i + n for i in range(n_layer)}


def grow_depth(model, n, source_layer=-1):
    """+n blocks inserted after `source_layer` (default: the last), each a copy of that block
    with its output projections (attention c_proj, MLP c_proj, experts' w_proj, shared
    experts' proj) zeroed, so it adds nothing to the stream until it trains. With moe_freq F,
    n must be a multiple of F so the layers after the insertion keep their kind; an inserted
    layer whose kind (MoE/dense) differs from the source block's takes its FFN from the
    nearest earlier layer of that kind (its output is zero either way)."""
    cfg = model.config
    L = cfg.n_layer
    if n < 0:
        raise UserError(f"--add-layers must be >= 0 (got {n})")
    if n == 0:
        return model
    src = source_layer if source_layer >= 0 else L + source_layer
    if not 0 <= src < L:
        raise UserError(f"--source-layer {source_layer} is not a layer of the {L}-layer source (0..{L - 1})")
    # the layer-indexed pieces whose placement depends on n_layer (value embeddings: alternating
    # from the last layer; backout: the middle layer; windows: the pattern tiled over the depth)
    if cfg.value_embeds:
        raise UserError("--add-layers: a model with value embeddings (--value-embeds) cannot grow in depth exactly "
                        "(which layers have one depends on the depth)")
    if cfg.backout:
        raise UserError("--add-layers: a model with --backout cannot grow in depth exactly (its layer is the middle one)")
    if "S" in cfg.window_pattern.upper():
        raise UserError(f"--add-layers: a model with sliding windows (--window-pattern {cfg.window_pattern}) cannot grow "
                        f"in depth exactly (the pattern is tiled over the depth)")
    if cfg.use_moe and n % cfg.moe_freq:
        raise UserError(f"--add-layers {n} must be a multiple of moe_freq {cfg.moe_freq}, or the layers after the "
                        f"insertion would change kind (MoE every {cfg.moe_freq}th layer)")
    new = _new_model(model, n_layer=L + n)
    old_blocks, blocks = model.transformer.h, new.transformer.h
    layer_map = depth_layer_map(L, n, src)
    new_state = {k: v for k, v in model.state_dict().items() if not k.startswith("transformer.h.")}
    if cfg.layer_lambdas:  # an inserted layer gets resid 1, x0 0: with its zeroed block, the identity
        for key, fill in (("resid_lambdas", 1.0), ("x0_lambdas", 0.0)):
            old = new_state[key]
            grown = torch.full((L + n,), fill, dtype=old.dtype, device=old.device)
            grown[[layer_map[i] for i in range(L)]] = old
            new_state[key] = grown
    for i, block in enumerate(old_blocks):
        for k, v in block.state_dict().items():
            new_state[f"transformer.h.{layer_map[i]}.{k}"] = v
    for p in range(src + 1, src + n + 1):
        want_moe = blocks[p].is_moe
        same_kind = [i for i in range(L) if old_blocks[i].is_moe == want_moe]
        earlier = [i for i in same_kind if i <= src]
        ffn_src = max(earlier) if earlier else min(same_kind)
        for k, v in old_blocks[src].attn.state_dict().items():
            new_state[f"transformer.h.{p}.attn.{k}"] = v
        for k, v in old_blocks[ffn_src].mlp.state_dict().items():
            new_state[f"transformer.h.{p}.mlp.{k}"] = v
        for k in ("attn.c_proj.weight", "mlp.c_proj.weight", "mlp.w_proj", "mlp.shared_proj.weight"):
            key = f"transformer.h.{p}.{k}"
            if key in new_state:
                new_state[key] = torch.zeros_like(new_state[key])
    new.load_state_dict(new_state, strict=True)
    return new


# --------------------------------------------------------------------------------- verify

def _moe_blocks(model):
    return {i: b.mlp for i, b in enumerate(model.transformer.h) if isinstance(b.mlp, MoE)}


@torch.no_grad()
def record_choices(model, idx):
    """{layer index: (B*T, k) expert ids} the model's MoE layers choose for idx, recomputed in a
    pre-hook by the same route() call the layer makes."""
    choices, hooks = {}, []
    for i, moe in _moe_blocks(model).items():
        def hook(m, args, i=i):
            x = args[0].reshape(-1, args[0].size(-1))
            choices[i] = route(x, m.router.weight, m.topk, m.router_kind,
                               m.expert_bias, m.route_scale)[1]
        hooks.append(moe.register_forward_pre_hook(hook))
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    return choices


def count_flips(source_choices, grown_choices, layer_map):
    """Expert choices of the source that the grown model does not make (per token, as sets)."""
    flips = 0
    for i, ids in source_choices.items():
        g = grown_choices[layer_map.get(i, i)]
        present = (g.unsqueeze(-1) == ids.unsqueeze(-2)).any(dim=-1)
        flips += int((~present).sum())
    return flips


@torch.no_grad()
def verify(source, grown, batches, layer_map=None):
    """Max |logit difference| between source and grown over `batches` (token id tensors, run
    in fp32, eval mode). When the source has MoE layers, the grown model is run with the
    source's expert choices forced (layer i -> layer_map[i]), and the choices it would make
    unforced are compared. Returns dict(max_abs_diff, flips, choices, unforced_max_abs_diff)."""
    layer_map = layer_map or {}
    source.eval()
    grown.eval()
    grown_moe = _moe_blocks(grown)
    out = dict(max_abs_diff=0.0, flips=0, choices=0, unforced_max_abs_diff=0.0)
    for idx in batches:
        ref = source(idx).float()
        src_choices = record_choices(source, idx) if _moe_blocks(source) else {}
        unforced = grown(idx).float()
        out["unforced_max_abs_diff"] = max(out["unforced_max_abs_diff"], (unforced - ref).abs().max().item())
        if src_choices:
            out["flips"] += count_flips(src_choices, record_choices(grown, idx), layer_map)
            out["choices"] += sum(c.numel() for c in src_choices.values())
            for i, ids in src_choices.items():
                grown_moe[layer_map.get(i, i)].forced_expert_ids = ids
            try:
                forced = grown(idx).float()
            finally:
                for m in grown_moe.values():
                    m.forced_expert_ids = None
        else:
            forced = unforced
        out["max_abs_diff"] = max(out["max_abs_diff"], (forced - ref).abs().max().item())
    return out


@torch.no_grad()
def verify_autocast(source, grown, batches, layer_map=None, dtype=torch.bfloat16):
    """The same comparison in the dtype CUDA trains in (base_train: bf16 autocast), on the
    batches' device: max |logits(grown) - logits(source)| with both under autocast and nothing
    forced, next to the source's own autocast-vs-fp32 gap as the yardstick. The transforms are
    exact in real arithmetic, not in bf16: a grown model sums differently split weights and
    wider dot products, so its rounding differs from its source's; a near-tied top-k choice can
    flip and move a token's logits by far more than rounding. What a bf16 run starts from is
    this function, so it is reported, not judged: a gap near the yardstick is rounding.
    Returns dict(dtype, max_abs_diff, source_gap, flips, choices, source_flips)."""
    layer_map = layer_map or {}
    source.eval()
    grown.eval()
    has_moe = bool(_moe_blocks(source))
    autocast = lambda: torch.autocast(device_type=batches[0].device.type, dtype=dtype)
    out = dict(dtype=str(dtype).removeprefix("torch."), max_abs_diff=0.0, source_gap=0.0, flips=0, choices=0,
               source_flips=0)
    for idx in batches:
        ref32 = source(idx).float()
        with autocast():
            ref = source(idx).float()
            got = grown(idx).float()
        out["max_abs_diff"] = max(out["max_abs_diff"], (got - ref).abs().max().item())
        out["source_gap"] = max(out["source_gap"], (ref - ref32).abs().max().item())
        if has_moe:
            src32 = record_choices(source, idx)
            with autocast():
                src, new = record_choices(source, idx), record_choices(grown, idx)
            out["flips"] += count_flips(src, new, layer_map)
            out["source_flips"] += count_flips(src32, src, {})
            out["choices"] += sum(c.numel() for c in src.values())
    return out


def autocast_line(r):
    """The one-line report of verify_autocast (scripts/grow.py prints it above the fp32 verdict)."""
    line = (f"training dtype ({r['dtype']} autocast): max abs logit difference {r['max_abs_diff']:.3g} "
            f"(the source's own {r['dtype']}-vs-fp32 gap: {r['source_gap']:.3g})")
    if r["choices"]:
        line += (f"; expert choices: {r['flips']:,} of {r['choices']:,} flip "
                 f"(the source's own {r['dtype']}-vs-fp32: {r['source_flips']:,})")
    return line
