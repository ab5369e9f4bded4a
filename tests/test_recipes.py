"""runs/*.sh: syntax, shellcheck when available, and dry runs that print the commands."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from nanochat.common import UserError
from tests.test_base_train import train_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["runs/runcpu.sh", "runs/tmp_moe.sh", "runs/test.sh", "runs/setup_env.sh", "runs/gpu_check.sh", "runs/grow.sh",
           "dev/grow_techmix.sh", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    r = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def dry_run(script, **env):
    r = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DRY_RUN": "1", **env})
    assert r.returncode == 0, r.stderr
    return [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]


def test_runcpu_dry_run_trains_dense_and_moe_at_the_same_flops():
    cmds = dry_run("runs/runcpu.sh", TARGET_FLOPS="3e12", DATA="my/texts")
    dense, moe, frontier, compare = cmds
    assert dense.startswith("python -m scripts.base_train") and "--use-moe" not in dense
    assert "--use-moe" in moe and "--expert-topk 2" in moe and "--expert-hidden-mult 2" in moe
    for cmd in (dense, moe):
        assert "--target-flops 3e12" in cmd and "--data my/texts" in cmd and "--device-type cpu" in cmd
    # the frontier: the same dense model trained to 1.5x the FLOPs, read at its final point
    assert frontier == dense.replace("--target-flops 3e12", "--target-flops 4.5e+12").replace("cpu_dense", "cpu_dense_1.5x")
    assert compare.startswith("python -m scripts.compare --runs cpu_dense cpu_moe cpu_dense_1.5x "
                              "--frontier cpu_dense cpu_dense_1.5x --out")
    dense, moe, compare = dry_run("runs/runcpu.sh", FRONTIER="0")
    assert compare.startswith("python -m scripts.compare --runs cpu_dense cpu_moe --out")


def test_runcpu_moe_flags_reach_only_the_moe_run():
    dense, moe, _, _ = dry_run("runs/runcpu.sh", MOE_FLAGS="--router softmax --aux-free-bias 0 --balance-loss-coeff 0.01")
    assert "--router" not in dense
    assert moe.endswith("--router softmax --aux-free-bias 0 --balance-loss-coeff 0.01 --model-tag cpu_moe")


def tmp_moe_dry_run(**env):
    """The printed commands, less the CORE preparation (test_tmp_moe_core_at_the_end_of_every_run)."""
    return [c for c in (shlex.split(line) for line in dry_run("runs/tmp_moe.sh", **env)) if "scripts.base_eval" not in c]


def test_tmp_moe_core_at_the_end_of_every_run():
    cmds = [shlex.split(line) for line in dry_run("runs/tmp_moe.sh")]
    prepare_core = cmds[1]
    assert prepare_core[1:] == ["-m", "scripts.base_eval", "--prepare", "--max-per-task", "500"]  # before any torchrun
    trains = [c for c in cmds if "scripts.base_train" in c]
    assert len(trains) == 3 and all(flag(c, "--core-every") == "-1" and flag(c, "--core-max-per-task") == "500"
                                    for c in trains)
    cmds = [shlex.split(line) for line in dry_run("runs/tmp_moe.sh", CORE_EVAL_DIR="/data/eval", CORE_MAX_PER_TASK="-1")]
    assert cmds[1][-2:] == ["--eval-dir", "/data/eval"]
    assert all(flag(c, "--core-eval-dir") == "/data/eval" and flag(c, "--core-max-per-task") == "-1"
               for c in cmds if "scripts.base_train" in c)
    cmds = [shlex.split(line) for line in dry_run("runs/tmp_moe.sh", CORE="0")]
    assert not any("scripts.base_eval" in c or "--core-every" in c for c in cmds)


def flag(cmd, name):
    """The value after `name` in a command's argv (None when absent)."""
    return cmd[cmd.index(name) + 1] if name in cmd else None


def base_train_argv(cmd, nproc):
    """base_train's flags in a printed torchrun command; None for a command that is not one."""
    if "scripts.base_train" not in cmd:
        return None
    i = cmd.index("scripts.base_train")
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and cmd[i - 1] == "-m", cmd
    assert f"--nproc_per_node={nproc}" in cmd[:i], cmd
    return cmd[i + 1:]  # with the "--" torchrun passes through (base_train drops it)


