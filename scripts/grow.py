"""
Grow a trained checkpoint into a bigger model that computes the same function, verify it on
real validation batches, and save it as the step-0 checkpoint of a new run.

    python -m scripts.grow --from d2 --to d2_moe --upcycle --n-experts 8 --expert-topk 2
    python -m scripts.grow --from d2_moe --to d4_moe --width-mult 2 --add-layers 2
    python -m scripts.base_train --init-from d4_moe:0 --model-tag d4_moe ...   # then train it

Transforms run in the order upcycle, width, depth (nanochat/grow.py). The new run gets the
source's tokenizer, data and loader position (training continues the data stream), the new
config, and no optimizer state. Verification: max |logit difference| in fp32 on
--verify-batches validation batches, with an MoE source's expert choices forced (rounding can
flip a near-tie; the unforced flips are reported). A failed verification writes nothing and
exits 1. The last line is `verification: max abs logit difference <x> (PASSED < 0.0001) ...`.
The line above it reports the same comparison under bf16 autocast (CUDA trains in it): the
grown model's distance from its source there, next to the source's own bf16-vs-fp32 gap, and
the expert choices that flip. The two models round differently, so it is not a pass/fail.
"""

import os
import sys

import torch

from nanochat.common import require, ArgumentParser, run_main, get_base_dir, check_device_type, git_commit


def parse_args(argv=None):
    p = ArgumentParser(prog="grow", description="Grow a checkpoint (upcycle / width / depth), function-preserving.")
    p.add_argument("--from", dest="source", required=True, help="source run: a model tag, a run folder or a checkpoint folder")
    p.add_argument("--step", default="latest", help="source checkpoint: step number, 'best' or 'latest'")
    p.add_argument("--to", dest="target", required=True, help="model tag of the new run (under $NANOCHAT_BASE_DIR/runs)")
    p.add_argument("--upcycle", action="store_true", help="dense MLPs -> MoE whose experts are copies of the MLP")
    p.add_argument("--n-experts", type=int, default=8, help="--upcycle: experts per MoE layer")
    p.add_argument("--expert-topk", type=int, default=2, help="--upcycle: experts per token (>= 2: top-1 is not preserved)")
    p.add_argument("--n-shared-experts", type=int, default=0, help="--upcycle: always-on experts (copies of the MLP too)")
    p.add_argument("--moe-freq", type=int, default=1, help="--upcycle: every n-th layer becomes MoE")
    p.add_argument("--router", default="sigmoid", choices=["softmax", "sigmoid"], help="--upcycle: router scores")
    p.add_argument("--route-scale", type=float, default=1.0, help="--upcycle: combine-weight scale (compensated in the experts)")
    p.add_argument("--aux-free-bias", type=float, default=0.01, help="--upcycle: aux-loss-free balancing rate (0 = off)")
    p.add_argument("--capacity-factor", type=float, default=0.0, help="--upcycle: training capacity factor (0 = dropless)")
    p.add_argument("--width-mult", type=int, default=1, help="multiply the width (residual, heads, hidden units) by this integer")
    p.add_argument("--add-layers", type=int, default=0, help="insert this many identity-initialised blocks")
    p.add_argument("--source-layer", type=int, default=-1, help="--add-layers: the block to copy, inserted after it (-1 = last)")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers' init and of the width split")
    p.add_argument("--verify-batches", type=int, default=2, help="validation batches for the check")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per validation batch")
    p.add_argument("--device-type", default="cpu", help="cpu | cuda | mps (the check runs in fp32, then reports bf16 autocast)")
    return p.parse_args(argv)


def validate_args(args):
    require(args.upcycle or args.width_mult > 1 or args.add_layers > 0,
            "nothing to do: give --upcycle, --width-mult M (> 1) and/or --add-layers N (> 0)")
    require(args.width_mult >= 1, f"--width-mult must be an integer >= 1 (got {args.width_mult})")
    require(args.add_layers >= 0, f"--add-layers must be >= 0 (got {args.add_layers})")
    require(args.verify_batches >= 1, f"--verify-batches must be >= 1 (got {args.verify_batches})")
    require(args.device_batch_size >= 1, f"--device-batch-size must be >= 1 (got {args.device_batch_size})")
    require(args.step in ("best", "latest") or args.step.isdigit(), f"--step must be a step number, 'best' or 'latest' (got {args.step!r})")
    require(os.sep not in args.target and args.target not in ("", ".", ".."), f"--to {args.target!r}: give a model tag (a folder name)")
    target_dir = os.path.join(get_base_dir(), "runs", args.target)
    require(not os.path.exists(os.path.join(target_dir, "checkpoints")),
            f"--to {args.target}: {target_dir} already has checkpoints; choose a new name (nothing is overwritten)")
    return check_device_type(args.device_type), target_dir


