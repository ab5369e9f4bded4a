"""Tests for nanochat/checkpoint.py: exact round trip of weights, optimizer states and loader
state; meta.json as the completion marker; clear errors on corrupted or unsafe files and on a
full disk."""

import errno
import json
import os
import pickle
import shutil
import socket
import stat
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import SafetensorError
from safetensors.torch import save_file

import nanochat.checkpoint as ckpt
from nanochat.common import compute_cleanup, exit_distributed_worker
from nanochat.checkpoint import find_latest_step, load_checkpoint, save_checkpoint
from nanochat.common import UserError
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import setup_optimizers

CONFIG = dict(sequence_len=16, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
              use_moe=True, n_experts=4, expert_topk=2, moe_freq=2, expert_hidden_mult=2)
LOADER_STATE = {"epoch": 1, "shard": 0, "row_group": 3, "offset": 1234, "batch": 57}


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**{**CONFIG, **overrides}), "cpu")
    return model, setup_optimizers(model)


def train_steps(model, optimizers, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=g)
        y = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=g)
        ce, aux = model(x, y)
        (ce + 0.01 * aux["balance_loss"]).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def save(ckpt_dir, step, model, optimizers, loader_state=LOADER_STATE, **meta):
    save_checkpoint(str(ckpt_dir), step, model, optimizers, rank=0, ddp=False, loader_state=loader_state,
                    meta=dict(step=step, **meta))


