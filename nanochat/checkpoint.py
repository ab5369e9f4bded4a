"""
Checkpoints that never lose work and cannot run code on load.

Layout: <run>/checkpoints/step_000123/  (and best/, the lowest val bpb so far)
    model.safetensors     weights and persistent buffers (safetensors: plain tensors, no pickle)
    optim.pt              optimizer states (loaded with weights_only=True: no code runs)
    loader_rank{r}.json   each rank's data loader position
    rng_rank{r}.json      each rank's python / numpy / torch (/ cuda) RNG states
    meta.json             step, config, args, val bpb, world size, tokenizer; written LAST
Every file is written to `name.tmp`, fsynced and renamed; a checkpoint counts as complete
only once meta.json exists, so a crash mid-save leaves the previous checkpoint the latest.
A full disk (or quota) is one line on every rank naming the step, the folder, the bytes a
checkpoint needs and the last complete checkpoint; the partial folder is removed, and a save
that visibly will not fit (shutil.disk_usage) is refused before anything is written.
Optimizer states are identical on every rank (gradients are all-reduced before the
update), so rank 0 saves them once, in optim.pt; with a sharded optimizer (--shard-optimizer)
each rank holds its own part and saves optim_rank{r}.pt, and a resume must use the same
number of processes (the split is by rank).
"""

import errno
import json
import os
import random
import re
import shutil

import numpy as np

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanochat.common import UserError, print0, get_base_dir, run_dir, atomic_write, atomic_write_json


def _step_dir(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step_{step:06d}")


def rng_state():
    """All RNG states of this process as JSON-able lists (no pickle needed to restore them)."""
    np_state = np.random.get_state()
    state = dict(python=[random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                 numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]],
                 torch=torch.get_rng_state().tolist())
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def has_optimizer_state(d):
    return os.path.exists(os.path.join(d, "optim.pt")) or os.path.exists(os.path.join(d, "optim_rank0.pt"))


