"""
The model's command-line flags, in one place: every script that builds or plans a model
(base_train, iso_flops, bench_moe) declares its shape and MoE flags with add_model_args and
turns them into a GPTConfig with config_from_args, so "--depth 4 --n-embd 128" means the same
model everywhere. Shape flags default to None: a script can tell "not given" from "given".
resolve_init_from does the reverse for base_train --init-from: the config comes from a
checkpoint, and the flags are checked against it and set from it.
"""

import json
import os

from nanochat.common import UserError, require
from nanochat.gpt import GPTConfig

# Defaults of the shape flags, applied by model_shape() when a flag is not given.
SHAPE_DEFAULTS = dict(depth=12, aspect_ratio=64, n_embd=0, head_dim=64, n_kv_head=0, max_seq_len=1024)


def iso_flops_expert_mult(topk, n_shared=0):
    """Expert width / model width at which top-k routed (+ shared) experts cost what the dense
    4d MLP costs: 4 / (k + s). The router's E·d FLOPs per layer are not compensated (a <1% excess
    at our shapes); router_exact_expert_hidden does that for the planner."""
    return 4 / (topk + n_shared)


def router_exact_expert_hidden(d, n_experts, topk, n_shared, align):
    """(rounded, exact) expert hidden width whose FLOPs, router included, equal the dense MLP's:
    (k + s) * 2dh + E d = 8 d^2 -> h = (8d - E) / (2 (k + s)), rounded to a multiple of align."""
    exact = (8 * d - n_experts) / (2 * (topk + n_shared))
    return max(align, int(round(exact / align)) * align), exact


def add_model_args(p, planner=False):
    """Shape and MoE flags. planner=True (iso_flops: it plans a dense and an MoE model at once)
    leaves out --use-moe and the routing variants, which do not change shapes or FLOPs."""
    p.add_argument("--depth", type=int, default=None, help=f"number of transformer layers (default {SHAPE_DEFAULTS['depth']})")
    p.add_argument("--aspect-ratio", type=int, default=None,
                   help=f"model width = depth x aspect-ratio unless --n-embd (default {SHAPE_DEFAULTS['aspect_ratio']})")
    p.add_argument("--n-embd", type=int, default=None, help="model width (default: depth x aspect-ratio)")
    p.add_argument("--head-dim", type=int, default=None, help=f"attention head dimension (default {SHAPE_DEFAULTS['head_dim']})")
    p.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: as many as query heads)")
    p.add_argument("--max-seq-len", type=int, default=None, help=f"context length in tokens (default {SHAPE_DEFAULTS['max_seq_len']})")
    p.add_argument("--mtp-heads", type=int, default=0,
                   help="multi-token prediction heads (training only): head i also predicts token t+1+i (0 = off)")
    p.add_argument("--mod-capacity", type=float, default=0.0,
                   help="Mixture-of-Depths: fraction of each sequence's tokens a routed block processes, e.g. 0.125 (0 = off)")
    p.add_argument("--mod-freq", type=int, default=2, help="--mod-capacity: every n-th block is routed (2 = every other)")
    p.add_argument("--layer-pattern", default="A",
                   help="token mixer per layer, repeated over the depth: A = attention, M = Mamba-2 (e.g. AM alternates)")
    p.add_argument("--mamba-d-state", type=int, default=64, help="Mamba-2 state size per head")
    p.add_argument("--mamba-expand", type=int, default=2, help="Mamba-2 inner width = expand x model width")
    p.add_argument("--mamba-head-dim", type=int, default=64, help="Mamba-2 head dimension (inner width / heads)")
    p.add_argument("--mamba-chunk", type=int, default=64, help="chunk length of Mamba-2's SSD scan")
    p.add_argument("--mamba-d-conv", type=int, default=4, help="width of Mamba-2's causal depthwise conv")
    if not planner:
        p.add_argument("--use-moe", action="store_true", help="replace MLPs with a token-choice top-k MoE")
    p.add_argument("--n-experts", type=int, default=8)
    p.add_argument("--expert-topk", type=int, default=2)
    p.add_argument("--moe-freq", type=int, default=1, help="every n-th layer is MoE (1 = all)")
    p.add_argument("--n-shared-experts", type=int, default=0, help="always-on experts per MoE layer")
    p.add_argument("--expert-hidden-mult", type=float, default=0.0,
                   help="expert hidden width / model width; 0 = 4 / (expert-topk + n-shared-experts), iso-FLOPs with the dense 4x MLP")
    if not planner:
        # CLI defaults: sigmoid scores balanced by the aux-loss-free bias (DeepSeek-V3), chosen by the
        # techmix study (dev/LOG.md 2026-11-26): the same loss as softmax + Switch within seed noise,
        # load CV ~0.1 instead of ~0.5, and faster steps. GPTConfig's own defaults stay softmax / 0.
        p.add_argument("--router", default="sigmoid", choices=["softmax", "sigmoid"],
                       help="router scores (sigmoid: DeepSeek-V3; softmax: Switch/GShard, use with --balance-loss-coeff)")
        p.add_argument("--route-scale", type=float, default=1.0, help="scale of the combine weights")
        p.add_argument("--aux-free-bias", type=float, default=0.01,
                       help="aux-loss-free balancing: bias update rate per optimizer step (0 = off; default 0.01 balances "
                            "within ~100 steps)")
        p.add_argument("--capacity-factor", type=float, default=0.0, help="expert capacity factor in training; 0 = dropless")


