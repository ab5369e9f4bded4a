"""scripts/iso_flops.py: planned dense and MoE configs have equal FLOPs (per GPT.estimate_flops)."""

import re
import subprocess
import sys

import pytest
import torch

from nanochat.gpt import GPTConfig, GPT
from nanochat.model_args import router_exact_expert_hidden as moe_hidden_for_iso_flops
from scripts.iso_flops import memory_estimate
from tests.plain import PLAIN, PLAIN_FLAGS


def flops(cfg):
    with torch.device("meta"):
        return GPT(cfg).estimate_flops()


@pytest.mark.parametrize("d,E,k,s,freq", [(128, 8, 2, 0, 1), (256, 64, 8, 1, 1), (384, 16, 1, 1, 2), (512, 8, 2, 0, 2)])
def test_exact_width_makes_flops_equal(d, E, k, s, freq):
    hidden, exact = moe_hidden_for_iso_flops(d, E, k, s, align=1)
    common = dict(sequence_len=256, vocab_size=1000, n_layer=4, n_head=d // 64, n_kv_head=d // 64, n_embd=d)
    dense = flops(GPTConfig(**common))
    moe = flops(GPTConfig(**common, use_moe=True, n_experts=E, expert_topk=k, n_shared_experts=s, moe_freq=freq,
                          expert_hidden_mult=hidden / d))
    # per MoE layer: 6 * ((k + s) * 2 * d * h + E * d) vs 6 * 8 d^2; the residual is rounding h only
    n_moe = 4 // freq
    assert abs(moe - dense) <= 6 * n_moe * (k + s) * 2 * d * abs(hidden - exact) + 1e-6
    assert abs(moe - dense) / dense < 0.005


def test_cli_reports_mismatch_that_matches_built_models():
    r = subprocess.run([sys.executable, "-m", "scripts.iso_flops", "--depth", "4", "--n-embd", "128", "--vocab-size",
                        "2048", "--max-seq-len", "256", "--n-experts", "8", "--expert-topk", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mult = float(re.search(r"--expert-hidden-mult ([0-9.]+);", r.stdout).group(1))
    reported = float(re.search(r"FLOPs mismatch ([+-][0-9.]+)%", r.stdout).group(1))
    common = dict(sequence_len=256, vocab_size=2048, n_layer=4, n_head=2, n_kv_head=2, n_embd=128)
    dense = flops(GPTConfig(**common))
    moe = flops(GPTConfig(**common, use_moe=True, n_experts=8, expert_topk=2, expert_hidden_mult=mult))
    assert reported == pytest.approx(100 * (moe - dense) / dense, abs=0.001)
    assert "--use-moe --n-experts 8 --expert-topk 2" in r.stdout


def test_memory_estimate_counts_weights_grads_and_optimizer_states():
    with torch.device("meta"):
        model = GPT(GPTConfig(**PLAIN, sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128,
                              use_moe=True, n_experts=4, expert_topk=2, expert_hidden_mult=2))
    mem = memory_estimate(model, batch_tokens=0, bytes_per_value=2)
    params = sum(p.numel() for p in model.parameters())
    adam = 512 * 128 * 2 + 2 * 4 * 128  # wte + lm_head + 2 routers: 2 states each
    assert mem["weights"] == mem["grads"] == 4 * params
    assert mem["optimizer"] == 8 * adam + 4 * (params - adam)
    assert mem["activations"] == 0


def test_bad_input_is_one_line():
    r = subprocess.run([sys.executable, "-m", "scripts.iso_flops", "--n-embd", "100"], capture_output=True, text=True)
    assert r.returncode == 2 and "--head-dim" in r.stderr and "Traceback" not in r.stderr


def test_default_width_is_base_trains_and_router_exact_is_the_option():
    def mult(*extra):
        r = subprocess.run([sys.executable, "-m", "scripts.iso_flops", "--depth", "2", "--n-embd", "256", "--vocab-size",
                            "512", "--n-experts", "64", "--expert-topk", "8", *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return float(re.search(r"--expert-hidden-mult ([0-9.]+);", r.stdout).group(1))
    assert mult() == 4 / 8  # base_train's --expert-hidden-mult 0: 4 / (k + s)
    # (8 * 256 - 64) / (2 * 8) = 124 -> 128 at --align 8; at --align 4: 124
    assert mult("--router-exact") == 128 / 256 and mult("--router-exact", "--align", "4") == 124 / 256
    assert mult("--expert-hidden-mult", "0.75") == 0.75


def test_plans_mtp_heads_for_both_models():
    r = subprocess.run([sys.executable, "-m", "scripts.iso_flops", "--depth", "2", "--n-embd", "64", "--head-dim", "32",
                        "--vocab-size", "1024", "--max-seq-len", "256", "--mtp-heads", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dense_fpt = float(re.search(r"FLOPs/token \(train\)\s+([0-9.e+]+)", r.stdout).group(1))
    cfg = GPTConfig(sequence_len=256, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, mtp_heads=2)
    assert dense_fpt == pytest.approx(flops(cfg), rel=1e-4)
    assert r.stdout.count("--max-seq-len 256 --mtp-heads 2") == 2  # the printed dense and MoE flags carry the heads


def test_plans_mod_against_the_plain_models_at_a_flops_budget():
    r = subprocess.run([sys.executable, "-m", "scripts.iso_flops", "--depth", "2", "--n-embd", "64", "--head-dim", "32",
                        "--vocab-size", "1024", "--max-seq-len", "256", "--mod-capacity", "0.125", "--target-flops", "1e13"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    common = dict(sequence_len=256, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    plain, mod = flops(GPTConfig(**common)), flops(GPTConfig(**common, mod_capacity=0.125))
    line = next(l for l in r.stdout.splitlines() if l.strip().startswith("dense") and "->" in l)
    f0, f1, ratio, t0, t1 = re.search(r"FLOPs/token ([0-9.e+]+) -> ([0-9.e+]+) \(([0-9.]+)x\); tokens at 1e\+13 FLOPs: "
                                      r"([0-9,]+) -> ([0-9,]+)", line).groups()
    assert float(f0) == pytest.approx(plain, rel=1e-4) and float(f1) == pytest.approx(mod, rel=1e-4)
    assert float(ratio) == pytest.approx(mod / plain, abs=1e-3)
    assert int(t1.replace(",", "")) == round(1e13 / mod) and int(t0.replace(",", "")) == round(1e13 / plain)
    flags = [l for l in r.stdout.splitlines() if l.startswith(("  dense:", "  moe:"))]
    assert len(flags) == 2 and all("--mod-capacity 0.125 --mod-freq 2" in l for l in flags)


def test_plans_a_hybrid_against_the_attention_only_model():
    r = subprocess.run([sys.executable, "-m", "scripts.iso_flops", "--depth", "4", "--n-embd", "64", "--head-dim", "32",
                        "--vocab-size", "1024", "--max-seq-len", "256", "--layer-pattern", "AM", "--mamba-head-dim", "32",
                        "--mamba-d-state", "32", *PLAIN_FLAGS], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    common = dict(sequence_len=256, vocab_size=1024, n_layer=4, n_head=2, n_kv_head=2, n_embd=64, **PLAIN)
    attn = flops(GPTConfig(**common))
    hybrid = flops(GPTConfig(**common, layer_pattern="AM", mamba_head_dim=32, mamba_d_state=32))
    line = next(l for l in r.stdout.splitlines() if l.strip().startswith("dense") and "->" in l)
    f0, f1 = re.search(r"FLOPs/token ([0-9.e+]+) -> ([0-9.e+]+)", line).groups()
    assert float(f0) == pytest.approx(attn, rel=1e-4) and float(f1) == pytest.approx(hybrid, rel=1e-4) and hybrid != attn
    flags = [l for l in r.stdout.splitlines() if l.startswith(("  dense:", "  moe:"))]
    assert all("--layer-pattern AM --mamba-d-state 32 --mamba-expand 2 --mamba-head-dim 32" in l for l in flags)
