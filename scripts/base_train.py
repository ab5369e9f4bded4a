"""
Pretrain a GPT (dense, or MoE with --use-moe) on parquet text shards.

    python -m scripts.base_train                                  # CPU or one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --use-moe

Data (--data): `synthetic` (the built-in offline corpus, with an exact entropy floor),
`fineweb` (downloads shards), or a path (a folder of shards, or .txt/.jsonl/.parquet files
that are turned into shards). Missing corpus and tokenizer are prepared on first use
(scripts/prepare_data.py; under torchrun, run that first).
Everything a run writes goes to $NANOCHAT_BASE_DIR/runs/<model-tag>/ (metrics.jsonl,
config.json, checkpoints/).
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat.common import (UserError, require, ArgumentParser, run_main, print0, get_base_dir, git_commit, check_device_type,
                             get_dist_info, compute_init, compute_cleanup, exit_distributed_worker, DummyWandb, get_peak_flops,
                             keep_freed_memory, atomic_write_json)
from nanochat.gpt import GPTConfig
from nanochat.model_args import add_model_args, validate_model_args, config_from_args, parse_with_preset
from nanochat.report import (MetricsLog, peak_memory_mb, finite_or_none, format_step_line, training_summary_rows, summary_table,
                             describe_params, hardware_info)
from nanochat.train_step import add_optimizer_args, RECIPE_PRESETS
from scripts.prepare_data import add_data_args, validate_data_args, prepare_data
from scripts.base_eval import add_core_args, validate_core_args, prepare_core, core_due, run_core

def build_parser():
    p = ArgumentParser(prog="base_train", description="Pretrain a dense or MoE GPT.")
    add_model_args(p)  # shape, MoE and loss-weight flags, defaults from GPTConfig (nanochat/model_args.py)
    p.add_argument("--moe-stats-every", type=int, default=20, help="steps between routing-statistics records")
    add_data_args(p)  # --data and how it is prepared (scripts/prepare_data.py); default None: see parse_args
    # Training horizon: the first of these that is set wins
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps")
    p.add_argument("--target-flops", type=float, default=-1.0, help="train for this many FLOPs (active params)")
    p.add_argument("--target-param-data-ratio", type=float, default=20.0, help="tokens = ratio x active params (Chinchilla: 20)")
    # Batch
    p.add_argument("--device-batch-size", type=int, default=16, help="rows per micro-batch per process")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all processes")
    add_optimizer_args(p)  # the optimizers and the LR/momentum schedules (nanochat/train_step.py)
    p.add_argument("--seed", type=int, default=42)
    # Evaluation, sampling, checkpoints, logging
    p.add_argument("--eval-every", type=int, default=250, help="steps between val bpb evaluations (-1 = only at the end)")
    p.add_argument("--eval-tokens", type=int, default=10 * 524288, help="validation tokens per evaluation")
    p.add_argument("--sample-every", type=int, default=2000, help="steps between greedy samples (-1 = never)")
    add_core_args(p)  # --core-every, --core-max-per-task, --core-eval-dir (scripts/base_eval.py)
    p.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1 = only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=0, help="keep only the newest N step checkpoints (0 = all); best/ is always kept")
    p.add_argument("--resume-from-step", default="", help="resume this run from a saved step (or 'latest')")
    p.add_argument("--init-from", default="", help="RUN[:STEP]: start from a checkpoint's weights, config, tokenizer and data "
                                                   "position (a model tag or folder; STEP a number, best or latest), fresh optimizer")
    p.add_argument("--log-every", type=int, default=1, help="steps between step lines")
    p.add_argument("--run", default="dummy", help="wandb run name; 'dummy' = no wandb")
    p.add_argument("--model-tag", default="", help="run folder name under $NANOCHAT_BASE_DIR/runs (default from the config)")
    # Hardware
    p.add_argument("--device-type", default="", help="cpu | cuda | mps (empty = autodetect)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile the model (auto = on for CUDA)")
    p.add_argument("--fp8", action="store_true", help="FP8 training of the dense linears (torchao; needs an H100-class GPU)")
    p.add_argument("--expert-parallel", type=int, default=1,
                   help="under torchrun: split each MoE layer's experts over groups of N ranks (all_to_all token exchange)")
    p.add_argument("--shard-optimizer", default="auto", choices=["auto", "off"],
                   help="under torchrun, each rank keeps the optimizer state of its share of the parameters (ZeRO-1); "
                        "auto = on with more than one process")
    return p


def _argv(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m scripts.base_train -- --flags` passes the separator through
        argv = argv[1:]
    return argv


def parse_args(argv=None):
    args = parse_with_preset(build_parser(), _argv(argv), RECIPE_PRESETS)
    args.data = args.data or "synthetic"
    if args.warmup_ratio is None:
        args.warmup_ratio = 0.05 if args.init_from else 0.0
    return args


def explicit_flags(argv=None):
    """The dests of the flags given on the command line (not defaulted): a parse in which every
    default is 'absent'."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(_argv(argv))))


