"""Growth transforms (nanochat/grow.py): each one computes the source's function (max abs logit
difference < 1e-4 in fp32) on dense and MoE sources, moe_freq > 1, GQA, and in combination;
the footguns are refused; the copies made by the width growth drift apart in training."""

import pytest
import torch
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.gpt import GPTConfig, build_model
from nanochat.grow import (TOLERANCE, upcycle, grow_width, grow_depth, depth_layer_map, verify, record_choices,
                           count_flips, verify_autocast, autocast_line)
from nanochat.moe import route
from nanochat.optim import setup_optimizers
from tests.plain import PLAIN

V, T = 256, 16


def trained_like(config, seed=0):
    """A model whose every weight is random (a freshly initialised one has zero output
    projections, so every block is the identity and any transform would look exact)."""
    torch.manual_seed(seed)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.size(-1)
            p.normal_(std=(1.0 if "wte" in name else 1.5 * fan_in**-0.5))
        for m in model.modules():
            if hasattr(m, "expert_bias"):
                m.expert_bias.normal_(std=0.01)
    return model.eval()


def dense(**kw):
    return GPTConfig(**{**PLAIN, **dict(sequence_len=T, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=32),
                        **kw})


def moe(**kw):
    return dense(**{**dict(n_layer=4, n_head=4, n_kv_head=2, use_moe=True, n_experts=4, expert_topk=2, moe_freq=2,
                           expert_hidden_mult=2, router="sigmoid", aux_free_bias=0.01), **kw})


def batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (3, T), generator=g) for _ in range(n)]


def diff(a, b, layer_map=None):
    return verify(a, b, batches(), layer_map)


# ------------------------------------------------------------------------------- upcycle

@pytest.mark.parametrize("kw", [dict(), dict(router="softmax"), dict(topk=3, n_experts=6), dict(route_scale=2.5),
                                dict(n_shared=1), dict(n_shared=2, topk=2), dict(moe_freq=2)])
def test_upcycle_computes_the_dense_function(kw):
    src = trained_like(dense(n_layer=2))
    grown = upcycle(src, **kw)
    cfg = grown.config
    assert cfg.use_moe and cfg.expert_hidden_mult == 4 and cfg.moe_freq == kw.get("moe_freq", 1)
    assert [b.is_moe for b in grown.transformer.h] == [(i + 1) % cfg.moe_freq == 0 for i in range(2)]
    # any router gives the same output: randomise it well away from its small init
    with torch.no_grad():
        for b in grown.transformer.h:
            if b.is_moe:
                b.mlp.router.weight.normal_(std=1.0)
    r = diff(src, grown)
    assert r["max_abs_diff"] < TOLERANCE and r["flips"] == 0 and r["choices"] == 0  # dense source: nothing to force
    # and the function is not trivially the same because the logits are constant
    assert src(batches(1)[0]).std() > 0.1


def test_upcycle_expert_weights_are_the_mlp():
    src = trained_like(dense())
    grown = upcycle(src, n_experts=4, topk=2, n_shared=1, route_scale=2.0)
    mlp, moe = src.transformer.h[0].mlp, grown.transformer.h[0].mlp
    for e in range(4):
        assert torch.equal(moe.w_fc[e], mlp.c_fc.weight)
        # routed part k/(k+s) = 2/3 of the output, divided by route_scale 2
        torch.testing.assert_close(moe.w_proj[e], mlp.c_proj.weight * (2 / 3) / 2.0)
    torch.testing.assert_close(moe.shared_proj.weight, mlp.c_proj.weight / 3)
    assert torch.equal(grown.transformer.wte.weight, src.transformer.wte.weight)


def test_upcycle_refuses_what_it_cannot_preserve():
    with pytest.raises(UserError, match="top-1"):
        upcycle(trained_like(dense()), topk=1)
    with pytest.raises(UserError, match="already an MoE"):
        upcycle(trained_like(moe()))
    with pytest.raises(UserError, match="--moe-freq"):
        upcycle(trained_like(dense()), moe_freq=3)
    mod = build_model(dense(mod_capacity=0.5), "cpu")
    for transform in (upcycle, lambda m: grow_width(m, 2), lambda m: grow_depth(m, 2)):
        with pytest.raises(UserError, match="Mixture-of-Depths"):
            transform(mod)


# ------------------------------------------------------------------------------- width

@pytest.mark.parametrize("mult", [2, 3])
@pytest.mark.parametrize("make", [dense, moe, lambda: moe(n_shared_experts=1, moe_freq=1, router="softmax")])
def test_grow_width_computes_the_same_function(make, mult):
    src = trained_like(make())
    grown = grow_width(src, mult, seed=3)
    c, g = src.config, grown.config
    assert (g.n_embd, g.n_head, g.n_kv_head) == (c.n_embd * mult, c.n_head * mult, c.n_kv_head * mult)
    assert g.n_embd // g.n_head == c.n_embd // c.n_head  # same head_dim: rotary and QK-norm unchanged
    r = diff(src, grown)
    assert r["max_abs_diff"] < TOLERANCE
    if c.use_moe:
        assert r["choices"] > 0 and r["flips"] <= r["choices"] // 100  # rounding flips are rare
    assert src(batches(1)[0]).std() > 0.1


