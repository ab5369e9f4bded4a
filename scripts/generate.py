"""
Sample text from a trained checkpoint (dense or MoE), with a KV cache.

    python -m scripts.generate --model-tag cpu_moe --prompt "The cat" --num-samples 3
    python -m scripts.generate --path runs/x/checkpoints/step_000500 --temperature 0   # greedy

Prints each sample (prompt + continuation) and a final line with the generation speed.
The same --seed gives the same samples. --no-kv-cache re-runs the full context every step
(slower; for comparison).
"""

import time

import torch

from nanochat.common import require, ArgumentParser, run_main, check_device_type


def parse_args(argv=None):
    p = ArgumentParser(prog="generate", description="Sample from a trained dense or MoE checkpoint.")
    p.add_argument("--model-tag", default="", help="run folder name under $NANOCHAT_BASE_DIR/runs")
    p.add_argument("--path", default="", help="a run folder or a checkpoint folder (instead of --model-tag)")
    p.add_argument("--step", default="latest", help="checkpoint step number, 'best' or 'latest'")
    p.add_argument("--prompt", default="", help="text to continue (empty = start a new document)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per sample (at most)")
    p.add_argument("--num-samples", type=int, default=1, help="samples, generated as one batch")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this probability (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on seen tokens (1 = off, >1 = fewer repeats)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device-type", default="", help="cpu | cuda | mps (empty = autodetect)")
    p.add_argument("--no-kv-cache", action="store_true", help="re-run the whole context every step (for comparison)")
    return p.parse_args(argv)


def validate_args(args):
    """The cheap checks, before the model is loaded. Raises UserError."""
    require(bool(args.model_tag) != bool(args.path), "give one of --model-tag TAG or --path DIR")
    require(args.step in ("best", "latest") or args.step.isdigit(), f"--step must be a step number, 'best' or 'latest' (got {args.step!r})")
    require(args.max_tokens >= 1, f"--max-tokens must be >= 1 (got {args.max_tokens})")
    require(args.num_samples >= 1, f"--num-samples must be >= 1 (got {args.num_samples})")
    require(args.temperature >= 0, f"--temperature must be >= 0 (got {args.temperature})")
    require(args.top_k >= 0, f"--top-k must be >= 0, 0 = off (got {args.top_k})")
    require(0 < args.top_p <= 1, f"--top-p must be in (0, 1], 1 = off (got {args.top_p})")
    require(args.repetition_penalty > 0, f"--repetition-penalty must be > 0, 1 = off (got {args.repetition_penalty})")
    return check_device_type(args.device_type)


def model_summary(model):
    cfg = model.config
    kind = f"MoE top-{cfg.expert_topk} of {cfg.n_experts} experts" if cfg.use_moe else "dense"
    c = model.num_scaling_params()
    return f"{kind}, {cfg.n_layer} layers x {cfg.n_embd}, params {c['total']:,} total / {c['active_total']:,} active"


def main():
    args = parse_args()
    device_type = validate_args(args)
    from nanochat.checkpoint import load_model
    from nanochat.engine import generate
    from nanochat.checkpoint import checkpoint_for
    ckpt = (checkpoint_for("--model-tag", args.model_tag, args.step, is_tag=True) if args.model_tag
            else checkpoint_for("--path", args.path, args.step, is_tag=False))
    device = torch.device(device_type)
    model, tokenizer, meta = load_model(ckpt, device)
    print(f"Model: {ckpt} (step {meta.get('step', '?')}; {model_summary(model)})")
    prompt_ids = tokenizer.encode(args.prompt, prepend_bos=True)
    t0 = time.perf_counter()
    samples = generate(model, prompt_ids, args.max_tokens, num_samples=args.num_samples,
                       temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed,
                       use_kv_cache=not args.no_kv_cache, bos_token_id=tokenizer.get_bos_token_id())
    elapsed = time.perf_counter() - t0
    for i, sample in enumerate(samples):
        print(f"--- sample {i + 1}/{len(samples)} ({len(sample)} tokens) ---")
        # decode prompt and continuation together, so a character split across the seam is whole
        print(tokenizer.decode(prompt_ids[1:] + sample))
    n_new = sum(len(s) for s in samples)
    print("---")
    print(f"{n_new} tokens in {elapsed:.2f}s: {n_new / elapsed:,.1f} tokens/s "
          f"({device_type}, KV cache {'off' if args.no_kv_cache else 'on'}, batch of {len(samples)})")


if __name__ == "__main__":
    run_main(main)