def test_tmp_moe_defaults_fp8_off_frontier_on_fineweb_prepared_first():
    prepare, dense, moe, dense_2x, compare = tmp_moe_dry_run()
    assert prepare[1:] == ["-m", "scripts.prepare_data", "--data", "fineweb", "--vocab-size", "65536", "--num-shards", "64"]
    for cmd in (dense, moe, dense_2x):
        argv = base_train_argv(cmd, 8)
        assert "--fp8" not in argv and flag(argv, "--data") == "fineweb" and flag(argv, "--device-type") == "cuda"
        assert (flag(argv, "--depth"), flag(argv, "--max-seq-len"), flag(argv, "--head-dim")) == ("12", "1024", "64")
    assert flag(dense, "--target-flops") == flag(moe, "--target-flops") == "2e18"
    assert flag(dense_2x, "--target-flops") == "4e+18" and "--use-moe" not in dense + dense_2x
    assert moe[moe.index("--use-moe"):moe.index("--run")] == ["--use-moe", "--n-experts", "8", "--expert-topk", "2",
                                                              "--expert-hidden-mult", "2"]
    assert [flag(c, "--model-tag") for c in (dense, moe, dense_2x)] == ["tmp_dense_d12", "tmp_moe_d12", "tmp_dense_d12_2x"]
    assert compare[1:] == ["-m", "scripts.compare", "--runs", "tmp_dense_d12", "tmp_moe_d12", "tmp_dense_d12_2x",
                           "--frontier", "tmp_dense_d12", "tmp_dense_d12_2x", "--out", compare[-1]]


def test_tmp_moe_knobs(tmp_path):
    cmds = tmp_moe_dry_run(FP8="1", NPROC="1", WANDB_RUN="exp1")
    assert "--fp8" not in cmds[0] and all("--fp8" in c for c in cmds[1:4]) and "--fp8" not in cmds[-1]
    assert [flag(c, "--run") for c in cmds[1:4]] == ["exp1", "exp1_moe", "exp1_dense_2x"]
    assert all(base_train_argv(c, 1) for c in cmds[1:4])
    prepare, dense, moe, compare = tmp_moe_dry_run(FRONTIER="0", DATA=str(tmp_path), MOE_FLAGS="--router softmax --aux-free-bias 0")
    assert prepare[3:] == ["--data", str(tmp_path), "--vocab-size", "65536"]  # own files: no shards to download
    assert flag(dense, "--data") == flag(moe, "--data") == str(tmp_path)
    assert "--router" not in dense and moe[-6:-4] == ["--aux-free-bias", "0"]
    assert compare[3:7] == ["--runs", "tmp_dense_d12", "tmp_moe_d12", "--out"]  # one dense curve, no --frontier
    cmds = tmp_moe_dry_run(FRONTIER_MULTS="0.5 2", TARGET_FLOPS="1e19", DEPTH="20")
    assert [flag(c, "--target-flops") for c in cmds[1:5]] == ["1e19", "1e19", "5e+18", "2e+19"]
    assert cmds[-1][cmds[-1].index("--frontier"):-2] == ["--frontier", "tmp_dense_d20", "tmp_dense_d20_0.5x",
                                                          "tmp_dense_d20_2x"]


# The CPU smoke of tests/test_recipes.py::test_tmp_moe_cpu_smoke: depth 2, width 64, 2 processes (gloo)
TMP_MOE_SMOKE = dict(DEVICE="cpu", NPROC="2", SETUP="0", DATA="synthetic", SYNTHETIC_DOCS="1000", DEPTH="2", WIDTH="64",
                     HEAD_DIM="32", SEQ_LEN="64", BATCH="4", TOTAL_BATCH="512", VOCAB="512", TARGET_FLOPS="5e9",
                     EVAL_EVERY="5", EVAL_TOKENS="1024", N_EXPERTS="4", TRAIN_FLAGS="--sample-every -1",
                     CORE_EVAL_DIR="tests/fixtures/core", CORE_MAX_PER_TASK="12")


