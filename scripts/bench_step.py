"""
Whole-model training steps, side by side: does a variant's wall clock follow its FLOPs?
Each --variant is a name and extra model flags on top of the common shape flags; every variant
is built, (optionally) compiled, then timed round-robin (repeat r of every variant, then
repeat r+1 ...), so a slow patch of the machine hits all alike. Forward+backward of one
micro-batch of random tokens and the optimizers' step are timed apart; the reported step is
fwd+bwd + optimizer / (--total-batch-size / tokens per micro-batch), as in training, where the
optimizer runs once per gradient-accumulated batch (timing the optimizer once per micro-batch
would charge a MoD model, whose matmuls shrink but whose optimizer does not, for work it does
not do; the first GPU run did exactly that: dev/LOG.md).

    python -m scripts.bench_step --depth 2 --n-embd 64 --head-dim 32 --max-seq-len 256 --rows 64 \\
        --vocab-size 1024 --variant dense: --variant "mod:--mod-capacity 0.125" \\
        --variant "moe:--use-moe" --variant "mtp:--mtp-heads 1"
    python -m scripts.bench_step --device-type cuda --dtype bf16 --compile on --depth 12 --n-embd 768 ...

Per variant: FLOPs/token (GPT.estimate_flops), median step time and tok/s, time ratio and FLOPs
ratio against the first variant (a variant whose time ratio is above its FLOPs ratio loses
wall clock to overhead the FLOPs count does not see), MFU where the peak is known, graphs
compiled after the warm-up (recompiles: must be 0) and, on CUDA, peak memory; with --profile N,
the N ops with the most self time in one fwd+bwd (kernels on CUDA): where an overhead lives.
The last line is JSON: {variant: {...}}.
"""

import argparse
import json
import shlex
import statistics
import time
from contextlib import nullcontext

import torch

from nanochat.common import ArgumentParser, check_device_type, get_peak_flops, print0, require, run_main, sync_device
from nanochat.gpt import build_model
from nanochat.model_args import add_model_args, config_from_args, validate_model_args
from nanochat.optim import setup_optimizers
from nanochat.train_step import accumulate_gradients, optimizer_step


def variant_parser(spec):
    p = ArgumentParser(prog=f"bench_step: --variant {spec!r}", add_help=False)  # its errors name the variant
    add_model_args(p)
    return p


def parse_args(argv=None):
    p = ArgumentParser(prog="bench_step", description="Whole-model training steps of model variants, side by side.")
    add_model_args(p)
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:FLAGS, extra model flags for one variant (repeat; e.g. 'mod:--mod-capacity 0.125')")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--rows", type=int, default=16, help="rows per micro-batch")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compilation happens here)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, as base_train on CUDA")
    p.add_argument("--device-type", default="", help="cpu | cuda (empty = autodetect)")
    p.add_argument("--compile", default="off", choices=["on", "off"])
    p.add_argument("--fp8", action="store_true",
                   help="convert every variant to FP8 training (torchao, as base_train --fp8; needs an H100-class GPU)")
    p.add_argument("--total-batch-size", type=int, default=524288,
                   help="tokens per optimizer step: the optimizer's time is spread over its micro-batches")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one fwd+bwd per variant (torch.profiler) and report its N most "
                        "expensive ops by self time on the device (CPU time on CPU)")
    args = p.parse_args(argv)
    require(args.variant, "give at least one --variant NAME:FLAGS (e.g. --variant dense:)")
    variants = []
    for spec in args.variant:
        name, sep, flags = spec.partition(":")
        require(sep and name, f"--variant {spec!r}: expected NAME:FLAGS, e.g. 'mod:--mod-capacity 0.125'")
        # the common flags, then this variant's on top (argparse keeps what the namespace has)
        extra = variant_parser(spec).parse_args(shlex.split(flags), namespace=argparse.Namespace(**vars(args)))
        validate_model_args(extra)
        variants.append((name, extra))
    require(len({n for n, _ in variants}) == len(variants), "--variant names must differ")
    require(args.rows >= 1 and args.repeats >= 1 and args.warmup >= 1, "--rows, --repeats and --warmup must be >= 1")
    require(args.profile >= 0, "--profile N must be >= 0")
    args.variants = variants
    return args


def build_variant(name, flags, args, device):
    config = config_from_args(flags, args.vocab_size)
    model = build_model(config, device)
    if args.fp8:  # before the optimizers and compile, as in base_train
        from nanochat.fp8 import convert_to_fp8
        convert_to_fp8(model)
    model.train()
    optimizers = setup_optimizers(model, device_type=device.type)
    fwd = torch.compile(model, dynamic=False, fullgraph=True) if args.compile == "on" else model
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    T = config.sequence_len
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, args.vocab_size, (args.rows, T), device=device, generator=g)
    y = torch.randint(0, args.vocab_size, (args.rows, T), device=device, generator=g)

    # the training step's two halves (nanochat/train_step.py), as base_train runs them: the
    # loss terms with the config's coefficients, the optimizer with its MoE/MoD bookkeeping
    fwd_bwd = lambda: accumulate_gradients(model, fwd, lambda: (x, y), 1, autocast)
    opt_step = lambda: optimizer_step(model, optimizers)
    return dict(name=name, model=model, optimizers=optimizers, batch=(x, y), fwd_bwd=fwd_bwd, opt_step=opt_step,
                tokens=args.rows * T,
                flops_per_token=model.estimate_flops(), params=model.num_scaling_params())