def save_checkpoint(ckpt_dir, step, model, optimizers, rank, ddp, loader_state, meta, name=None, keep=0, sharded=False,
                    weights=None):
    """Save a complete checkpoint as <ckpt_dir>/<name> (default step_XXXXXX). With keep > 0,
    afterwards delete all but the newest `keep` complete step_ checkpoints (best/ is kept).
    sharded: every rank saves its own optimizer state (optim_rank{r}.pt). weights: the state
    dict to save instead of model.state_dict() (expert parallelism: the gathered experts).
    A full disk (or quota) is a UserError on every rank, before anything is written when the
    free space is visibly too small, else after the partial folder is removed."""
    d = os.path.join(ckpt_dir, name) if name else _step_dir(ckpt_dir, step)
    meta_path = os.path.join(d, "meta.json")
    # What the checkpoint needs on disk (rank 0 writes the weights; every rank with an optimizer
    # file adds its own) and what resume would fall back to: known to every rank, so that all
    # of them can raise the same error.
    report = dict(optim=_tensor_bytes([o.state_dict() for o in optimizers]) if rank == 0 or sharded else 0)
    if rank == 0:
        steps = complete_steps(ckpt_dir)
        report.update(weights=_tensor_bytes(weights if weights is not None else model.state_dict()),
                      free=_free_bytes(ckpt_dir), last=_step_dir(ckpt_dir, steps[-1]) if steps else None)
    reports = _gather(ddp, report)
    needed = reports[0]["weights"] + sum(r["optim"] for r in reports)
    free, last = reports[0]["free"], reports[0]["last"]
    wanted = needed + needed // 20 + 2**20  # a margin for what is not counted: JSON files, headers
    if free is not None and free < wanted:
        reason = f"{_size(free)} free there, {_size(wanted)} wanted with a margin; nothing written"
        raise UserError(_not_saved(step, d, reason, needed, last))
    if rank == 0 and os.path.exists(meta_path):
        os.remove(meta_path)  # overwriting (best/): incomplete until the new meta lands
    if ddp:
        dist.barrier()  # no rank writes into best/ while its old meta.json still calls it complete
    error = None
    try:
        os.makedirs(d, exist_ok=True)
        if rank == 0:
            _write_weights(d, model, weights)
        if rank == 0 or sharded:
            _write_optimizer_state(os.path.join(d, f"optim_rank{rank}.pt" if sharded else "optim.pt"), optimizers)
        atomic_write_json(os.path.join(d, f"loader_rank{rank}.json"), loader_state)
        atomic_write_json(os.path.join(d, f"rng_rank{rank}.json"), rng_state())
        if rank == 0:  # meta.json's bytes too (they can hit the full disk as well); renamed below
            with open(meta_path + ".tmp", "w") as f:
                f.write(json.dumps(meta, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
    except Exception as e:  # kept until every rank has reported, so that no rank waits for one gone
        error = e
    code = _disk_full_errno(error)
    outcomes = _gather(ddp, None if error is None else (code, f"{type(error).__name__}: {error}"))
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        full = [(r, c) for r, (c, _) in failed if c is not None]
        if full and rank == 0:
            shutil.rmtree(d, ignore_errors=True)  # the partial folder, .tmp files included: space back
        if ddp:
            dist.barrier()  # every rank has stopped writing, and the folder is gone, before any rank leaves
        if error is not None and code is None:
            raise error
        if full:
            r, c = full[0]
            where = f" (rank {r})" if ddp else ""
            raise UserError(_not_saved(step, d, f"{os.strerror(c)}{where}, removed the partial folder", needed, last))
        r, (_, what) = failed[0]
        raise RuntimeError(f"checkpoint {d} not saved: rank {r} failed writing its files ({what})")
    if rank == 0:  # every rank's files are in place: the checkpoint is complete
        os.replace(meta_path + ".tmp", meta_path)
        print0(f"Saved checkpoint {d}")
        if keep > 0:
            # a checkpoint without optimizer state is a grown model's step 0 (scripts/grow.py):
            # the phase's starting point, kept like best/
            trained = [s for s in complete_steps(ckpt_dir) if has_optimizer_state(_step_dir(ckpt_dir, s))]
            for old in trained[:-keep]:
                shutil.rmtree(_step_dir(ckpt_dir, old), ignore_errors=True)


def _not_saved(step, d, reason, needed, last):
    """The one line of a checkpoint that did not fit on the disk."""
    fallback = f"the last complete checkpoint is {last}" if last else "there is no complete checkpoint yet"
    return (f"checkpoint of step {step} not saved to {d}: {reason}; a checkpoint needs {_size(needed)} "
            f"({needed} bytes of weights and optimizer state); {fallback}; free some disk space "
            f"(--keep-checkpoints N keeps only the newest N)")


def _gather(ddp, obj):
    """obj from every rank, in rank order (a collective: every rank must call it)."""
    if not ddp:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _tensor_bytes(obj):
    """Bytes of the tensors in a (nested) state dict: what its file takes, less the headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _free_bytes(path):
    """Free bytes on the disk that holds path (which may not exist yet); None when unknown."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full_errno(e):
    """ENOSPC or EDQUOT when e is a write that failed for lack of space, else None. safetensors
    raises SafetensorError('... No space left on device (os error 28)'), the rest OSError."""
    code = e.errno if isinstance(e, OSError) else None
    if isinstance(e, SafetensorError) and (m := re.search(r"\(os error (\d+)\)", str(e))):
        code = int(m.group(1))
    return code if code in DISK_FULL else None


class _WriteErrorRecorder:
    """A file for torch.save that keeps the OSError of a failed write: torch turns it into a
    RuntimeError ('[enforce fail at inline_container.cc] unexpected pos ...') that has lost
    the reason (a full disk, or anything else)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _write_optimizer_state(path, optimizers):
    def write(tmp):
        with open(tmp, "wb") as f:
            out = _WriteErrorRecorder(f)
            try:
                torch.save([o.state_dict() for o in optimizers], out)
            except RuntimeError as e:
                if _disk_full_errno(out.error):
                    raise out.error from e
                raise
    atomic_write(path, write)


def _write_weights(d, model, weights=None):
    state = {k: v.detach().contiguous() for k, v in (weights if weights is not None else model.state_dict()).items()}
    atomic_write(os.path.join(d, "model.safetensors"), lambda tmp: save_file(state, tmp))


def save_weights_checkpoint(ckpt_dir, step, model, meta, loader_states):
    """A checkpoint with no optimizer state (a grown model's step 0: its run starts with a
    fresh optimizer via base_train --init-from). loader_states: one per rank of the source."""
    d = _step_dir(ckpt_dir, step)
    os.makedirs(d, exist_ok=True)
    _write_weights(d, model)
    for rank, loader_state in enumerate(loader_states):
        atomic_write_json(os.path.join(d, f"loader_rank{rank}.json"), loader_state)
    atomic_write_json(os.path.join(d, "meta.json"), meta)
    return d


def read_loader_states(ckpt_path):
    """Every rank's saved data-loader position in a checkpoint folder, rank order."""
    states, rank = [], 0
    while os.path.exists(path := os.path.join(ckpt_path, f"loader_rank{rank}.json")):
        with open(path) as f:
            states.append(json.load(f))
        rank += 1
    return states


def complete_steps(ckpt_dir):
    """Sorted steps of the complete (meta.json present) step_ checkpoints in ckpt_dir."""
    steps = []
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.startswith("step_") and name[5:].isdigit() and os.path.exists(os.path.join(ckpt_dir, name, "meta.json")):
                steps.append(int(name[5:]))
    return sorted(steps)


def find_latest_step(ckpt_dir):
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise UserError(f"--resume-from-step latest: no complete checkpoint in {ckpt_dir}")
    return max(steps)


def load_checkpoint(ckpt_dir, step, model, optimizers, rank, device, slices=None, check_meta=None):
    """Load weights (and optimizer states when `optimizers` is given) into place; return meta
    with this rank's loader state under 'loader_state' (and RNG states under 'rng_state').
    `step` is a step number or a checkpoint name such as 'best'. slices: {name: slice} of saved
    tensors to read only part of, along dim 0 (expert parallelism: each rank's block of the
    experts; the rest is never read, so no rank holds every expert, even while loading).
    check_meta(meta): called before anything is loaded (raise UserError to refuse the checkpoint)."""
    d = os.path.join(ckpt_dir, step) if isinstance(step, str) else _step_dir(ckpt_dir, step)
    meta_path = os.path.join(d, "meta.json")
    if not os.path.exists(meta_path):
        raise UserError(f"--resume-from-step {step}: no complete checkpoint at {d}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: corrupted checkpoint metadata ({e})")
    if check_meta is not None:
        check_meta(meta)
    if optimizers is not None and not has_optimizer_state(d):
        raise UserError(f"{d} has no optimizer state (a grown model's step 0?): start a run from it with "
                        f"base_train --init-from, not --resume-from-step")
    path = os.path.join(d, "model.safetensors")
    slices = slices or {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            state = {k: f.get_slice(k)[slices[k]] if k in slices else f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read checkpoint weights ({e})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # names or shapes differ: saved with other model flags
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise UserError(f"{path}: does not fit this model (saved with other model flags?): {detail[:300]}")
    if optimizers is not None:
        sharded = os.path.exists(os.path.join(d, "optim_rank0.pt"))
        path = os.path.join(d, f"optim_rank{rank}.pt" if sharded else "optim.pt")
        if not os.path.exists(path):
            raise UserError(f"{path} is missing: resume with as many processes as the run that saved this checkpoint")
        try:
            states = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # pickle errors come in many types; all mean "not a safe, complete file"
            raise UserError(f"{path}: cannot read optimizer state safely ({type(e).__name__}: {str(e).splitlines()[0]})")
        try:
            for opt, s in zip(optimizers, states):
                opt.load_state_dict(s)
        except ValueError as e:  # parameter groups of another size: saved with(out) a sharded optimizer
            raise UserError(f"{path}: does not fit this run's optimizer ({str(e).splitlines()[0]}); resume with the "
                            f"--shard-optimizer setting and the number of processes that saved it")
    if optimizers is None:  # weights only (generation, benchmarks)
        return meta
    path = os.path.join(d, f"loader_rank{rank}.json")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: resume with as many processes as the run that saved this checkpoint")
    with open(path) as f:
        meta["loader_state"] = json.load(f)
    path = os.path.join(d, f"rng_rank{rank}.json")
    if os.path.exists(path):
        with open(path) as f:
            meta["rng_state"] = json.load(f)
    return meta


def resolve_checkpoint(source, step=None):
    """The checkpoint folder for `source` (a model tag under $NANOCHAT_BASE_DIR/runs, a run
    folder, or a checkpoint folder) and `step` (a number, 'best', or None/'latest')."""
    if os.path.exists(os.path.join(source, "meta.json")):
        return source
    ckpt_dir = os.path.join(run_dir(source), "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"{source}: no checkpoints folder at {ckpt_dir} (is it a model tag or a run folder?)")
    if step in (None, "", "latest"):
        return _step_dir(ckpt_dir, find_latest_step(ckpt_dir))
    d = os.path.join(ckpt_dir, "best") if step == "best" else _step_dir(ckpt_dir, int(step))
    if not os.path.exists(os.path.join(d, "meta.json")):
        raise UserError(f"--step {step}: no complete checkpoint at {d} (have steps {complete_steps(ckpt_dir)})")
    return d


def load_model(ckpt_path, device):
    """Rebuild the model a checkpoint folder was saved from and load its weights.
    Returns (model in eval mode, tokenizer, meta)."""
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import get_tokenizer
    ckpt_dir, name = os.path.split(os.path.normpath(ckpt_path))
    with open(os.path.join(ckpt_path, "meta.json")) as f:
        config = GPTConfig.from_saved(json.load(f)["config"])
    model = build_model(config, device)
    meta = load_checkpoint(ckpt_dir, name, model, None, 0, device)
    model.eval()
    return model, get_tokenizer(meta["tokenizer_dir"]), meta


def checkpoint_for(flag, source, step, is_tag):
    """The checkpoint folder a user named with `flag` (a model tag, or a run/checkpoint folder),
    with one-line errors naming the flag."""
    if is_tag:
        folder = os.path.join(get_base_dir(), "runs", source)
        if not os.path.isdir(folder):
            raise UserError(f"{flag} {source}: no run folder at {folder}")
        return resolve_checkpoint(folder, step)
    if not os.path.exists(source):
        raise UserError(f"{flag} {source}: no such folder")
    return resolve_checkpoint(source, step)