@pytest.mark.parametrize("env", [
    {}, dict(NPROC="1", FP8="1"), dict(NPROC="4", DEPTH="20", WIDTH="1280", TARGET_FLOPS="1e19", FRONTIER_MULTS="0.5 2 4"),
    dict(DATA="synthetic", VOCAB="4096", MOE_FLAGS="--router softmax --aux-free-bias 0 --balance-loss-coeff 0.01"),
    dict(FRONTIER="0", TOPK="1", EXPERT_MULT="4", N_EXPERTS="16"), TMP_MOE_SMOKE,
], ids=["defaults", "one-gpu-fp8", "d20-4gpu", "synthetic-switch", "top1", "cpu-smoke"])
def test_tmp_moe_every_printed_command_passes_argument_validation(monkeypatch, env):
    """Each base_train command goes through base_train's own checks (as main runs them, with the
    world size torchrun gives it), the machine aside: CUDA and FP8 are assumed present here."""
    from nanochat import fp8
    from scripts import base_train, prepare_data, compare
    real_check = base_train.check_device_type
    monkeypatch.setattr(base_train, "check_device_type", lambda d: "cuda" if d == "cuda" else real_check(d))
    fp8_checked = []
    monkeypatch.setattr(fp8, "check_fp8_supported", fp8_checked.append)
    nproc = int(env.get("NPROC", 8))
    prepare, *trains, last = tmp_moe_dry_run(**env)
    assert prepare[1:3] == ["-m", "scripts.prepare_data"]
    data_args = prepare_data.build_parser().parse_args(prepare[3:])
    prepare_data.validate_data_args(data_args)
    tags, dense = [], []
    for cmd in trains:
        argv = base_train_argv(cmd, nproc)
        args = base_train.parse_args(argv)
        config = base_train.resolve_config(args, base_train.explicit_flags(argv), None)
        assert base_train.validate_args(args, config, nproc) == env.get("DEVICE", "cuda")
        # the same data flags as the preparation: base_train finds it all in place (the built-in
        # corpus would be rebuilt under rank 0 for another --synthetic-train-docs)
        assert {k: getattr(args, k) for k in vars(data_args)} == vars(data_args)
        tags.append(args.model_tag)
        if not config.use_moe:
            dense.append(args.model_tag)
    assert fp8_checked == (["cuda"] * len(trains) if env.get("FP8") == "1" else [])
    compare_args = compare.build_parser().parse_args(last[3:])
    assert last[1:3] == ["-m", "scripts.compare"] and compare_args.runs == tags
    assert compare_args.frontier == ([] if env.get("FRONTIER") == "0" else dense)


def test_tmp_moe_validation_catches_a_bad_knob(monkeypatch):
    from scripts import base_train
    argv = base_train_argv(tmp_moe_dry_run(BATCH="3")[1], 8)  # 3 x 1024 x 8 does not divide 524288
    args = base_train.parse_args(argv)
    with pytest.raises(UserError, match="--total-batch-size 524288"):
        base_train.validate_args(args, base_train.resolve_config(args, base_train.explicit_flags(argv), None), 8)


