"""nanochat's architecture pieces (GPTConfig: value_embeds, layer_lambdas, smear, backout,
window_pattern, rotary_base, qk_scale, vocab_pad, embedding_init_std, fc_init_scale,
cast_weights): each against an independent re-implementation of the formulas below
(`reference_logits`), off = the model before bit for bit, the window convention, inits,
parameter roles, accounting by hand, the KV cache, MoE/MTP/MoD/Mamba, checkpoints, the FP8
filter, growth and the flags/preset."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.attention import CausalSelfAttention, has_value_embed, layer_windows, short_window, window_mask
from nanochat.common import UserError
from nanochat.engine import generate, new_kv_cache
from nanochat.fp8 import fp8_module_filter
from nanochat.gpt import GPTConfig, build_model
from nanochat.grow import grow_depth, grow_width, upcycle, verify
from nanochat.model_args import MODEL_PRESETS, add_model_args, parse_with_preset, config_from_args, validate_model_args
from tests.plain import PLAIN, PLAIN_FLAGS

V = 200
SHAPE = dict(sequence_len=256, vocab_size=V, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)  # short window 128
NANOCHAT = dict(value_embeds=True, layer_lambdas=True, smear=True, backout=True, window_pattern="SSL",
                rotary_base=100000.0, qk_scale=1.2, vocab_pad=64, embedding_init_std=0.8, fc_init_scale=0.4,
                cast_weights=True)
FEATURES = {  # one feature on at a time
    "value_embeds": dict(value_embeds=True), "layer_lambdas": dict(layer_lambdas=True), "smear": dict(smear=True),
    "backout": dict(backout=True), "window_pattern": dict(window_pattern="SL"), "rotary_base": dict(rotary_base=100000.0),
    "qk_scale": dict(qk_scale=1.2), "vocab_pad": dict(vocab_pad=64), "cast_weights": dict(cast_weights=True),
    "all": NANOCHAT,
}


def random_model(seed=0, std=0.3, **kw):
    """Every weight random (the init makes blocks the identity and the gates ~constant). Every
    piece off (PLAIN) unless kw turns it on, whatever GPTConfig's defaults."""
    model = build_model(GPTConfig(**{**PLAIN, **SHAPE, **kw}), "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def reference_logits(model, idx):
    """nanochat's forward written out from its formulas (a dense model, fp32, no cache)."""
    cfg, w = model.config, dict(model.named_parameters())
    B, T = idx.shape
    nh, nkv, hd, L = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head, cfg.n_layer
    rms = lambda x: F.rms_norm(x, (x.size(-1),))
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angle = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]

    def rotate(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)

    x = rms(F.embedding(idx, w["transformer.wte.weight"]))
    if cfg.smear:  # x_t += lambda * sigmoid(W x_t[:24]) * x_(t-1), the first token alone
        gate = w["smear_lambda"] * torch.sigmoid(F.linear(x[:, 1:, :24], w["smear_gate.weight"]))
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
    x0, mid = x, None
    short = 128 * math.ceil(cfg.sequence_len / 512)
    for i in range(L):
        p = f"transformer.h.{i}."
        if cfg.layer_lambdas:
            x = w["resid_lambdas"][i] * x + w["x0_lambdas"][i] * x0
        h = rms(x)
        q = F.linear(h, w[p + "attn.c_q.weight"]).view(B, T, nh, hd)
        k = F.linear(h, w[p + "attn.c_k.weight"]).view(B, T, nkv, hd)
        v = F.linear(h, w[p + "attn.c_v.weight"]).view(B, T, nkv, hd)
        if cfg.value_embeds and i % 2 == (L - 1) % 2:
            gate = 3 * torch.sigmoid(F.linear(h[..., :12], w[p + "attn.ve_gate.weight"]))
            v = v + gate.unsqueeze(-1) * F.embedding(idx, w[f"value_embeds.{i}.weight"]).view(B, T, nkv, hd)
        q, k = rms(rotate(q)), rms(rotate(k))
        if cfg.qk_scale != 1.0:
            q, k = q * cfg.qk_scale, k * cfg.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        letter = cfg.window_pattern[i % len(cfg.window_pattern)] if i < L - 1 else "L"
        if letter == "S" and short + 1 < T:  # query t sees keys t-short .. t: short + 1 of them
            allowed = torch.tensor([[0 <= t - s <= short for s in range(T)] for t in range(T)])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nh != nkv)
        x = x + F.linear(y.transpose(1, 2).contiguous().view(B, T, -1), w[p + "attn.c_proj.weight"])
        x = x + F.linear(F.relu(F.linear(rms(x), w[p + "mlp.c_fc.weight"])).square(), w[p + "mlp.c_proj.weight"])
        if cfg.backout and i == L // 2:
            mid = x
    if cfg.backout:
        x = x - w["backout_lambda"] * mid
    logits = F.linear(rms(x), w["lm_head.weight"])[..., :cfg.vocab_size].float()
    return 15.0 * torch.tanh(logits / 15.0)


