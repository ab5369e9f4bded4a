"""
The model's command-line flags, in one place: every script that builds or plans a model
(base_train, bench_step, iso_flops) declares its shape, MoE and loss-weight flags with
add_model_args and turns them into a GPTConfig with config_from_args, so "--depth 4 --n-embd 128"
means the same model everywhere. Every default comes from GPTConfig (defined once, there):
the flags that set a field take the field's default, and the shape flags (which derive n_embd
and n_head) default to None, so a script can tell "not given" from "given", and resolve to
GPTConfig's shape. With base_train --init-from, config_from_args starts from the checkpoint's
config and applies only the flags the user gave (the caller reads the checkpoint).
"""

import argparse
import dataclasses

from nanochat.common import UserError, require
from nanochat.gpt import GPTConfig

DEFAULT = GPTConfig()
# Defaults of the shape flags, applied by model_shape() when a flag is not given: GPTConfig's
# shape (n_embd = depth x aspect-ratio, head dim = n_embd / n_head).
SHAPE_DEFAULTS = dict(depth=DEFAULT.n_layer, aspect_ratio=DEFAULT.n_embd // DEFAULT.n_layer, n_embd=0,
                      head_dim=DEFAULT.n_embd // DEFAULT.n_head, n_kv_head=0, max_seq_len=DEFAULT.sequence_len)
# Flags that set one GPTConfig field each (flag dest == field name), beyond the shape flags; the
# MoE ones apply to an MoE only (a dense model keeps GPTConfig's defaults there).
MOE_FLAGS = ("use_moe", "n_experts", "expert_topk", "moe_freq", "n_shared_experts", "expert_hidden_mult", "router",
             "route_scale", "aux_free_bias", "capacity_factor", "balance_loss_coeff", "router_z_loss")
# nanochat's architecture pieces (GPTConfig's fields of the same names; all off by default)
NANOCHAT_FLAGS = ("value_embeds", "layer_lambdas", "smear", "backout", "window_pattern", "rotary_base", "qk_scale",
                  "vocab_pad", "embedding_init_std", "fc_init_scale", "cast_weights")
FIELD_FLAGS = ("mtp_heads", "mtp_weight", "mod_capacity", "mod_freq", "layer_pattern", "mamba_d_state", "mamba_expand",
               "mamba_head_dim", "mamba_chunk", "mamba_d_conv") + NANOCHAT_FLAGS + MOE_FLAGS
# Presets: flag dest -> value, applied as defaults (a flag given on the command line wins).
# "nanochat": its model at commit 92d63d4 (nanochat/gpt.py there). Its shape defaults are
# head dim 128 and aspect ratio 64 (base_train's --head-dim / --aspect-ratio), and n_kv_head =
# n_head; the preset sets the first two as well, since they are part of what "nanochat's model at
# depth N" means. Its window pattern is base_train's default SSSL (the GPTConfig default there
# too). The optimizer recipe is not a model field: see nanochat/optim.py.
MODEL_PRESETS = {
    "nanochat": dict(value_embeds=True, layer_lambdas=True, smear=True, backout=True, window_pattern="SSSL",
                     rotary_base=100000.0, qk_scale=1.2, vocab_pad=64, embedding_init_std=0.8, fc_init_scale=0.4,
                     cast_weights=True, head_dim=128, aspect_ratio=64),
}
# Fields a run started from a checkpoint (--init-from) may change: training-time choices that do
# not change the function the weights compute. Every other field is the checkpoint's, and a
# flag given with another value is an error.
# (cast_weights: how the matmuls round, not what they compute; the weights stay fp32 either way)
TRAINING_FIELDS = ("aux_free_bias", "capacity_factor", "balance_loss_coeff", "router_z_loss", "mtp_weight", "cast_weights")


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
    """Shape, MoE and loss-weight flags, defaults from GPTConfig. planner=True (iso_flops: it
    plans a dense and an MoE model at once) leaves out --use-moe, the routing variants and the
    loss weights, which do not change shapes or FLOPs."""
    D = DEFAULT
    p.add_argument("--depth", type=int, default=None, help=f"number of transformer layers (default {SHAPE_DEFAULTS['depth']})")
    p.add_argument("--aspect-ratio", type=int, default=None,
                   help=f"model width = depth x aspect-ratio unless --n-embd (default {SHAPE_DEFAULTS['aspect_ratio']})")
    p.add_argument("--n-embd", type=int, default=None, help="model width (default: depth x aspect-ratio)")
    p.add_argument("--head-dim", type=int, default=None, help=f"attention head dimension (default {SHAPE_DEFAULTS['head_dim']})")
    p.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: as many as query heads)")
    p.add_argument("--max-seq-len", type=int, default=None, help=f"context length in tokens (default {SHAPE_DEFAULTS['max_seq_len']})")
    p.add_argument("--mtp-heads", type=int, default=D.mtp_heads,
                   help="multi-token prediction heads (training only): head i also predicts token t+1+i (0 = off)")
    p.add_argument("--mod-capacity", type=float, default=D.mod_capacity,
                   help="Mixture-of-Depths: fraction of each sequence's tokens a routed block processes, e.g. 0.125 (0 = off)")
    p.add_argument("--mod-freq", type=int, default=D.mod_freq, help="--mod-capacity: every n-th block is routed (2 = every other)")
    p.add_argument("--layer-pattern", default=D.layer_pattern,
                   help="token mixer per layer, repeated over the depth: A = attention, M = Mamba-2 (e.g. AM alternates)")
    p.add_argument("--mamba-d-state", type=int, default=D.mamba_d_state, help="Mamba-2 state size per head")
    p.add_argument("--mamba-expand", type=int, default=D.mamba_expand, help="Mamba-2 inner width = expand x model width")
    p.add_argument("--mamba-head-dim", type=int, default=D.mamba_head_dim, help="Mamba-2 head dimension (inner width / heads)")
    p.add_argument("--mamba-chunk", type=int, default=D.mamba_chunk, help="chunk length of Mamba-2's SSD scan")
    p.add_argument("--mamba-d-conv", type=int, default=D.mamba_d_conv, help="width of Mamba-2's causal depthwise conv")
    # nanochat's architecture pieces (MODEL_PRESETS["nanochat"] turns them all on)
    flag = lambda name, **kw: p.add_argument("--" + name.replace("_", "-"), default=getattr(D, name), **kw)
    flag("value_embeds", action=argparse.BooleanOptionalAction, help="ResFormer value embeddings on alternating layers (the last always)")
    flag("layer_lambdas", action=argparse.BooleanOptionalAction, help="learnable per-layer residual and x0 scalars before each block")
    flag("smear", action=argparse.BooleanOptionalAction, help="mix the previous token's embedding into each token through a small gate")
    flag("backout", action=argparse.BooleanOptionalAction, help="subtract a learnable 0.2x of the middle layer's residual before the final norm")
    flag("window_pattern", help="sliding-window attention per layer, tiled: L = full, S = a quarter of --max-seq-len "
                                "rounded up to 128 (e.g. SSSL; the last layer is always L)")
    flag("rotary_base", type=float, help=f"rotary embedding base (default {D.rotary_base:g}; nanochat 100000)")
    flag("qk_scale", type=float, help=f"q and k multiplied by this after QK-norm (default {D.qk_scale:g}; nanochat 1.2)")
    flag("vocab_pad", type=int, help=f"pad the embeddings and lm_head to a multiple of this (default {D.vocab_pad}; nanochat 64)")
    flag("embedding_init_std", type=float, help=f"std of the token embedding init (default {D.embedding_init_std:g}; nanochat 0.8)")
    flag("fc_init_scale", type=float,
         help=f"the first MLP (and expert) matrix's init bound x this (default {D.fc_init_scale:g}; nanochat 0.4)")
    flag("cast_weights", action=argparse.BooleanOptionalAction, help="linears cast their weights to the activation dtype (bf16 on CUDA) "
                                                   "instead of autocast")
    if not planner:
        p.add_argument("--use-moe", action="store_true", help="replace MLPs with a token-choice top-k MoE")
    p.add_argument("--n-experts", type=int, default=D.n_experts)
    p.add_argument("--expert-topk", type=int, default=D.expert_topk)
    p.add_argument("--moe-freq", type=int, default=D.moe_freq, help="every n-th layer is MoE (1 = all)")
    p.add_argument("--n-shared-experts", type=int, default=D.n_shared_experts, help="always-on experts per MoE layer")
    # 0 is a rule, not a width: the iso-FLOPs width for whatever top-k and shared experts are
    # given (GPTConfig's default is that width for its own default top-k)
    p.add_argument("--expert-hidden-mult", type=float, default=0.0,
                   help="expert hidden width / model width; 0 = 4 / (expert-topk + n-shared-experts), iso-FLOPs with the dense 4x MLP")
    if planner:
        return
    p.add_argument("--preset", default="", choices=["", *MODEL_PRESETS],
                   help="a named set of defaults: nanochat = its model at commit 92d63d4 (and, in base_train, its "
                        "training recipe); flags given on the command line win")
    p.add_argument("--router", default=D.router, choices=["softmax", "sigmoid"],
                   help=f"router scores (sigmoid: DeepSeek-V3; softmax: Switch/GShard, use with --balance-loss-coeff; "
                        f"default {D.router})")
    p.add_argument("--route-scale", type=float, default=D.route_scale, help="scale of the combine weights")
    p.add_argument("--aux-free-bias", type=float, default=D.aux_free_bias,
                   help=f"aux-loss-free balancing: bias update rate per optimizer step (0 = no updates; a trained bias is "
                        f"still used; default {D.aux_free_bias:g} balances within ~100 steps)")
    p.add_argument("--capacity-factor", type=float, default=D.capacity_factor, help="expert capacity factor in training; 0 = dropless")
    p.add_argument("--balance-loss-coeff", type=float, default=D.balance_loss_coeff,
                   help=f"weight of each MoE layer's Switch balance loss (default {D.balance_loss_coeff:g}: the aux-free bias "
                        f"balances; Switch: --router softmax --aux-free-bias 0 --balance-loss-coeff 0.01)")
    p.add_argument("--router-z-loss", type=float, default=D.router_z_loss,
                   help="weight of each MoE layer's router z-loss (ST-MoE), e.g. 0.001")
    p.add_argument("--mtp-weight", type=float, default=D.mtp_weight,
                   help=f"--mtp-heads: weight of the MTP loss (the mean over heads), added to the next-token loss "
                        f"(default {D.mtp_weight:g}, as DeepSeek-V3 starts)")


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


