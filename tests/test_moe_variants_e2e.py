"""End-to-end runs of scripts/base_train.py with the MoE routing variants: each trains and
logs routing stats, 2-process torchrun matches 1 process, resume keeps the bias and the moe
records, bad variant flags fail fast."""

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.plain import PLAIN_FLAGS
from tests.test_base_train import run_train, read_metrics, of_type, TINY, MOE

# The routing variants on the plain model (none of nanochat's pieces), whatever GPTConfig's defaults:
# the losses and the aux-free biases' paths below are those of the model these tests were written on
MOE = MOE + PLAIN_FLAGS

# ---------------------------------------------------------------------------------------------
# 7. End to end: each variant trains; 1 vs 2 processes; resume; bad flags

# Switch balancing spelled out (the CLI defaults are sigmoid + aux-free since the techmix study),
# so each variant below tests its own feature on the same base as before
SWITCH = ["--router", "softmax", "--aux-free-bias", "0", "--balance-loss-coeff", "0.01"]
VARIANTS = {
    "defaults": [],
    "sigmoid_bias": ["--router", "sigmoid", "--aux-free-bias", "0.001"],
    "switch": SWITCH,
    "shared": SWITCH + ["--n-shared-experts", "1"],
    "zloss": SWITCH + ["--router-z-loss", "0.001"],
    "capacity": SWITCH + ["--capacity-factor", "1.0"],
}
BIAS_MOVES = ("defaults", "sigmoid_bias")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_and_logs_routing_stats(base_dir, variant):
    tag = f"variant_{variant}"
    steps = 12
    run_train(base_dir, TINY + MOE + VARIANTS[variant] +
              ["--num-iterations", str(steps), "--eval-every", "-1", "--moe-stats-every", "4", "--model-tag", tag])
    records = read_metrics(base_dir, tag)
    header, trains, moes = records[0], of_type(records, "train"), of_type(records, "moe")
    cfg = header["config"]
    assert (cfg["router"], cfg["n_shared_experts"], cfg["aux_free_bias"], cfg["capacity_factor"]) == {
        "defaults": ("sigmoid", 0, 0.01, 0.0), "sigmoid_bias": ("sigmoid", 0, 0.001, 0.0),
        "switch": ("softmax", 0, 0.0, 0.0), "shared": ("softmax", 1, 0.0, 0.0),
        "zloss": ("softmax", 0, 0.0, 0.0), "capacity": ("softmax", 0, 0.0, 1.0)}[variant]
    assert header["args"]["balance_loss_coeff"] == (0.0 if variant in BIAS_MOVES else 0.01)
    assert header["args"]["router_z_loss"] == (0.001 if variant == "zloss" else 0.0)
    if variant == "shared":  # default width 4 / (top-2 + 1 shared): iso-FLOPs with the dense MLP
        hidden = round(4 / 3 * 128)
        assert header["params"]["shared_experts"] == 2 * 2 * 128 * hidden
    else:
        assert header["params"]["shared_experts"] == 0

    assert [r["step"] for r in trains] == list(range(1, steps + 1))
    losses = [r["train_loss"] for r in trains]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    # step 1 runs with small random routers (logit std 0.1): per layer, z near (ln 4)^2 and a
    # balance loss near 1 (the logged values are per-layer means), for every variant
    assert trains[0]["z_loss"] == pytest.approx(math.log(4) ** 2, abs=0.15)
    assert trains[0]["balance_loss"] == pytest.approx(1.0, abs=0.1)
    assert all(r["z_loss"] > 0 for r in trains)

    assert [r["step"] for r in moes] == [4, 8, 12]
    for r in moes:
        assert len(r["layers"]) == 2  # depth 2, every layer MoE
        for s in r["layers"]:
            assert len(s["load"]) == 4 and sum(s["load"]) == pytest.approx(1.0, abs=1e-4)
            assert 0 <= s["entropy"] <= math.log(4) + 1e-6 and s["cv"] >= 0 and 0 <= s["dead"] <= 4
            assert s["max_load"] >= 1.0 - 1e-9 >= s["min_load"] - 1e-9
            assert s["z_loss"] > 0 and s["balance_loss"] > 0
            if variant == "capacity":
                assert 0 <= s["dropped"] < 1
            else:
                assert s["dropped"] == 0.0
    if variant == "capacity":
        # capacity = the balanced share: any imbalance of the early routing drops assignments
        assert max(s["dropped"] for s in moes[0]["layers"]) > 0
    # the biases moved (aux-free: the defaults, sigmoid_bias) or stayed zero (the others), and are mean-zero
    w = load_file(str(base_dir / "runs" / tag / "checkpoints" / f"step_{steps:06d}" / "model.safetensors"))
    biases = [w[f"transformer.h.{i}.mlp.expert_bias"] for i in range(2)]
    for b in biases:
        assert abs(b.mean().item()) < 1e-6
        assert (b.abs().sum() > 0) == (variant in BIAS_MOVES)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_sigmoid_bias_capacity_two_processes_match_one(base_dir):
    args = TINY + MOE + ["--router", "sigmoid", "--aux-free-bias", "0.01", "--capacity-factor", "1.0",
                         "--num-iterations", "6", "--eval-every", "-1", "--moe-stats-every", "3"]
    run_train(base_dir, args + ["--model-tag", "var_ddp_one"])
    run_train(base_dir, args + ["--model-tag", "var_ddp_two"], nproc=2)
    one, two = read_metrics(base_dir, "var_ddp_one"), read_metrics(base_dir, "var_ddp_two")
    assert (one[0]["world_size"], two[0]["world_size"]) == (1, 2)
    t1, t2 = of_type(one, "train"), of_type(two, "train")
    assert len(t1) == len(t2) == 6
    for a, b in zip(t1, t2):
        for key in ("train_loss", "balance_loss", "z_loss"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    m1, m2 = of_type(one, "moe"), of_type(two, "moe")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [3, 6]
    for a, b in zip(m1, m2):  # statistics are summed over ranks: the same as one process
        for la, lb in zip(a["layers"], b["layers"]):
            assert la["load"] == pytest.approx(lb["load"], abs=1e-5)
            for key in ("dropped", "cv", "entropy", "balance_loss", "z_loss"):
                assert la[key] == pytest.approx(lb[key], abs=1e-5), key
    # the bias update all-reduces the loads: both runs moved the biases identically
    w1 = load_file(str(base_dir / "runs" / "var_ddp_one" / "checkpoints" / "step_000006" / "model.safetensors"))
    w2 = load_file(str(base_dir / "runs" / "var_ddp_two" / "checkpoints" / "step_000006" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for i in range(2):
        key = f"transformer.h.{i}.mlp.expert_bias"
        assert w1[key].abs().sum() > 0
        assert torch.allclose(w1[key], w2[key], atol=1e-6, rtol=0), (w1[key], w2[key])
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=1e-5, rtol=0), key


def test_resume_keeps_moe_records_and_the_bias(base_dir):
    tag = "var_resume"
    args = TINY + MOE + ["--router", "sigmoid", "--aux-free-bias", "0.01", "--num-iterations", "6",
                         "--eval-every", "-1", "--save-every", "3", "--moe-stats-every", "3", "--model-tag", tag]
    run_train(base_dir, args)
    full = read_metrics(base_dir, tag)
    ckpts = base_dir / "runs" / tag / "checkpoints"
    full_weights = load_file(str(ckpts / "step_000006" / "model.safetensors"))
    assert load_file(str(ckpts / "step_000003" / "model.safetensors"))["transformer.h.0.mlp.expert_bias"].abs().sum() > 0
    run_train(base_dir, args + ["--resume-from-step", "3"])
    resumed = read_metrics(base_dir, tag)
    # the moe record of the resume step is kept (the resumed run does not write it again)
    assert [r["step"] for r in of_type(resumed, "moe")] == [3, 6]
    assert of_type(resumed, "moe") == of_type(full, "moe")
    assert [r["train_loss"] for r in of_type(resumed, "train")] == [r["train_loss"] for r in of_type(full, "train")]
    weights = load_file(str(ckpts / "step_000006" / "model.safetensors"))
    for k in full_weights:
        assert torch.equal(weights[k], full_weights[k]), k


@pytest.mark.parametrize("args,flag", [
    (["--capacity-factor", "-1"], "--capacity-factor"),
    (["--aux-free-bias", "-0.1"], "--aux-free-bias"),
    (["--n-shared-experts", "-1"], "--n-shared-experts"),
    (["--router", "foo"], "--router"),
])
def test_bad_variant_flags_fail_fast_with_one_line(tmp_path, args, flag):
    p = run_train(tmp_path, TINY + MOE + ["--num-iterations", "2", "--model-tag", "bad"] + args,
                  check=False, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("base_train: error: ") and flag in lines[0], p.stderr
    assert "Traceback" not in p.stderr and "Total Parameters" not in p.stdout
    assert not (tmp_path / "runs").exists()