def read_init_from(spec, world_size):
    """--init-from RUN[:STEP] -> (checkpoint folder, its meta). Raises UserError."""
    from nanochat.checkpoint import checkpoint_for
    source, step = spec, "latest"
    head, sep, tail = spec.rpartition(":")
    if sep and (tail.isdigit() or tail in ("best", "latest")):
        source, step = head, tail
    ckpt = checkpoint_for("--init-from", source, step, is_tag=not os.path.exists(source))
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    require(meta.get("world_size", 1) == world_size,
            f"--init-from {spec}: saved by {meta.get('world_size', 1)} process(es), this run has {world_size}; "
            f"the data position is per rank, so start it with the same number")
    return ckpt, meta


def resolve_config(args, given, init_meta=None):
    """The GPTConfig this run trains, before any data work: from the flags, or (--init-from) the
    checkpoint's config with the flags the user gave (model_args.config_from_args). The vocab
    size is a placeholder until the tokenizer is known (train() sets it). With --init-from,
    --data defaults to the checkpoint's (the run continues its data stream)."""
    if init_meta is None:
        return config_from_args(args, vocab_size=args.vocab_size)
    config = config_from_args(args, None, base=GPTConfig.from_saved(init_meta["config"]), given=given)
    data = init_meta.get("args", {}).get("data")
    same = lambda a, b: a == b or (os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))
    require("data" not in given or data is None or same(args.data, data),
            f"--data {args.data} contradicts the --init-from checkpoint's data {data!r}: the run continues its data stream")
    args.data = data or args.data
    return config


def validate_args(args, config, world_size):
    """All the cheap checks, before any data, tokenizer or model work. Raises UserError.
    Returns the device type."""
    validate_model_args(args)
    if config.use_moe:
        require(args.moe_stats_every >= 1, f"--moe-stats-every must be >= 1 (got {args.moe_stats_every})")
    ep = args.expert_parallel
    if ep != 1:
        require(ep >= 1 and world_size % ep == 0, f"--expert-parallel {ep} must divide the number of processes {world_size}")
        require(config.use_moe and config.n_experts % ep == 0,
                f"--expert-parallel {ep} needs --use-moe with --n-experts a multiple of it")
        require(not config.capacity_factor, "--expert-parallel is dropless: drop --capacity-factor")
        require(not args.fp8, "--expert-parallel runs its experts in bf16, not FP8: drop --fp8")
    require(args.device_batch_size >= 1, f"--device-batch-size must be >= 1 (got {args.device_batch_size})")
    seq_len = config.sequence_len
    tokens_per_fwdbwd = args.device_batch_size * seq_len * world_size
    require(args.total_batch_size > 0 and args.total_batch_size % tokens_per_fwdbwd == 0,
            f"--total-batch-size {args.total_batch_size} is not a multiple of --device-batch-size x --max-seq-len x "
            f"processes = {args.device_batch_size} x {seq_len} x {world_size} = {tokens_per_fwdbwd}")
    require(args.num_iterations != 0, "--num-iterations must be positive (or -1 to derive it)")
    require(args.num_iterations > 0 or args.target_flops > 0 or args.target_param_data_ratio > 0,
            "set one of --num-iterations, --target-flops, --target-param-data-ratio")
    require(args.eval_every != 0, "--eval-every must be a number of steps, or -1 for an evaluation at the end only")
    validate_core_args(args)
    require(args.eval_tokens >= seq_len, f"--eval-tokens {args.eval_tokens} is less than one row of --max-seq-len {seq_len}")
    require(0 <= args.warmup_ratio <= 1 and 0 <= args.warmdown_ratio <= 1 and args.warmup_ratio + args.warmdown_ratio <= 1,
            "--warmup-ratio and --warmdown-ratio must be in [0, 1] and sum to at most 1")
    require(args.warmup_steps is None or args.warmup_steps >= 0, f"--warmup-steps must be >= 0 (got {args.warmup_steps})")
    require(args.muon_weight_decay >= 0, f"--muon-weight-decay must be >= 0 (got {args.muon_weight_decay})")
    require(args.lambda_lr >= 0, f"--lambda-lr must be >= 0 (got {args.lambda_lr})")
    require(args.resume_from_step in ("", "latest") or args.resume_from_step.isdigit(),
            f"--resume-from-step must be a step number or 'latest' (got {args.resume_from_step!r})")
    validate_data_args(args)
    device_type = check_device_type(args.device_type)
    if args.fp8:
        from nanochat.fp8 import check_fp8_supported
        check_fp8_supported(device_type)
    return device_type