# ------------------------------------------------------------------------- off = before, on = reference

OLD_KEYS = {"transformer.wte.weight", "lm_head.weight"} | {
    f"transformer.h.{i}.{k}" for i in range(4) for k in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight",
                                                         "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}


def test_all_fields_off_is_the_model_before_bit_for_bit():
    explicit = dict(value_embeds=False, layer_lambdas=False, smear=False, backout=False, window_pattern="L",
                    rotary_base=10000.0, qk_scale=1.0, vocab_pad=1, embedding_init_std=1.0, fc_init_scale=1.0,
                    cast_weights=False)
    # every field named (PLAIN is this), and a config saved before the fields existed loads with them off
    assert explicit == PLAIN and GPTConfig.from_saved(SHAPE) == GPTConfig(**SHAPE, **explicit)
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SHAPE, **explicit), "cpu")
    assert set(model.state_dict()) == OLD_KEYS  # no new parameter or buffer
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    idx = torch.randint(0, V, (2, 160), generator=torch.Generator().manual_seed(1))
    model = random_model()
    # the reference runs the model before these fields op for op when they are off: identical bits
    assert torch.equal(model(idx), reference_logits(model, idx))


@pytest.mark.parametrize("feature", list(FEATURES))
def test_each_feature_computes_the_reference(feature):
    model = random_model(**FEATURES[feature])
    idx = torch.randint(0, V, (2, 160), generator=torch.Generator().manual_seed(1))  # 160 > 128 + 1: windows bite
    got = model(idx)
    assert got.shape == (2, 160, V)
    torch.testing.assert_close(got, reference_logits(model, idx), rtol=0, atol=2e-5)
    if feature not in ("cast_weights", "vocab_pad"):  # the others change the function (same weights)
        assert (got - random_model()(idx)).abs().max() > 1e-3


# ------------------------------------------------------------------------- windows

def test_short_window_is_nanochats_quarter_rounded_up_to_128():
    for T in range(1, 5000, 7):  # nanochat's expression, operator precedence and all
        assert short_window(T) == -(-T // 4 // 128) * 128
    assert [short_window(T) for T in (2048, 1024, 513, 512, 100)] == [512, 256, 256, 128, 128]


def test_window_pattern_tiles_and_the_last_layer_is_full():
    cfg = GPTConfig(sequence_len=2048, n_layer=6, window_pattern="SSSL")
    assert layer_windows(cfg) == [512, 512, 512, None, 512, None]
    assert layer_windows(GPTConfig(n_layer=3, window_pattern="S")) == [256, 256, None]  # 1024 -> 256


def test_a_window_of_w_sees_w_plus_1_keys():
    """FA3's window_size=(W, 0) and nanochat's SDPA fallback: query i sees keys i-W .. i."""
    m = window_mask(6, 6, 2, "cpu")
    assert m[5].tolist() == [False, False, False, True, True, True]  # 3 = W + 1 keys
    assert m.sum(1).tolist() == [1, 2, 3, 3, 3, 3]
    # the same in an attention layer: position 9's output moves with the input at 9 - W, not 9 - W - 1
    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(n_embd=32, n_head=2, n_kv_head=2), window=4)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    cos, sin = torch.ones(1, 12, 1, 8), torch.zeros(1, 12, 1, 8)
    x = torch.randn(1, 12, 32)
    base = attn(x, (cos, sin))[0, 9]
    for j, moves in ((5, True), (4, False)):
        x2 = x.clone()
        x2[0, j] += 1.0
        assert (attn(x2, (cos, sin))[0, 9] - base).abs().max().item() > 1e-4 if moves else \
            torch.equal(attn(x2, (cos, sin))[0, 9], base)


# ------------------------------------------------------------------------- init, roles, accounting