def apply_preset_defaults(parser, preset):
    """A preset's values (flag dest -> value) as the parser's defaults, so flags given on the
    command line still win. Every key must be a flag's dest (a typo must not pass silently)."""
    dests = {a.dest for a in parser._actions}
    unknown = sorted(set(preset) - dests)
    assert not unknown, f"preset keys that are not flags: {unknown}"
    parser.set_defaults(**preset)
    return parser


def parse_with_preset(parser, argv, more_presets=None):
    """parser.parse_args(argv) with --preset NAME's values as defaults: MODEL_PRESETS[NAME], and
    more_presets[NAME] when given (base_train adds its training recipe). A flag on the command
    line wins over the preset; --init-from's checkpoint config wins over the preset's model
    values (they are not given flags)."""
    name = parser.parse_known_args(argv)[0].preset
    if name:
        apply_preset_defaults(parser, {**MODEL_PRESETS[name], **(more_presets or {}).get(name, {})})
    return parser.parse_args(argv)


def validate_model_args(args):
    """The cheap checks of the shape and MoE flags, before any work. Raises UserError."""
    depth, seq = model_shape(args)[0], model_shape(args)[5]
    _validate_nanochat_args(args, depth, seq)
    require(0 <= args.mtp_heads < seq, f"--mtp-heads must be in 0..{seq - 1} (--max-seq-len {seq}; got {args.mtp_heads})")
    require(getattr(args, "mtp_weight", 0) >= 0, f"--mtp-weight must be >= 0 (got {getattr(args, 'mtp_weight', 0)})")
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
        require(args.balance_loss_coeff >= 0, f"--balance-loss-coeff must be >= 0 (got {args.balance_loss_coeff})")
        require(args.router_z_loss >= 0, f"--router-z-loss must be >= 0 (got {args.router_z_loss})")