def model_shape(args):
    """(depth, n_embd, n_head, n_kv_head, head_dim, max_seq_len) from the flags and defaults,
    checked: raises UserError naming the flag."""
    get = lambda name: getattr(args, name) if getattr(args, name, None) is not None else SHAPE_DEFAULTS[name]
    depth, head_dim, seq = get("depth"), get("head_dim"), get("max_seq_len")
    require(depth >= 1, f"--depth must be >= 1 (got {depth})")
    require(seq >= 2, f"--max-seq-len must be >= 2 (got {seq})")
    require(head_dim >= 2 and head_dim % 2 == 0, f"--head-dim must be even and >= 2 (got {head_dim})")
    n_embd = get("n_embd") or depth * get("aspect_ratio")
    require(n_embd >= 1, f"--n-embd must be >= 1 (got {n_embd})")
    require(n_embd % head_dim == 0,
            f"model width {n_embd} ({'--n-embd' if get('n_embd') else '--depth x --aspect-ratio'}) is not divisible by --head-dim {head_dim}")
    n_head = n_embd // head_dim
    n_kv_head = get("n_kv_head") or n_head
    require(n_head % n_kv_head == 0, f"--n-kv-head {n_kv_head} must divide the number of heads {n_head}")
    return depth, n_embd, n_head, n_kv_head, head_dim, seq


