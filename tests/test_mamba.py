"""Mamba-2 mixer: the chunked SSD scan against a plain sequential recurrence, prefill/decode
consistency of the layer, init, FLOPs accounting, compile, gradients."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nanochat.mamba import Mamba2, ssd_chunked


def naive_ssd(X, A, B, C, initial_state=None):
    """The recurrence, one token at a time, in fp64:
    h_t = exp(A_t) h_{t-1} + X_t (x) B_t, y_t = h_t . C_t."""
    b, l, h, p = X.shape
    n = B.size(-1)
    state = torch.zeros(b, h, p, n, dtype=torch.float64) if initial_state is None else initial_state.double()
    ys = []
    for t in range(l):
        decay = torch.exp(A[:, t].double())[:, :, None, None]                        # (b, h, 1, 1)
        inp = X[:, t].double()[:, :, :, None] * B[:, t].double()[:, None, None, :]  # (b, h, p, n)
        state = decay * state + inp
        ys.append((state * C[:, t].double()[:, None, None, :]).sum(-1))             # (b, h, p)
    return torch.stack(ys, dim=1), state


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


def random_ssd_inputs(b, l, h, p, n, seed):
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.empty(b, l, h).uniform_(math.log(1e-2), math.log(1.0), generator=g))
    A = -F.softplus(torch.randn(b, l, h, generator=g)) * dt
    X = torch.randn(b, l, h, p, generator=g) * dt[..., None]
    B = torch.randn(b, l, n, generator=g)
    C = torch.randn(b, l, n, generator=g)
    init = torch.randn(b, h, p, n, generator=g)
    return X, A, B, C, init


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("length", [1, 7, 16, 33])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_ssd_chunked_matches_recurrence(chunk, length, with_init):
    X, A, B, C, init = random_ssd_inputs(2, length, 3, 4, 5, seed=chunk * 100 + length)
    init = init if with_init else None
    Y, final = ssd_chunked(X, A, B, C, chunk, initial_state=init)
    Y_ref, final_ref = naive_ssd(X, A, B, C, init)
    assert Y.shape == X.shape and Y.dtype == X.dtype
    assert final.shape == (2, 3, 4, 5) and final.dtype == torch.float32
    assert rel_err(Y, Y_ref) < 1e-4
    assert rel_err(final, final_ref) < 1e-4


def test_ssd_chunked_long_decay_is_finite():
    """Strong decays over many chunks: the stable segsum keeps everything finite."""
    X, A, B, C, _ = random_ssd_inputs(1, 300, 2, 4, 3, seed=7)
    Y, final = ssd_chunked(X, A * 20, B, C, 8)
    Y_ref, final_ref = naive_ssd(X, A * 20, B, C)
    assert torch.isfinite(Y).all() and rel_err(Y, Y_ref) < 1e-4 and rel_err(final, final_ref) < 1e-4


def make_config(chunk=4, n_embd=32):
    return SimpleNamespace(n_embd=n_embd, mamba_d_state=8, mamba_expand=2, mamba_head_dim=16,
                           mamba_chunk=chunk, mamba_d_conv=4)


def make_layer(chunk=4, seed=0):
    """An initialised layer with a random out_proj (the zero init would make every output 0)
    and larger step sizes, so the decays and the conv window really matter."""
    torch.manual_seed(seed)
    layer = Mamba2(make_config(chunk))
    layer.init_weights()
    with torch.no_grad():
        layer.out_proj.weight.normal_(0, 0.2)
        layer.dt_bias.add_(torch.randn_like(layer.dt_bias) + 2.0)
        layer.D.add_(torch.randn_like(layer.D))
    return layer


def reference_layer(layer, x):
    """The Mamba-2 block written out step by step: projection, causal depthwise conv as an
    explicit sum over the window, SiLU, the sequential SSM, the D skip, gate, norm, out_proj."""
    d_in, N, H, P, K = layer.d_inner, layer.d_state, layer.n_heads, layer.head_dim, layer.d_conv
    b, T, _ = x.shape
    proj = x @ layer.in_proj.weight.T
    z, xBC, dt = proj[..., :d_in], proj[..., d_in:2 * d_in + 2 * N], proj[..., 2 * d_in + 2 * N:]
    w = layer.conv1d.weight[:, 0, :]  # (conv_dim, K): w[:, K-1] multiplies the current token
    conv = torch.zeros_like(xBC) + layer.conv1d.bias
    for t in range(T):
        for k in range(K):
            if t - (K - 1 - k) >= 0:
                conv[:, t] += w[:, k] * xBC[:, t - (K - 1 - k)]
    xBC = F.silu(conv)
    xs, Bm, Cm = xBC[..., :d_in].reshape(b, T, H, P), xBC[..., d_in:d_in + N], xBC[..., d_in + N:]
    dt = F.softplus(dt + layer.dt_bias)
    A = -torch.exp(layer.A_log)
    y, _ = naive_ssd(xs * dt[..., None], dt * A, Bm, Cm)
    y = (y.float() + layer.D[:, None] * xs).reshape(b, T, d_in) * F.silu(z)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    return y @ layer.out_proj.weight.T


@pytest.mark.parametrize("chunk", [4, 8])
def test_layer_matches_reference(chunk):
    layer = make_layer(chunk, seed=2)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        assert rel_err(layer(x), reference_layer(layer, x)) < 1e-4


def assert_states_close(s1, s2):
    assert rel_err(s1[0], s2[0]) < 1e-4 and rel_err(s1[1], s2[1]) < 1e-4


@pytest.mark.parametrize("chunk", [4, 8])
@pytest.mark.parametrize("T", [5, 21])
def test_layer_prefill_then_decode(T, chunk):
    layer = make_layer(chunk)
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        y_full, state_full = layer(x, return_state=True)
        assert rel_err(layer(x), y_full) == 0.0
        for prefill in (0, 1, T // 3):  # 0: decode from new_state(), token by token
            if prefill == 0:
                ys, state = [], layer.new_state(2, x.device, x.dtype)
            else:
                y0, state = layer(x[:, :prefill], return_state=True)
                ys = [y0]
            for t in range(prefill, T):
                y_t, state = layer(x[:, t:t + 1], state)
                ys.append(y_t)
            assert rel_err(torch.cat(ys, dim=1), y_full) < 1e-4
            assert_states_close(state, state_full)


@pytest.mark.parametrize("chunk", [4, 8])
@pytest.mark.parametrize("T", [5, 21])
def test_layer_prefill_then_chunk_then_decode(T, chunk):
    layer = make_layer(chunk, seed=1)
    x = torch.randn(2, T, 32)
    a, b = (2, 4) if T == 5 else (6, 17)  # the middle piece (T > 1, with state) crosses chunk boundaries
    with torch.no_grad():
        y_full, state_full = layer(x, return_state=True)
        y0, state = layer(x[:, :a], return_state=True)
        y1, state = layer(x[:, a:b], state)
        ys = [y0, y1]
        for t in range(b, T):
            y_t, state = layer(x[:, t:t + 1], state)
            ys.append(y_t)
    assert rel_err(torch.cat(ys, dim=1), y_full) < 1e-4
    assert_states_close(state, state_full)


def test_init():
    cfg = make_config()
    with torch.device("meta"):
        layer = Mamba2(cfg)
    layer.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        layer.init_weights()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p).all(), name
    y = layer(torch.randn(2, 9, 32))
    assert y.shape == (2, 9, 32) and (y == 0).all()
    dt = F.softplus(layer.dt_bias)
    assert (dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    A = -torch.exp(layer.A_log)
    assert (A >= -16 * 1.0001).all() and (A <= -1 * 0.9999).all()
    assert (layer.D == 1).all()
    assert (layer.conv1d.bias == 0).all() and layer.conv1d.weight.abs().max() <= 0.5
    s = 3**0.5 * 32**-0.5
    assert layer.in_proj.weight.abs().max() <= s and layer.in_proj.weight.std() > 0.5 * 32**-0.5
    assert layer.A_log.std() > 0 and layer.dt_bias.std() > 0  # per head, not one value


def test_flops_per_token_hand_count():
    layer = Mamba2(make_config(chunk=8))  # d=32, d_inner=64, N=8, P=16, H=4, K=4
    # seq_len 20: Q = 8, c = 3 chunks (padded to 24)
    in_proj = 32 * (2 * 64 + 2 * 8 + 4)                   # 4736
    out_proj = 64 * 32                                     # 2048
    conv = (64 + 2 * 8) * 4                                # 320
    scores = 3 * 8 * 8 * 8                                 # C.B^T, once for all heads
    per_head = 3 * 8 * 8 * 16 + 3 * 8 * 16 * 8 + 4 * 4 * 16 * 8 + 3 * 8 * 16 * 8  # values, states, scan, readout
    expected = 6 * (in_proj + out_proj) + 6 * conv + 6 * (scores + 4 * per_head) / 20
    assert expected == pytest.approx(56601.6)
    assert layer.flops_per_token(20) == pytest.approx(expected)
    # seq_len 5 < chunk: one chunk of 5
    ssd5 = 5 * 5 * 8 + 4 * (5 * 5 * 16 + 5 * 16 * 8 + 2 * 2 * 16 * 8 + 5 * 16 * 8)
    assert layer.flops_per_token(5) == pytest.approx(6 * (in_proj + out_proj) + 6 * conv + 6 * ssd5 / 5)


@pytest.mark.parametrize("seq_len,chunk", [(20, 8), (5, 8), (32, 16)])
def test_flops_match_counted_einsums(seq_len, chunk):
    """The SSD term equals 3x the forward matmul FLOPs torch's FlopCounterMode sees."""
    from torch.utils.flop_counter import FlopCounterMode
    layer = Mamba2(make_config(chunk=chunk))
    H, P, N = 4, 16, 8
    X, A, B, C, _ = random_ssd_inputs(1, seq_len, H, P, N, seed=0)
    with FlopCounterMode(display=False) as counter:
        ssd_chunked(X, A, B, C, chunk, initial_state=torch.zeros(1, H, P, N))
    ssd = layer.flops_per_token(seq_len) - 6 * (32 * 148 + 64 * 32) - 6 * 80 * 4
    assert ssd == pytest.approx(3 * counter.get_total_flops() / seq_len)