def test_inits_are_nanochats():
    torch.manual_seed(0)
    cfg = GPTConfig(**{**SHAPE, "n_layer": 5, "n_embd": 128, "n_head": 2, "n_kv_head": 2}, **NANOCHAT)
    model = build_model(cfg, "cpu")
    i = torch.arange(5) / 4
    assert torch.allclose(model.resid_lambdas, 1.15 - 0.10 * i) and torch.allclose(model.x0_lambdas, 0.20 - 0.15 * i)
    assert model.backout_lambda.item() == pytest.approx(0.2) and model.smear_lambda.item() == 0.0
    assert 0 <= model.smear_gate.weight.min() and model.smear_gate.weight.max() <= 0.02
    assert sorted(model.value_embeds) == ["0", "2", "4"]  # the last layer and every other one before it
    s = 3**0.5 * 128**-0.5
    for ve in model.value_embeds.values():
        assert ve.weight.shape == (256, 128) and ve.weight.abs().max() <= s and ve.weight.abs().max() > 0.95 * s
    for i, block in enumerate(model.transformer.h):
        gate = block.attn.ve_gate
        assert (gate is not None) == (i % 2 == 0)
        if gate is not None:
            assert gate.weight.shape == (2, 12) and 0 <= gate.weight.min() and gate.weight.max() <= 0.02
        fc = block.mlp.c_fc.weight.abs().max()
        assert 0.38 * s < fc <= 0.4 * s
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.02)
    assert model.transformer.wte.weight.shape == (256, 128) and model.lm_head.weight.shape == (256, 128)
    moe = build_model(GPTConfig(**SHAPE, use_moe=True, n_experts=4, n_shared_experts=1, fc_init_scale=0.4), "cpu")
    s = 3**0.5 * 64**-0.5
    for w in (moe.transformer.h[0].mlp.w_fc, moe.transformer.h[0].mlp.shared_fc.weight):  # experts like the MLP
        assert 0.38 * s < w.abs().max() <= 0.4 * s


def test_has_value_embed_rule():
    assert [i for i in range(4) if has_value_embed(i, 4)] == [1, 3]
    assert [i for i in range(5) if has_value_embed(i, 5)] == [0, 2, 4]


def test_parameter_roles():
    model = build_model(GPTConfig(**SHAPE, **NANOCHAT), "cpu")
    roles = {role: {id(p) for p in ps} for role, ps in model.param_roles().items()}
    assert roles["value_embedding"] == {id(model.value_embeds["1"].weight), id(model.value_embeds["3"].weight)}
    assert roles["resid_lambdas"] == {id(model.resid_lambdas)} and roles["x0_lambdas"] == {id(model.x0_lambdas)}
    assert roles["smear_backout"] == {id(model.smear_gate.weight), id(model.smear_lambda), id(model.backout_lambda)}
    assert id(model.transformer.h[1].attn.ve_gate.weight) in roles["matrix"]  # with the block's matrices (Muon)


def test_accounting_by_hand():
    """d 64, 4 layers, 4 heads of 16, 2 kv heads, vocab 200 -> 256, seq 256, windows SSL (128, 128, full, full)."""
    model = build_model(GPTConfig(**SHAPE, **NANOCHAT), "cpu")
    c = model.num_scaling_params()
    d, kv, Vp, L = 64, 32, 256, 4
    attn = d * d + 2 * d * kv + d * d
    mlp = 8 * d * d
    ve_gates = 2 * 12 * 2  # layers 1 and 3
    assert c["wte"] == c["lm_head"] == Vp * d and c["value_embeds"] == 2 * Vp * kv
    assert c["scalars"] == 2 * L + 24 + 1 + 1
    assert c["total"] == 2 * Vp * d + 2 * Vp * kv + L * (attn + mlp) + ve_gates + c["scalars"]
    assert c["data_ratio_params"] == L * (attn + mlp) + ve_gates + Vp * d  # nanochat: transformer matrices + lm_head
    spans = [128, 128, 256, 256]
    expected = 6 * (L * (attn + mlp) + ve_gates + 24 + Vp * d) + sum(12 * 4 * 16 * t for t in spans)
    assert model.estimate_flops() == expected


# ------------------------------------------------------------------------- cache, compositions

PROMPT = [V - 1] + list(range(1, 150))  # 150 tokens: the 128-token windows slide during generation


