"""scripts/bench_step.py: variants built from the common flags plus their own, FLOPs ratios from
the built models, one-line errors for bad variants."""

import json
import subprocess
import sys

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig

COMMON = ["--depth", "2", "--n-embd", "64", "--head-dim", "32", "--max-seq-len", "64", "--vocab-size", "256",
          "--rows", "2", "--repeats", "2", "--warmup", "1"]


def bench(*variants):
    args = [sys.executable, "-m", "scripts.bench_step", *COMMON] + [a for v in variants for a in ("--variant", v)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def flops(**kw):
    with torch.device("meta"):
        return GPT(GPTConfig(**{**dict(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64), **kw})).estimate_flops()


def test_variants_side_by_side_with_flops_of_the_built_models():
    r = bench("dense:", "mod:--mod-capacity 0.25", "moe:--use-moe --n-experts 4", "wide:--n-embd 128")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])["variants"]
    assert list(out) == ["dense", "mod", "moe", "wide"]
    assert out["dense"]["flops_per_token"] == flops() and out["dense"]["time_ratio"] == 1.0
    assert out["mod"]["flops_ratio"] == pytest.approx(flops(mod_capacity=0.25) / flops())
    assert out["moe"]["active_total"] < out["moe"]["total"]
    assert out["wide"]["flops_per_token"] == flops(n_embd=128, n_head=4, n_kv_head=4)  # a variant may change the shape
    assert all(v["step_s_median"] > 0 and v["tok_per_sec"] == pytest.approx(128 / v["step_s_median"]) for v in out.values())


def test_profile_names_where_the_time_goes():
    """--profile N: each variant's ops by self time, largest first, shares of the profiled total;
    the MoE's dispatch (its sort by expert) shows up in the MoE's profile and not in the dense one."""
    args = [sys.executable, "-m", "scripts.bench_step", *COMMON, "--variant", "dense:",
            "--variant", "moe:--use-moe --n-experts 4", "--profile", "500"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])["variants"]
    for v in out.values():
        prof = v["profile"]
        times = [op["self_ms"] for op in prof["ops"]]
        assert prof["clock"] == "CPU" and times == sorted(times, reverse=True) and times[-1] > 0
        assert sum(times) == pytest.approx(prof["total_ms"], rel=1e-6)  # 500 > every op: the whole profile
        assert all(op["share"] == pytest.approx(op["self_ms"] / prof["total_ms"]) for op in prof["ops"])
    names = {v: {op["name"] for op in out[v]["profile"]["ops"]} for v in out}
    assert "aten::sort" in names["moe"] and "aten::sort" not in names["dense"], names
    assert "top 500 ops" not in r.stdout and "dense: top" in r.stdout  # the header counts the ops it lists


@pytest.mark.parametrize("spec,message", [("nocolon", "expected NAME:FLAGS"), ("x:--bogus", "unrecognized arguments: --bogus"),
                                          ("x:--mod-capacity 2", "--mod-capacity must be in [0, 1]")])
def test_bad_variant_is_one_line(spec, message):
    r = bench(spec)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_fp8_without_an_fp8_gpu_is_one_line():
    r = subprocess.run([sys.executable, "-m", "scripts.bench_step", *COMMON, "--device-type", "cpu", "--fp8",
                        "--variant", "dense:"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--fp8" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