@pytest.mark.slow
def test_tmp_moe_cpu_smoke(tmp_path):
    """The 8-GPU script end to end on CPU: prepare, 2-process torchrun runs (dense, MoE, dense at 2x),
    compare with the frontier and time multipliers. No network: set-up skipped, built-in corpus."""
    base = tmp_path / "base"
    env = train_env(base, dict(TMP_MOE_SMOKE, PYTHON=sys.executable))
    env.pop("DRY_RUN", None)
    t0 = time.time()
    r = subprocess.run(["bash", "runs/tmp_moe.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    assert seconds < 120, seconds
    # the data and tokenizer were prepared once, before torchrun started; the runs found them
    out = r.stdout
    first_torchrun = out.index("torch.distributed.run")
    assert out.count("Preparing the built-in corpus") == 1 and out.index("Preparing the built-in corpus") < first_torchrun
    assert out.count("training one (vocab 512)") == 1
    assert f"tokenizer: {base / 'tokenizers' / 'synthetic'} (vocab 512)" in out[:first_torchrun]
    flops = {}
    for tag in ("tmp_dense_d2", "tmp_moe_d2", "tmp_dense_d2_2x"):
        records = [json.loads(line) for line in (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()]
        header, summary = records[0], records[-1]
        assert header["world_size"] == 2 and header["device_type"] == "cpu" and summary["type"] == "summary"
        assert header["hardware"]["world_size"] == 2 and header["hardware"]["threads"] == 1
        assert all(r["dt"] > 0 for r in records if r["type"] == "train")
        flops[tag] = summary["flops"]
    assert flops["tmp_dense_d2_2x"] == pytest.approx(2 * flops["tmp_dense_d2"], rel=0.1)
    table = [[c.strip() for c in line.strip("| ").split("|")] for line in out.splitlines() if line.startswith("| ")]
    moe_row = next(row for row in table if row[0] == "tmp_moe_d2")
    time_mult = moe_row[table[0].index("time multiplier (step time)")]
    assert re.fullmatch(r"(<= |> )?\d+\.\d\d(†)?", time_mult), time_mult  # a number: same hardware
    # CORE at the end of every run (the fixture's 5 tasks), in the table
    for tag in ("tmp_dense_d2", "tmp_moe_d2", "tmp_dense_d2_2x"):
        core = [json.loads(line) for line in (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()
                if '"type": "core"' in line]
        assert len(core) == 1 and core[0]["n_tasks"] == 5 and core[0]["max_per_task"] == 12
    assert re.fullmatch(r"-?\d\.\d{4} ± \d\.\d{4} \(5/22, partial\)", moe_row[table[0].index("CORE")])
    assert (base / "comparisons" / "tmp_d2" / "comparison.md").exists()


GPU_CHECK_LIMIT = re.compile(r"timeout -k 10 (\d+) (.*)")


def gpu_check_dry_run(**env):
    """(limit in seconds, command) of each stage the dry run prints: every stage runs under timeout."""
    out = []
    for line in dry_run("runs/gpu_check.sh", **env):
        m = GPU_CHECK_LIMIT.fullmatch(line)
        assert m, line
        out.append((int(m[1]), m[2]))
    return out


def test_gpu_check_dry_run_default_stages_in_order_with_limits():
    stages = gpu_check_dry_run()
    (lt, tests), (ls, step), (lp, parts), (lf, step_fp8), (lm, tmp_moe), (lb, bench) = stages
    assert tests == "python -m pytest -q tests/test_cuda.py"
    # the shape of the first GPU measurement: depth 8, width 768, 32 rows x 1024 = 32k tokens
    assert step.startswith("python -m scripts.bench_step --depth 8 --n-embd 768 --head-dim 128 --max-seq-len 1024 "
                           "--vocab-size 32768 --rows 32")
    assert "--dtype bf16 --device-type cuda --compile on --profile 25" in step
    assert step.endswith("--variant dense: --variant moe:--use-moe")
    assert step_fp8 == step + " --fp8" and "--fp8" not in step
    assert parts.startswith("python -m scripts.bench_step --depth 4") and "--compile on --profile 15" in parts
    assert "moe_e1:--use-moe --n-experts 1 --expert-topk 1 --expert-hidden-mult 4" in parts
    (_, variants), = gpu_check_dry_run(STAGES="variants")  # opt-in: measured already
    assert variants.startswith("python -m scripts.bench_step --depth 8") and "--compile on" in variants
    assert "mod:--mod-capacity 0.125" in variants and "mtp:--mtp-heads 1" in variants
    assert bench == "python -m scripts.bench_moe --step-only --dtype bf16 --device-type cuda --compile on --repeats 10"
    # the recipe on one GPU: no set-up (offline), the built-in corpus, its own base dir
    assert tmp_moe.startswith("env SETUP=0 PYTHON=python NANOCHAT_BASE_DIR=") and tmp_moe.endswith("bash runs/tmp_moe.sh")
    assert "NPROC=1" in tmp_moe and "DATA=synthetic" in tmp_moe and "DEVICE=cuda" in tmp_moe
    # BEFORE=DIR: the step bench in the exported older tree first, the same command, on the same card
    with_before = gpu_check_dry_run(BEFORE="gpu_before")
    assert [c for _, c in with_before[1:3]] == [f"env -C gpu_before PYTHONPATH=. {step}", step]
    assert all(10 <= lim <= 150 for lim, _ in stages)  # the whole run is also capped by TOTAL_LIMIT
    assert "base_train" not in " ".join(c for _, c in stages)  # train needs a tokenizer: opt-in
    # STAGES picks stages (in the script's order); <STAGE>_LIMIT overrides one stage's limit
    assert gpu_check_dry_run(STAGES="bench_moe step", STEP_LIMIT="99") == [(99, step), (lb, bench)]
    dense, moe = [c for _, c in gpu_check_dry_run(STAGES="train", STEPS="10")]
    for cmd in (dense, moe):
        assert cmd.startswith("python -m scripts.base_train") and "--device-type cuda --compile on" in cmd
        assert "--num-iterations 10" in cmd
    assert "--use-moe" in moe and "--use-moe" not in dense


TINY_STEP = "--depth 1 --n-embd 64 --head-dim 32 --max-seq-len 32 --vocab-size 256 --rows 2 --repeats 1 --warmup 1"


def gpu_check(tmp_path, **env):
    return subprocess.run(["bash", "runs/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "DEVICE": "cpu",
                               "STEP_ARGS": TINY_STEP, **env})


def test_gpu_check_stages_run_on_cpu_and_write_json_as_they_end(tmp_path):
    r = gpu_check(tmp_path, STAGES="step step_fp8")
    assert r.returncode == 0, r.stdout + r.stderr
    step = json.loads((tmp_path / "step.json").read_text())
    assert step["stage"] == "step" and step["status"] == "ok" and step["exit_code"] == 0 and step["seconds"] > 0
    assert step["command"].startswith(sys.executable + " -m scripts.bench_step --depth 1")
    assert list(step["result"]["variants"]) == ["dense", "moe"]  # the bench's JSON line, embedded
    assert all(len(v["profile"]["ops"]) == 25 for v in step["result"]["variants"].values())  # where the time goes
    assert "moe" in (tmp_path / "step.log").read_text()
    fp8 = json.loads((tmp_path / "step_fp8.json").read_text())  # no FP8 GPU here: skipped, not failed
    assert fp8["status"] == "skipped" and fp8["exit_code"] is None and "--fp8" in fp8["reason"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["step", "step_fp8"] and summary["failed"] == []
    assert summary["gpu"]["device"] == "cpu"
    ratio = next(t for t in summary["targets"] if t["target"] == "MoE/dense step")
    assert ratio["measured"] == step["result"]["variants"]["moe"]["time_ratio"] and ratio["verdict"] in ("PASS", "MISS")
    assert "MoE/dense step" in r.stdout


def test_gpu_check_records_a_timed_out_stage_and_exits_non_zero(tmp_path):
    # 1 s for 1000 repeats (and importing torch): killed by timeout, exit 124; the script goes on
    r = gpu_check(tmp_path, STAGES="step step_fp8", STEP_LIMIT="1", STEP_ARGS=TINY_STEP + " --repeats 1000")
    assert r.returncode != 0
    step = json.loads((tmp_path / "step.json").read_text())
    assert step["status"] == "timeout" and step["exit_code"] == 124 and step["limit_s"] == 1 and step["result"] is None
    assert json.loads((tmp_path / "step_fp8.json").read_text())["status"] == "skipped"
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == ["step"]
    # no time left of TOTAL_LIMIT: the stage is not started, and recorded as timed out
    r = gpu_check(tmp_path, STAGES="bench_moe", TOTAL_LIMIT="0")
    assert r.returncode != 0
    bench = json.loads((tmp_path / "bench_moe.json").read_text())
    assert bench["status"] == "timeout" and bench["exit_code"] is None and "TOTAL_LIMIT" in bench["reason"]
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == ["bench_moe"]


@pytest.mark.slow
def test_tmp_moe_without_task_files_skips_core_in_one_line(tmp_path):
    """Offline with no task files: one line says CORE is skipped, and the runs go on without it."""
    base = tmp_path / "base"
    env = train_env(base, dict(TMP_MOE_SMOKE, PYTHON=sys.executable, CORE_EVAL_DIR=str(tmp_path / "none"), FRONTIER="0",
                               TARGET_FLOPS="2e9"))
    r = subprocess.run(["bash", "runs/tmp_moe.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"--eval-dir {tmp_path / 'none'}: no such folder" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.count("tmp_moe: CORE skipped") == 1 and "--core-every" not in r.stdout
    assert not any('"type": "core"' in (base / "runs" / t / "metrics.jsonl").read_text() for t in ("tmp_dense_d2", "tmp_moe_d2"))