def test_compile_no_recompiles():
    import torch._dynamo
    torch._dynamo.reset()
    layer = make_layer(chunk=8)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for i in range(3):
            x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(i))
            assert rel_err(compiled(x), layer(x)) < 1e-4
    torch._dynamo.reset()


def test_gradients_reach_every_parameter():
    layer = make_layer(chunk=4)
    x = torch.randn(2, 11, 32)
    layer(x).sum().backward()
    for name in ("A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "in_proj.weight", "out_proj.weight"):
        g = layer.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_ssd_chunked_under_bf16_autocast_keeps_fp32():
    """Under autocast every einsum would become a bf16 bmm; the scan keeps fp32 states (as the
    reference kernels do), so on fp32 inputs it returns what it returns without autocast."""
    X, A, B, C, init = random_ssd_inputs(1, 256, 4, 16, 16, seed=11)
    Y32, final32 = ssd_chunked(X, A, B, C, 32, initial_state=init)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Y, final = ssd_chunked(X, A, B, C, 32, initial_state=init)
    Y_ref, final_ref = naive_ssd(X, A, B, C, init)
    assert final.dtype == torch.float32 and Y.dtype == torch.float32
    assert rel_err(final, final32) < 1e-6 and rel_err(Y, Y32) < 1e-6
    assert rel_err(final, final_ref) < 1e-4 and rel_err(Y, Y_ref) < 1e-4


def test_layer_under_bf16_autocast():
    """The layer under autocast: the projections run in bf16, the SSM state stays fp32 whether
    it comes from a prefill or a decode step, and the output stays close to the fp32 layer's
    (measured 7.2e-3 relative here, the same as before the scan kept fp32: it comes from the
    bf16 in/out projections)."""
    layer = make_layer(chunk=8, seed=3)
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y32, _ = layer(x, return_state=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state = layer(x[:, :-1], return_state=True)
            y_last, state_last = layer(x[:, -1:], state)
    assert state[1].dtype == torch.float32 and state_last[1].dtype == state[1].dtype
    assert state_last[0].dtype == state[0].dtype
    assert rel_err(torch.cat([y, y_last], dim=1), y32) < 2e-2


@pytest.mark.parametrize("T", [1, 300])
def test_cached_state_owns_its_memory(T):
    """The conv window and the SSM state that a cache keeps are small; they must not be views
    that keep the prefill's (b, conv_dim, T + K - 1) input or its per-chunk states alive."""
    layer = make_layer(chunk=16)
    x = torch.randn(1, T, 32)
    with torch.no_grad():
        _, state = layer(x, return_state=True)            # prefill from zeros
        _, state = layer(x, state=state)                   # continuing (T == 1: a decode step)
    for t in state:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_param_roles_partition_the_parameters():
    layer = Mamba2(make_config())
    roles = {role: [id(p) for p in params] for role, params in layer.param_roles().items()}
    assert roles == {"matrix": [id(layer.in_proj.weight), id(layer.out_proj.weight)],
                     "conv": [id(layer.conv1d.weight), id(layer.conv1d.bias)],
                     "no_decay": [id(layer.A_log), id(layer.D), id(layer.dt_bias)]}
    listed = [i for ids in roles.values() for i in ids]
    assert sorted(listed) == sorted(id(p) for p in layer.parameters()) and len(set(listed)) == len(listed)


# ------------------------------------------------------------------ in the GPT: hybrid models

from nanochat.engine import generate, new_kv_cache  # noqa: E402
from nanochat.gpt import GPTConfig, build_model  # noqa: E402
from nanochat.report import describe_params  # noqa: E402
from nanochat.optim import setup_optimizers  # noqa: E402
from tests.plain import PLAIN  # noqa: E402


def hybrid_cfg(**kw):
    return GPTConfig(**{**PLAIN, **dict(sequence_len=32, vocab_size=256, n_layer=4, n_head=2, n_kv_head=1, n_embd=64,
                                        layer_pattern="AM", use_moe=True, n_experts=4, expert_topk=2,
                                        expert_hidden_mult=2, mamba_d_state=16, mamba_head_dim=32, mamba_chunk=8),
                        **kw})


def randomized(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "wte" not in name and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model.eval()


def test_layer_pattern_places_mamba_layers():
    model = build_model(hybrid_cfg(n_layer=5, layer_pattern="AMM"), "cpu")
    assert model.mamba_layers() == [1, 2, 4]  # A M M | A M (cut at the last layer)
    assert all(hasattr(b, "attn") != b.is_mamba for b in model.transformer.h)
    assert all(b.is_moe for b in model.transformer.h)  # the FFN is still MoE everywhere
    mtp = build_model(hybrid_cfg(layer_pattern="M", mtp_heads=1), "cpu")
    assert mtp.mamba_layers() == [0, 1, 2, 3] and not mtp.mtp[0].is_mamba  # MTP heads stay attention blocks
    assert "mixers: 2 attention + Mamba layers: 2 (pattern 'AM'" in describe_params(build_model(hybrid_cfg(), "cpu"))


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_hybrid_state_cache_equals_full_forward(use_moe):
    """Prefill, a multi-token chunk, then single steps: attention layers through the KV cache,
    Mamba layers through their recurrent state, logits equal to the full forward."""
    model = randomized(build_model(hybrid_cfg(use_moe=use_moe), "cpu"))
    idx = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = new_kv_cache(model, 2, 30)
        pieces = [model(idx[:, :9], kv_cache=cache), model(idx[:, 9:20], kv_cache=cache)]
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(20, 30)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)
    assert sorted(cache.mamba) == [1, 3] and cache.k[1] is None and cache.k[3] is None  # no keys for Mamba layers
    prompt = idx[0, :6].tolist()
    kw = dict(max_tokens=20, temperature=0.0, stop_at_bos=False)
    assert generate(model, prompt, use_kv_cache=True, **kw) == generate(model, prompt, use_kv_cache=False, **kw)
    samples = generate(model, prompt, num_samples=3, temperature=1.0, max_tokens=8, stop_at_bos=False)
    assert len(samples) == 3  # repeat_rows copies the Mamba states too


def test_hybrid_flops_and_params_hand_count():
    d, T, V, H, hd = 64, 32, 256, 2, 32
    model = build_model(hybrid_cfg(use_moe=False, n_kv_head=2), "cpu")
    attn_block = 4 * d * d + 2 * d * 4 * d  # q, k, v, proj + MLP
    mlp = 2 * d * 4 * d
    # Mamba-2 at d=64: inner 128 in 4 heads of 32, state 16, conv over 128 + 2*16 = 160 channels
    d_inner, heads, N, P, K, Q = 128, 4, 16, 32, 4, 8
    in_proj, out_proj, conv_dim = d * (2 * d_inner + 2 * N + heads), d_inner * d, d_inner + 2 * N
    c = T // Q
    M = c * Q * Q * N + heads * (c * Q * Q * P + 2 * c * Q * P * N + (c + 1) ** 2 * P * N)
    mamba = 6 * (in_proj + out_proj) + 6 * conv_dim * K + 6 * M / T
    expected = 6 * V * d + 2 * (6 * attn_block + 12 * H * hd * T) + 2 * (6 * mlp + mamba)
    assert model.estimate_flops() == pytest.approx(expected, rel=1e-12)
    counts = model.num_scaling_params()
    mamba_params = in_proj + out_proj + conv_dim * K + conv_dim + 3 * heads  # + conv bias, A_log, D, dt_bias
    assert counts["mamba"] == 2 * mamba_params and counts["attn"] == 2 * 4 * d * d
    assert counts["total"] == 2 * V * d + 2 * attn_block + 2 * (mlp + mamba_params) == counts["active_total"]


def test_hybrid_optimizer_groups():
    model = build_model(hybrid_cfg(), "cpu")
    adamw, muon = setup_optimizers(model)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if ".mamba." in name:
            assert (id(p) in in_muon) == name.endswith(("in_proj.weight", "out_proj.weight")), name