def test_zero_padding_would_not_be_exact():
    # The reason for copying: padding the stream with zeros changes what the RMSNorm divides by.
    x = torch.randn(5, 8)
    padded = F.rms_norm(torch.cat([x, torch.zeros_like(x)], -1), (16,))[:, :8]
    copied = F.rms_norm(torch.cat([x, x], -1), (16,))[:, :8]
    torch.testing.assert_close(copied, F.rms_norm(x, (8,)))
    assert (padded - F.rms_norm(x, (8,))).abs().max() > 0.1


def test_width_split_is_asymmetric_and_sums_to_the_source():
    src = trained_like(dense())
    grown = grow_width(src, 2, seed=0)
    w, w2 = src.transformer.h[0].attn.c_q.weight, grown.transformer.h[0].attn.c_q.weight
    d = w.size(1)
    top_left, top_right = w2[:w.size(0), :d], w2[:w.size(0), d:]
    torch.testing.assert_close(top_left + top_right, w)  # the two input copies sum to the weight
    assert (top_left - top_right).abs().max() > 0.1 * w.abs().max()  # not a 50/50 split
    assert not torch.equal(w2[:w.size(0)], w2[w.size(0):])  # the two output copies split differently
    torch.testing.assert_close(grown.transformer.wte.weight[:, :d], grown.transformer.wte.weight[:, d:], rtol=0, atol=0)


def test_width_copies_drift_apart_in_training():
    torch.manual_seed(0)
    src = trained_like(dense())
    grown = grow_width(src, 2, seed=0).train()
    d, hidden = src.config.n_embd, 4 * src.config.n_embd
    adamw, muon = setup_optimizers(grown)
    seen = {}
    grown.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].detach()))
    x = batches(1)[0]
    grown(x)
    # the copies start identical (to the rounding of the split sums)
    gap = lambda h: ((h[..., :hidden] - h[..., hidden:]).abs().max() / h.abs().max()).item()
    assert gap(seen["h"]) < 1e-5
    for idx in batches(4, seed=5):
        loss, _ = grown(idx, idx.roll(-1, dims=1))
        loss.backward()
        adamw.step()
        muon.step()
        grown.zero_grad(set_to_none=True)
    grown(x)
    wte = grown.transformer.wte.weight
    assert (wte[:, :d] - wte[:, d:]).abs().max() > 1e-3       # residual stream copies
    assert gap(seen["h"]) > 1e-3                                # hidden-unit copies


def test_grow_width_rejects_a_fraction():
    with pytest.raises(UserError, match="--width-mult"):
        grow_width(trained_like(dense()), 1.5)


# ------------------------------------------------------------------------------- depth

@pytest.mark.parametrize("make,n,source", [(dense, 1, -1), (dense, 2, 0), (moe, 2, 1), (moe, 4, 3),
                                           (lambda: moe(moe_freq=1), 1, 2)])
def test_grow_depth_computes_the_same_function(make, n, source):
    src = trained_like(make())
    grown = grow_depth(src, n, source)
    L = src.config.n_layer
    s = source % L
    assert grown.config.n_layer == L + n
    assert [b.is_moe for b in grown.transformer.h] == [grown.config.is_moe_layer(i) for i in range(L + n)]
    layer_map = depth_layer_map(L, n, s)
    for p in range(s + 1, s + n + 1):  # the inserted blocks: the source's attention, zero outputs
        new = grown.transformer.h[p]
        assert torch.equal(new.attn.c_q.weight, src.transformer.h[s].attn.c_q.weight)
        assert new.attn.c_proj.weight.abs().sum() == 0
        assert (new.mlp.w_proj if new.is_moe else new.mlp.c_proj.weight).abs().sum() == 0
    for i, j in layer_map.items():  # the old blocks, moved
        assert torch.equal(grown.transformer.h[j].attn.c_v.weight, src.transformer.h[i].attn.c_v.weight)
    r = diff(src, grown, layer_map)
    assert r["max_abs_diff"] < TOLERANCE
    assert r["flips"] == 0  # moved blocks compute exactly what they did: the same choices


def test_grow_depth_errors():
    with pytest.raises(UserError, match="multiple of moe_freq 2"):
        grow_depth(trained_like(moe()), 1)
    with pytest.raises(UserError, match="--source-layer 7"):
        grow_depth(trained_like(dense()), 1, 7)


# ------------------------------------------------------------------------------- together

def test_upcycle_then_width_then_depth_from_a_dense_source():
    src = trained_like(dense())
    grown = grow_depth(grow_width(upcycle(src, n_experts=4, topk=2, seed=1), 2, seed=2), 2, source_layer=1)
    assert (grown.config.n_layer, grown.config.n_embd, grown.config.n_experts) == (4, 64, 4)
    assert diff(src, grown)["max_abs_diff"] < TOLERANCE


