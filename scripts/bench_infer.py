"""
Inference benchmark: greedy decoding with the KV cache, one checkpoint or several side by
side (dense vs MoE, attention-only vs hybrid), at several batch sizes and context lengths.

    python -m scripts.bench_infer --model-tags cpu_dense cpu_moe --batch-sizes 1,4,16
    python -m scripts.bench_infer --model-tags attn hybrid --batch-sizes 1 --prompt-len 64,512,2048

Each row of a batch gets its own prompt of --prompt-len random (seeded) tokens after BOS, then
--gen-tokens greedy tokens are decoded (no early stop, so every run does the same work).
Per (model, batch size): 1 warm-up, then the median of --repeats timed runs. Within each
repeat the models take turns (and swap order every repeat) so they see the same machine state.

Columns:
    latency ms     wall time of one batch, prompt to last token: every sample in the batch
                   completes together, so this is the time one request waits
    ms/sample      latency / batch size (the amortised cost of a sample)
    prefill/decode the split of the latency: the prompt forward (B x (prompt + BOS) tokens),
                   then the decode loop (gen-tokens samplings, gen-tokens - 1 one-token forwards)
    tok/s          generated tokens / latency (prompt tokens not counted); samples/s likewise
    peak MiB       CUDA: torch.cuda.max_memory_allocated during the run ("cuda alloc");
                   CPU: the process's peak RSS so far ("cpu RSS"), a high-water mark of the
                   whole process (all models loaded), so it only ever grows
    KV MiB         the KV cache's tensors, exact (a Mamba layer's recurrent state included: it
                   does not grow with the context, attention layers' keys do)
    fwd FLOPs/tok  inference forward FLOPs per token, active parameters only:
                   2 x (active params - embedding) + 4 x n_attention_layers x n_embd x context,
                   with context the mean length attended during decode (prompt + (gen + 1) / 2),
                   plus per Mamba layer the recurrent state update and read, 4 x heads x
                   head_dim x state size (the decode step's form of the SSD scan).
                   (Training counts 6N + 12 x n_layer x n_embd x seq_len: model.estimate_flops.)
Finally one line of JSON with every row.
"""

import json
import os
import resource
import statistics
import sys
import time

import torch

from nanochat.common import UserError, require, ArgumentParser, run_main, check_device_type


def parse_args(argv=None):
    p = ArgumentParser(prog="bench_infer", description="Benchmark KV-cache inference of dense and MoE checkpoints.")
    p.add_argument("--model-tags", nargs="+", default=[], help="run folder names under $NANOCHAT_BASE_DIR/runs")
    p.add_argument("--paths", nargs="+", default=[], help="run folders or checkpoint folders (instead of --model-tags)")
    p.add_argument("--step", default="latest", help="checkpoint step number, 'best' or 'latest' (for every model)")
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", default="64", help="prompt tokens per row (after BOS); comma-separated for several")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens decoded per row")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per (model, batch size), after 1 warm-up")
    p.add_argument("--seed", type=int, default=42, help="seed of the random prompts")
    p.add_argument("--device-type", default="", help="cpu | cuda | mps (empty = autodetect)")
    return p.parse_args(argv)


def validate_args(args):
    """Cheap checks before loading anything. Returns (device_type, batch sizes)."""
    require(bool(args.model_tags) != bool(args.paths), "give one of --model-tags TAG [TAG ...] or --paths DIR [DIR ...]")
    require(args.step in ("best", "latest") or args.step.isdigit(), f"--step must be a step number, 'best' or 'latest' (got {args.step!r})")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, e.g. 1,4,16 (got {args.batch_sizes!r})")
    require(all(b >= 1 for b in batch_sizes), f"--batch-sizes must all be >= 1 (got {args.batch_sizes})")
    try:
        args.prompt_lens = [int(n) for n in str(args.prompt_len).split(",")]
    except ValueError:
        raise UserError(f"--prompt-len must be comma-separated integers, e.g. 64,512 (got {args.prompt_len!r})")
    require(all(n >= 0 for n in args.prompt_lens), f"--prompt-len must be >= 0 (got {args.prompt_len})")
    require(args.gen_tokens >= 1, f"--gen-tokens must be >= 1 (got {args.gen_tokens})")
    require(args.repeats >= 1, f"--repeats must be >= 1 (got {args.repeats})")
    return check_device_type(args.device_type), batch_sizes


def find_checkpoints(args):
    """[(label, checkpoint folder)] for --model-tags or --paths."""
    from nanochat.checkpoint import checkpoint_for
    flag = "--model-tags" if args.model_tags else "--paths"
    out = []
    for source in args.model_tags or args.paths:
        label = source if args.model_tags else os.path.basename(os.path.normpath(source))
        if any(label == l for l, _ in out):
            label = f"{label}#{len(out) + 1}"
        out.append((label, checkpoint_for(flag, source, args.step, is_tag=bool(args.model_tags))))
    return out


