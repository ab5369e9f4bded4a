"""
Checkpoints that never lose work and cannot run code on load.

Layout: <run>/checkpoints/step_000123/
    model.safetensors     weights (safetensors: plain tensors, no pickle)
    optim.pt              optimizer states (loaded with weights_only=True: no code runs)
    loader_rank{r}.json   each rank's data loader position
    meta.json             step, config, metrics; written LAST
Every file is written to `name.tmp`, fsynced and renamed; a checkpoint counts as complete
only once meta.json exists, so a crash mid-save leaves the previous checkpoint the latest.
Optimizer states are identical on every rank (gradients are all-reduced before the
update), so rank 0 saves them once.
"""

import json
import os

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file, load_file

from nanochat.common import UserError, print0


def _step_dir(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step_{step:06d}")


def _atomic_write(path, write_fn):
    tmp = path + ".tmp"
    write_fn(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    _atomic_write(path, write)


def save_checkpoint(ckpt_dir, step, model, optimizers, rank, ddp, loader_state, meta):
    d = _step_dir(ckpt_dir, step)
    os.makedirs(d, exist_ok=True)
    if rank == 0:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        _atomic_write(os.path.join(d, "model.safetensors"), lambda tmp: save_file(state, tmp))
        _atomic_write(os.path.join(d, "optim.pt"), lambda tmp: torch.save([o.state_dict() for o in optimizers], tmp))
    _write_json(os.path.join(d, f"loader_rank{rank}.json"), loader_state)
    if ddp:
        dist.barrier()  # every rank's files are in place before the checkpoint is declared complete
    if rank == 0:
        _write_json(os.path.join(d, "meta.json"), meta)
        print0(f"Saved checkpoint {d}")


def find_latest_step(ckpt_dir):
    steps = []
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.startswith("step_") and os.path.exists(os.path.join(ckpt_dir, name, "meta.json")):
                steps.append(int(name[len("step_"):]))
    if not steps:
        raise UserError(f"--resume-from-step latest: no complete checkpoint in {ckpt_dir}")
    return max(steps)


def load_checkpoint(ckpt_dir, step, model, optimizers, rank, device):
    """Load weights (and optimizer states when `optimizers` is given) into place; return meta
    with this rank's loader state under 'loader_state'."""
    d = _step_dir(ckpt_dir, step)
    meta_path = os.path.join(d, "meta.json")
    if not os.path.exists(meta_path):
        raise UserError(f"--resume-from-step {step}: no complete checkpoint at {d}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: corrupted checkpoint metadata ({e})")
    path = os.path.join(d, "model.safetensors")
    try:
        state = load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read checkpoint weights ({e})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # names or shapes differ: saved with other model flags
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise UserError(f"{path}: does not fit this model (saved with other model flags?): {detail[:300]}")
    if optimizers is not None:
        path = os.path.join(d, "optim.pt")
        try:
            states = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # pickle errors come in many types; all mean "not a safe, complete file"
            raise UserError(f"{path}: cannot read optimizer state safely ({type(e).__name__}: {str(e).splitlines()[0]})")
        for opt, s in zip(optimizers, states):
            opt.load_state_dict(s)
    path = os.path.join(d, f"loader_rank{rank}.json")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: resume with as many processes as the run that saved this checkpoint")
    with open(path) as f:
        meta["loader_state"] = json.load(f)
    return meta