def validate_model_args(args):
    """The cheap checks of the shape and MoE flags, before any work. Raises UserError."""
    depth, seq = model_shape(args)[0], model_shape(args)[5]
    require(0 <= args.mtp_heads < seq, f"--mtp-heads must be in 0..{seq - 1} (--max-seq-len {seq}; got {args.mtp_heads})")
    require(0 <= args.mod_capacity <= 1, f"--mod-capacity must be in [0, 1], 0 = off (got {args.mod_capacity})")
    require(not args.mod_capacity or 1 <= args.mod_freq <= depth,
            f"--mod-freq must be in 1..--depth {depth}, or no block is routed (got {args.mod_freq})")
    pattern = args.layer_pattern
    require(pattern != "" and set(pattern) <= {"A", "M"}, f"--layer-pattern must be letters A (attention) and M (Mamba), got {pattern!r}")
    if any(pattern[i % len(pattern)] == "M" for i in range(depth)):
        d = model_shape(args)[1]
        require(args.mamba_expand >= 1 and args.mamba_d_state >= 1 and args.mamba_chunk >= 1 and args.mamba_d_conv >= 1,
                "--mamba-expand, --mamba-d-state, --mamba-chunk and --mamba-d-conv must be >= 1")
        require(args.mamba_head_dim >= 1 and (args.mamba_expand * d) % args.mamba_head_dim == 0,
                f"--mamba-head-dim {args.mamba_head_dim} must divide the Mamba inner width --mamba-expand x width = {args.mamba_expand * d}")
        require(not args.mod_capacity, "--mod-capacity with Mamba layers (--layer-pattern) is not supported: "
                                       "a routed block must be an attention block")
    if not getattr(args, "use_moe", True):  # planners have no --use-moe: they always plan an MoE
        return
    require(args.n_experts >= 1, f"--n-experts must be >= 1 (got {args.n_experts})")
    require(args.expert_topk >= 1, f"--expert-topk must be >= 1 (got {args.expert_topk})")
    require(args.expert_topk <= args.n_experts, f"--expert-topk {args.expert_topk} exceeds --n-experts {args.n_experts}")
    require(args.moe_freq >= 1, f"--moe-freq must be >= 1 (got {args.moe_freq})")
    require(args.moe_freq <= depth, f"--moe-freq {args.moe_freq} > --depth {depth}: no layer would be MoE")
    require(args.n_shared_experts >= 0, f"--n-shared-experts must be >= 0 (got {args.n_shared_experts})")
    require(args.expert_hidden_mult >= 0,
            f"--expert-hidden-mult must be > 0, or 0 for 4 / (--expert-topk + --n-shared-experts) (got {args.expert_hidden_mult})")
    if hasattr(args, "router"):
        require(args.route_scale > 0, f"--route-scale must be > 0 (got {args.route_scale})")
        require(args.aux_free_bias >= 0, f"--aux-free-bias must be >= 0 (got {args.aux_free_bias})")
        require(args.capacity_factor >= 0, f"--capacity-factor must be >= 0, 0 = dropless (got {args.capacity_factor})")


def config_from_args(args, vocab_size, **overrides):
    """The GPTConfig the flags describe (checked). The MoE fields keep their GPTConfig defaults
    for a dense model; an --expert-hidden-mult of 0 means iso-FLOPs with the dense MLP."""
    depth, n_embd, n_head, n_kv_head, _, seq = model_shape(args)
    cfg = dict(sequence_len=seq, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
               mtp_heads=args.mtp_heads, mod_capacity=args.mod_capacity, mod_freq=args.mod_freq,
               layer_pattern=args.layer_pattern, mamba_d_state=args.mamba_d_state, mamba_expand=args.mamba_expand,
               mamba_head_dim=args.mamba_head_dim, mamba_chunk=args.mamba_chunk, mamba_d_conv=args.mamba_d_conv)
    if getattr(args, "use_moe", True):
        cfg.update(use_moe=True, n_experts=args.n_experts, expert_topk=args.expert_topk, moe_freq=args.moe_freq,
                   n_shared_experts=args.n_shared_experts,
                   expert_hidden_mult=args.expert_hidden_mult or iso_flops_expert_mult(args.expert_topk, args.n_shared_experts))
        if hasattr(args, "router"):
            cfg.update(router=args.router, route_scale=args.route_scale, aux_free_bias=args.aux_free_bias,
                       capacity_factor=args.capacity_factor)
    return GPTConfig(**{**cfg, **overrides})


# Model flags and the GPTConfig field each fixes; with --init-from the checkpoint's config
# rules, and a flag given with another value is an error. The training-time routing choices
# (--aux-free-bias, --capacity-factor) may change: they do not change the function at eval.
INIT_FROM_FIXED = dict(depth="n_layer", n_embd="n_embd", n_kv_head="n_kv_head", max_seq_len="sequence_len",
                       use_moe="use_moe", n_experts="n_experts", expert_topk="expert_topk", moe_freq="moe_freq",
                       n_shared_experts="n_shared_experts", expert_hidden_mult="expert_hidden_mult", router="router",
                       route_scale="route_scale", mtp_heads="mtp_heads", mod_capacity="mod_capacity", mod_freq="mod_freq",
                       layer_pattern="layer_pattern", mamba_d_state="mamba_d_state", mamba_expand="mamba_expand",
                       mamba_head_dim="mamba_head_dim", mamba_chunk="mamba_chunk", mamba_d_conv="mamba_d_conv")


