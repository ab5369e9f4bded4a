"""
CORE of a trained model (nanochat/core_eval.py): a per-task table, the CORE line, and a
"type": "core" record appended to the run's metrics.jsonl.

    python -m scripts.base_eval --model-tag d4 --max-per-task 100 --eval-dir ../shared/data/eval
    python -m scripts.base_eval --model-tag d4                 # the full bundle, downloaded once
    torchrun --nproc_per_node=8 -m scripts.base_eval --model-tag d20

Task files come from --eval-dir (the bundle's nested layout or a flat folder of .jsonl files,
with eval_meta_data.csv), or from $NANOCHAT_BASE_DIR/eval_bundle, downloaded once (retried,
written under a temporary name and renamed when complete). Missing tasks are listed and the
score is marked partial.
"""

import os
import shutil
import zipfile

import torch

from nanochat.common import (require, ArgumentParser, run_main, print0, get_base_dir, check_device_type,
                             compute_init, compute_cleanup, UserError)
from nanochat.core_eval import load_tasks, evaluate_core, format_table, core_line, core_record

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def check_zip(path):
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise OSError(f"corrupt member {bad}")


def download_bundle(dest, url, max_retries=5, timeout=60, backoff=1.0):
    """Fetch the eval bundle zip and unpack it into dest: the zip and the unpacked folder are
    both written under temporary names and renamed when complete, so an interrupted download
    leaves nothing that looks finished."""
    from tqdm import tqdm
    from nanochat.dataset import download_file
    zip_path = dest + ".zip"
    with tqdm(unit="B", unit_scale=True, desc="eval bundle", disable=None) as bar:
        error = download_file(url, zip_path, max_retries, timeout, backoff, check=check_zip, bar=bar)
    if error is not None:
        raise UserError(f"eval bundle download failed from {url}: {error} (or pass --eval-dir)")
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(tmp)
    # the bundle zips one top folder (eval_bundle/); a zip of the files themselves works too
    inner = [os.path.join(tmp, d) for d in os.listdir(tmp)]
    root = inner[0] if len(inner) == 1 and os.path.isdir(inner[0]) else tmp
    os.replace(root, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    os.remove(zip_path)
    return dest


def resolve_eval_dir(eval_dir, flag="--eval-dir", url=EVAL_BUNDLE_URL, download=True):
    """The folder of CORE task files: the one given, or $NANOCHAT_BASE_DIR/eval_bundle
    (downloaded when absent and download is set)."""
    if eval_dir:
        require(os.path.isdir(eval_dir), f"{flag} {eval_dir}: no such folder")
        return eval_dir
    dest = os.path.join(get_base_dir(), "eval_bundle")
    if not os.path.isdir(dest):
        require(download, f"{flag}: no eval bundle at {dest} (pass {flag} or download it with scripts.base_eval)")
        print0(f"Downloading the CORE eval bundle to {dest} ...")
        download_bundle(dest, url)
    return dest


def report_core(summary, print_fn=print0):
    print_fn(format_table(summary))
    missing = f"; missing: {', '.join(summary['missing'])}" if summary["missing"] else ""
    print_fn(f"{core_line(summary)} | standard error {summary['core_se']:.4f}{missing}")


def parse_args(argv=None):
    p = ArgumentParser(description="CORE (DCLM's 22 in-context-learning tasks) of a trained model")
    p.add_argument("--model-tag", help="the run under $NANOCHAT_BASE_DIR/runs/")
    p.add_argument("--path", help="a run or checkpoint folder (instead of --model-tag)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per task after the shuffle (-1: all)")
    p.add_argument("--eval-dir", default="", help="folder of task files (default: $NANOCHAT_BASE_DIR/eval_bundle, downloaded once)")
    p.add_argument("--eval-url", default=EVAL_BUNDLE_URL, help="where the bundle is downloaded from")
    p.add_argument("--device", default="", help="cuda | cpu | mps (default: cuda when available)")
    p.add_argument("--no-metrics", action="store_true", help="do not append the result to the run's metrics.jsonl")
    p.add_argument("--prepare", action="store_true", help="only get the task files (download the bundle if needed), "
                                                          "check them, print what was found, and exit")
    args = p.parse_args(argv)
    if args.prepare:
        return args
    require(bool(args.model_tag) != bool(args.path), "give exactly one of --model-tag and --path")
    require(args.max_per_task == -1 or args.max_per_task >= 1, f"--max-per-task must be >= 1 or -1, got {args.max_per_task}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.prepare:  # before torchrun: a download inside rank 0 could outlast the others' wait
        eval_dir = resolve_eval_dir(args.eval_dir, url=args.eval_url)
        tasks, _ = load_tasks(eval_dir, args.max_per_task)
        missing = 22 - len(tasks)
        print(f"CORE task files: {eval_dir} ({len(tasks)}/22 tasks{', partial' if missing else ''})")
        return
    from nanochat.checkpoint import load_model, checkpoint_for
    from nanochat.common import autodetect_device_type
    device_type = check_device_type(args.device or autodetect_device_type())
    ckpt = (checkpoint_for("--model-tag", args.model_tag, args.step, is_tag=True) if args.model_tag
            else checkpoint_for("--path", args.path, args.step, is_tag=False))
    eval_dir = resolve_eval_dir(args.eval_dir, url=args.eval_url)
    tasks, baselines = load_tasks(eval_dir, args.max_per_task)  # every file checked before the model loads
    ddp, rank, _, world, device = compute_init(device_type)
    model, tokenizer, meta = load_model(ckpt, device)
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda" else None
    print0(f"Model: {ckpt} (step {meta.get('step', '?')}); tasks from {eval_dir}: {len(tasks)} of 22; "
           f"{args.max_per_task if args.max_per_task > 0 else 'all'} examples per task; {world} rank(s)")
    summary = evaluate_core(model, tokenizer, tasks, baselines, device, model.config.sequence_len, autocast)
    report_core(summary)
    run = os.path.dirname(os.path.dirname(os.path.normpath(ckpt)))
    metrics = os.path.join(run, "metrics.jsonl")
    if rank == 0 and not args.no_metrics and os.path.exists(metrics):
        import json
        with open(metrics, "a") as f:
            f.write(json.dumps(core_record(summary, meta.get("step"), meta.get("flops"), args.max_per_task)) + "\n")
        print0(f"Appended a core record to {metrics}")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)


# -----------------------------------------------------------------------------
# CORE during training (base_train --core-every)

def add_core_args(p):
    p.add_argument("--core-every", type=int, default=0,
                   help="steps between CORE evaluations, and one at the end (-1: at the end only; 0: never)")
    p.add_argument("--core-max-per-task", type=int, default=500, help="CORE examples per task (-1: all)")
    p.add_argument("--core-eval-dir", default="", help="CORE task files (default: $NANOCHAT_BASE_DIR/eval_bundle, downloaded once)")


def validate_core_args(args):
    require(args.core_every >= -1, f"--core-every must be >= 0, or -1 for the end only (got {args.core_every})")
    require(args.core_max_per_task == -1 or args.core_max_per_task >= 1,
            f"--core-max-per-task must be >= 1 or -1 (got {args.core_max_per_task})")
    if args.core_every and args.core_eval_dir:
        require(os.path.isdir(args.core_eval_dir), f"--core-eval-dir {args.core_eval_dir}: no such folder")


def prepare_core(args, rank, ddp):
    """(tasks, baselines) for --core-every, read and checked before training starts (rank 0
    downloads the bundle if needed; the others wait), or None when CORE is off."""
    if not args.core_every:
        return None
    if rank == 0:
        eval_dir = resolve_eval_dir(args.core_eval_dir, "--core-eval-dir")
    if ddp:
        import torch.distributed as dist
        dist.barrier()
    if rank != 0:
        eval_dir = resolve_eval_dir(args.core_eval_dir, "--core-eval-dir", download=False)
    return load_tasks(eval_dir, args.core_max_per_task)


def core_due(args, step, last):
    return bool(args.core_every) and (last or (args.core_every > 0 and step > 0 and step % args.core_every == 0))


def run_core(model, tokenizer, core, device, autocast, lockstep, master, step, flops, max_per_task):
    """Evaluate CORE now; prints the table on rank 0 and returns the metrics record."""
    tasks, baselines = core
    summary = evaluate_core(model, tokenizer, tasks, baselines, device, model.config.sequence_len, autocast, lockstep,
                            progress=master)
    if master:
        print0(f"step {step:05d} | CORE")
        report_core(summary)
    return core_record(summary, step, flops, max_per_task)
