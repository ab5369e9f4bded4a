"""
Plan an iso-FLOPs comparison: a dense GPT and an MoE with the same training FLOPs per token.

    python -m scripts.iso_flops --depth 4 --n-embd 128 --n-experts 8 --expert-topk 2
    python -m scripts.iso_flops --depth 12 --n-experts 64 --expert-topk 8 --n-shared-experts 1

Per MoE layer the MoE spends (top-k + shared) x 2·d·h on experts plus E·d on the router,
where the dense layer spends 2·d·4d on its MLP. Equal FLOPs therefore needs
h = (8d − E) / (2 (top-k + shared)) (--router-exact; rounded to a multiple of --align, as
kernels want aligned widths). By default the planner uses base_train's width, 4d / (top-k +
shared), which leaves the router's E·d uncompensated (or --expert-hidden-mult X); either way the
remaining mismatch, measured with GPT.estimate_flops() of the two built models, is reported. Prints both configs side by side with params, FLOPs/token, a
training-memory estimate, and the base_train flags to use.

Architecture variants (--mtp-heads, --mod-capacity/--mod-freq, --layer-pattern with Mamba
layers) apply to both models; the
planner then also prints what they do to FLOPs/token against the same models without them
(attention-only, no heads, no MoD),
and with --target-flops how many training tokens each of the four gets at that budget (the
fair comparison is at equal FLOPs: MTP heads cost tokens, MoD buys them).
"""

import math

import torch

from nanochat.common import UserError, ArgumentParser, run_main, require
from nanochat.gpt import GPT
from nanochat.model_args import (add_model_args, validate_model_args, model_shape, config_from_args,
                                 iso_flops_expert_mult, router_exact_expert_hidden)


def build_meta(config):
    with torch.device("meta"):  # shapes only: no memory, no init
        return GPT(config)


def activation_bytes_per_token(cfg, bytes_per_value):
    """Rough count of the activations autograd keeps per token (an estimate, not a
    measurement): per layer the residual input, two norms, q/k/v, attention output and
    projection input (~8d), then the MLP (input, 4d hidden before and after relu², ~9d) or
    the MoE (router logits/probs 2E, k copies of the input and output in dispatch order
    plus the un-permuted output ~3kd, 2 x k x h hidden, shared experts like a dense MLP of
    width s·h); plus logits in fp32 three times (logits, softcap, CE grad)."""
    d = cfg.n_embd
    h = round(cfg.expert_hidden_mult * d)
    total = 0
    for layer in range(cfg.n_layer):
        total += 8 * d
        if cfg.is_moe_layer(layer):
            k, s = cfg.expert_topk, cfg.n_shared_experts
            total += 2 * cfg.n_experts + 3 * k * d + 2 * k * h + (2 * s * h + d if s else 0)
        else:
            total += 9 * d
    return total * bytes_per_value + 3 * 4 * cfg.vocab_size


def memory_estimate(model, batch_tokens, bytes_per_value):
    """Training memory in bytes: fp32 weights and grads, optimizer states (AdamW: 2 per
    param for every role but "matrix", GPT.param_roles; Muon: 1 momentum buffer per matrix param), and the
    activation estimate at `batch_tokens` tokens per micro-batch."""
    params = sum(p.numel() for p in model.parameters())
    adam = model.num_scaling_params()["adamw"]
    weights, grads = 4 * params, 4 * params
    optim = 8 * adam + 4 * (params - adam)
    acts = activation_bytes_per_token(model.config, bytes_per_value) * batch_tokens
    return dict(weights=weights, grads=grads, optimizer=optim, activations=acts, total=weights + grads + optim + acts)


def fmt_params(n):
    return f"{n / 1e6:.2f}M"