@pytest.mark.parametrize("kw", [NANOCHAT, dict(NANOCHAT, use_moe=True, n_experts=4, expert_hidden_mult=2),
                                dict(smear=True), dict(value_embeds=True), dict(window_pattern="SL")],
                         ids=["nanochat", "nanochat_moe", "smear", "value_embeds", "windows"])
def test_greedy_with_cache_equals_without(kw):
    model = random_model(std=0.1, **kw)
    a = generate(model, PROMPT, 12, temperature=0.0, stop_at_bos=False, num_samples=2)
    b = generate(model, PROMPT, 12, temperature=0.0, stop_at_bos=False, num_samples=2, use_kv_cache=False)
    assert a == b and len(set(a[0])) >= 2  # not one token repeated


def test_cached_chunks_equal_the_full_forward():
    """Prefill, a chunk after the prefix, then single steps: smear takes its previous token from
    the cache, windows mask the chunk and slice the decode step's keys."""
    model = random_model(**NANOCHAT)
    idx = torch.randint(0, V, (2, 180), generator=torch.Generator().manual_seed(2))
    full = model(idx)
    cache = new_kv_cache(model, 2, 180)
    with torch.no_grad():
        parts = [model(idx[:, :70], kv_cache=cache), model(idx[:, 70:150], kv_cache=cache)]
        parts += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(150, 180)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=2e-5)


def test_mtp_mod_moe_with_every_feature_train():
    model = build_model(GPTConfig(**SHAPE, **dict(NANOCHAT, window_pattern="L"), use_moe=True, n_experts=4,
                                  expert_hidden_mult=2, mtp_heads=2, mod_capacity=0.5, mod_freq=2), "cpu")
    idx = torch.randint(0, V, (2, 64))
    loss, aux = model(idx, idx)
    model.training_loss(loss, aux).backward()
    assert aux["mtp_losses"].shape == (2,) and all(p.grad is not None for p in model.param_roles()["value_embedding"])
    assert all(b.attn.ve_gate is None for b in model.mtp)  # MTP heads: full attention, no value embedding


def test_mod_capacity_one_with_value_embeds_is_the_dense_model():
    """A routed block gathers its tokens' value embeddings with them (top-k of all = every token)."""
    kw = dict(value_embeds=True, layer_lambdas=True, smear=True, backout=True)
    dense, routed = random_model(**kw), random_model(**kw, mod_capacity=1.0, mod_freq=1)
    routed.load_state_dict(dense.state_dict(), strict=False)
    dense.train(), routed.train()
    idx = torch.randint(0, V, (2, 32))
    assert torch.equal(dense(idx, idx)[0], routed(idx, idx)[0])


@pytest.mark.parametrize("pattern,layers", [("MA", ["1", "3"]), ("AM", [])])
def test_hybrid_value_embeds_only_on_attention_layers(pattern, layers):
    """The rule picks layers 1 and 3 of 4; a Mamba layer there has no v to add to."""
    model = build_model(GPTConfig(**SHAPE, value_embeds=True, layer_pattern=pattern, mamba_d_state=16,
                                  mamba_head_dim=32, mamba_chunk=8), "cpu")
    assert sorted(model.value_embeds) == layers
    model(torch.randint(0, V, (1, 16)))


def test_checkpoint_state_dict_round_trip():
    model = random_model(**NANOCHAT)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = build_model(GPTConfig(**SHAPE, **NANOCHAT), "cpu").eval()
    fresh.load_state_dict(state, strict=True)
    idx = torch.randint(0, V, (1, 40))
    assert torch.equal(fresh(idx), model(idx))


def test_fp8_filter_leaves_the_small_gates():
    model = build_model(GPTConfig(**SHAPE, **NANOCHAT), "cpu")
    names = dict(model.named_modules())
    assert not fp8_module_filter(names["smear_gate"], "smear_gate")                    # (1, 24)
    assert not fp8_module_filter(names["transformer.h.1.attn.ve_gate"], "ve_gate")     # (2, 12)
    assert fp8_module_filter(names["transformer.h.1.attn.c_q"], "c_q")


