"""scripts/bench_moe.py: the measurement helpers and the contract output, on tiny sizes.
(The speed targets themselves are benchmark results in dev/LOG.md, not timed tests.)"""

import json
import subprocess
import sys

import pytest
import torch

from scripts.bench_moe import make_layers, saved_activation_bytes, time_round_robin, ratio_stats


def test_saved_activation_bytes_counts_what_autograd_keeps():
    a = torch.randn(64, 32, requires_grad=True)
    b = torch.randn(32, 16, requires_grad=True)
    saved, out = saved_activation_bytes(lambda: a @ b)
    assert saved == (64 * 32 + 32 * 16) * 4  # mm saves both operands
    saved, _ = saved_activation_bytes(lambda: (a * a).sum())
    assert saved == 64 * 32 * 4  # the same tensor saved twice is counted once
    with torch.no_grad():
        assert saved_activation_bytes(lambda: a @ b)[0] == 0


def test_round_robin_interleaves_cases_and_counts_repeats():
    calls = []
    times = time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3,
                             torch.device("cpu"))
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up round, then interleaved rounds
    assert [len(v) for v in times.values()] == [3, 3]


def test_layers_are_iso_flops_and_naive_shares_the_moe_weights():
    d = 64
    layers = make_layers(d, (16, 8), torch.device("cpu"), torch.float32)
    dense_mm = sum(p.numel() for p in layers["dense"].parameters())  # 2 * d * 4d, all active
    moe = layers["moe"]
    active = moe.topk * (moe.w_fc[0].numel() + moe.w_proj[0].numel())
    fine = layers["moe_fine16"]
    fine_active = fine.topk * (fine.w_fc[0].numel() + fine.w_proj[0].numel())
    assert active == dense_mm == fine_active == 8 * d * d
    x = torch.randn(1, 40, d)
    y_moe, _ = moe(x)
    y_naive, _ = layers["naive"](x)
    assert torch.allclose(y_moe, y_naive, atol=1e-5)
    # a random gate: tokens spread over the experts (a zero gate would send all to two)
    moe(x)
    assert (moe.stats[:moe.n_experts] > 0).sum() >= 6


def test_cli_prints_table_and_contract_json():
    r = subprocess.run([sys.executable, "-m", "scripts.bench_moe", "--widths", "64", "--tokens", "256", "--repeats", "1",
                        "--fine-experts", "16,8", "--step-width", "64", "--step-depth", "1", "--step-seq-len", "32",
                        "--step-rows", "2", "--step-vocab", "128", "--total-batch-size", "256"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("moe_over_dense_layer", "moe_over_dense_step", "naive_over_grouped"):
        low, high = result[key + "_range"]
        assert 0 < low <= result[key] <= high
    assert result["step_accum"] == 4  # 256 tokens per optimizer step / (2 rows x 32 tokens)
    assert set(result["layer_saved_mib"]) == {"dense", "moe", "moe_fine16", "naive"}
    assert "whole-model step" in r.stdout and "moe_fine16" in r.stdout


@pytest.mark.parametrize("args,flag", [(["--widths", "abc"], "--widths"), (["--widths", "100"], "--widths"),
                                       (["--fine-experts", "8,16"], "--fine-experts"), (["--repeats", "0"], "--repeats")])
def test_bad_input_is_one_line_error(args, flag):
    r = subprocess.run([sys.executable, "-m", "scripts.bench_moe", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in r.stderr


def test_ratios_are_taken_per_repeat_then_summarised():
    # repeat 2 was slow for both cases (a busy machine): per-repeat ratios stay 2, 2, 2.5
    moe, dense = [2.0, 8.0, 5.0], [1.0, 4.0, 2.0]
    assert ratio_stats(moe, dense) == (2.0, 2.0, 2.5)
