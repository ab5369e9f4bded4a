"""runs/*.sh: syntax, shellcheck when available, and dry runs that print the commands."""

import os
import shutil
import subprocess

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


def test_gpu_check_dry_run_runs_cuda_tests_training_and_bench():
    tests, dense, moe, bench, variants = dry_run("runs/gpu_check.sh", STEPS="10")
    assert variants.startswith("python -m scripts.bench_step") and "--compile on" in variants
    assert "mod:--mod-capacity 0.125" in variants and "mtp:--mtp-heads 1" in variants
    assert dry_run("runs/gpu_check.sh", STAGES="variants") == [variants]
    assert tests == "python -m pytest -q tests/test_cuda.py"
    for cmd in (dense, moe):
        assert "--device-type cuda --compile on" in cmd and "--num-iterations 10" in cmd
    assert "--use-moe" in moe and "--use-moe" not in dense
    assert bench.startswith("python -m scripts.bench_moe --step-only --dtype bf16 --device-type cuda")