def training_horizon(args, params, flops_per_token):
    """(optimizer steps, the flag that set them): --num-iterations, else --target-flops (training
    FLOPs, active parameters), else --target-param-data-ratio x the model's data_ratio_params
    (active, without the embedding and the training-only MTP heads) tokens."""
    if args.num_iterations > 0:
        return args.num_iterations, "--num-iterations"
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * args.total_batch_size))), "--target-flops"
    target_tokens = args.target_param_data_ratio * params["data_ratio_params"]
    return max(1, round(target_tokens / args.total_batch_size)), "--target-param-data-ratio"


def training_autocast(device_type, config):
    """bf16 autocast on CUDA (fp32 elsewhere), unless the model casts its weights to the
    activation dtype itself (config.cast_weights, nanochat's way): autocast on top would cast
    again what the model already cast, and run its fp32 parts (norms, softmax) in its own way."""
    if device_type == "cuda" and not getattr(config, "cast_weights", False):
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def evaluate(model, val_batches, eval_steps, token_bytes, autocast, lockstep=False):
    """Val bits per byte over eval_steps batches, in eval mode (dropless MoE)."""
    from nanochat.loss_eval import evaluate_bpb
    model.eval()
    with autocast:
        bpb = evaluate_bpb(model, val_batches, eval_steps, token_bytes, lockstep)
    model.train()
    return bpb


def print_samples(model, tokenizer, prompts, autocast, max_tokens=24):
    """Greedy continuations of a few validation prompts, through the KV-cache engine."""
    from nanochat.engine import generate
    model.eval()
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend_bos=True)
        with autocast:
            out = generate(model, ids, max_tokens, temperature=0.0, bos_token_id=tokenizer.get_bos_token_id())[0]
        print0(f"  sample | {prompt!r} -> {tokenizer.decode(out)!r}")
    model.train()


def parallel_optimizers(model, args, device_type, rank, world_size, sharded):
    """The optimizers and how gradients and parameters cross ranks, for train_step: expert
    parallelism (each rank's experts exchange tokens; expert grads summed over replicas), the
    sharded optimizer (ZeRO-1: each gradient reduced to the rank owning its state, parameters
    broadcast back after the update) or plain data parallelism (gradients averaged). Returns
    (optimizers, sync_grads, after_update or None, EP group or None)."""
    from nanochat.optim import (setup_optimizers, all_reduce_grads, shard_owners, reduce_grads_to_owners,
                                broadcast_from_owners)
    from nanochat.expert_parallel import ep_groups, enable_expert_parallel, sync_expert_grads
    ep, ep_group, expert_params = args.expert_parallel, None, []
    if ep > 1:
        ep_group, replica_group = ep_groups(world_size, ep, rank)
        expert_params = enable_expert_parallel(model, ep, ep_group)
        n_local = sum(p.numel() for p in expert_params)
        print0(f"Expert parallelism: {ep} ranks per group, {model.config.n_experts // ep} experts per rank per MoE layer "
               f"({n_local:,} expert params here, 1/{ep} of {n_local * ep:,})")
    local = set(expert_params)
    replicated = [p for p in model.parameters() if p not in local]
    owners = shard_owners(model, world_size, replicated) if sharded else None
    optimizers = setup_optimizers(model, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                  matrix_lr=args.matrix_lr, router_lr=args.router_lr, lambda_lr=args.lambda_lr,
                                  weight_decay=args.weight_decay, adamw_groups=args.adamw_groups,
                                  muon_coeffs=args.muon_coeffs, muon_row_equil=args.muon_eq, muon_renorm=args.muon_plus,
                                  normuon=args.normuon, muon_weight_decay=args.muon_weight_decay,
                                  cautious_wd=args.cautious_wd, device_type=device_type, owners=owners, rank=rank,
                                  world_size=world_size)

    def sync_grads():
        if sharded:  # each gradient summed onto the rank that owns its optimizer state
            reduce_grads_to_owners(model, owners, rank, world_size)
        else:
            all_reduce_grads(model, world_size, replicated)
        if ep > 1:
            sync_expert_grads(expert_params, replica_group, world_size)
    after_update = (lambda: broadcast_from_owners(model, owners)) if sharded else None
    return optimizers, sync_grads, after_update, ep_group