def profile_ops(fwd_bwd, device, n):
    """One fwd+bwd under torch.profiler: {clock, total_ms, ops: the n ops (kernels on CUDA) with
    the most self time, [{name, calls, self_ms, share}]}. Self time: an op's own time, without
    the ops it calls, so the shares add up and name where the time is spent."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fwd_bwd()
        sync_device(device)
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events)
    events.sort(key=self_us, reverse=True)
    ops = [dict(name=e.key, calls=e.count, self_ms=self_us(e) / 1000, share=self_us(e) / total) for e in events[:n]]
    return dict(clock="device" if cuda else "CPU", total_ms=total / 1000, ops=ops)


def main(argv=None):
    args = parse_args(argv)
    device_type = check_device_type(args.device_type)
    require(args.dtype == "fp32" or device_type == "cuda", "--dtype bf16 is for CUDA (CPU runs fp32, as base_train)")
    if args.fp8:  # fail in one line before any model is built
        from nanochat.fp8 import check_fp8_supported
        check_fp8_supported(device_type)
    device = torch.device(device_type)
    print0(f"bench_step: {device_type} ({torch.get_num_threads()} threads), {args.dtype}{' + fp8' if args.fp8 else ''}, "
           f"compile {args.compile}, "
           f"{args.rows} rows per micro-batch, optimizer once per {args.total_batch_size:,} tokens; medians of "
           f"{args.repeats} round-robin repeats")
    cases = [build_variant(name, flags, args, device) for name, flags in args.variants]
    counters = torch._dynamo.utils.counters
    for case in cases:  # warm-up (and compilation), one variant at a time; its peak memory
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            case["fwd_bwd"]()
            case["opt_step"]()
        sync_device(device)
        case["warmup_s"] = time.perf_counter() - t0
        case["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else None
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    times = {c["name"]: [] for c in cases}
    for _ in range(args.repeats):
        for case in cases:
            sync_device(device)
            t0 = time.perf_counter()
            case["fwd_bwd"]()
            sync_device(device)
            t1 = time.perf_counter()
            case["opt_step"]()
            sync_device(device)
            accum = max(1, args.total_batch_size // case["tokens"])
            times[case["name"]].append((t1 - t0, time.perf_counter() - t1, t1 - t0 + (time.perf_counter() - t1) / accum))
    recompiles = counters["stats"]["unique_graphs"] - graphs_after_warmup
    peak = get_peak_flops(device_type)
    base = cases[0]
    median = lambda name, i: statistics.median(t[i] for t in times[name])
    base_t = median(base["name"], 2)
    result = {}
    rows = [("variant", "FLOPs/token", "params total/active", "fwd+bwd ms", "optim ms", "step ms", "tok/s", "time x",
             "FLOPs x", "MFU", "peak GiB")]
    for case in cases:
        t, t_fb, t_opt = median(case["name"], 2), median(case["name"], 0), median(case["name"], 1)
        tok_s = case["tokens"] / t
        mfu = 100 * case["flops_per_token"] * tok_s / peak if peak else None
        result[case["name"]] = dict(flops_per_token=case["flops_per_token"], step_s_median=t, fwd_bwd_s_median=t_fb,
                                    optim_s_median=t_opt, tok_per_sec=tok_s,
                                    time_ratio=t / base_t, flops_ratio=case["flops_per_token"] / base["flops_per_token"],
                                    mfu=mfu, warmup_s=case["warmup_s"], peak_memory_gib=case["peak_gib"], total=case["params"]["total"],
                                    active_total=case["params"]["active_total"])
        rows.append((case["name"], f"{case['flops_per_token']:.4e}",
                     f"{case['params']['total'] / 1e6:.2f}M/{case['params']['active_total'] / 1e6:.2f}M",
                     f"{1000 * t_fb:.1f}", f"{1000 * t_opt:.1f}", f"{1000 * t:.1f}", f"{tok_s:,.0f}", f"{t / base_t:.3f}",
                     f"{case['flops_per_token'] / base['flops_per_token']:.3f}", f"{mfu:.1f}%" if mfu else "n/a",
                     f"{case['peak_gib']:.2f}" if case["peak_gib"] is not None else "n/a"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print0("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if args.profile:  # where each variant's time goes (after the timing, so it cannot perturb it)
        for case in cases:
            result[case["name"]]["profile"] = top_ops = profile_ops(case["fwd_bwd"], device, args.profile)
            print0(f"\n{case['name']}: top {len(top_ops['ops'])} ops of one fwd+bwd by self {top_ops['clock']} time "
                   f"(of {top_ops['total_ms']:.1f} ms)")
            for op in top_ops["ops"]:
                print0(f"  {op['self_ms']:8.2f} ms {100 * op['share']:5.1f}%  x{op['calls']:<5d} {op['name'][:100]}")
    extra = dict(recompiles_after_warmup=recompiles if args.compile == "on" else None, repeats=args.repeats, fp8=args.fp8,
                 device=torch.cuda.get_device_name() if device_type == "cuda" else "cpu")
    if args.compile == "on":
        print0(f"graphs compiled after the warm-up (recompiles): {recompiles}")
    print0(json.dumps(dict(variants=result, **extra)))


if __name__ == "__main__":
    run_main(main)