def _validate_nanochat_args(args, depth, seq):
    """The checks of nanochat's architecture flags (absent flags: GPTConfig's defaults)."""
    get = lambda name: getattr(args, name, getattr(DEFAULT, name))
    n_embd, n_head, n_kv_head = model_shape(args)[1:4]
    require(get("vocab_pad") >= 1, f"--vocab-pad must be >= 1 (got {get('vocab_pad')})")
    require(get("rotary_base") > 1, f"--rotary-base must be > 1 (got {get('rotary_base')})")
    require(get("qk_scale") > 0, f"--qk-scale must be > 0 (got {get('qk_scale')})")
    require(get("embedding_init_std") > 0, f"--embedding-init-std must be > 0 (got {get('embedding_init_std')})")
    require(get("fc_init_scale") > 0, f"--fc-init-scale must be > 0 (got {get('fc_init_scale')})")
    require(not get("smear") or n_embd >= 24, f"--smear reads 24 channels of the embedding: the width {n_embd} is < 24")
    require(not get("value_embeds") or n_embd >= 12,
            f"--value-embeds: the gate reads 12 channels of the block input, the width {n_embd} is < 12")
    pattern = get("window_pattern")
    require(pattern != "" and set(pattern.upper()) <= {"S", "L"},
            f"--window-pattern must be letters S (short window) and L (full context), got {pattern!r}")
    layers = get("layer_pattern") or "A"
    # (short windows apply to attention layers that are not MoD-routed: attention.layer_windows)
    require(not (get("cast_weights") and "M" in {layers[i % len(layers)] for i in range(depth)}),
            "--cast-weights with Mamba layers (--layer-pattern) is not supported: Mamba-2's conv and scan keep fp32 "
            "weights and need autocast")