@dataclass
class RunState:
    """What the loop carries from step to step, and what a checkpoint and the summary record."""
    step: int = 0
    flops: float = 0.0
    val_bpb: float = float("nan")
    val_bpb_topk: float = float("nan")  # MoD: the final eval with top-k routing (not causal)
    min_val_bpb: float = float("inf")
    smooth_loss: float = 0.0      # EMA of the printed training loss (continued on resume)
    loader_state: dict = None     # loader position after the last batch trained on
    core: float = None            # the last CORE score (--core-every)
    step_times: list = field(default_factory=list)


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world_size = get_dist_info()
    init = None
    if args.init_from:
        ckpt, meta = read_init_from(args.init_from, world_size)
        init = dict(checkpoint=ckpt, meta=meta)
    config = resolve_config(args, explicit_flags(argv), init and init["meta"])
    device_type = validate_args(args, config, world_size)
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    if keep_freed_memory(device_type):  # ~1.5x faster CPU steps at d=512 (dev/LOG.md)
        print0("CPU: glibc keeps freed memory in the heap (no page faults on reused activations)")
    try:
        train(args, config, device_type, device, ddp, rank, world_size, init)
    finally:
        compute_cleanup()
    if ddp:
        exit_distributed_worker()


def train(args, config, device_type, device, ddp, rank, world_size, init=None):
    """config: resolve_config's (its vocab size is set here from the tokenizer, unless --init-from).
    init: {checkpoint, meta} for --init-from (weights, tokenizer, data position)."""
    from nanochat.gpt import build_model, meta_model
    from nanochat.optim import optimizer_state_mib_per_rank
    from nanochat.tokenizer import get_tokenizer, load_token_bytes
    from nanochat.dataloader import data_loader
    from nanochat.dataset import list_shards, split_shards, read_entropy_floor
    from nanochat.moe import collect_moe_stats, format_moe_stats, newly_dead_experts
    from nanochat.train_step import train_step, get_lr_multiplier, get_muon_momentum, get_muon_weight_decay
    from nanochat.checkpoint import save_checkpoint, load_checkpoint, find_latest_step, set_rng_state, read_loader_states
    from nanochat.expert_parallel import full_state_dict, local_expert_slices

    master = rank == 0
    torch.manual_seed(args.seed)
    if init:  # the source's data and tokenizer, as they are
        data_dir, tokenizer_dir = init["meta"]["data_dir"], init["meta"]["tokenizer_dir"]
        for what, path in (("data", data_dir), ("tokenizer", tokenizer_dir)):
            require(os.path.isdir(path), f"--init-from {args.init_from}: its {what} folder {path} is missing")
    else:
        data_dir, tokenizer_dir = prepare_data(args, rank, ddp)
    tokenizer = get_tokenizer(tokenizer_dir)
    print0(f"Data: {data_dir} | tokenizer: {tokenizer_dir} (vocab {tokenizer.get_vocab_size():,})")
    if tokenizer.get_vocab_size() != args.vocab_size and not init:
        # a tokenizer belongs to its corpus, not to a run: one trained earlier is used whatever
        # --vocab-size says, so say so rather than let the model be sized silently for another vocab
        print0(f"Note: using the tokenizer trained earlier for this data (vocab {tokenizer.get_vocab_size()}); "
               f"--vocab-size {args.vocab_size} only applies when one is trained: delete {tokenizer_dir} to retrain, "
               f"or use another NANOCHAT_BASE_DIR")
    token_bytes = load_token_bytes(tokenizer_dir, device=device)
    shards = list_shards(data_dir)
    train_shards, val_shards = split_shards(shards, "train"), split_shards(shards, "val")
    entropy_floor = read_entropy_floor(data_dir)
    core = prepare_core(args, rank, ddp)  # the CORE task files, checked before any training

    if not init:
        config = dataclasses.replace(config, vocab_size=tokenizer.get_vocab_size())
    ep = args.expert_parallel  # EP: each rank builds only its block of experts; the rest is replicated
    model = build_model(config, device, expert_shard=(rank % ep, ep) if ep > 1 else None)
    load_slices = local_expert_slices(model)  # under EP: read only this rank's block of each expert tensor
    init_flops = 0.0  # FLOPs the weights cost before this run (the --init-from lineage): records are cumulative
    if init:
        init_flops = init["meta"].get("flops") or 0.0
        if not args.resume_from_step:
            ckpt_parent, ckpt_name = os.path.split(os.path.normpath(init["checkpoint"]))
            load_checkpoint(ckpt_parent, ckpt_name, model, None, rank, device, slices=load_slices)
        print0(f"Initialised from {init['checkpoint']} (step {init['meta']['step']}, val bpb {init['meta'].get('val_bpb')}, "
               f"{init_flops:.3e} FLOPs before this run); fresh optimizer, LR warm-up "
               + (f"{args.warmup_steps} steps" if args.warmup_steps is not None else f"{args.warmup_ratio:g} of the steps"))
    whole = model if ep == 1 else meta_model(config)  # counts and FLOPs are of the whole model
    params = whole.num_scaling_params()
    flops_per_token = whole.estimate_flops()
    print0(describe_params(whole))
    if args.fp8:
        from nanochat.fp8 import convert_to_fp8
        converted, fp8_experts = convert_to_fp8(model)
        print0(f"FP8 linears ({len(converted)}): {', '.join(converted) or 'none'}")
        if config.use_moe:
            print0(f"FP8 grouped experts ({len(fp8_experts)} MoE layers): {', '.join(fp8_experts) or 'none'}; "
                   f"routers stay in fp32 (routing is computed in fp32 under autocast)")

    # Training horizon, from active parameters (an MoE's idle experts do no work per token).
    B, T = args.device_batch_size, config.sequence_len
    tokens_per_step = args.total_batch_size
    grad_accum = tokens_per_step // (B * T * world_size)
    num_iterations, horizon = training_horizon(args, params, flops_per_token)
    total_tokens = num_iterations * tokens_per_step
    print0(f"Steps: {num_iterations:,} (from {horizon}) x {tokens_per_step:,} tokens = {total_tokens:,} tokens, "
           f"{flops_per_token * total_tokens:.3e} FLOPs; grad accum {grad_accum} x {world_size} process(es)")
    print0(f"LR: matrix {args.matrix_lr:g}, embedding {args.embedding_lr:g}, unembedding {args.unembedding_lr:g}"
           + (f", router {args.router_lr:g}" if config.use_moe or config.mod_capacity else "")
           + (f" | warm-up {args.warmup_steps} steps" if args.warmup_steps is not None else f" | warm-up {args.warmup_ratio:g}")
           + f", warm-down {args.warmdown_ratio:g} of the steps to {args.final_lr_frac:g}x | device {device_type} x {world_size}")
    if entropy_floor is not None:
        print0(f"Entropy floor of the validation data: {entropy_floor:.4f} bits/byte (irreducible)")

    sharded = world_size > 1 and args.shard_optimizer != "off"
    optimizers, sync_grads, after_update, ep_group = parallel_optimizers(model, args, device_type, rank, world_size, sharded)
    n_mod = len(model.mod_layers())
    use_compile = args.compile == "on" or (args.compile == "auto" and device_type == "cuda")
    # Fixed shapes, one graph: the MoE's tensors are sized by (tokens, k, experts) only; how many
    # tokens each expert got is data (grouped-GEMM offsets), never a shape. So dynamic=False (no
    # symbolic shapes to guard) and fullgraph=True (a graph break is an error, not a silent slow
    # path). tests/test_compile.py proves zero recompiles under changing, skewed routing.
    # Under EP the token exchange is the exception: its split sizes are host data, so it runs eager
    # between compiled graphs (a graph break per MoE layer; the graphs' shapes stay fixed).
    train_model = torch.compile(model, dynamic=False, fullgraph=ep == 1) if use_compile else model
    autocast = training_autocast(device_type, config)
    if config.cast_weights and device_type == "cuda":  # nanochat's way: bf16 activations, fp32 master weights
        model.set_compute_dtype(torch.bfloat16)

    model_tag = args.model_tag or (f"d{config.n_layer}" + (f"_moe{config.n_experts}k{config.expert_topk}" if config.use_moe else "")
                                   + (f"_mod{config.mod_capacity:g}" if config.mod_capacity else "")
                                   + (f"_{config.layer_pattern}" if "M" in config.layer_pattern else ""))
    run_dir = os.path.join(get_base_dir(), "runs", model_tag)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    state = RunState(flops=init_flops)
    if init:
        loader_states = read_loader_states(init["checkpoint"])
        require(len(loader_states) > rank, f"--init-from {args.init_from}: no loader_rank{rank}.json in {init['checkpoint']}")
        state.loader_state = loader_states[rank]  # continue the source's data stream: no token is seen twice
    if args.resume_from_step:
        step_to_load = find_latest_step(ckpt_dir) if args.resume_from_step == "latest" else int(args.resume_from_step)

        def same_layout(meta):  # each rank restores its own optimizer state and data position
            if meta.get("world_size", world_size) != world_size:
                raise UserError(f"--resume-from-step: the checkpoint was saved by {meta['world_size']} process(es), this run "
                                f"has {world_size}; resume with the same number (each rank restores its own data position)")
            if meta.get("args", {}).get("expert_parallel", 1) != ep:
                raise UserError(f"--resume-from-step: the checkpoint was saved with --expert-parallel "
                                f"{meta['args'].get('expert_parallel', 1)}, this run has {ep}; resume with the same (the "
                                f"optimizer state is per rank), or start from its weights with --init-from")
        meta = load_checkpoint(ckpt_dir, step_to_load, model, optimizers, rank, device, slices=load_slices,
                               check_meta=same_layout)
        init_flops = meta.get("init_flops", init_flops)  # this run's own record, whatever --init-from resolves to now
        if "rng_state" in meta:
            set_rng_state(meta["rng_state"])
        state = RunState(step=meta["step"], flops=init_flops + meta["step"] * flops_per_token * tokens_per_step,
                         min_val_bpb=meta.get("min_val_bpb") or float("inf"), smooth_loss=meta.get("smooth_loss", 0.0),
                         loader_state=meta["loader_state"])
        print0(f"Resumed from {ckpt_dir} step {state.step}")
    start_step = state.step
    hardware = hardware_info(device_type, world_size)  # scripts/compare compares step seconds on equal hardware only
    header = dict(type="header", config=config.to_dict(), args=vars(args), commit=git_commit(), model_tag=model_tag,
                  total=params["total"], active_total=params["active_total"], params=params,
                  flops_per_token=flops_per_token, tokens_per_step=tokens_per_step, num_iterations=num_iterations,
                  world_size=world_size, device_type=device_type, hardware=hardware, data_dir=data_dir, entropy_floor=entropy_floor,
                  init_from=init and dict(checkpoint=init["checkpoint"], step=init["meta"]["step"], flops=init_flops,
                                          val_bpb=init["meta"].get("val_bpb"), grown_from=init["meta"].get("grown_from")))
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), master, resume_step=start_step)
    if master:
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_json(os.path.join(run_dir, "config.json"), header)
        print0(f"Run folder: {run_dir}")
    if start_step == 0:
        metrics.write(header)
    if master and args.run != "dummy":
        import wandb
        wandb_run = wandb.init(project="nanochat-moe", name=args.run, config=header)
    else:
        wandb_run = DummyWandb()

    def batches(shard_list, loader_state, loop):
        return data_loader(tokenizer, shard_list, B, T, rank=rank, world_size=world_size, device=device,
                           state=loader_state, loop=loop)

    def save(state, name=None):
        meta = dict(step=state.step, world_size=world_size, config=config.to_dict(), args=vars(args),
                    val_bpb=finite_or_none(state.val_bpb), min_val_bpb=finite_or_none(state.min_val_bpb),
                    smooth_loss=state.smooth_loss, flops=state.flops, init_flops=init_flops, num_iterations=num_iterations,
                    tokenizer_dir=tokenizer_dir, data_dir=data_dir, commit=git_commit())
        save_checkpoint(ckpt_dir, state.step, model, optimizers, rank, ddp, loader_state=state.loader_state,
                        meta=meta, name=name, keep=args.keep_checkpoints, sharded=sharded or ep > 1,
                        weights=full_state_dict(model, ep, ep_group, rank) if ep > 1 else None)

    eval_steps = max(1, args.eval_tokens // (B * T * world_size))
    sample_prompts = [d[:48].rsplit(" ", 1)[0] for d in _first_documents(val_shards[0], 3)]  # whole words
    dead_streaks = {}  # (layer, expert) -> consecutive stats intervals without a single token
    # The batch in x, y is fetched ahead and not consumed yet; state.loader_state is the position
    # after the last batch trained on (what a checkpoint saves).
    train_batches = batches(train_shards, state.loader_state, True)
    x, y, next_loader_state = next(train_batches)

    def next_batch():  # the batch fetched ahead; the loader position moves past it
        nonlocal x, y, next_loader_state
        batch = x, y
        state.loader_state = next_loader_state
        x, y, next_loader_state = next(train_batches)
        return batch

    t_start = time.time()
    while True:
        step = state.step
        last = step == num_iterations
        if args.eval_every > 0 and (step % args.eval_every == 0 or last) or (last and args.eval_every < 0):
            state.val_bpb = evaluate(model, batches(val_shards, None, False), eval_steps, token_bytes, autocast, ep > 1)
            floor = f" | floor {entropy_floor:.4f} (+{state.val_bpb - entropy_floor:.4f})" if entropy_floor is not None else ""
            print0(f"step {step:05d} | val bpb {state.val_bpb:.4f}{floor}")
            record = dict(type="eval", step=step, flops=state.flops, tokens=step * tokens_per_step, val_bpb=state.val_bpb)
            if last and n_mod:  # what the causal rule costs: top-k routing on whole sequences (not causal)
                model.set_mod_rule("topk")
                record["val_bpb_topk"] = state.val_bpb_topk = evaluate(model, batches(val_shards, None, False), eval_steps,
                                                                       token_bytes, autocast, ep > 1)
                model.set_mod_rule("auto")
                print0(f"step {step:05d} | val bpb with top-k MoD routing (not causal, a diagnostic) {state.val_bpb_topk:.4f}")
            metrics.write(record)
            wandb_run.log({"step": step, "flops": state.flops, "val/bpb": state.val_bpb})
            if state.val_bpb < state.min_val_bpb and step > start_step:
                state.min_val_bpb = state.val_bpb
                save(state, name="best")
            state.min_val_bpb = min(state.min_val_bpb, state.val_bpb)
        if core_due(args, step, last):
            record = run_core(model, tokenizer, core, device, autocast, ep > 1, master, step, state.flops, args.core_max_per_task)
            metrics.write(record)
            state.core = record["core"]
        # (under expert parallelism one rank cannot run the model alone: no samples)
        if args.sample_every > 0 and master and ep == 1 and (step % args.sample_every == 0 or last) and step > 0:
            print_samples(model, tokenizer, sample_prompts, autocast)
        if last or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            save(state)
        if last:
            break

        # One optimizer step (nanochat/train_step.py): grad_accum micro-batches, the gradients
        # synced over ranks, the update (idle experts stay; MoE/MoD bookkeeping in Muon's hook)
        t0 = time.time()

        lrm = get_lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac,
                                args.warmup_steps)
        momentum = get_muon_momentum(step, args.muon_momentum_schedule, num_iterations, args.warmdown_ratio)
        muon_wd = get_muon_weight_decay(step, num_iterations, args.muon_weight_decay, args.muon_wd_schedule)
        loss_means = train_step(model, train_model, optimizers, next_batch, grad_accum, autocast, lr_multiplier=lrm,
                                muon_momentum=momentum, sync_grads=sync_grads, after_update=after_update,
                                muon_weight_decay=muon_wd)
        if ddp:
            dist.all_reduce(loss_means)
            loss_means /= world_size
        train_loss, balance_loss, z_loss, *rest = loss_means.tolist()  # one host sync per step, for logging
        mtp_losses, mod_stats = rest[:config.mtp_heads], rest[config.mtp_heads:]
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        state.step = step = step + 1
        state.flops = init_flops + step * flops_per_token * tokens_per_step
        if not math.isfinite(train_loss):
            raise SystemExit(f"base_train: error: non-finite training loss ({train_loss}) at step {step}; "
                             f"stopping (last checkpoint untouched). Try a lower --matrix-lr / --embedding-lr.")

        if step - start_step > 2:  # the first steps include warm-up/compilation
            state.step_times.append(dt)
        if use_compile and step == start_step + 1:
            graphs_after_warmup = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            print0(f"torch.compile: first step {dt:.1f}s (compilation included), {graphs_after_warmup} graph(s)")
        state.smooth_loss = 0.9 * state.smooth_loss + 0.1 * train_loss
        debiased = state.smooth_loss / (1 - 0.9 ** step)
        tok_per_sec = tokens_per_step / dt
        peak = get_peak_flops(device_type)
        mfu = 100 * flops_per_token * tok_per_sec / (peak * world_size) if peak else None
        avg_dt = sum(state.step_times) / len(state.step_times) if state.step_times else dt
        epochs = state.loader_state["epochs"]
        record = dict(type="train", step=step, flops=state.flops, tokens=step * tokens_per_step, train_loss=train_loss,
                      lr_mult=lrm, dt=dt, tok_per_sec=tok_per_sec, mfu=mfu, epoch=state.loader_state["epoch"],
                      epochs=round(epochs, 4))
        if config.use_moe:
            record.update(balance_loss=balance_loss, z_loss=z_loss)
        if use_compile and step == start_step + 1:  # its dt includes compilation: compare leaves that out
            record.update(compile_warmup=True)
        if mtp_losses:  # per head: head i predicts token t+1+i (train_loss stays next-token)
            record.update(mtp_losses=mtp_losses)
        if n_mod:  # per routed block: the fraction the causal rule would process, its agreement with top-k
            record.update(mod_frac=mod_stats[0::2], mod_agree=mod_stats[1::2])
        metrics.write(record)
        wandb_run.log({"step": step, "flops": state.flops, "train/loss": train_loss, "train/balance_loss": balance_loss,
                       "train/z_loss": z_loss, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu or 0.0})
        if config.use_moe and (step % args.moe_stats_every == 0 or step == num_iterations):
            layers = collect_moe_stats(model, world_size)
            metrics.write(dict(type="moe", step=step, flops=state.flops, layers=layers))
            for i, s in enumerate(layers):
                wandb_run.log({"step": step, **{f"moe/layer{i}/{k}": v for k, v in s.items() if k != "load"}})
            print0(format_moe_stats(step, layers))
            for i, e in newly_dead_experts(dead_streaks, layers):
                print0(f"  warning: MoE layer {i} expert {e} has received no token for 3 intervals "
                       f"({3 * args.moe_stats_every} steps); consider --aux-free-bias or a larger --balance-loss-coeff")
        if step % args.log_every == 0 or step == num_iterations:
            print0(format_step_line(record, num_iterations, debiased, avg_dt * (num_iterations - step)))

    wall = time.time() - t_start
    times = state.step_times
    avg_tok_s = tokens_per_step / (sum(times) / len(times)) if times else float("nan")
    epochs = (state.loader_state or {}).get("epochs", 0.0)
    optim_mib = optimizer_state_mib_per_rank(optimizers, world_size, device)
    summary = dict(type="summary", step=state.step, flops=state.flops, tokens=state.step * tokens_per_step,
                   final_val_bpb=state.val_bpb, final_val_bpb_topk=finite_or_none(state.val_bpb_topk),
                   min_val_bpb=state.min_val_bpb, entropy_floor=entropy_floor, core=state.core,
                   total=params["total"], active_total=params["active_total"], flops_per_token=flops_per_token,
                   tok_per_sec=avg_tok_s, wall_time=wall, hardware=hardware, peak_memory_mb=peak_memory_mb(device_type),
                   optimizer_state_mib_per_rank=optim_mib, sharded_optimizer=sharded, epochs=round(epochs, 4))
    metrics.write(summary)
    metrics.close()
    wandb_run.finish()
    recompiles = None
    if use_compile and state.step > start_step:  # graphs compiled after step 1 (routing changes must not cause any)
        recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_after_warmup
    print0(summary_table(training_summary_rows(summary, model_tag, run_dir, init_flops, n_mod, recompiles)))


def _first_documents(path, n):
    import pyarrow.parquet as pq
    docs = pq.ParquetFile(path).read_row_group(0, columns=["text"]).column("text").to_pylist()
    return docs[:n]


if __name__ == "__main__":
    run_main(main)