def validation_batches(meta, tokenizer, n, B, T, device):
    from nanochat.dataloader import data_loader
    from nanochat.dataset import list_shards, split_shards
    shards = split_shards(list_shards(meta["data_dir"]), "val")
    out = []
    for x, _, _ in data_loader(tokenizer, shards, B, T, device=device, loop=False):
        out.append(x)
        if len(out) == n:
            break
    return out


def main(argv=None):
    args = parse_args(argv)
    device_type, target_dir = validate_args(args)
    from nanochat.checkpoint import checkpoint_for, load_model, read_loader_states, save_weights_checkpoint
    from nanochat.report import describe_params
    from nanochat.grow import (upcycle, grow_width, grow_depth, depth_layer_map, verify, verify_autocast,
                               autocast_line, TOLERANCE)
    device = torch.device(device_type)
    ckpt = checkpoint_for("--from", args.source, args.step, is_tag=not os.path.exists(args.source))
    source, tokenizer, meta = load_model(ckpt, device)
    print(f"Source: {ckpt} (step {meta['step']}, val bpb {meta.get('val_bpb')})")
    print(describe_params(source))

    grown, layer_map, done = source, {i: i for i in range(source.config.n_layer)}, []
    if args.upcycle:
        grown = upcycle(grown, args.n_experts, args.expert_topk, args.n_shared_experts, args.moe_freq, args.router,
                        args.route_scale, args.aux_free_bias, args.capacity_factor, seed=args.seed)
        done.append(f"upcycle to top-{args.expert_topk} of {args.n_experts} experts (moe_freq {args.moe_freq})")
    if args.width_mult > 1:
        grown = grow_width(grown, args.width_mult, seed=args.seed)
        done.append(f"width x{args.width_mult}")
    if args.add_layers:
        n_layer = grown.config.n_layer
        grown = grow_depth(grown, args.add_layers, args.source_layer)  # checks --source-layer
        src_layer = args.source_layer % n_layer
        moved = depth_layer_map(n_layer, args.add_layers, src_layer)
        layer_map = {i: moved[j] for i, j in layer_map.items()}
        done.append(f"+{args.add_layers} layers after layer {src_layer}")
    print(f"Grown ({'; '.join(done)}):")
    print(describe_params(grown))

    batches = validation_batches(meta, tokenizer, args.verify_batches, args.device_batch_size,
                                 source.config.sequence_len, device)
    result = verify(source, grown, batches, layer_map)
    tokens = sum(b.numel() for b in batches)
    if result["choices"]:
        print(f"expert choices: {result['flips']:,} of {result['choices']:,} flip when not forced "
              f"(max abs logit difference unforced {result['unforced_max_abs_diff']:.3e}); checked with the source's choices forced")
    result_bf16 = verify_autocast(source, grown, batches, layer_map)
    passed = result["max_abs_diff"] < TOLERANCE
    line = (f"verification: max abs logit difference {result['max_abs_diff']:.3e} "
            f"({'PASSED' if passed else 'FAILED'} < {TOLERANCE:g}) on {tokens:,} validation tokens, fp32")
    if not passed:
        print(autocast_line(result_bf16))
        print(line)
        print(f"grow: nothing written to {target_dir}", file=sys.stderr)
        sys.exit(1)
    new_meta = dict(step=0, world_size=meta.get("world_size", 1), config=grown.config.to_dict(),
                    args=dict(meta.get("args", {}), grow=vars(args)), val_bpb=meta.get("val_bpb"),
                    flops=meta.get("flops", 0.0), tokenizer_dir=meta["tokenizer_dir"], data_dir=meta["data_dir"],
                    commit=git_commit(),
                    grown_from=dict(checkpoint=os.path.abspath(ckpt), step=meta["step"], transforms=done,
                                    val_bpb=meta.get("val_bpb"), flops=meta.get("flops", 0.0), verification=result,
                                    verification_autocast=result_bf16,
                                    config=source.config.to_dict()))
    d = save_weights_checkpoint(os.path.join(target_dir, "checkpoints"), 0, grown, new_meta, read_loader_states(ckpt))
    print(f"Saved {d} (train it with: python -m scripts.base_train --init-from {args.target}:0 --model-tag {args.target})")
    print(autocast_line(result_bf16))
    print(line)


if __name__ == "__main__":
    run_main(main)