def forward_flops_per_token(model, context):
    """Inference forward FLOPs per token from active parameters: 2 per matmul weight (the
    embedding is a lookup) plus attention, QK^T and AV at 2 x n_embd each per attended key."""
    cfg = model.config
    c = model.num_scaling_params()
    head_dim = cfg.n_embd // cfg.n_head
    mamba = model.mamba_layers()
    n_heads_ssm = cfg.mamba_expand * cfg.n_embd // cfg.mamba_head_dim
    ssm_step = 4 * n_heads_ssm * cfg.mamba_head_dim * cfg.mamba_d_state
    return (2 * (c["active_total"] - c["wte"]) + 4 * (cfg.n_layer - len(mamba)) * cfg.n_head * head_dim * context
            + len(mamba) * ssm_step)


def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def run_once(model, prompts, gen_tokens, device):
    from nanochat.engine import generate_batch
    timings = {}
    peak_memory_reset(device)
    t0 = time.perf_counter()
    generate_batch(model, prompts, gen_tokens, temperature=0.0, use_kv_cache=True, stop_at_bos=False, timings=timings)
    wall = time.perf_counter() - t0
    return dict(wall=wall, prefill=timings["prefill_s"], decode=timings["decode_s"],
                kv_bytes=timings["kv_cache_bytes"], peak_mib=peak_memory_mib(device))


def make_prompts(vocab_size, bos_id, batch_size, prompt_len, seed):
    """BOS then random ordinary tokens; seeded, so every model and run gets the same prompts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size - 1, (batch_size, prompt_len), generator=g)
    ids = ids + (ids >= bos_id).long()  # skip BOS
    return [[bos_id] + row for row in ids.tolist()]


def fmt_table(rows, mem_col):
    cols = ["model", "prompt", "batch", "latency ms", "ms/sample", "prefill ms", "decode ms", "tok/s", "samples/s",
            mem_col, "KV MiB", "fwd FLOPs/tok", "params total", "params active"]
    cells = [[r["model"], str(r["prompt_len"]), str(r["batch_size"]), f"{r['latency_ms']:.1f}", f"{r['ms_per_sample']:.2f}",
              f"{r['prefill_ms']:.1f}", f"{r['decode_ms']:.1f}", f"{r['tokens_per_s']:,.0f}",
              f"{r['samples_per_s']:.2f}", f"{r['peak_mem_mib']:.0f}", f"{r['kv_cache_mib']:.2f}",
              f"{r['fwd_flops_per_token']:.3e}", f"{r['params_total']:,}", f"{r['params_active']:,}"] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep] + [line(row) for row in cells])


def main():
    args = parse_args()
    device_type, batch_sizes = validate_args(args)
    from nanochat.checkpoint import load_model
    from nanochat.engine import max_positions
    device = torch.device(device_type)
    models = []
    for label, ckpt in find_checkpoints(args):
        model, tokenizer, _ = load_model(ckpt, device)
        need = 1 + max(args.prompt_lens) + args.gen_tokens
        if need > max_positions(model):
            raise UserError(f"--prompt-len + --gen-tokens + BOS = {need} exceeds what {label} encodes ({max_positions(model)} positions)")
        models.append((label, ckpt, model, tokenizer.get_bos_token_id()))
        print(f"{label}: {ckpt}")
    mem_col = "peak MiB (cuda alloc)" if device.type == "cuda" else "peak MiB (cpu RSS)"
    print(f"device {device_type}, threads {torch.get_num_threads()}, prompt {args.prompt_len} + BOS, "
          f"{args.gen_tokens} greedy tokens, median of {args.repeats} after 1 warm-up")
    rows = []
    for prompt_len, bs in [(n, b) for n in args.prompt_lens for b in batch_sizes]:
        context = 1 + prompt_len + (args.gen_tokens + 1) / 2
        prompts = {label: make_prompts(model.config.vocab_size, bos, bs, prompt_len, args.seed)
                   for label, _, model, bos in models}
        for label, _, model, _ in models:  # warm-up (allocator, kernels, caches)
            run_once(model, prompts[label], args.gen_tokens, device)
        runs = {label: [] for label, *_ in models}
        for r in range(args.repeats):
            order = models if r % 2 == 0 else models[::-1]
            for label, _, model, _ in order:
                runs[label].append(run_once(model, prompts[label], args.gen_tokens, device))
        for label, ckpt, model, _ in models:
            med = lambda key, label=label: statistics.median(run[key] for run in runs[label])
            wall = med("wall")
            c = model.num_scaling_params()
            rows.append(dict(
                model=label, checkpoint=ckpt, moe=model.config.use_moe, batch_size=bs,
                prompt_len=prompt_len, mamba_layers=len(model.mamba_layers()), gen_tokens=args.gen_tokens, repeats=args.repeats,
                latency_ms=1000 * wall, ms_per_sample=1000 * wall / bs,
                prefill_ms=1000 * med("prefill"), decode_ms=1000 * med("decode"),
                tokens_per_s=bs * args.gen_tokens / wall, samples_per_s=bs / wall,
                peak_mem_mib=max(run["peak_mib"] for run in runs[label]), peak_mem_kind=mem_col,
                kv_cache_mib=runs[label][0]["kv_bytes"] / 2**20,
                fwd_flops_per_token=forward_flops_per_token(model, context),
                params_total=c["total"], params_active=c["active_total"], device=device_type))
    print(fmt_table(rows, mem_col))
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    run_main(main)
