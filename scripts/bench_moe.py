"""
Does the MoE's wall clock follow its FLOPs? Forward+backward of one FFN layer (dense 4d MLP,
our MoE at iso-FLOPs, a fine-grained MoE, the naive per-expert mask loop) over several widths
and token counts, plus a whole-model training step dense vs MoE at iso-FLOPs.

    python -m scripts.bench_moe                        # CPU, fp32, default grid (< 5 min, < 8 GB on 2 cores)
    python -m scripts.bench_moe --widths 256,512,1024 --step-rows 16   # bigger (prints the memory it needs first)
    python -m scripts.bench_moe --dtype bf16 --compile on   # on a GPU: bf16, compiled

Method: all cases live in one process and are timed round-robin (repeat r of every case, then
repeat r+1 ...), so a slow patch of the machine hits every case alike; one untimed warm-up
round first. Every ratio (MoE / dense, naive / ours) is taken per repeat, between cases timed
side by side, and reported as min / median / max over the repeats. Routing uses a random (not zero-initialised)
gate so tokens spread over the experts as in a trained model. Memory is the activation memory
autograd keeps for the backward pass (saved tensors, each storage counted once); on CUDA also
the peak allocated during forward+backward.

The last line is JSON (a stable interface for scripts): moe_over_dense_layer,
moe_over_dense_step, naive_over_grouped (medians; the layer ratios at the d=512, 16k-token case,
or the closest measured), each also as *_range [min, max].
"""

import json
import statistics
import time

import torch
import torch.nn as nn

from nanochat.common import ArgumentParser, UserError, keep_freed_memory, print0, require, run_main, sync_device
from nanochat.gpt import GPTConfig, MLP, build_model
from nanochat.model_args import iso_flops_expert_mult
from nanochat.moe import MoE, naive_moe_forward
from nanochat.optim import setup_optimizers
from nanochat.train_step import accumulate_gradients, optimizer_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = ArgumentParser(description="MoE vs dense speed and memory at iso-FLOPs")
    p.add_argument("--widths", default="256,512", help="comma-separated model widths d")
    p.add_argument("--tokens", default="4096,16384", help="comma-separated tokens per forward")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per case (ratios: min / median / max)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="parameter/activation dtype")
    p.add_argument("--device-type", default="", help="cpu | cuda (empty = autodetect)")
    p.add_argument("--compile", default="off", choices=["on", "off"], help="torch.compile every layer/model")
    p.add_argument("--fine-experts", default="64,8", help="fine-grained case: n_experts,topk (width 4d/topk)")
    p.add_argument("--step-only", action="store_true", help="skip the per-layer grid, time only the whole-model step")
    p.add_argument("--step-width", type=int, default=512, help="whole-model step: model width (0 = skip the step)")
    p.add_argument("--step-depth", type=int, default=4, help="whole-model step: layers")
    p.add_argument("--step-seq-len", type=int, default=512, help="whole-model step: sequence length")
    p.add_argument("--step-rows", type=int, default=8, help="whole-model step: rows per micro-batch")
    p.add_argument("--step-vocab", type=int, default=4096, help="whole-model step: vocabulary size")
    p.add_argument("--total-batch-size", type=int, default=524288,
                   help="tokens per optimizer step: the optimizer's time is spread over its micro-batches")
    args = p.parse_args(argv)
    try:
        args.widths = [int(v) for v in args.widths.split(",")]
        args.tokens = [int(v) for v in args.tokens.split(",")]
        args.fine = [int(v) for v in args.fine_experts.split(",")]
    except ValueError:
        raise UserError("--widths, --tokens and --fine-experts take comma-separated integers, e.g. --widths 256,512")
    require(len(args.fine) == 2 and 0 < args.fine[1] <= args.fine[0], "--fine-experts needs n_experts,topk with topk <= n_experts")
    require(all(w > 0 and w % 64 == 0 for w in args.widths), "--widths must be positive multiples of 64")
    require(all(n > 0 for n in args.tokens), "--tokens must be positive")
    require(args.repeats >= 1, "--repeats must be >= 1")
    require(args.step_width % 64 == 0 and args.step_width >= 0, "--step-width must be a multiple of 64 (0 = skip)")
    require(not args.step_only or args.step_width, "--step-only needs --step-width > 0")
    require(args.step_depth >= 1 and args.step_rows >= 1 and args.step_seq_len >= 1, "--step-depth/--step-rows/--step-seq-len must be >= 1")
    args.device_type = args.device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    require(args.device_type in ("cpu", "cuda"), f"--device-type {args.device_type}: use cpu or cuda")
    require(args.device_type != "cuda" or torch.cuda.is_available(), "--device-type cuda: no CUDA device here")
    return args