def fmt_bytes(n):
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def main():
    p = ArgumentParser(prog="iso_flops", description="Dense and MoE configs with equal training FLOPs per token.")
    add_model_args(p, planner=True)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--router-exact", action="store_true",
                   help="solve for the expert width that also pays for the router's FLOPs, rounded to --align")
    p.add_argument("--align", type=int, default=8, help="--router-exact: round the expert width to a multiple of this")
    p.add_argument("--device-batch-size", type=int, default=16, help="rows per micro-batch, for the memory estimate")
    p.add_argument("--activation-bytes", type=int, default=2, help="bytes per activation value (2 = bf16 on GPU, 4 = fp32 CPU)")
    p.add_argument("--target-flops", type=float, default=0.0, help="also print the training tokens each model gets for this budget")
    args = p.parse_args()

    validate_model_args(args)
    require(args.align >= 1, f"--align must be >= 1 (got {args.align})")
    require(args.target_flops >= 0, f"--target-flops must be >= 0 (got {args.target_flops})")
    depth, d, _, _, head_dim, seq_len = model_shape(args)
    if args.router_exact:
        hidden, exact = router_exact_expert_hidden(d, args.n_experts, args.expert_topk, args.n_shared_experts, args.align)
    else:  # --expert-hidden-mult as given, else base_train's default 4 / (k + s)
        exact = (args.expert_hidden_mult or iso_flops_expert_mult(args.expert_topk, args.n_shared_experts)) * d
        hidden = round(exact)
    mult = hidden / d
    dense = build_meta(config_from_args(args, args.vocab_size, use_moe=False))
    moe = build_meta(config_from_args(args, args.vocab_size, expert_hidden_mult=mult))
    f_dense, f_moe = dense.estimate_flops(), moe.estimate_flops()
    mismatch = 100 * (f_moe - f_dense) / f_dense
    batch_tokens = args.device_batch_size * seq_len
    rows = []
    for name, model in (("dense", dense), ("moe", moe)):
        c = model.num_scaling_params()
        mem = memory_estimate(model, batch_tokens, args.activation_bytes)
        rows.append((name, c, model.estimate_flops(), mem))

    routed = f"top-{args.expert_topk} of {args.n_experts}" + (f" + {args.n_shared_experts} shared" if args.n_shared_experts else "")
    print(f"width {d}, depth {depth}, seq {seq_len}, vocab {args.vocab_size}; MoE {routed}, "
          f"every {args.moe_freq} layer(s)")
    how = f"router-exact {exact:.2f} -> {hidden} (multiple of {args.align})" if args.router_exact else f"{hidden}"
    print(f"iso-FLOPs expert width: {how}, "
          f"--expert-hidden-mult {mult:.6g}; FLOPs mismatch {mismatch:+.3f}%")
    header = ["", "dense", "moe"]
    lines = [
        ("FFN per layer", "4d MLP", f"{routed}, width {hidden}"),
        ("params total", fmt_params(rows[0][1]["total"]), fmt_params(rows[1][1]["total"])),
        ("params active", fmt_params(rows[0][1]["active_total"]), fmt_params(rows[1][1]["active_total"])),
        ("FLOPs/token (train)", f"{rows[0][2]:.4e}", f"{rows[1][2]:.4e}"),
    ]
    for key in ("weights", "grads", "optimizer", "activations", "total"):
        label = f"memory {key}" + (f" ({args.device_batch_size}x{seq_len} tok, {args.activation_bytes} B)" if key == "activations" else "")
        lines.append((label, fmt_bytes(rows[0][3][key]), fmt_bytes(rows[1][3][key])))
    widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(3)]
    for r in [header] + lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    variants = (f" --mtp-heads {args.mtp_heads}" if args.mtp_heads else "") + \
        (f" --mod-capacity {args.mod_capacity:g} --mod-freq {args.mod_freq}" if args.mod_capacity else "") + \
        (f" --layer-pattern {args.layer_pattern} --mamba-d-state {args.mamba_d_state} --mamba-expand {args.mamba_expand} "
         f"--mamba-head-dim {args.mamba_head_dim} --mamba-chunk {args.mamba_chunk} --mamba-d-conv {args.mamba_d_conv}"
         if "M" in args.layer_pattern else "")
    if variants:
        print_variant_plan(args, mult, f_dense, f_moe, variants.strip())
    base = f"--depth {depth} --n-embd {d} --head-dim {head_dim} --max-seq-len {seq_len}" + variants
    print("\nbase_train flags:")
    print(f"  dense: {base}")
    print(f"  moe:   {base} --use-moe --n-experts {args.n_experts} --expert-topk {args.expert_topk} "
          f"--n-shared-experts {args.n_shared_experts} --moe-freq {args.moe_freq} --expert-hidden-mult {mult:.6g}")
    if not math.isfinite(mismatch):
        raise UserError("could not compute FLOPs")


def print_variant_plan(args, mult, f_dense, f_moe, variants):
    """FLOPs/token of the two planned models against the same models without MTP/MoD, and the
    tokens each gets at --target-flops."""
    plain = dict(mtp_heads=0, mod_capacity=0.0, layer_pattern="A")
    f_dense0 = build_meta(config_from_args(args, args.vocab_size, use_moe=False, **plain)).estimate_flops()
    f_moe0 = build_meta(config_from_args(args, args.vocab_size, expert_hidden_mult=mult, **plain)).estimate_flops()
    print(f"\n{variants} against the same models without them:")
    for name, f0, f in (("dense", f_dense0, f_dense), ("moe", f_moe0, f_moe)):
        line = f"  {name:6s} FLOPs/token {f0:.4e} -> {f:.4e} ({f / f0:.3f}x)"
        if args.target_flops:
            line += f"; tokens at {args.target_flops:.3g} FLOPs: {args.target_flops / f0:,.0f} -> {args.target_flops / f:,.0f}"
        print(line)


if __name__ == "__main__":
    run_main(main)