def test_cast_weights_fp32_is_exact_and_bf16_runs_every_linear_in_bf16():
    model = random_model(std=0.1, **NANOCHAT)
    plain = random_model(std=0.1, **dict(NANOCHAT, cast_weights=False))
    idx = torch.randint(0, V, (2, 40))
    assert torch.equal(model(idx), plain(idx))  # in fp32 the cast is a no-op
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    model.set_compute_dtype(torch.bfloat16)
    low = model(idx)
    for h in hooks:
        h.remove()
    assert set(dtypes) == {torch.bfloat16} and low.dtype == torch.float32
    assert (low - plain(idx)).abs().max() < 0.5  # bf16 rounding, not another function
    assert model.transformer.wte.weight.dtype == torch.float32  # master weights stay fp32


# ------------------------------------------------------------------------- growth

def test_upcycle_is_exact_with_every_feature():
    model = random_model(std=0.1, **NANOCHAT)
    moe = upcycle(model, n_experts=4, topk=2)
    assert moe.config.value_embeds and moe.config.window_pattern == "SSL"
    r = verify(model, moe, [torch.randint(0, V, (2, 160))])
    assert r["max_abs_diff"] < 1e-4


def test_width_growth_is_exact_with_every_feature():
    model = random_model(std=0.1, **NANOCHAT)
    r = verify(model, grow_width(model, 2), [torch.randint(0, V, (2, 160))])
    assert r["max_abs_diff"] < 1e-4


def test_depth_growth_keeps_layer_lambdas_and_refuses_what_moves():
    model = random_model(std=0.1, layer_lambdas=True, smear=True, qk_scale=1.2, vocab_pad=64)
    r = verify(model, grow_depth(model, 2, source_layer=1), [torch.randint(0, V, (2, 40))])
    assert r["max_abs_diff"] < 1e-4
    for kw, flag in ((dict(value_embeds=True), "--value-embeds"), (dict(backout=True), "--backout"),
                     (dict(window_pattern="SL"), "--window-pattern")):
        with pytest.raises(UserError, match=flag):
            grow_depth(random_model(**kw), 1)


# ------------------------------------------------------------------------- flags and the preset

def _args(argv):
    p = argparse.ArgumentParser()
    add_model_args(p)
    return p.parse_args(argv)


def test_flags_default_to_gptconfig_and_the_preset_sets_nanochat():
    args = _args([])
    for name in NANOCHAT:
        assert getattr(args, name) == getattr(GPTConfig(), name)
    p = argparse.ArgumentParser()
    add_model_args(p)
    args = parse_with_preset(p, ["--depth", "4", "--qk-scale", "1.0", "--preset", "nanochat"])
    validate_model_args(args)
    cfg = config_from_args(args, vocab_size=V)
    assert cfg.n_embd == 256 and cfg.n_head == 2  # aspect ratio 64, head dim 128
    for name, value in MODEL_PRESETS["nanochat"].items():
        if name not in ("head_dim", "aspect_ratio", "qk_scale"):
            assert getattr(cfg, name) == value
    assert cfg.qk_scale == 1.0 and cfg.window_pattern == "SSSL"


def test_short_windows_skip_mamba_layers_and_routed_blocks():
    """S applies to attention layers that see every token: a Mamba layer has no attention and a
    MoD-routed block attends over its routed tokens only, so both keep full context (and the
    FLOPs count follows the layers' windows)."""
    from nanochat.attention import layer_windows, short_window
    from nanochat.gpt import GPTConfig
    base = dict(PLAIN, sequence_len=256, vocab_size=V, n_layer=4, n_head=2, n_kv_head=2, n_embd=64, window_pattern="S")
    w = short_window(256)
    assert w == 128
    assert layer_windows(GPTConfig(**base)) == [w, w, w, None]                        # the last layer is full
    assert layer_windows(GPTConfig(**base, layer_pattern="AM")) == [w, None, w, None]  # Mamba layers 1, 3
    assert layer_windows(GPTConfig(**base, mod_capacity=0.5, mod_freq=2)) == [w, None, w, None]  # routed 1, 3


@pytest.mark.parametrize("argv,flag", [
    (["--window-pattern", "SXL"], "--window-pattern"),
    (["--cast-weights", "--layer-pattern", "AM"], "--cast-weights"),
    (["--vocab-pad", "0"], "--vocab-pad"),
    (["--smear", "--n-embd", "16", "--head-dim", "8"], "--smear"),
])
def test_refusals_name_the_flag(argv, flag):
    with pytest.raises(UserError, match=flag):
        validate_model_args(_args(["--depth", "4", *PLAIN_FLAGS] + argv))  # only argv's pieces on