# ---------------------------------------------------------------------------------------------
# measurement helpers

def saved_activation_bytes(fn):
    """Bytes of the tensors autograd saves for backward while fn() runs (each storage once).
    This is the activation memory a training step holds between forward and backward."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def ratio_stats(num, den):
    """Per-repeat ratios num[r] / den[r] of two cases timed side by side: (min, median, max)."""
    ratios = [a / b for a, b in zip(num, den)]
    return min(ratios), statistics.median(ratios), max(ratios)


def fmt_ratio(stats):
    return f"{stats[1]:.3f} [{stats[0]:.3f}-{stats[2]:.3f}]"


# Measured peak resident memory / the estimates below, on the 2-core CPU box (fp32, glibc
# keeping freed memory, so the process holds its peak heap): 2.1-2.3 for the step at 4k/8k
# tokens and vocab 4096/8192, 2.0 for the d=512/16k layer grid (dev/LOG.md). Multiplied in.
MEASURED_OVER_ESTIMATE = 2.3


def estimate_memory_gib(args, bytes_per_value):
    """Peak memory before running: the whole-model step (weights, grads, optimizer state and
    activations, as scripts/iso_flops.py estimates them, for dense and MoE alive together) and the
    largest layer case (the fine-grained MoE saves ~28 activation values per token and width unit;
    4 layers, an input and its gradient live together; x2 for the allocator's reuse), each
    scaled by MEASURED_OVER_ESTIMATE."""
    from scripts.iso_flops import memory_estimate, build_meta
    step = 0
    if args.step_width:
        d = args.step_width
        common = dict(sequence_len=args.step_seq_len, vocab_size=args.step_vocab, n_layer=args.step_depth,
                      n_head=d // 64, n_kv_head=d // 64, n_embd=d)
        for cfg in (GPTConfig(**common), GPTConfig(**common, use_moe=True, n_experts=8, expert_topk=2,
                                                   expert_hidden_mult=iso_flops_expert_mult(2))):
            step += memory_estimate(build_meta(cfg), args.step_rows * args.step_seq_len, bytes_per_value)["total"]
    layer = 0 if args.step_only else 2 * 36 * max(args.widths) * max(args.tokens) * bytes_per_value
    return MEASURED_OVER_ESTIMATE * step / 2**30, MEASURED_OVER_ESTIMATE * layer / 2**30


def time_round_robin(cases, repeats, device):
    """cases: {name: fn}. One warm-up call each, then `repeats` rounds calling every case once.
    Returns {name: [seconds...]}."""
    for fn in cases.values():
        fn()
    sync_device(device)
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync_device(device)
            t0 = time.perf_counter()
            fn()
            sync_device(device)
            times[name].append(time.perf_counter() - t0)
    return times


class NaiveMoE(nn.Module):
    """The old per-expert loop with boolean masks, on the same weights as `moe` (baseline only)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        B, T, d = x.shape
        y = naive_moe_forward(x.reshape(B * T, d), self.moe.router.weight, self.moe.w_fc, self.moe.w_proj,
                              self.moe.topk, self.moe.router_kind)
        return y.view(B, T, d), {}


def make_layers(d, fine, device, dtype):
    """The FFN layers compared at width d: dense 4d MLP, top-2 of 8 at 2d, fine-grained top-k of E
    at 4d/k, and the naive loop on the top-2 of 8 weights. All iso-FLOPs (+ the router)."""
    torch.manual_seed(0)
    dense_cfg = GPTConfig(n_embd=d)
    moe_cfg = GPTConfig(n_embd=d, use_moe=True, n_experts=8, expert_topk=2, expert_hidden_mult=iso_flops_expert_mult(2))
    fine_cfg = GPTConfig(n_embd=d, use_moe=True, n_experts=fine[0], expert_topk=fine[1],
                         expert_hidden_mult=iso_flops_expert_mult(fine[1]))
    layers = {"dense": MLP(dense_cfg), "moe": MoE(moe_cfg), f"moe_fine{fine[0]}": MoE(fine_cfg)}
    with torch.no_grad():
        for layer in layers.values():
            for name, p in layer.named_parameters():
                fan_in = p.size(-1)
                p.normal_(0.0, fan_in ** -0.5)  # random gate too: a zero gate sends every token to the same experts
    layers["naive"] = NaiveMoE(layers["moe"])
    return {name: layer.to(device=device, dtype=dtype) for name, layer in layers.items()}


def bench_layers(d, n_tokens, args, device, dtype):
    layers = make_layers(d, args.fine, device, dtype)
    x = torch.randn(1, n_tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(1, n_tokens, d, device=device, dtype=dtype)
    calls, memory = {}, {}
    for name, layer in layers.items():
        fwd = layer
        if args.compile == "on" and name != "naive":  # the loop is the uncompilable baseline
            fwd = torch.compile(layer)

        def forward(fwd=fwd):
            out = fwd(x)
            return out[0] if isinstance(out, tuple) else out

        def step(forward=forward, layer=layer):
            forward().backward(grad_out)
            layer.zero_grad(set_to_none=True)
            x.grad = None

        calls[name] = step
        forward()  # compile / warm up outside the memory measurement
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        saved, out = saved_activation_bytes(forward)
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
        del out
        memory[name] = (saved, peak)
        step()
    times = time_round_robin(calls, args.repeats, device)
    rows = []
    for name in layers:
        rows.append(dict(d=d, tokens=n_tokens, case=name, ms=1e3 * statistics.median(times[name]),
                         over_dense=ratio_stats(times[name], times["dense"]),
                         saved_mib=memory[name][0] / 2**20,
                         peak_mib=None if memory[name][1] is None else memory[name][1] / 2**20))
    naive_over_moe = ratio_stats(times["naive"], times["moe"])
    return rows, naive_over_moe


def bench_step(args, device, dtype):
    """Whole-model training step, dense vs top-2-of-8 MoE at iso-FLOPs (GPTConfig's routing
    defaults, as base_train trains): forward+backward of one micro-batch and the optimizer step
    (nanochat/train_step.py's two halves, as base_train runs them), the latter divided by the
    micro-batches per optimizer step (--total-batch-size), each timed separately."""
    d = args.step_width
    micro_tokens = args.step_rows * args.step_seq_len
    accum = max(1, args.total_batch_size // micro_tokens)
    common = dict(sequence_len=args.step_seq_len, vocab_size=args.step_vocab, n_layer=args.step_depth,
                  n_head=d // 64, n_kv_head=d // 64, n_embd=d)
    configs = {"dense": GPTConfig(**common),
               "moe": GPTConfig(**common, use_moe=True, n_experts=8, expert_topk=2, expert_hidden_mult=iso_flops_expert_mult(2))}
    torch.manual_seed(0)
    idx = torch.randint(0, args.step_vocab, (args.step_rows, args.step_seq_len), device=device)
    targets = torch.roll(idx, -1, dims=1)
    fwdbwd, opt_step, info = {}, {}, {}
    for name, cfg in configs.items():
        model = build_model(cfg, device).to(dtype=dtype)
        with torch.no_grad():  # a random gate: see make_layers
            for m in model.modules():
                if isinstance(m, MoE):
                    m.router.weight.normal_(0.0, d ** -0.5)
        optimizers = setup_optimizers(model, device_type=device.type)
        fwd = torch.compile(model) if args.compile == "on" else model

        # the training step's two halves (nanochat/train_step.py), as base_train runs them
        run_fwdbwd = lambda model=model, fwd=fwd: accumulate_gradients(model, fwd, lambda: (idx, targets), 1)
        run_opt = lambda model=model, optimizers=optimizers: optimizer_step(model, optimizers)

        run_fwdbwd()
        run_opt()
        fwdbwd[name], opt_step[name] = run_fwdbwd, run_opt
        counts = model.num_scaling_params()
        saved, (loss, _) = saved_activation_bytes(lambda fwd=fwd: fwd(idx, targets))
        del loss
        state = [t for st in (opt.state for opt in optimizers) for s in st.values() for t in s.values()
                 if torch.is_tensor(t)]
        weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        state_bytes = 2 * weights_bytes + sum(t.numel() * t.element_size() for t in state)  # + grads
        info[name] = dict(params_total=counts["total"], params_active=counts["active_total"],
                          flops_per_token=model.estimate_flops(), saved_mib=saved / 2**20, state_mib=state_bytes / 2**20)
    times = time_round_robin({**{f"{k}/fwdbwd": f for k, f in fwdbwd.items()},
                              **{f"{k}/optim": f for k, f in opt_step.items()}}, args.repeats, device)
    step_times = {}
    for name in configs:
        info[name]["fwdbwd_ms"] = 1e3 * statistics.median(times[f"{name}/fwdbwd"])
        info[name]["optim_ms"] = 1e3 * statistics.median(times[f"{name}/optim"])
        info[name]["step_ms"] = info[name]["fwdbwd_ms"] + info[name]["optim_ms"] / accum
        step_times[name] = [f + o / accum for f, o in zip(times[f"{name}/fwdbwd"], times[f"{name}/optim"])]
    ratios = dict(step=ratio_stats(step_times["moe"], step_times["dense"]),
                  fwdbwd=ratio_stats(times["moe/fwdbwd"], times["dense/fwdbwd"]),
                  optim=ratio_stats(times["moe/optim"], times["dense/optim"]))
    return info, ratios, accum, micro_tokens


def _child_step(args, device, dtype):
    keep_freed_memory(device.type)
    torch.set_float32_matmul_precision("high")
    return bench_step(args, device, dtype)


def bench_step_in_child(args, device, dtype):
    """bench_step in a fresh process: it times on a fresh heap (timed after the layer grid the
    step read 1.14 where fresh processes read 0.95-1.02, dev/LOG.md), and the memory it holds
    (glibc keeps a process's peak heap, see keep_freed_memory) is gone before the grid runs, so
    the benchmark's peak is the larger phase's, not their sum (measured 7.2-7.6 GiB before)."""
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child_step, args, device, dtype).result()


def _fmt_mib(v):
    return "-" if v is None else f"{v:,.0f}"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device_type)
    dtype = DTYPES[args.dtype]
    torch.set_float32_matmul_precision("high")
    heap = keep_freed_memory(args.device_type)
    print0(f"bench_moe: {args.device_type} ({torch.get_num_threads()} threads), {args.dtype}, compile {args.compile}, "
           f"{args.repeats} repeats (ratios: median [min-max] of per-repeat ratios), torch {torch.__version__}"
           + (", glibc keeps freed memory" if heap else ""))
    step_gib, layer_gib = estimate_memory_gib(args, 4 if args.dtype == "fp32" else 2)
    print0(f"memory needed (estimate): whole-model step ~{step_gib:.1f} GiB, largest layer case ~{layer_gib:.1f} GiB"
           + (" (host RAM)" if device.type == "cpu" else " (GPU)"))
    result = dict(device=args.device_type, dtype=args.dtype, compile=args.compile)
    # The whole-model step runs in its own process (bench_step_in_child).
    if args.step_width:
        info, ratios, accum, micro_tokens = bench_step_in_child(args, device, dtype)
        print0(f"whole-model step: depth {args.step_depth}, width {args.step_width}, {micro_tokens} tokens per micro-batch, "
               f"optimizer every {accum} micro-batches (--total-batch-size {args.total_batch_size})")
        print0(f"{'model':<6} {'params':>8} {'active':>8} {'FLOPs/tok':>10} {'fwd+bwd ms':>11} {'optim ms':>9} {'step ms':>9} "
               f"{'saved MiB':>10} {'w+g+opt MiB':>12}")
        for name, r in info.items():
            print0(f"{name:<6} {r['params_total'] / 1e6:>7.2f}M {r['params_active'] / 1e6:>7.2f}M {r['flops_per_token']:>10.3e} "
                   f"{r['fwdbwd_ms']:>11.1f} {r['optim_ms']:>9.1f} {r['step_ms']:>9.1f} {r['saved_mib']:>10,.0f} "
                   f"{r['state_mib']:>12,.0f}")
        print0(f"MoE / dense, median [min-max] over {args.repeats} side-by-side repeats: step {fmt_ratio(ratios['step'])}, "
               f"fwd+bwd {fmt_ratio(ratios['fwdbwd'])}, optimizer {fmt_ratio(ratios['optim'])}")
        result.update(moe_over_dense_step=round(ratios["step"][1], 4),
                      moe_over_dense_step_range=[round(ratios["step"][0], 4), round(ratios["step"][2], 4)],
                      moe_over_dense_fwdbwd=round(ratios["fwdbwd"][1], 4),
                      moe_over_dense_optim=round(ratios["optim"][1], 4),
                      step_saved_mib={k: round(v["saved_mib"], 1) for k, v in info.items()},
                      step_state_mib={k: round(v["state_mib"], 1) for k, v in info.items()},
                      step_accum=accum)
    else:
        result["moe_over_dense_step"] = None
    if not args.step_only:
        result.update(bench_layer_grid(args, device, dtype))
    print0(json.dumps(result))
    return result


def bench_layer_grid(args, device, dtype):
    """The per-layer table over widths x token counts; returns the contract numbers of the d=512,
    16k-token case (or the closest measured one)."""
    rows, naive = [], {}
    print0(f"\nper layer: forward+backward of one FFN layer on (1, tokens, d) inputs")
    print0(f"{'d':>5} {'tokens':>7} {'case':<12} {'fwd+bwd ms':>11} {'x dense: median [min-max]':>26} "
           f"{'saved MiB':>10} {'peak MiB':>9}")
    for d in args.widths:
        for n_tokens in args.tokens:
            case_rows, naive[d, n_tokens] = bench_layers(d, n_tokens, args, device, dtype)
            for row in case_rows:
                rows.append(row)
                print0(f"{row['d']:>5} {row['tokens']:>7} {row['case']:<12} {row['ms']:>11.1f} "
                       f"{fmt_ratio(row['over_dense']):>26} {_fmt_mib(row['saved_mib']):>10} {_fmt_mib(row['peak_mib']):>9}")
    ref_d = min(args.widths, key=lambda w: abs(w - 512))
    ref_n = min(args.tokens, key=lambda n: abs(n - 16384))
    ref = {r["case"]: r for r in rows if r["d"] == ref_d and r["tokens"] == ref_n}
    layer, naive_ref, fine = ref["moe"]["over_dense"], naive[ref_d, ref_n], ref[f"moe_fine{args.fine[0]}"]["over_dense"]
    return dict(ref_width=ref_d, ref_tokens=ref_n,
                moe_over_dense_layer=round(layer[1], 4), moe_over_dense_layer_range=[round(layer[0], 4), round(layer[2], 4)],
                naive_over_grouped=round(naive_ref[1], 4), naive_over_grouped_range=[round(naive_ref[0], 4), round(naive_ref[2], 4)],
                fine_over_dense_layer=round(fine[1], 4),
                layer_saved_mib={k: round(v["saved_mib"], 1) for k, v in ref.items()})


if __name__ == "__main__":
    run_main(main)
