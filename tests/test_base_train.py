"""End-to-end tests of scripts/base_train.py, run as subprocesses (as a user would):
input validation, that tiny dense and MoE models learn, the metrics they write, 1 vs 2
processes (torchrun), wandb offline logging, and exact resume from a checkpoint.

All training runs share one NANOCHAT_BASE_DIR, prepared once (built-in corpus + tokenizer)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.plain import PLAIN, PLAIN_FLAGS

REPO = Path(__file__).resolve().parents[1]

# A tiny model: width 128 (depth 2 x aspect 64), 2 heads of 64, vocab 1024, 512 tokens/step
# = 2 micro-batches of 4 x 64 on one process.
TINY = ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
        "--eval-tokens", "1024", "--sample-every", "-1", "--vocab-size", "1024", "--synthetic-train-docs", "3000"]
MOE = ["--use-moe", "--n-experts", "4"]
V, D, L, T, N_HEAD, HEAD_DIM, TOKENS_PER_STEP = 1024, 128, 2, 64, 2, 64, 512
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def train_env(base_dir, extra=None):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("WANDB_")}
    env.update(NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(extra or {})
    return env


def run_train(base_dir, args, nproc=1, env=None, check=True, timeout=600):
    if nproc == 1:
        cmd = [sys.executable, "-m", "scripts.base_train", *args]
    else:  # torchrun, through the running interpreter
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "scripts.base_train", *args]
    p = subprocess.run(cmd, cwd=REPO, env=train_env(base_dir, env), capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        assert "Traceback" not in p.stderr, p.stderr[-4000:]
    return p


def read_metrics(base_dir, tag):
    with open(Path(base_dir) / "runs" / tag / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def of_type(records, kind):
    return [r for r in records if r["type"] == kind]


# ---------------------------------------------------------------------------------------------
# 1. Bad inputs: exit 2, one line naming the flag, before any data/model work

BAD_INPUTS = [
    pytest.param(MOE[:1] + ["--n-experts", "8", "--expert-topk", "9"], "--expert-topk", id="topk>experts"),
    pytest.param(MOE[:1] + ["--n-experts", "0"], "--n-experts", id="zero-experts"),
    pytest.param(MOE[:1] + ["--moe-freq", "0"], "--moe-freq", id="moe-freq-0"),
    pytest.param(["--n-embd", "100", "--head-dim", "64"], "--head-dim", id="width-not-divisible"),
    pytest.param(["--n-kv-head", "3"], "--n-kv-head", id="kv-heads-not-dividing"),
    pytest.param(["--device-type", "tpu"], "--device-type", id="device-tpu"),
    pytest.param(["--device-type", "cuda"], "--device-type", id="device-cuda-unavailable",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    pytest.param(["--data", "nonexistent/path"], "--data", id="data-missing-path"),
    pytest.param(["--data", "some_unknown_name"], "--data", id="data-unknown-name"),
    pytest.param(["--total-batch-size", "500"], "--total-batch-size", id="batch-not-divisible"),
    pytest.param(["--device-type", "cpu", "--fp8"], "--fp8", id="fp8-on-cpu"),
    pytest.param(["--resume-from-step", "abc"], "--resume-from-step", id="resume-step-not-a-number"),
    pytest.param(["--warmup-steps", "-1"], "--warmup-steps", id="warmup-steps-negative"),
    pytest.param(["--muon-weight-decay", "-0.1"], "--muon-weight-decay", id="muon-wd-negative"),
    pytest.param(["--muon-coeffs", "cubic"], "--muon-coeffs", id="muon-coeffs-unknown"),
]


@pytest.mark.parametrize("args,flag", BAD_INPUTS)
def test_bad_input_fails_fast_with_one_line(tmp_path, args, flag):
    base = tmp_path / "base"
    base.mkdir()
    p = run_train(base, TINY + ["--num-iterations", "2", "--model-tag", "bad"] + args, check=False, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("base_train: error: "), lines[0]
    assert flag in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    # nothing was built or prepared: no model summary, no data, tokenizer or run folder
    assert "Total Parameters" not in p.stdout and "Preparing" not in p.stdout
    assert os.listdir(base) == []


def test_cli_moe_defaults_are_the_techmix_studys_choice():
    """`--use-moe` alone trains the MoE the techmix study chose (dev/LOG.md, 2026-11-26): top-2
    of 8 at iso-FLOPs width, sigmoid router balanced by the aux-free bias at 0.01 per step, no
    Switch loss. Defaults are defined once, in GPTConfig: the flags' config IS GPTConfig's."""
    from nanochat.gpt import GPTConfig
    from nanochat.model_args import config_from_args, FIELD_FLAGS
    from scripts.base_train import parse_args
    args = parse_args(["--use-moe"])
    assert args.balance_loss_coeff == 0.0 and args.router_z_loss == 0.0
    cfg = config_from_args(args, vocab_size=1024)
    assert (cfg.n_experts, cfg.expert_topk, cfg.expert_hidden_mult) == (8, 2, 2.0)
    assert (cfg.router, cfg.aux_free_bias, cfg.capacity_factor) == ("sigmoid", 0.01, 0.0)
    assert cfg == GPTConfig(vocab_size=1024, use_moe=True)  # every field, shape included
    assert config_from_args(parse_args([]), vocab_size=1024) == GPTConfig(vocab_size=1024)
    defaults = parse_args([])
    for name in FIELD_FLAGS:  # every flag that sets a field defaults to the field's default
        if name not in ("use_moe", "expert_hidden_mult"):  # a switch; 0 = the iso-FLOPs rule
            assert getattr(defaults, name) == getattr(GPTConfig(), name), name
    switch = parse_args(["--use-moe", "--router", "softmax", "--aux-free-bias", "0", "--balance-loss-coeff", "0.01"])
    assert (config_from_args(switch, 1024).router, switch.aux_free_bias, switch.balance_loss_coeff) == ("softmax", 0.0, 0.01)


def test_existing_tokenizer_with_another_vocab_is_used_and_said(base_dir):
    """A tokenizer belongs to its corpus: --vocab-size does not retrain it, and the run says so
    (the model is sized for the vocab it gets, which the header records)."""
    p = run_train(base_dir, TINY + ["--vocab-size", "2048", "--num-iterations", "1", "--eval-every", "-1",
                                    "--model-tag", "other_vocab"])
    note = [line for line in p.stdout.splitlines() if line.startswith("Note: using the tokenizer trained earlier")]
    assert len(note) == 1 and "(vocab 1024)" in note[0] and "--vocab-size 2048" in note[0], p.stdout[-2000:]
    assert read_metrics(base_dir, "other_vocab")[0]["config"]["vocab_size"] == V
    p = run_train(base_dir, TINY + ["--num-iterations", "1", "--eval-every", "-1", "--model-tag", "same_vocab"])
    assert "Note: using the tokenizer" not in p.stdout


# ---------------------------------------------------------------------------------------------
# 2. Tiny dense and MoE models learn; the metrics are consistent with the model

def expected_counts(moe):
    """Parameter counts from the architecture, independent of GPT.num_scaling_params."""
    embed = 2 * V * D  # wte + lm_head (untied)
    attn = 4 * D * D   # c_q, c_k, c_v, c_proj (no GQA here, no biases)
    if not moe:
        total = embed + L * (attn + 2 * 4 * D * D)
        return total, total
    E, k = 4, 2
    hidden = round(4 / k * D)  # default expert-hidden-mult: iso-FLOPs with the dense MLP
    experts = 2 * E * hidden * D
    total = embed + L * (attn + E * D + experts)  # router: E x D
    inactive = L * (E - k) * 2 * hidden * D
    return total, total - inactive


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_tiny_model_learns_and_metrics_are_consistent(base_dir, kind):
    tag = f"learn_{kind}"
    steps = 30
    p = run_train(base_dir, TINY + PLAIN_FLAGS + (MOE if kind == "moe" else []) +
                  ["--num-iterations", str(steps), "--eval-every", "10", "--model-tag", tag])
    assert "Total Parameters" in p.stdout
    records = read_metrics(base_dir, tag)
    header, trains, evals, summaries = (records[0], of_type(records, "train"), of_type(records, "eval"),
                                        of_type(records, "summary"))
    assert header["type"] == "header" and len(of_type(records, "header")) == 1
    assert records[-1]["type"] == "summary" and len(summaries) == 1
    summary = summaries[0]

    # header: config, commit, counts and FLOPs as the architecture says
    assert header["config"]["vocab_size"] == V and header["config"]["n_embd"] == D
    assert header["config"]["use_moe"] is (kind == "moe")
    assert isinstance(header["commit"], str) and header["commit"]
    total, active = expected_counts(kind == "moe")
    assert (header["total"], header["active_total"]) == (total, active)
    if kind == "moe":
        assert header["active_total"] < header["total"]
    else:
        assert header["active_total"] == header["total"]
    fpt = 6 * (active - V * D) + 12 * L * N_HEAD * HEAD_DIM * T
    assert header["flops_per_token"] == fpt
    assert header["tokens_per_step"] == TOKENS_PER_STEP and header["num_iterations"] == steps
    assert header["world_size"] == 1
    with open(base_dir / "runs" / tag / "config.json") as f:
        assert json.load(f) == header

    # train records: one per step, FLOPs/tokens exact, loss starts at ln(V) and falls well below
    assert [r["step"] for r in trains] == list(range(1, steps + 1))
    for r in trains:
        assert r["flops"] == r["step"] * fpt * TOKENS_PER_STEP
        assert r["tokens"] == r["step"] * TOKENS_PER_STEP
        assert math.isfinite(r["train_loss"])
        assert ("balance_loss" in r) is (kind == "moe")
    losses = [r["train_loss"] for r in trains]
    assert abs(losses[0] - math.log(V)) < 0.05, losses[0]  # near-uniform logits at init
    assert losses[-1] < losses[0] - 1.0, losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    if kind == "moe":
        # the router starts small and random: near-uniform probabilities give a Switch loss
        # near 1; the logged value is the per-layer mean (the training loss adds the layers'
        # sum), so it stays in the single-layer range whatever the depth
        assert abs(trains[0]["balance_loss"] - 1.0) < 0.05, trains[0]["balance_loss"]
        assert all(0.9 < r["balance_loss"] < 2.0 for r in trains), [r["balance_loss"] for r in trains]
    # LR schedule (default warmdown 0.2): constant, then linear to 0 over the last 6 steps
    expected_lrm = [1.0 if s <= steps - 6 else (steps - s) / 6 for s in range(steps)]
    assert [r["lr_mult"] for r in trains] == pytest.approx(expected_lrm)

    # eval records at 0, 10, 20, 30: bpb falls, and stays above the corpus's entropy floor
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    for r in evals:
        assert r["flops"] == r["step"] * fpt * TOKENS_PER_STEP
    bpbs = [r["val_bpb"] for r in evals]
    assert bpbs[-1] < bpbs[0] - 0.5, bpbs
    floor = header["entropy_floor"]
    assert floor is not None and 0 < floor < min(bpbs)

    # summary
    assert summary["step"] == steps and summary["flops"] == steps * fpt * TOKENS_PER_STEP
    assert summary["final_val_bpb"] == bpbs[-1] and summary["min_val_bpb"] == min(bpbs)
    assert (summary["total"], summary["active_total"], summary["flops_per_token"]) == (total, active, fpt)
    assert summary["entropy_floor"] == floor

    # the final checkpoint is complete
    d = base_dir / "runs" / tag / "checkpoints" / f"step_{steps:06d}"
    assert sorted(os.listdir(d)) == ["loader_rank0.json", "meta.json", "model.safetensors", "optim.pt", "rng_rank0.json"]
    with open(d / "meta.json") as f:
        meta = json.load(f)
    assert meta["step"] == steps and meta["val_bpb"] == bpbs[-1] and meta["config"] == header["config"]


# ---------------------------------------------------------------------------------------------
# 3. Two processes (torchrun, gloo) reproduce one process with twice the gradient accumulation

@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_sharded_optimizer_with_2_and_4_processes_matches_one_process(base_dir):
    """ZeRO-1 (the default under torchrun): each rank updates only the parameters it owns and
    keeps only their optimizer state; 10 steps at one global batch (1 process x 4 micro-batches,
    2 x 2, 4 x 1) give the same losses (1e-5 relative), and the state per rank shrinks ~1/N."""
    args = TINY + MOE + ["--total-batch-size", "1024", "--num-iterations", "10", "--eval-every", "-1"]
    runs = {}
    for n in (1, 2, 4):
        p = run_train(base_dir, args + ["--model-tag", f"zero{n}"], nproc=n)
        assert f"grad accum {4 // n} x {n} process(es)" in p.stdout
        runs[n] = read_metrics(base_dir, f"zero{n}")
    one = [r["train_loss"] for r in of_type(runs[1], "train")]
    for n in (2, 4):
        other = [r["train_loss"] for r in of_type(runs[n], "train")]
        assert len(other) == 10 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, other)), (n, one, other)
    total = of_type(runs[1], "summary")[0]["optimizer_state_mib_per_rank"][0]
    for n in (2, 4):
        summary = of_type(runs[n], "summary")[0]
        per_rank = summary["optimizer_state_mib_per_rank"]
        assert summary["sharded_optimizer"] and len(per_rank) == n
        assert sum(per_rank) == pytest.approx(total, rel=1e-3)  # nothing kept twice
        assert max(per_rank) < 1.5 * total / n  # balanced: whole tensors, so not exactly 1/n
    ckpt = base_dir / "runs" / "zero4" / "checkpoints" / "step_000010"
    assert sorted(f.name for f in ckpt.glob("optim*.pt")) == [f"optim_rank{r}.pt" for r in range(4)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_torchrun_nodes_on_loopback_train_like_one_process(base_dir):
    """Multi-node as the README shows it (one torchrun per node, c10d rendezvous), here two
    'nodes' on 127.0.0.1 with one process each: they meet, train a tiny MoE, and take the steps
    of one process with twice the gradient accumulation."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = TINY + MOE + ["--num-iterations", "4", "--eval-every", "-1", "--model-tag", "two_nodes"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={r}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=loopback", "-m", "scripts.base_train", *args],
                              cwd=REPO, env=train_env(base_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs
    run_train(base_dir, TINY + MOE + ["--num-iterations", "4", "--eval-every", "-1", "--model-tag", "one_node"])
    two, one = read_metrics(base_dir, "two_nodes"), read_metrics(base_dir, "one_node")
    assert two[0]["world_size"] == 2
    pairs = list(zip(of_type(one, "train"), of_type(two, "train")))
    assert len(pairs) == 4 and all(abs(a["train_loss"] - b["train_loss"]) < 1e-5 for a, b in pairs)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_processes_match_one_process(base_dir):
    args = TINY + MOE + ["--num-iterations", "6", "--eval-every", "3"]
    run_train(base_dir, args + ["--model-tag", "ddp_one"])
    p = run_train(base_dir, args + ["--model-tag", "ddp_two"], nproc=2)
    assert "grad accum 1 x 2 process(es)" in p.stdout
    one, two = read_metrics(base_dir, "ddp_one"), read_metrics(base_dir, "ddp_two")
    assert one[0]["world_size"] == 1 and two[0]["world_size"] == 2
    assert one[0]["total"] == two[0]["total"] and one[0]["flops_per_token"] == two[0]["flops_per_token"]

    t1, t2 = of_type(one, "train"), of_type(two, "train")
    assert [r["step"] for r in t1] == [r["step"] for r in t2] == list(range(1, 7))
    for a, b in zip(t1, t2):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5, (a["step"], a["train_loss"], b["train_loss"])
        assert abs(a["balance_loss"] - b["balance_loss"]) < 1e-5, (a["step"], a["balance_loss"], b["balance_loss"])
        assert a["flops"] == b["flops"] and a["tokens"] == b["tokens"]
    e1, e2 = of_type(one, "eval"), of_type(two, "eval")
    assert [r["step"] for r in e1] == [r["step"] for r in e2] == [0, 3, 6]
    for a, b in zip(e1, e2):
        assert abs(a["val_bpb"] - b["val_bpb"]) < 1e-5, (a, b)
    assert abs(of_type(one, "summary")[0]["final_val_bpb"] - of_type(two, "summary")[0]["final_val_bpb"]) < 1e-5

    # each rank saved its loader position; the weights agree
    d1 = base_dir / "runs" / "ddp_one" / "checkpoints" / "step_000006"
    d2 = base_dir / "runs" / "ddp_two" / "checkpoints" / "step_000006"
    assert (d2 / "loader_rank0.json").exists() and (d2 / "loader_rank1.json").exists()
    w1, w2 = load_file(str(d1 / "model.safetensors")), load_file(str(d2 / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), k


# ---------------------------------------------------------------------------------------------
# 4. wandb: offline logging with --run NAME, nothing at all with --run dummy

def wandb_env(root):
    dirs = {"WANDB_DIR": root / "dir", "WANDB_CONFIG_DIR": root / "config", "WANDB_CACHE_DIR": root / "cache",
            "WANDB_DATA_DIR": root / "data", "WANDB_ARTIFACT_DIR": root / "artifacts"}
    for d in dirs.values():
        d.mkdir(parents=True)
    return {k: str(v) for k, v in dirs.items()} | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def test_wandb_offline_run_is_logged(base_dir, tmp_path):
    pytest.importorskip("wandb")
    env = wandb_env(tmp_path)
    run_train(base_dir, TINY + ["--num-iterations", "2", "--eval-every", "-1", "--run", "testrun",
                                "--model-tag", "wandb_on"], env=env)
    runs = sorted((tmp_path / "dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path / "dir")
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1
    data = logs[0].read_bytes()
    for key in (b"testrun", b"train/loss", b"val/bpb", b"flops_per_token"):
        assert key in data, key


def test_wandb_dummy_run_creates_nothing(base_dir, tmp_path):
    env = wandb_env(tmp_path)
    run_train(base_dir, TINY + ["--num-iterations", "2", "--eval-every", "-1", "--run", "dummy",
                                "--model-tag", "wandb_off"], env=env)
    for d in tmp_path.iterdir():
        assert list(d.iterdir()) == [], d
    assert (base_dir / "runs" / "wandb_off" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# 5. Resume: continuing from step 3 gives exactly the uninterrupted run

def test_resume_reproduces_the_uninterrupted_run(base_dir):
    tag = "resume"
    args = TINY + MOE + ["--num-iterations", "6", "--eval-every", "-1", "--save-every", "3", "--model-tag", tag]
    run_train(base_dir, args)
    ckpts = base_dir / "runs" / tag / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["best", "step_000003", "step_000006"]
    full = read_metrics(base_dir, tag)
    full_weights = load_file(str(ckpts / "step_000006" / "model.safetensors"))
    with open(ckpts / "step_000003" / "loader_rank0.json") as f:
        assert json.load(f)["batch"] == 3 * 2  # 3 steps x 2 micro-batches consumed

    p = run_train(base_dir, args + ["--resume-from-step", "3"])
    assert "Resumed from" in p.stdout and "step 3" in p.stdout
    records = read_metrics(base_dir, tag)
    # Records the resumed run writes again are cut, so every step appears exactly once and the
    # file equals the uninterrupted run's record for record (timings aside).
    assert len(of_type(records, "header")) == 1 and len(of_type(records, "summary")) == 1
    assert [r["step"] for r in of_type(records, "train")] == [1, 2, 3, 4, 5, 6]
    resumed = [r for r in records if r.get("step", 0) > 3 or r["type"] == "summary"]
    r_train, f_train = of_type(resumed, "train"), of_type(full, "train")
    assert [r["step"] for r in r_train] == [4, 5, 6]
    for r, f in zip(r_train, f_train[3:]):
        assert r["step"] == f["step"] and r["flops"] == f["flops"] and r["tokens"] == f["tokens"]
        assert r["train_loss"] == f["train_loss"], (r["step"], r["train_loss"], f["train_loss"])
        assert r["balance_loss"] == f["balance_loss"], (r["step"], r["balance_loss"], f["balance_loss"])
    assert of_type(resumed, "eval")[-1]["val_bpb"] == of_type(full, "eval")[-1]["val_bpb"]
    assert of_type(resumed, "summary")[0]["final_val_bpb"] == of_type(full, "summary")[0]["final_val_bpb"]

    resumed_weights = load_file(str(ckpts / "step_000006" / "model.safetensors"))
    for k in full_weights:
        assert torch.equal(full_weights[k], resumed_weights[k]), k


def test_resume_errors_are_one_line(base_dir):
    args = TINY + MOE + ["--num-iterations", "6", "--eval-every", "-1"]
    p = run_train(base_dir, args + ["--model-tag", "no_such_run", "--resume-from-step", "latest"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "no complete checkpoint" in p.stderr
    # a checkpoint of another model shape (8 experts instead of 4): clear error, no traceback
    run_train(base_dir, TINY + ["--use-moe", "--n-experts", "8", "--num-iterations", "1", "--eval-every", "-1",
                                "--model-tag", "shape8"])
    p = run_train(base_dir, args + ["--model-tag", "shape8", "--resume-from-step", "1"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip()
    assert "\n" not in line and "model.safetensors" in line and "size mismatch" in line


# ---------------------------------------------------------------------------------------------
# 6. A non-finite loss stops training with a clear line naming the step; checkpoints intact

NAN_SCRIPT = r"""
import sys
import nanochat.gpt as gpt
real_forward = gpt.GPT.forward
calls = [0]
def forward(self, idx, targets=None, *args, **kwargs):
    out = real_forward(self, idx, targets, *args, **kwargs)
    if targets is not None and self.training:
        calls[0] += 1
        if calls[0] > {good_calls}:  # from here on the loss is NaN
            return out[0] * float("nan"), out[1]
    return out
gpt.GPT.forward = forward
from nanochat.common import run_main
from scripts.base_train import main
sys.argv = ["base_train"] + {args!r}
run_main(main)
"""


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(base_dir):
    from nanochat.checkpoint import find_latest_step, load_checkpoint
    from nanochat.gpt import GPTConfig, build_model
    tag = "nan"
    args = TINY + ["--num-iterations", "8", "--eval-every", "-1", "--save-every", "2", "--model-tag", tag]
    script = NAN_SCRIPT.format(good_calls=8, args=args)  # 2 micro-steps a step: steps 1-4 are fine
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=train_env(base_dir), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    last_line = p.stderr.strip().splitlines()[-1]
    assert "non-finite training loss" in last_line and "step 5" in last_line, p.stderr[-2000:]
    ckpt_dir = base_dir / "runs" / tag / "checkpoints"
    assert find_latest_step(str(ckpt_dir)) == 4
    with open(ckpt_dir / "step_000004" / "meta.json") as f:
        config = GPTConfig(**json.load(f)["config"])
    meta = load_checkpoint(str(ckpt_dir), 4, build_model(config, "cpu"), None, 0, "cpu")
    assert meta["step"] == 4
    assert [r["step"] for r in of_type(read_metrics(base_dir, tag), "train")] == [1, 2, 3, 4]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_process_resume_restores_each_ranks_loader(base_dir):
    tag = "resume2"
    args = TINY + MOE + ["--num-iterations", "4", "--eval-every", "-1", "--save-every", "2", "--model-tag", tag]
    run_train(base_dir, args, nproc=2)
    full = of_type(read_metrics(base_dir, tag), "train")
    step2 = base_dir / "runs" / tag / "checkpoints" / "step_000002"
    states = [json.loads((step2 / f"loader_rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0] != states[1]  # each rank has its own position
    run_train(base_dir, args + ["--resume-from-step", "2"], nproc=2)
    resumed = of_type(read_metrics(base_dir, tag), "train")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for r, f in zip(resumed[2:], full[2:]):
        assert r["train_loss"] == f["train_loss"] and r["balance_loss"] == f["balance_loss"]
    # resuming with another process count is refused in one line
    p = run_train(base_dir, args + ["--resume-from-step", "2"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "process" in p.stderr.strip().splitlines()[-1]


def test_mtp_heads_train_and_log_per_head(base_dir):
    tag = "mtp_heads"
    run_train(base_dir, TINY + PLAIN_FLAGS + MOE + ["--mtp-heads", "2", "--mtp-weight", "0.5", "--num-iterations", "6",
                                                    "--eval-every", "3", "--model-tag", tag])
    records = read_metrics(base_dir, tag)
    header, trains = records[0], of_type(records, "train")
    assert header["config"]["mtp_heads"] == 2 and header["params"]["mtp"] == 2 * 12 * D * D
    # the heads' FLOPs are in the horizon: their blocks, the lm_head again, their attention
    assert header["flops_per_token"] == (6 * (header["active_total"] - V * D) + 12 * L * N_HEAD * HEAD_DIM * T
                                         + 2 * (6 * V * D + 12 * N_HEAD * HEAD_DIM * T))
    assert all(len(r["mtp_losses"]) == 2 and all(math.isfinite(v) for v in r["mtp_losses"]) for r in trains)
    # train_loss stays next-token: at step 1 it is ~ln(V), as are the heads' losses
    assert trains[0]["train_loss"] == pytest.approx(math.log(V), abs=0.1)
    assert trains[-1]["mtp_losses"][0] < trains[0]["mtp_losses"][0]
    p = run_train(base_dir, TINY + ["--mtp-heads", "64", "--num-iterations", "1", "--model-tag", "x"], check=False)
    assert p.returncode == 2 and "--mtp-heads must be in 0..63" in p.stderr


def test_mod_trains_logs_per_block_and_evaluates_both_rules(base_dir):
    tag = "mod"
    run_train(base_dir, TINY + PLAIN_FLAGS + MOE + ["--mod-capacity", "0.25", "--num-iterations", "8",
                                                    "--eval-every", "4", "--sample-every", "8", "--model-tag", tag])
    records = read_metrics(base_dir, tag)
    header, trains, evals = records[0], of_type(records, "train"), of_type(records, "eval")
    assert header["config"]["mod_capacity"] == 0.25 and header["params"]["mod"] == D
    # layer 0 full, layer 1 routed: 16 of 64 tokens, attention over 16; its router 6d per token
    block = header["active_total"] - V * D - V * D - header["params"]["mod"]  # both blocks, active weights
    per_block = block // 2
    assert header["flops_per_token"] == pytest.approx(
        6 * V * D + 6 * per_block + 12 * N_HEAD * HEAD_DIM * T
        + 16 / 64 * (6 * per_block + 12 * N_HEAD * HEAD_DIM * 16) + 6 * D, rel=1e-12)
    assert all(len(r["mod_agree"]) == 1 and 0 <= r["mod_frac"][0] <= 1 for r in trains)
    # calibrated from the first update on: about C of the tokens, agreeing with the top-k
    # (at C = 0.25 "never process" would agree 0.75; measured here 0.89-0.96)
    assert all(0.1 < r["mod_frac"][0] < 0.5 and r["mod_agree"][0] > 0.8 for r in trains[1:])
    assert "val_bpb_topk" in evals[-1] and all("val_bpb_topk" not in e for e in evals[:-1])
    assert math.isfinite(evals[-1]["val_bpb"]) and math.isfinite(evals[-1]["val_bpb_topk"])
    p = run_train(base_dir, TINY + PLAIN_FLAGS + ["--mod-capacity", "1.5", "--num-iterations", "1", "--model-tag", "x"],
                  check=False)
    assert p.returncode == 2 and "--mod-capacity must be in [0, 1]" in p.stderr and "Traceback" not in p.stderr


def test_hybrid_moe_trains_and_resumes_exactly(base_dir):
    tag = "hybrid"
    hybrid = ["--layer-pattern", "AM", "--mamba-d-state", "16", "--mamba-head-dim", "64", "--mamba-chunk", "16"]
    common = TINY + PLAIN_FLAGS + MOE + hybrid + ["--num-iterations", "4", "--eval-every", "-1", "--save-every", "2"]
    args = common + ["--model-tag", tag]
    p = run_train(base_dir, args)
    assert "Mamba layers: 1 (pattern 'AM'" in p.stdout
    full = read_metrics(base_dir, tag)
    assert full[0]["config"]["layer_pattern"] == "AM" and full[0]["params"]["mamba"] > 0
    ckpts = base_dir / "runs" / tag / "checkpoints"
    full_weights = load_file(str(ckpts / "step_000004" / "model.safetensors"))
    assert any(".mamba.A_log" in k for k in full_weights)
    run_train(base_dir, args + ["--resume-from-step", "2"])
    resumed = read_metrics(base_dir, tag)
    assert [r["train_loss"] for r in of_type(resumed, "train")] == [r["train_loss"] for r in of_type(full, "train")]
    assert of_type(resumed, "train")[-1]["train_loss"] < of_type(resumed, "train")[0]["train_loss"]
    resumed_weights = load_file(str(ckpts / "step_000004" / "model.safetensors"))
    assert all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)
    # under torchrun (2 processes, gloo): the same steps as one process with twice the accumulation
    run_train(base_dir, common + ["--model-tag", "hybrid_ddp"], nproc=2)
    two = of_type(read_metrics(base_dir, "hybrid_ddp"), "train")
    assert all(abs(a["train_loss"] - b["train_loss"]) < 1e-5 for a, b in zip(of_type(full, "train"), two)) and len(two) == 4
    for bad, message in ((["--layer-pattern", "AX"], "--layer-pattern must be letters A"),
                         (["--layer-pattern", "M", "--mamba-head-dim", "48"], "--mamba-head-dim 48 must divide"),
                         (["--layer-pattern", "AM", "--mod-capacity", "0.5"], "--mod-capacity with Mamba layers")):
        p = run_train(base_dir, TINY + PLAIN_FLAGS + bad + ["--num-iterations", "1", "--model-tag", "x"], check=False)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_mtp_heads_do_not_lengthen_the_data_ratio_horizon():
    """--target-param-data-ratio counts the parameters of the model being trained for: active,
    without the embedding lookup and the training-only MTP heads (they would make a run with 2
    heads train 1.75x the tokens of the same trunk). Hand count: lm_head V*D + 12 D^2 per layer."""
    from nanochat.gpt import GPTConfig, meta_model
    from scripts.base_train import parse_args, training_horizon
    args = parse_args(["--target-param-data-ratio", "20", "--total-batch-size", "512"])
    steps = {}
    for heads in (0, 2):
        model = meta_model(GPTConfig(**PLAIN, sequence_len=T, vocab_size=V, n_layer=L, n_head=N_HEAD, n_kv_head=N_HEAD,
                                     n_embd=D, mtp_heads=heads))
        steps[heads], flag = training_horizon(args, model.num_scaling_params(), model.estimate_flops())
        assert flag == "--target-param-data-ratio"
    assert steps[0] == steps[2] == round(20 * (V * D + 12 * L * D * D) / 512)


def test_init_from_keeps_the_trained_expert_bias_and_old_checkpoints_load(base_dir):
    """A trained aux-free bias is part of the function the weights compute: a run started from
    it with --aux-free-bias 0 stops moving it but still chooses with it, so its step-0 val bpb is
    the source's final one. And a checkpoint whose config predates the loss-weight fields (a
    config.json written before they existed) starts a run the same way."""
    common = TINY + ["--eval-every", "-1"]
    run_train(base_dir, common + MOE + ["--num-iterations", "6", "--model-tag", "bias_src"])
    source_bpb = of_type(read_metrics(base_dir, "bias_src"), "eval")[-1]["val_bpb"]
    ckpt = Path(base_dir) / "runs" / "bias_src" / "checkpoints" / "step_000006"
    bias = load_file(str(ckpt / "model.safetensors"))["transformer.h.0.mlp.expert_bias"]
    assert bias.abs().sum() > 0  # the bias moved in training
    run_train(base_dir, common[:-2] + ["--eval-every", "1", "--init-from", "bias_src", "--aux-free-bias", "0",
                                       "--num-iterations", "1", "--model-tag", "bias_dst"])
    records = read_metrics(base_dir, "bias_dst")
    assert records[0]["config"]["aux_free_bias"] == 0.0
    assert of_type(records, "eval")[0]["val_bpb"] == pytest.approx(source_bpb, abs=1e-6)
    moved = load_file(str(Path(base_dir) / "runs" / "bias_dst" / "checkpoints" / "step_000001" / "model.safetensors"))
    assert torch.equal(moved["transformer.h.0.mlp.expert_bias"], bias)  # rate 0: not moved
    # the same checkpoint with a config from before the loss-weight fields
    old = Path(base_dir) / "runs" / "bias_old" / "checkpoints"
    old.mkdir(parents=True)
    import shutil
    shutil.copytree(ckpt, old / "step_000006")
    meta = json.loads((old / "step_000006" / "meta.json").read_text())
    for name in ("balance_loss_coeff", "router_z_loss", "mtp_weight"):
        del meta["config"][name]
    (old / "step_000006" / "meta.json").write_text(json.dumps(meta))
    run_train(base_dir, common[:-2] + ["--eval-every", "1", "--init-from", "bias_old", "--num-iterations", "1",
                                       "--model-tag", "bias_old_dst"])
    records = read_metrics(base_dir, "bias_old_dst")
    assert records[0]["config"]["balance_loss_coeff"] == 0.0 and records[0]["config"]["router"] == "sigmoid"
    assert of_type(records, "eval")[0]["val_bpb"] == pytest.approx(source_bpb, abs=1e-6)