def test_moe_source_width_and_depth_with_forced_choices():
    src = trained_like(moe())
    grown = grow_depth(grow_width(src, 2, seed=4), 2, source_layer=1)
    layer_map = depth_layer_map(4, 2, 1)
    r = diff(src, grown, layer_map)
    assert r["max_abs_diff"] < TOLERANCE
    assert r["choices"] == 2 * 2 * 3 * T * 2  # 2 batches x 2 MoE layers x 3x16 tokens x top-2


def test_forcing_and_flip_count_by_hand():
    # route() with given ids uses them; weights are their renormalised scores
    x, gate = torch.randn(5, 8), torch.randn(4, 8)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    w, got, _, _ = route(x, gate, 2, "sigmoid", expert_ids=ids)
    assert torch.equal(got, ids)
    s = torch.sigmoid(x @ gate.T).gather(1, ids)
    torch.testing.assert_close(w, s / s.sum(-1, keepdim=True))
    # flips: choices of the source the grown model does not make, order within a token ignored
    src = {1: torch.tensor([[0, 1], [2, 3]])}
    assert count_flips(src, {1: torch.tensor([[1, 0], [2, 0]])}, {}) == 1
    assert count_flips(src, {5: torch.tensor([[3, 2], [0, 1]])}, {1: 5}) == 4


def test_forced_choices_are_what_makes_a_flipped_model_exact():
    src = trained_like(moe(moe_freq=1, n_layer=2))
    grown = grow_width(src, 2)
    # flip one layer's router sign in the grown model: unforced it chooses other experts
    with torch.no_grad():
        grown.transformer.h[0].mlp.router.weight.neg_()
    idx = batches(1)
    choices = record_choices(grown, idx[0])
    assert set(choices) == {0, 1}
    r = verify(src, grown, idx)
    assert r["flips"] > 0 and r["unforced_max_abs_diff"] > TOLERANCE


def test_mtp_heads_are_carried_through_every_transform():
    # the heads are training-only (logits never see them): compare their losses in train mode
    src = trained_like(dense(mtp_heads=2))
    idx = batches(1)[0]
    y = idx.roll(-1, dims=1)
    want = src.train()(idx, y)[1]["mtp_losses"]
    for grown in (upcycle(src), grow_width(src, 2), grow_depth(src, 1)):
        assert grown.config.mtp_heads == 2
        got = grown.train()(idx, y)[1]["mtp_losses"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- bf16 autocast

def bf16_logits(model, idx):
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        return model.eval()(idx).float()


@pytest.mark.parametrize("transform", [lambda m: upcycle(m, n_experts=4, seed=1), lambda m: grow_width(m, 2, seed=2)])
def test_autocast_check_measures_the_bf16_distance(transform):
    # exact in fp32, not in bf16: the report is the max over batches of |grown - source|, both
    # under autocast, beside the source's own bf16-vs-fp32 gap, each recomputed here
    src = trained_like(dense())
    grown = transform(src)
    assert diff(src, grown)["max_abs_diff"] < TOLERANCE
    r = verify_autocast(src, grown, batches())
    want = max((bf16_logits(grown, idx) - bf16_logits(src, idx)).abs().max().item() for idx in batches())
    gap = max((bf16_logits(src, idx) - src.eval()(idx)).abs().max().item() for idx in batches())
    assert r["max_abs_diff"] == pytest.approx(want, rel=1e-6) and r["source_gap"] == pytest.approx(gap, rel=1e-6)
    assert r["max_abs_diff"] > 100 * TOLERANCE and r["source_gap"] > 100 * TOLERANCE  # bf16 is not exact
    assert r["choices"] == 0  # a dense source: no choices to compare
    line = autocast_line(r)
    assert line.startswith(f"training dtype (bfloat16 autocast): max abs logit difference {want:.3g} ")
    assert f"(the source's own bfloat16-vs-fp32 gap: {gap:.3g})" in line and "expert choices" not in line


def test_autocast_check_counts_flipped_choices_of_an_moe_source():
    src = trained_like(moe())
    grown = grow_depth(grow_width(src, 2, seed=4), 2, source_layer=1)
    layer_map = depth_layer_map(4, 2, 1)
    r = verify_autocast(src, grown, batches(), layer_map)
    assert r["choices"] == 2 * 2 * 3 * T * 2  # 2 batches x 2 MoE layers x 3x16 tokens x top-2
    flips = source_flips = 0
    for idx in batches():
        src32 = record_choices(src, idx)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            src16, grown16 = record_choices(src, idx), record_choices(grown, idx)
        flips += count_flips(src16, grown16, layer_map)
        source_flips += count_flips(src32, src16, {})
    assert (r["flips"], r["source_flips"]) == (flips, source_flips)
    assert f"expert choices: {flips:,} of {r['choices']:,} flip (the source's own bfloat16-vs-fp32: {source_flips:,})" \
        in autocast_line(r)
    # an MoE whose router is negated in the grown copy flips most choices under bf16 too
    with torch.no_grad():
        for i in layer_map.values():
            if grown.transformer.h[i].is_moe:
                grown.transformer.h[i].mlp.router.weight.neg_()
    assert verify_autocast(src, grown, batches(), layer_map)["flips"] > r["choices"] // 4