def config_from_args(args, vocab_size, base=None, given=None, **overrides):
    """The GPTConfig the flags describe (checked). An --expert-hidden-mult of 0 means iso-FLOPs
    with the dense MLP. The MoE fields keep GPTConfig's defaults for a dense model, and a
    planner's parser (no --use-moe) always describes an MoE.
    base (a GPTConfig, e.g. a checkpoint's for --init-from) with `given` (the dests of the flags
    on the command line): the base config, with the training-time fields (TRAINING_FIELDS) the
    user gave applied; any other flag given must agree with the base, else UserError naming it.
    vocab_size is then the base's."""
    if base is not None:
        return _apply_given_flags(args, base, given or set())
    depth, n_embd, n_head, n_kv_head, _, seq = model_shape(args)
    cfg = dict(sequence_len=seq, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)
    use_moe = getattr(args, "use_moe", True)
    for name in FIELD_FLAGS:
        if hasattr(args, name) and (use_moe or name not in MOE_FLAGS):
            cfg[name] = getattr(args, name)
    if use_moe:
        cfg["use_moe"] = True
        cfg["expert_hidden_mult"] = args.expert_hidden_mult or iso_flops_expert_mult(args.expert_topk, args.n_shared_experts)
    return GPTConfig(**{**cfg, **overrides})


def _apply_given_flags(args, base, given):
    """config_from_args with a base config: see there."""
    cfg = dataclasses.asdict(base)
    view = dict(cfg, depth=cfg["n_layer"], max_seq_len=cfg["sequence_len"], head_dim=cfg["n_embd"] // cfg["n_head"])
    wanted = {name: getattr(args, name) for name in (*FIELD_FLAGS, "depth", "max_seq_len", "head_dim", "n_embd", "n_kv_head")
              if name in given}
    if wanted.get("expert_hidden_mult") == 0:
        wanted["expert_hidden_mult"] = iso_flops_expert_mult(args.expert_topk, args.n_shared_experts)
    for name, value in wanted.items():
        if name in TRAINING_FIELDS:
            cfg[name] = value
        elif value != view[name]:  # (--use-moe, when given, is True)
            raise UserError(f"--{name.replace('_', '-')} {value} contradicts the checkpoint's {name} {view[name]}; "
                            f"drop the flag, or change the shape with scripts.grow")
    require("aspect_ratio" not in given or "n_embd" in given or args.aspect_ratio * cfg["n_layer"] == cfg["n_embd"],
            f"--aspect-ratio {getattr(args, 'aspect_ratio', None)} contradicts the checkpoint's width {cfg['n_embd']}")
    return GPTConfig(**cfg)