def assert_same(a, b, path="state"):
    """Deep, exact equality of (nested) optimizer states: tensors bitwise, the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture
def trained(tmp_path):
    model, optimizers = make(seed=0)
    train_steps(model, optimizers)
    ckpt_dir = tmp_path / "checkpoints"
    save(ckpt_dir, 7, model, optimizers, val_bpb=1.25, config=model.config.to_dict())
    return model, optimizers, ckpt_dir


def test_round_trip_restores_weights_optimizer_and_loader_state(trained):
    model, optimizers, ckpt_dir = trained
    d = ckpt_dir / "step_000007"
    assert sorted(os.listdir(d)) == ["loader_rank0.json", "meta.json", "model.safetensors", "optim.pt", "rng_rank0.json"]

    fresh, fresh_opts = make(seed=123)  # different init, empty optimizer states
    assert not torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)
    assert all(len(o.state) == 0 for o in fresh_opts)
    meta = load_checkpoint(str(ckpt_dir), 7, fresh, fresh_opts, rank=0, device=torch.device("cpu"))

    assert meta["step"] == 7 and meta["val_bpb"] == 1.25 and meta["config"] == model.config.to_dict()
    assert meta["loader_state"] == LOADER_STATE
    sd, fresh_sd = model.state_dict(), fresh.state_dict()
    assert sd.keys() == fresh_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], fresh_sd[k]), k
    assert len(optimizers) == len(fresh_opts) == 2
    for opt, fresh_opt in zip(optimizers, fresh_opts):
        assert_same(opt.state_dict(), fresh_opt.state_dict())
        assert len(fresh_opt.state) > 0
    # the restored states live on the parameters of the new model (AdamW exp_avg, Muon momentum)
    adamw, muon = fresh_opts
    assert torch.equal(adamw.state[fresh.lm_head.weight]["exp_avg"], optimizers[0].state[model.lm_head.weight]["exp_avg"])
    w = fresh.transformer.h[1].mlp.w_fc
    assert torch.equal(muon.state[w]["momentum_buffer"], optimizers[1].state[model.transformer.h[1].mlp.w_fc]["momentum_buffer"])

    # ... and continuing training from either gives bitwise the same result
    train_steps(model, optimizers, n=2, seed=9)
    train_steps(fresh, fresh_opts, n=2, seed=9)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_load_without_optimizers_loads_weights_only(trained):
    model, _, ckpt_dir = trained
    fresh, fresh_opts = make(seed=5)
    meta = load_checkpoint(str(ckpt_dir), 7, fresh, None, rank=0, device="cpu")
    assert "loader_state" not in meta and meta["step"] == 7  # weights only: no training state
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert all(len(o.state) == 0 for o in fresh_opts)


def test_meta_json_is_written_last_and_all_writes_are_atomic(tmp_path, monkeypatch):
    model, optimizers = make()
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        assert str(src) == str(dst) + ".tmp"  # every file lands via tmp + rename
        replaced.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", spy)
    save(tmp_path, 3, model, optimizers)
    assert sorted(replaced) == ["loader_rank0.json", "meta.json", "model.safetensors", "optim.pt", "rng_rank0.json"]
    assert replaced[-1] == "meta.json"
    assert not [f for f in os.listdir(tmp_path / "step_000003") if f.endswith(".tmp")]


def test_find_latest_step_picks_max_complete_step(tmp_path):
    model, optimizers = make()
    for step in (5, 20, 100):
        save(tmp_path, step, model, optimizers)
    assert find_latest_step(str(tmp_path)) == 100
    os.remove(tmp_path / "step_000100" / "meta.json")  # as if the save of step 100 crashed before meta.json
    assert find_latest_step(str(tmp_path)) == 20
    (tmp_path / "step_000200").mkdir()  # an empty step folder from a crash right after mkdir
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert find_latest_step(str(tmp_path)) == 20
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_checkpoint(str(tmp_path), 100, model, optimizers, rank=0, device="cpu")


def test_crash_mid_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    model, optimizers = make()
    save(tmp_path, 10, model, optimizers)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)  # fails after model.safetensors is written
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 20, model, optimizers)
    monkeypatch.undo()
    assert os.path.exists(tmp_path / "step_000020" / "model.safetensors")
    assert not os.path.exists(tmp_path / "step_000020" / "meta.json")
    assert find_latest_step(str(tmp_path)) == 10
    fresh, fresh_opts = make(seed=3)
    assert load_checkpoint(str(tmp_path), find_latest_step(str(tmp_path)), fresh, fresh_opts, 0, "cpu")["step"] == 10


def test_find_latest_step_without_checkpoints_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_latest_step(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_latest_step(str(tmp_path))


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty", "missing"])
def test_corrupted_weights_give_user_error_naming_the_file(trained, corruption):
    _, _, ckpt_dir = trained
    path = ckpt_dir / "step_000007" / "model.safetensors"
    data = path.read_bytes()
    if corruption == "garbage":
        path.write_bytes(b"\x00\xffnot a safetensors file" * 50)
    elif corruption == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif corruption == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    fresh, fresh_opts = make(seed=1)
    with pytest.raises(UserError) as e:
        load_checkpoint(str(ckpt_dir), 7, fresh, fresh_opts, rank=0, device="cpu")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_weights_of_another_model_shape_give_user_error(trained):
    _, _, ckpt_dir = trained
    other, other_opts = make(n_experts=8)
    with pytest.raises(UserError) as e:
        load_checkpoint(str(ckpt_dir), 7, other, other_opts, rank=0, device="cpu")
    msg = str(e.value)
    assert "model.safetensors" in msg and "size mismatch" in msg and "\n" not in msg


def test_weights_with_missing_tensor_give_user_error(trained):
    model, _, ckpt_dir = trained
    path = ckpt_dir / "step_000007" / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path))
    with pytest.raises(UserError, match="lm_head.weight"):
        load_checkpoint(str(ckpt_dir), 7, *make(seed=2), rank=0, device="cpu")


def test_corrupted_meta_json_gives_user_error(trained):
    _, _, ckpt_dir = trained
    meta = ckpt_dir / "step_000007" / "meta.json"
    meta.write_text('{"step": 7, ')
    with pytest.raises(UserError, match="meta.json"):
        load_checkpoint(str(ckpt_dir), 7, *make(), rank=0, device="cpu")


def test_missing_loader_state_of_this_rank_gives_user_error(trained):
    """e.g. resuming a 1-process checkpoint under 2 processes: rank 1 has no loader file."""
    _, _, ckpt_dir = trained
    with pytest.raises(UserError, match="loader_rank1.json"):
        load_checkpoint(str(ckpt_dir), 7, *make(), rank=1, device="cpu")


class Exploit:
    """Runs a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_optimizer_file_that_runs_code_on_unpickle_is_refused(trained, tmp_path, writer):
    _, optimizers, ckpt_dir = trained
    optim_path = ckpt_dir / "step_000007" / "optim.pt"
    marker = tmp_path / f"pwned_{writer.replace('.', '_')}"
    payload = [Exploit(marker)] + [o.state_dict() for o in optimizers]
    if writer == "torch.save":
        torch.save(payload, str(optim_path))
    else:
        with open(optim_path, "wb") as f:
            pickle.dump(payload, f)

    fresh, fresh_opts = make(seed=4)
    with pytest.raises(UserError) as e:
        load_checkpoint(str(ckpt_dir), 7, fresh, fresh_opts, rank=0, device="cpu")
    assert str(optim_path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists(), "unpickling the optimizer file ran code"
    assert all(len(o.state) == 0 for o in fresh_opts)

    # the payload is real: an unsafe load would have run it (proves the test is not vacuous)
    if writer == "torch.save":
        torch.load(str(optim_path), weights_only=False)
    else:
        with open(optim_path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_loader_state_json_round_trip_is_exact(tmp_path):
    model, optimizers = make()
    state = {"epoch": 0, "shard": 2, "row_group": 0, "offset": 0, "batch": 0}
    save(tmp_path, 1, model, optimizers, loader_state=state)
    with open(tmp_path / "step_000001" / "loader_rank0.json") as f:
        assert json.load(f) == state
    assert load_checkpoint(str(tmp_path), 1, *make(), rank=0, device="cpu")["loader_state"] == state


# ---------------------------------------------------------------------------------------------
# A process killed (SIGKILL) in the middle of a save, keep-last-N, best/, RNG states

KILL_SCRIPT = r"""
import os, signal, sys
import torch
sys.path.insert(0, {repo!r})
import nanochat.checkpoint as ckpt
from tests.test_checkpoint import make, train_steps, save
kill_at = {kill_at!r}
real_replace = os.replace
def replace(src, dst):
    if os.path.basename(dst) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: like a power cut
    real_replace(src, dst)
ckpt.os.replace = replace
model, optimizers = make()
train_steps(model, optimizers, n=2)
save({ckpt_dir!r}, 2, model, optimizers)
"""


@pytest.mark.parametrize("kill_at", ["model.safetensors", "optim.pt", "meta.json"])
def test_sigkill_during_save_leaves_last_good_checkpoint_loadable(tmp_path, kill_at):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model, optimizers = make()
    train_steps(model, optimizers, n=1)
    save(tmp_path, 1, model, optimizers)
    script = KILL_SCRIPT.format(repo=repo, kill_at=kill_at, ckpt_dir=str(tmp_path))
    p = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr  # really killed by SIGKILL at the chosen point
    assert os.path.isdir(tmp_path / "step_000002")  # the save had started
    assert find_latest_step(str(tmp_path)) == 1
    fresh, fresh_opts = make(seed=3)
    meta = load_checkpoint(str(tmp_path), 1, fresh, fresh_opts, rank=0, device="cpu")
    assert meta["step"] == 1
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_keep_last_n_prunes_old_steps_but_not_best(tmp_path):
    model, optimizers = make()
    save_checkpoint(str(tmp_path), 1, model, optimizers, rank=0, ddp=False, loader_state=None,
                    meta=dict(step=1), name="best")
    for step in (1, 2, 3, 4):
        save_checkpoint(str(tmp_path), step, model, optimizers, rank=0, ddp=False, loader_state=None,
                        meta=dict(step=step), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["best", "step_000003", "step_000004"]
    assert ckpt.complete_steps(str(tmp_path)) == [3, 4]


def test_best_is_overwritten_and_loadable_by_name(tmp_path):
    model, optimizers = make()
    save_checkpoint(str(tmp_path), 1, model, optimizers, rank=0, ddp=False, loader_state=None,
                    meta=dict(step=1, val_bpb=2.0), name="best")
    train_steps(model, optimizers, n=1)
    save_checkpoint(str(tmp_path), 5, model, optimizers, rank=0, ddp=False, loader_state=None,
                    meta=dict(step=5, val_bpb=1.5), name="best")
    fresh, _ = make(seed=9)
    meta = load_checkpoint(str(tmp_path), "best", fresh, None, rank=0, device="cpu")
    assert meta["step"] == 5 and meta["val_bpb"] == 1.5
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_rng_states_round_trip_through_json(tmp_path):
    import random
    import numpy as np
    model, optimizers = make()
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    save(tmp_path, 1, model, optimizers)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    meta = load_checkpoint(str(tmp_path), 1, model, optimizers, rank=0, device="cpu")
    ckpt.set_rng_state(meta["rng_state"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ---------------------------------------------------------------------------------------------
# A full disk: one line naming the step, the folder, the bytes needed and the last good checkpoint


def tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_size(model, optimizers):
    """Weights + optimizer states: what a checkpoint's files hold, less a little metadata."""
    return tensor_bytes(model.state_dict()) + tensor_bytes([o.state_dict() for o in optimizers])


def files(folder):
    """{relative path: bytes} of everything under folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def boom(*args, **kwargs):
    raise OSError("disk full")


real_atomic_write_json = ckpt.atomic_write_json


def edquot_on_rng(path, obj):
    if os.path.basename(path).startswith("rng_"):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    real_atomic_write_json(path, obj)


def safetensors_full(*args, **kwargs):  # what safetensors really raises on a full disk (a 2 MiB tmpfs)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


FULL_DISK = {  # where the save fails -> (module, attribute, replacement, the reason printed)
    "torch.save": (ckpt.torch, "save", enospc, "No space left on device"),
    "save_file": (ckpt, "save_file", enospc, "No space left on device"),
    "save_file (rust error)": (ckpt, "save_file", safetensors_full, "No space left on device"),
    "rng json (quota)": (ckpt, "atomic_write_json", edquot_on_rng, "Disk quota exceeded"),
}


@pytest.mark.parametrize("where", FULL_DISK)
def test_full_disk_mid_save_is_one_line_and_removes_the_partial_folder(tmp_path, monkeypatch, where):
    model, optimizers = make()
    train_steps(model, optimizers, n=1)
    save(tmp_path, 10, model, optimizers)
    before = files(tmp_path)
    module, attr, fail, reason = FULL_DISK[where]
    monkeypatch.setattr(module, attr, fail)
    with pytest.raises(UserError) as e:
        save(tmp_path, 20, model, optimizers)
    monkeypatch.undo()
    msg = str(e.value)
    assert "\n" not in msg and "step 20" in msg and reason in msg
    assert str(tmp_path / "step_000020") in msg
    assert f"{checkpoint_size(model, optimizers)} bytes" in msg
    assert str(tmp_path / "step_000010") in msg  # the last complete checkpoint, which resume takes
    assert not os.path.exists(tmp_path / "step_000020")  # partial folder and its .tmp files gone
    assert files(tmp_path) == before  # the earlier checkpoint is untouched
    assert find_latest_step(str(tmp_path)) == 10
    assert load_checkpoint(str(tmp_path), 10, *make(seed=3), rank=0, device="cpu")["step"] == 10


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_real_torch_save_on_a_full_device_is_recognised(tmp_path):
    """torch.save to a full disk raises RuntimeError('... inline_container.cc ... unexpected pos'),
    which does not say why; the real write error must still be told apart from other failures."""
    model, optimizers = make()
    train_steps(model, optimizers, n=1)
    d = tmp_path / "step_000001"
    d.mkdir()
    os.symlink("/dev/full", d / "optim.pt.tmp")  # every write to /dev/full fails with ENOSPC
    with pytest.raises(UserError) as e:
        save(tmp_path, 1, model, optimizers)
    msg = str(e.value)
    assert "No space left on device" in msg and str(d) in msg and "no complete checkpoint" in msg
    assert f"{checkpoint_size(model, optimizers)} bytes" in msg
    assert not os.path.exists(d) and stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_too_little_free_space_refuses_before_writing_anything(tmp_path, monkeypatch):
    model, optimizers = make()
    train_steps(model, optimizers, n=1)
    save(tmp_path, 10, model, optimizers)
    save_checkpoint(str(tmp_path), 10, model, optimizers, rank=0, ddp=False, loader_state=None,
                    meta=dict(step=10), name="best")
    before = files(tmp_path)
    needed = checkpoint_size(model, optimizers)
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real(p)._replace(free=needed // 2))
    monkeypatch.setattr(ckpt, "save_file", enospc)  # nothing may even be tried
    monkeypatch.setattr(ckpt.torch, "save", enospc)
    for name, folder in [(None, "step_000020"), ("best", "best")]:
        with pytest.raises(UserError) as e:
            save_checkpoint(str(tmp_path), 20, model, optimizers, rank=0, ddp=False, loader_state=None,
                            meta=dict(step=20), name=name)
        msg = str(e.value)
        assert "\n" not in msg and "step 20" in msg and str(tmp_path / folder) in msg
        assert f"{needed} bytes" in msg and str(tmp_path / "step_000010") in msg
        assert files(tmp_path) == before  # nothing written, and best/ still complete
    monkeypatch.undo()
    assert find_latest_step(str(tmp_path)) == 10
    # with enough room it saves
    save(tmp_path, 20, model, optimizers)
    assert find_latest_step(str(tmp_path)) == 20


def test_too_little_free_space_for_a_first_checkpoint(tmp_path, monkeypatch):
    model, optimizers = make()
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    ckpt_dir = tmp_path / "run" / "checkpoints"  # not created yet: the first save of a run
    with pytest.raises(UserError, match="no complete checkpoint") as e:
        save(ckpt_dir, 5, model, optimizers)
    assert str(ckpt_dir / "step_000005") in str(e.value)
    assert not os.path.exists(ckpt_dir)


def _full_disk_worker(rank, port, out):
    """Two ranks (gloo), sharded optimizer files: rank 1's disk fills up, then rank 0's pre-save
    check refuses; each time both ranks must raise the same one-line error (no hang). Then rank
    1 fails otherwise: its error is unchanged, rank 0 hears of it. A last save must still work
    (the ranks' collectives stayed in step)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    model, optimizers = make()
    train_steps(model, optimizers, n=1)
    results = []

    def attempt(step):
        try:
            save_checkpoint(out, step, model, optimizers, rank=rank, ddp=True, loader_state=LOADER_STATE,
                            meta=dict(step=step), sharded=True)
            results.append("saved")
        except Exception as e:
            results.append(f"{type(e).__name__}: {e}")

    attempt(1)
    real_save = torch.save
    if rank == 1:
        ckpt.torch.save = enospc
    attempt(2)
    ckpt.torch.save = real_save
    real_usage = shutil.disk_usage
    if rank == 0:
        ckpt.shutil.disk_usage = lambda p: real_usage(p)._replace(free=0)
    attempt(3)
    ckpt.shutil.disk_usage = real_usage
    if rank == 1:
        ckpt.torch.save = boom
    attempt(4)
    ckpt.torch.save = real_save
    attempt(5)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    compute_cleanup()
    exit_distributed_worker()  # gloo's threads can abort an interpreter teardown (nanochat/common.py)


def test_full_disk_under_two_ranks_gives_every_rank_the_same_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    mp.spawn(_full_disk_worker, args=(port, str(ckpt_dir)), nprocs=2, join=True)
    r0, r1 = (json.loads((ckpt_dir / f"rank{r}.json").read_text()) for r in range(2))
    assert r0[:3] == r1[:3], (r0, r1)
    assert r0[0] == "saved" and r0[4] == r1[4] == "saved"
    for step in (2, 3):
        assert r0[step - 1].startswith("UserError: ") and str(ckpt_dir / f"step_00000{step}") in r0[step - 1]
        assert str(ckpt_dir / "step_000001") in r0[step - 1]
        assert not os.path.exists(ckpt_dir / f"step_00000{step}")
    assert "No space left on device" in r0[1]
    assert r1[3] == "OSError: disk full"  # not a full disk (no errno): raised as it was
    assert r0[3].startswith("RuntimeError: ") and "rank 1" in r0[3] and "OSError: disk full" in r0[3]
    assert ckpt.complete_steps(str(ckpt_dir)) == [1, 5]  # step 4 left incomplete, as any crash does
    assert sorted(f for f in os.listdir(ckpt_dir / "step_000005") if f.startswith("optim")) == ["optim_rank0.pt", "optim_rank1.pt"]
