"""runs/*.sh: syntax, shellcheck when available, and dry runs that print the commands."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

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


def test_tmp_moe_dry_run_uses_torchrun_fp8_and_wandb():
    cmds = dry_run("runs/tmp_moe.sh", NPROC="1", WANDB_RUN="exp1")
    prepare, dense, moe, compare = cmds
    assert "--data fineweb" in prepare
    for cmd in (dense, moe):
        assert cmd.startswith("torchrun --standalone --nproc_per_node=1 -m scripts.base_train --")
        assert "--fp8" in cmd and "--depth 12" in cmd and "--max-seq-len 1024" in cmd and "--head-dim 64" in cmd
    assert "--run exp1 " in dense + " " and "--run exp1_moe" in moe
    assert "--n-experts 8 --expert-topk 2 --expert-hidden-mult 2" in moe
    assert "scripts.compare" in compare
    assert "--fp8" not in " ".join(dry_run("runs/tmp_moe.sh", FP8="0"))


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
    (lt, tests), (ls, step), (lp, parts), (lf, step_fp8), (lb, bench) = stages
    assert tests == "python -m pytest -q tests/test_cuda.py"
    assert step.startswith("python -m scripts.bench_step --depth 12 --n-embd 768 --head-dim 128 --max-seq-len 1024 "
                           "--vocab-size 32768")
    assert "--dtype bf16 --device-type cuda --compile on --profile 25" in step
    assert step.endswith("--variant dense: --variant moe:--use-moe")
    assert step_fp8 == step + " --fp8" and "--fp8" not in step
    assert parts.startswith("python -m scripts.bench_step --depth 4") and "--compile on --profile 15" in parts
    assert "moe_e1:--use-moe --n-experts 1 --expert-topk 1 --expert-hidden-mult 4" in parts
    (_, variants), = gpu_check_dry_run(STAGES="variants")  # opt-in: measured already
    assert variants.startswith("python -m scripts.bench_step --depth 8") and "--compile on" in variants
    assert "mod:--mod-capacity 0.125" in variants and "mtp:--mtp-heads 1" in variants
    assert bench == "python -m scripts.bench_moe --step-only --dtype bf16 --device-type cuda --compile on --repeats 10"
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
