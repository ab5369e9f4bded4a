"""Tests for nanochat/fp8.py that run on CPU: which modules the FP8 filter converts, the
fail-fast check, and that torchao is never imported unless --fp8 asks for it."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from nanochat.common import UserError
from nanochat.fp8 import check_fp8_supported, check_torchao, fp8_module_filter, pad_token_groups, expert_mlp_fp8
from nanochat.moe import expert_mlp
from nanochat.gpt import GPTConfig, build_model

REPO = Path(__file__).resolve().parents[1]


def test_filter_converts_plain_linear_with_dims_divisible_by_16():
    assert fp8_module_filter(nn.Linear(64, 128, bias=False), "transformer.h.0.attn.c_q") is True
    assert fp8_module_filter(nn.Linear(64, 128), "lm_head") is True


@pytest.mark.parametrize("in_f,out_f", [(60, 128), (64, 100), (8, 8), (64, 4)])
def test_filter_skips_linear_with_dims_not_divisible_by_16(in_f, out_f):
    assert fp8_module_filter(nn.Linear(in_f, out_f), "transformer.h.0.mlp.c_fc") is False


def test_filter_skips_the_precise_parameters_even_when_divisible():
    router = nn.Linear(64, 16)
    assert fp8_module_filter(router, "transformer.h.3.mlp.router") is True  # a name decides nothing
    assert fp8_module_filter(router, "transformer.h.3.mlp.router", precise=[router.weight]) is False
    assert fp8_module_filter(router, "x", precise=[nn.Linear(64, 16).weight]) is True  # identity, not equality


@pytest.mark.parametrize("module", [nn.Embedding(128, 64), nn.LayerNorm(64), nn.Sequential(nn.Linear(64, 64)),
                                    nn.Conv1d(64, 64, 1)])
def test_filter_skips_non_linear_modules(module):
    assert fp8_module_filter(module, "transformer.h.0.mlp") is False


def _expected_fp8(name, module, model):
    """Independent statement of the policy for the GPT below: exactly attention c_q/c_k/c_v/
    c_proj, dense MLP c_fc/c_proj and lm_head (all have dims divisible by 16 here)."""
    if name == "lm_head":
        return True
    parts = name.split(".")
    if len(parts) == 5 and parts[:2] == ["transformer", "h"]:
        block = model.transformer.h[int(parts[2])]
        if parts[3] == "attn":
            return parts[4] in ("c_q", "c_k", "c_v", "c_proj")
        if parts[3] == "mlp" and not block.is_moe:
            return parts[4] in ("c_fc", "c_proj")
    return False


def test_filter_on_a_moe_gpt_selects_exactly_the_dense_linears():
    # n_experts=16 makes the router a Linear(64, 16): divisible by 16, so only the router rule
    # can keep it out. moe_freq=2: layers 1 and 3 are MoE, 0 and 2 dense.
    config = GPTConfig(sequence_len=32, vocab_size=512, n_layer=4, n_head=2, n_kv_head=1, n_embd=64,
                       use_moe=True, n_experts=16, expert_topk=2, moe_freq=2, expert_hidden_mult=2)
    model = build_model(config, "cpu")
    modules = dict(model.named_modules())
    routers = model.param_roles()["router"]  # the model says which parameters are routers
    decisions = {name: fp8_module_filter(mod, name, precise=routers) for name, mod in modules.items()}
    for name, mod in modules.items():
        assert decisions[name] == _expected_fp8(name, mod, model), name
    routers = [n for n in modules if n.endswith("mlp.router")]
    assert routers == ["transformer.h.1.mlp.router", "transformer.h.3.mlp.router"]
    assert all(isinstance(modules[r], nn.Linear) and modules[r].out_features == 16 for r in routers)
    assert not any(decisions[r] for r in routers)
    assert not decisions["transformer.wte"] and not decisions["transformer.h.1.mlp"]
    converted = sorted(n for n, v in decisions.items() if v)
    assert len(converted) == 4 * 4 + 2 * 2 + 1  # 4 attention linears per layer, 2 dense MLPs, lm_head
    # the expert weights are stacked parameters, not modules: nothing to convert there
    assert all(isinstance(model.transformer.h[i].mlp.w_fc, nn.Parameter) for i in (1, 3))


def test_filter_skips_a_model_width_not_divisible_by_16():
    config = GPTConfig(sequence_len=16, vocab_size=256, n_layer=1, n_head=2, n_kv_head=2, n_embd=40)
    model = build_model(config, "cpu")
    assert not any(fp8_module_filter(m, n) for n, m in model.named_modules())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("device_type", ["cpu", "mps", "cuda"])
def test_check_fp8_supported_refuses_without_a_cuda_gpu(device_type):
    with pytest.raises(UserError) as e:
        check_fp8_supported(device_type)
    msg = str(e.value)
    assert "--fp8" in msg and "CUDA" in msg and device_type in msg
    assert "\n" not in msg


def install_fake_torchao(monkeypatch, version="0.18.0+cu128", keyword=True, has_grouped_mm=True):
    """A stand-in torchao in sys.modules (the real one may not be installed here): its version,
    float8, and the prototype grouped GEMM with or without the keyword expert_mlp_fp8 passes."""
    def grouped_mm(A, B_t, offs, out_dtype=torch.bfloat16, float8_dtype=None, pad_token_groups_for_grouped_mm=True):
        pass

    def old_grouped_mm(A, B_t, offs, out_dtype=torch.bfloat16):
        pass
    root, float8 = types.ModuleType("torchao"), types.ModuleType("torchao.float8")
    prototype, moe_training = types.ModuleType("torchao.prototype"), types.ModuleType("torchao.prototype.moe_training")
    root.__version__, root.float8, root.prototype, prototype.moe_training = version, float8, prototype, moe_training
    float8.convert_to_float8_training = lambda model, module_filter_fn=None: model
    if has_grouped_mm:
        moe_training._to_fp8_rowwise_then_scaled_grouped_mm = grouped_mm if keyword else old_grouped_mm
    for name, module in (("torchao", root), ("torchao.float8", float8), ("torchao.prototype", prototype),
                         ("torchao.prototype.moe_training", moe_training)):
        monkeypatch.setitem(sys.modules, name, module)


def test_check_torchao_accepts_the_pinned_series(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu128")
    install_fake_torchao(monkeypatch)
    check_torchao()
    install_fake_torchao(monkeypatch, version="0.18.2")
    check_torchao()


@pytest.mark.parametrize("fake,torch_version,expected", [
    (None, "2.13.0", "torchao 0.18.x, which is not installed: pip install 'torchao==0.18.*'"),
    (dict(version="0.17.1"), "2.13.0", "found torchao 0.17.1"),
    (dict(version="0.19.0"), "2.13.0", "found torchao 0.19.0"),
    (dict(version="0.18.0"), "2.10.0", "torchao 0.18.0 needs torch >= 2.11, found torch 2.10.0"),
    (dict(has_grouped_mm=False), "2.13.0", "no torchao.prototype.moe_training._to_fp8_rowwise_then_scaled_grouped_mm"),
    (dict(keyword=False), "2.13.0", "takes no pad_token_groups_for_grouped_mm="),
])
def test_check_torchao_names_what_is_missing_or_mismatched(monkeypatch, fake, torch_version, expected):
    monkeypatch.setattr(torch, "__version__", torch_version)
    if fake is None:
        monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    else:
        install_fake_torchao(monkeypatch, **fake)
    with pytest.raises(UserError) as e:
        check_torchao()
    msg = str(e.value)
    assert msg.startswith("--fp8") and expected in msg and "\n" not in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_check_fp8_supported_names_the_device_before_torchao(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        check_fp8_supported("cpu")


def test_check_torchao_with_the_installed_torchao():
    torchao = pytest.importorskip("torchao")
    if torchao.__version__.startswith("0.18.") and torch.__version__ >= "2.11":
        check_torchao()  # the keyword expert_mlp_fp8 passes is in the real signature
    else:
        with pytest.raises(UserError, match=f"torchao {torchao.__version__}"):
            check_torchao()


def test_importing_fp8_does_not_import_torchao():
    code = ("import sys, nanochat.fp8; from nanochat.fp8 import fp8_module_filter, check_fp8_supported; "
            "print(sorted(m for m in sys.modules if m == 'torchao' or m.startswith('torchao.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_convert_to_fp8_swaps_exactly_the_filtered_layers():
    """Module swap only (no FP8 forward on CPU); needs the optional torchao."""
    pytest.importorskip("torchao.float8")
    from nanochat.fp8 import convert_to_fp8
    config = GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                       use_moe=True, n_experts=16, expert_topk=2, moe_freq=2, expert_hidden_mult=2)
    model = build_model(config, "cpu")
    routers = model.param_roles()["router"]
    expected = [n for n, m in model.named_modules() if fp8_module_filter(m, n, precise=routers)]
    converted, experts = convert_to_fp8(model)
    assert converted == expected
    assert experts == ["transformer.h.1.mlp"]  # moe_freq=2: layer 1 is the only MoE layer
    assert model.transformer.h[1].mlp.expert_path == "fp8" and model.transformer.h[0].mlp.__class__.__name__ == "MLP"
    modules = dict(model.named_modules())
    for name in expected:
        assert type(modules[name]).__name__ == "Float8Linear", name
    assert type(modules["transformer.h.1.mlp.router"]) is nn.Linear


# ---------------------------------------------------------------------------------------------
# FP8 experts: the padding to 16-row groups, checked on CPU with a reference grouped GEMM


def test_pad_token_groups_hand_computed():
    # counts 3, 0, 17, 16 -> padded 16, 16 (empty expert: one block of zeros), 32, 16
    offsets = torch.tensor([3, 3, 20, 36], dtype=torch.int32)
    dest, padded_offsets, n_padded = pad_token_groups(offsets, 36)
    assert padded_offsets.tolist() == [16, 32, 64, 80]
    assert padded_offsets.dtype == torch.int32
    assert n_padded == 112  # 36 + 16 * 4 = 100, rounded up to 112: a bound, not routing-dependent
    assert dest.tolist() == [0, 1, 2] + list(range(32, 49)) + list(range(64, 80))


def _loop_grouped_mm(calls):
    """Reference grouped GEMM (end offsets), recording what it was given."""
    def grouped_mm(a, b_t, offs):
        calls.append(offs.clone())
        out, start = a.new_zeros(a.size(0), b_t.size(-1)), 0
        pieces = []
        for e, end in enumerate(offs.tolist()):
            pieces.append(a[start:end] @ b_t[e])
            start = end
        return torch.cat(pieces + [out[start:]])
    return grouped_mm


@pytest.mark.parametrize("counts", [[5, 0, 21, 6], [0, 0, 32, 0], [16, 16, 16, 16], [1, 1, 1, 1]])
def test_fp8_expert_mlp_padding_matches_unpadded_experts(counts):
    """Same outputs and gradients as the unpadded experts, including experts with no token;
    every group handed to the GEMM is a non-zero multiple of 16; the buffer size depends only
    on (rows, experts)."""
    torch.manual_seed(0)
    n_experts, d, hidden = 4, 32, 48
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    n_rows = int(offsets[-1])
    x = torch.randn(n_rows, d, requires_grad=True)
    w_fc = (0.2 * torch.randn(n_experts, hidden, d)).requires_grad_()
    w_proj = (0.2 * torch.randn(n_experts, d, hidden)).requires_grad_()
    calls = []
    y = expert_mlp_fp8(x, w_fc, w_proj, offsets, grouped_mm=_loop_grouped_mm(calls))
    y_ref = expert_mlp(x, w_fc, w_proj, offsets)
    assert torch.allclose(y, y_ref, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w_fc, w_proj), g)
    grads_ref = torch.autograd.grad(y_ref, (x, w_fc, w_proj), g)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5)
    for e, c in enumerate(counts):
        if c == 0:  # an idle expert gets an exactly zero weight gradient
            assert grads[1][e].abs().max() == 0 and grads[2][e].abs().max() == 0
    assert len(calls) == 2
    sizes = torch.diff(calls[0], prepend=calls[0].new_zeros(1))
    assert all(s > 0 and s % 16 == 0 for s in sizes.tolist())
    _, _, n_padded = pad_token_groups(offsets, n_rows)
    assert n_padded == -(-(n_rows + 16 * n_experts) // 16) * 16


def test_filter_on_a_hybrid_gpt():
    """Mamba layers: the output projection (128 -> 64) converts; the input projection's width
    2*128 + 2*16 + 4 = 292 does not divide by 16 and stays; the depthwise conv is no Linear."""
    config = GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, layer_pattern="AM",
                       mamba_d_state=16, mamba_head_dim=32)
    model = build_model(config, "cpu")
    decisions = {name: fp8_module_filter(mod, name) for name, mod in model.named_modules()}
    assert decisions["transformer.h.1.mamba.out_proj"] and not decisions["transformer.h.1.mamba.in_proj"]
    assert not decisions["transformer.h.1.mamba.conv1d"] and decisions["transformer.h.0.attn.c_q"]
    assert sorted(n for n, v in decisions.items() if v) == sorted(
        [f"transformer.h.0.attn.{k}" for k in ("c_q", "c_k", "c_v", "c_proj")]
        + [f"transformer.h.{i}.mlp.{k}" for i in (0, 1) for k in ("c_fc", "c_proj")]
        + ["transformer.h.1.mamba.out_proj", "lm_head"])