def resolve_init_from(args, given, world_size):
    """--init-from RUN[:STEP]: the checkpoint folder, its meta and the config to train, with the
    model flags in `args` set from it (so the rest of the script reads one set of flags).
    Raises UserError for a flag that contradicts the checkpoint."""
    from nanochat.checkpoint import checkpoint_for
    source, step = args.init_from, "latest"
    head, sep, tail = source.rpartition(":")
    if sep and (tail.isdigit() or tail in ("best", "latest")):
        source, step = head, tail
    ckpt = checkpoint_for("--init-from", source, step, is_tag=not os.path.exists(source))
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    cfg = dict(meta["config"])
    require(meta.get("world_size", 1) == world_size,
            f"--init-from {args.init_from}: saved by {meta.get('world_size', 1)} process(es), this run has {world_size}; "
            f"the data position is per rank, so start it with the same number")
    wanted = {name: getattr(args, name) for name in INIT_FROM_FIXED if name in given}
    if "expert_hidden_mult" in wanted and wanted["expert_hidden_mult"] == 0:
        wanted["expert_hidden_mult"] = iso_flops_expert_mult(args.expert_topk, args.n_shared_experts)
    if "head_dim" in given:
        wanted["head_dim"] = args.head_dim
    cfg_view = dict(cfg, head_dim=cfg["n_embd"] // cfg["n_head"])
    for name, value in wanted.items():
        field_name = INIT_FROM_FIXED.get(name, name)  # head_dim is derived: n_embd / n_head
        if value != cfg_view[field_name]:  # (--use-moe, when given, is True)
            raise UserError(f"--{name.replace('_', '-')} {value} contradicts the --init-from checkpoint's {field_name} "
                            f"{cfg_view[field_name]} ({ckpt}); drop the flag, or change the shape with scripts.grow")
    require("aspect_ratio" not in given or "n_embd" in given or args.aspect_ratio * cfg["n_layer"] == cfg["n_embd"],
            f"--aspect-ratio {getattr(args, 'aspect_ratio', None)} contradicts the --init-from checkpoint's width {cfg['n_embd']}")
    if cfg["use_moe"]:  # training-time routing choices: the flag when given, else the checkpoint's
        for name in ("aux_free_bias", "capacity_factor"):
            if name in given:
                cfg[name] = getattr(args, name)
    data = meta.get("args", {}).get("data")
    same = lambda a, b: a == b or (os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))
    require("data" not in given or data is None or same(args.data, data),
            f"--data {args.data} contradicts the --init-from checkpoint's data {data!r}: the run continues its data stream")
    args.data = data or args.data
    config = GPTConfig(**cfg)
    # the flags the rest of the script reads, from the config
    args.depth, args.n_embd, args.n_kv_head, args.max_seq_len = config.n_layer, config.n_embd, config.n_kv_head, config.sequence_len
    args.head_dim, args.aspect_ratio = config.n_embd // config.n_head, None
    args.use_moe, args.n_experts, args.expert_topk, args.moe_freq = config.use_moe, config.n_experts, config.expert_topk, config.moe_freq
    args.n_shared_experts, args.expert_hidden_mult = config.n_shared_experts, config.expert_hidden_mult
    args.router, args.route_scale = config.router, config.route_scale
    args.aux_free_bias, args.capacity_factor = config.aux_free_bias, config.capacity_factor
    args.mtp_heads, args.mod_capacity, args.mod_freq = config.mtp_heads, config.mod_capacity, config.mod_freq
    for name in ("layer_pattern", "mamba_d_state", "mamba_expand", "mamba_head_dim", "mamba_chunk", "mamba_d_conv"):
        setattr(args, name, getattr(config, name))
    return dict(checkpoint=ckpt, meta=meta, config=config)
