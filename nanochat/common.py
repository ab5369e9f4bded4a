"""
Small shared utilities: user-facing errors, printing on rank 0, the base directory and run
folders, atomic writes, device autodetection, torchrun (distributed) setup, a no-op wandb, and
peak FLOPs for MFU.
"""

import argparse
import json
import os
import sys
import subprocess

import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake in the user's input (a flag, a file). Entry points turn it into one line
    on stderr and a non-zero exit, never a traceback."""


def require(cond, message):
    """Raise UserError(message) unless cond: the one-line checks of every entry point."""
    if not cond:
        raise UserError(message)


def die(message, prog=None):
    """Print one line naming what is wrong and exit with status 2."""
    prog = prog or os.path.basename(sys.argv[0]).removesuffix(".py")
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (naming it) instead of the usage block."""

    def error(self, message):
        die(f"{message} (see --help)", self.prog)


def run_main(main):
    """Run an entry point, turning UserError into a one-line error and exit code 2."""
    try:
        main()
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def print0(*args, **kwargs):
    """print() on rank 0 only (every process prints when not under torchrun)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def get_base_dir():
    """Where data, tokenizers and runs live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def run_dir(run):
    """A run's folder: `run` itself when it is a folder, else $NANOCHAT_BASE_DIR/runs/<run>."""
    return run if os.path.isdir(run) else os.path.join(get_base_dir(), "runs", run)


def read_metrics(path):
    """The records of a metrics.jsonl, one dict per line; a bad line is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"no metrics.jsonl at {path}")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{n}: not valid JSON")
    return records


def atomic_write(path, write):
    """Write a file so that a crash never leaves a half-written one under its real name:
    write(tmp_path) writes path.tmp, which is fsynced (else after a power loss the new name can
    point at an empty file) and renamed over path."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def git_commit():
    """The commit of the code that is running (with '-dirty' when there are local edits)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device_type(device_type):
    """Validate a --device-type value ('' = autodetect) and return the device type to use."""
    if device_type == "":
        return autodetect_device_type()
    if device_type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device-type {device_type!r} is not one of cpu, cuda, mps (or empty to autodetect)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was given but CUDA is not available on this machine")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device-type mps was given but MPS is not available on this machine")
    return device_type


def keep_freed_memory(device_type):
    """CPU training: stop glibc from handing big tensors back to the kernel when they are freed.
    Allocations over 32 MiB are mmap'd by default and unmapped on free, so every step page-faults
    (and zero-fills) its activations again: measured ~1/3 of a d=512, 16k-token MLP
    forward+backward spent in the kernel (dev/LOG.md). With mmap off and a high trim
    threshold, freed blocks stay in the heap and the next step reuses them. The cost: the
    process keeps its peak heap. No-op off Linux/glibc or on GPUs (CUDA has a caching
    allocator). Returns True when applied."""
    if device_type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # <malloc.h>
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
                    and libc.mallopt(M_TOP_PAD, 2**28))
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False


def is_ddp():
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from the torchrun environment."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type):
    """Seed, set matmul precision and, under torchrun, join the process group:
    NCCL on CUDA, gloo on CPU. Returns (ddp, rank, local_rank, world_size, device)."""
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def sync_device(device):
    """Wait for the device's queued work (CUDA is asynchronous): before reading a timer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exit_distributed_worker():
    """The end of a successful torchrun worker, after compute_cleanup: exit without the
    interpreter's teardown. destroy_process_group does not free gloo's process group (torch
    still holds references), so its worker threads outlive it; one that frees a finished
    collective's tensors while the interpreter finalises needs the GIL and aborts the process
    ("terminate called without an active exception", exit -6, ~1 run in 20; the gdb backtrace
    is in dev/LOG.md). Everything of value is written and closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        # Every rank reaches here before any tears its connections down: destroying the group
        # while a peer is still in its last collective aborted a gloo process at exit now and
        # then ("terminate called without an active exception", ~1 run in 5 on 2 cores).
        dist.barrier()
        dist.destroy_process_group()


class DummyWandb:
    """Stands in for a wandb run when logging is off (--run dummy)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def get_peak_flops(device_type, dtype=torch.bfloat16):
    """Peak dense matmul FLOP/s of one accelerator, for MFU. None when unknown (CPU, MPS,
    unlisted GPUs): MFU is then reported as n/a rather than made up."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name().lower()
    # Dense (not 2:4 sparse) bf16 tensor-core peaks from the vendors' datasheets.
    table = [
        ("gb200", 2.5e15), ("b200", 2.25e15), ("h200", 989e12), ("h100", 989e12),
        ("h800", 989e12), ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12),
        ("a10g", 125e12), ("4090", 165e12), ("3090", 71e12),
    ]
    for key, flops in table:
        if key in name:
            if key in ("h100",) and "pcie" in name:
                return 756e12
            return flops
    return None
