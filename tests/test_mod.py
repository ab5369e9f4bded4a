"""Mixture-of-Depths (nanochat/mod.py and its wiring in gpt.Block / engine.KVCache): exactly
C*T tokens per sequence in training, the gather path against an independent masked path,
capacity 1.0 = the dense model, the causal rule's KV-cached generation against its full
forward, and FLOPs against a hand count."""

import pytest
import torch
import torch.nn.functional as F

from nanochat.engine import KVCache, generate, new_kv_cache
from nanochat.gpt import GPTConfig, build_model, norm
from nanochat.report import describe_params
from nanochat.mod import (MoDRouter, mod_tokens, topk_positions, straight_through_gate, causal_stats,
                          routed_attention_mask, update_mod_thresholds, gather_positions, scatter_positions)
from nanochat.optim import setup_optimizers
from tests.plain import PLAIN

V = 256


def cfg(**kw):
    return GPTConfig(**{**PLAIN, **dict(sequence_len=32, vocab_size=V, n_layer=4, n_head=2, n_kv_head=1, n_embd=64,
                                        mod_capacity=0.25, mod_freq=2), **kw})


def randomize(model, seed=0):
    """Random weights everywhere (init zeroes output projections, which would make every block
    the identity and hide routing); the causal thresholds stay 0, so about half the tokens are processed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "wte" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


def test_small_functions_by_hand():
    assert mod_tokens(32, 0.25) == 8 and mod_tokens(32, 0.125) == 4 and mod_tokens(10, 0.01) == 1 and mod_tokens(7, 1.0) == 7
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert topk_positions(scores, 2).tolist() == [[1, 3], [0, 1]]  # position order, not score order
    x = torch.arange(10.0).view(1, 5, 2)
    pos = torch.tensor([[1, 3]])
    assert gather_positions(x, pos).tolist() == [[[2.0, 3.0], [6.0, 7.0]]]
    assert scatter_positions(x, pos, -torch.ones(1, 2, 2))[0, :, 0].tolist() == [0.0, -1.0, 4.0, -1.0, 8.0]
    # straight-through gate: value exactly 1, gradient sigmoid'(r)
    r = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    g = straight_through_gate(r)
    assert g.tolist() == [1.0, 1.0, 1.0]
    g.sum().backward()
    s = torch.sigmoid(r.detach())
    assert torch.allclose(r.grad, s * (1 - s))
    # the causal rule's statistics: fraction it processes, agreement with the top-k
    scores = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    frac, agree = causal_stats(scores, torch.tensor([[0, 1]]), torch.tensor(0.0)).tolist()
    assert frac == 0.5 and agree == 0.5  # it says (yes, no, yes, no); top-k (yes, yes, no, no)
    assert causal_stats(scores, torch.tensor([[0, 1]]), torch.tensor(-1.5)).tolist() == [0.75, 0.75]
    # mask: new key m visible to query i iff m <= i and m processed (or m == i); cached keys by row length
    mask = routed_attention_mask(torch.tensor([[True, False, True]]), 2, torch.tensor([1]))
    assert mask[0, 0].int().tolist() == [[1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 1, 0, 1]]


def _routed_block_io(model, x_idx):
    """Inputs and outputs of every routed block in one forward."""
    seen = {}
    hooks = [model.transformer.h[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out[0])))
             for i in model.mod_layers()]
    try:
        model(x_idx, x_idx)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_training_processes_exactly_ct_tokens_and_matches_masked_reference(use_moe):
    """Each sequence's top C*T tokens go through the block, the rest pass untouched; the
    gather path equals an independent computation of the same thing: the whole sequence through
    the block with an attention mask that hides the unchosen keys (the causal rule's path, fed
    the top-k choice)."""
    model = randomize(build_model(cfg(use_moe=use_moe, n_experts=4, expert_topk=2, expert_hidden_mult=2), "cpu"))
    model.train()
    idx = torch.randint(0, V, (3, 32), generator=torch.Generator().manual_seed(1))
    attn_lengths = []
    hook = model.transformer.h[1].attn.register_forward_hook(lambda m, a, out: attn_lengths.append(a[0].shape[1]))
    io = _routed_block_io(model, idx)
    hook.remove()
    assert attn_lengths == [8]  # the block's attention ran on k = 0.25 * 32 tokens per sequence
    T = 32
    cos_sin = model.cos[:, :T], model.sin[:, :T]
    for i, (x, out) in io.items():
        block = model.transformer.h[i]
        chosen = torch.zeros(3, T, dtype=torch.bool).scatter(1, topk_positions(block.mod.scores(norm(x)), 8), True)
        assert chosen.sum(dim=1).tolist() == [8, 8, 8]
        moved = (out != x).any(dim=-1)
        assert torch.equal(moved, chosen)  # exactly the chosen tokens changed
        with torch.no_grad():
            ref, _ = block._residual(x, cos_sin, select=chosen)
        assert torch.allclose(out[chosen], ref[chosen], atol=1e-5)


def test_straight_through_gate_is_exactly_one():
    """1 + s - stopgrad(s) rounds twice: (1 + s) is rounded before s is taken off again. The gate
    must be exactly 1 for every score, in fp32 and in bf16."""
    r = torch.randn(100_000, generator=torch.Generator().manual_seed(7)) * 4
    for dtype in (torch.float32, torch.bfloat16):
        g = straight_through_gate(r.to(dtype))
        assert g.dtype == dtype and bool((g == 1).all()), dtype


def test_router_scores_are_fp32_under_autocast():
    router = MoDRouter(64)
    torch.manual_seed(0)
    router.init_weights()
    xn = norm(torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(8)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = router.scores(xn)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, xn @ router.router.weight[0])  # the fp32 computation, bit for bit


def test_param_roles():
    router = MoDRouter(64)
    roles = router.param_roles()
    assert list(roles) == ["router"] and [id(p) for p in roles["router"]] == [id(p) for p in router.parameters()]


def _capacity_one_pair(seed=0):
    """A dense model with random weights and the same model with every other block routed at
    capacity 1.0, its routers random (non-zero) too."""
    dense = randomize(build_model(cfg(mod_capacity=0.0), "cpu"), seed)
    mod = build_model(cfg(mod_capacity=1.0), "cpu")
    missing = mod.load_state_dict(dense.state_dict(), strict=False).missing_keys
    assert missing and all(".mod." in k for k in missing)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i in mod.mod_layers():
            w = mod.transformer.h[i].mod.router.weight
            w.copy_(torch.randn(w.shape, generator=g))
    return dense.train(), mod.train()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_capacity_one_is_the_dense_model_exactly(autocast):
    """Capacity 1.0: every token goes through every block with a gate of value exactly 1, so the
    logits are the dense model's bit for bit, whatever the router scores."""
    dense, mod = _capacity_one_pair()
    idx = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(2))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        logits_mod, logits_dense = mod(idx), dense(idx)
    assert torch.equal(logits_mod, logits_dense)


def test_capacity_one_gradients():
    """The gate's gradient reaches the residual stream only through the router's weights: with
    a zero router every other gradient is the dense one too, and the router itself still gets a
    gradient."""
    dense, mod = _capacity_one_pair()
    idx = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i in mod.mod_layers():
            mod.transformer.h[i].mod.router.weight.zero_()
    for model in (dense, mod):
        ce, aux = model(idx, idx)
        ce.backward()
    for name, p in dense.named_parameters():
        assert torch.equal(p.grad, mod.get_parameter(name).grad), name
    assert mod.transformer.h[1].mod.router.weight.grad.abs().sum() > 0  # the router still learns through the gate


def test_router_gradient_is_the_straight_through_one(monkeypatch):
    """d loss / d w_router = sum over the chosen tokens of (d loss / d gate) * sigmoid'(r) * norm(x):
    the gradient of Raposo et al.'s r * f(x), with the forward value of the gate kept at 1. The
    reference measures d loss / d gate of one routed block by putting a plain ones tensor in
    place of its gate (the other blocks keep theirs: a gate's gradient also reaches the
    residual stream through the routers of the blocks above)."""
    model = randomize(build_model(cfg(mod_capacity=0.5), "cpu")).train()
    idx = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(9))
    inputs = {}
    hooks = [model.transformer.h[i].register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i in model.mod_layers()]
    ce, _ = model(idx, idx)
    ce.backward()
    for h in hooks:
        h.remove()
    actual = {i: model.transformer.h[i].mod.router.weight.grad[0].clone() for i in model.mod_layers()}
    k = mod_tokens(32, 0.5)
    for n, i in enumerate(model.mod_layers()):
        calls, ones = [], {}
        def gate(scores):
            calls.append(scores)
            if len(calls) - 1 != n:
                return straight_through_gate(scores)
            ones["g"] = torch.ones_like(scores, requires_grad=True)
            return ones["g"]
        monkeypatch.setattr("nanochat.gpt.straight_through_gate", gate)
        model.zero_grad()
        ce_ref, _ = model(idx, idx)
        ce_ref.backward()
        assert torch.equal(ce_ref, ce)  # the gate's value is 1 either way
        xn = norm(inputs[i])
        positions = topk_positions(model.transformer.h[i].mod.scores(xn), k)
        s = torch.sigmoid(calls[n].detach())
        expected = ((ones["g"].grad * s * (1 - s))[..., None] * gather_positions(xn, positions)).sum(dim=(0, 1))
        assert expected.abs().sum() > 0
        assert torch.allclose(actual[i], expected, rtol=1e-5, atol=1e-8), i


def test_threshold_is_the_running_mean_of_each_sequences_cut():
    """The causal threshold: the first optimizer step sets it to the mean over micro-batches of
    the cut of each micro-batch's top B*k scores; later steps move it at max(0.05, 1/(n+1))."""
    model = randomize(build_model(cfg(), "cpu"))
    model.train()
    g = torch.Generator().manual_seed(3)
    steps = [[torch.randint(0, V, (3, 32), generator=g) for _ in range(2)] for _ in range(2)]  # 2 steps x 2 micro-batches
    expected = {i: 0.0 for i in model.mod_layers()}
    for n, micro_batches in enumerate(steps):
        cuts = {i: [] for i in model.mod_layers()}
        for idx in micro_batches:
            io = _routed_block_io(model, idx)
            for i, (x, _) in io.items():
                scores = model.transformer.h[i].mod.scores(norm(x)).detach()
                cuts[i].append(sorted(scores.flatten().tolist(), reverse=True)[3 * 8 - 1])  # 24th of 96
        update_mod_thresholds(model)
        for i in model.mod_layers():
            rate = max(0.05, 1 / (n + 1))
            expected[i] += rate * (sum(cuts[i]) / len(cuts[i]) - expected[i])
            assert model.transformer.h[i].mod.threshold.item() == pytest.approx(expected[i], rel=1e-5, abs=1e-6)
    assert all(model.transformer.h[i].mod.kth_sum.abs().sum() == 0 for i in model.mod_layers())
    assert "transformer.h.1.mod.threshold" in model.state_dict()  # saved with the weights
    # the router goes to AdamW, nothing of it to Muon
    adamw, muon = setup_optimizers(model)
    in_adam = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert all(id(p) in in_adam for n, p in model.named_parameters() if ".mod." in n)
    assert not any(id(p) in in_adam for group in muon.param_groups for p in group["params"])


def test_causal_rule_extremes():
    """Eval uses the threshold: all tokens processed = the dense model; none = the block is skipped."""
    dense = randomize(build_model(cfg(mod_capacity=0.0), "cpu")).eval()
    model = build_model(cfg(), "cpu").eval()
    model.load_state_dict(dense.state_dict(), strict=False)
    idx = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(4))
    for threshold, expect_identity in ((-100.0, False), (100.0, True)):
        with torch.no_grad():
            for i in model.mod_layers():
                model.transformer.h[i].mod.threshold.fill_(threshold)
            io = _routed_block_io(model, idx)
        for x, out in io.values():
            assert torch.equal(out, x) == expect_identity
    with torch.no_grad():
        for i in model.mod_layers():
            model.transformer.h[i].mod.threshold.fill_(-100.0)
        assert torch.allclose(model(idx), dense(idx), atol=1e-5)


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_kv_cached_causal_rule_equals_full_forward(use_moe):
    """Logits of a prefill, a chunk and single steps with the cache equal the full forward under
    the causal rule; each routed layer's cache holds exactly the tokens it processed per row
    (rows make different choices); the storage grows past its initial size."""
    model = randomize(build_model(cfg(use_moe=use_moe, n_experts=4, expert_topk=2, expert_hidden_mult=2), "cpu")).eval()
    idx = torch.randint(0, V, (3, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        io = _routed_block_io(model, idx)
        processed = {i: (out != x).any(dim=-1).sum(dim=1) for i, (x, out) in io.items()}
        full = model(idx)
        cache = KVCache(3, 4, 1, 32, 30, routed_layers=model.mod_layers(), routed_len=4)
        pieces = [model(idx[:, :10], kv_cache=cache), model(idx[:, 10:16], kv_cache=cache)]
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(16, 30)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)
    for i in model.mod_layers():
        assert torch.equal(cache.lengths[i], processed[i])
        assert 0 < processed[i].min() < 30 and len(set(processed[i].tolist())) > 1  # partial, and rows differ
        assert cache.k[i].size(2) < 30 or processed[i].max() > 15  # packed, not one slot per position
    assert cache.get_pos() == 30


def test_greedy_generation_with_cache_equals_without():
    model = randomize(build_model(cfg(sequence_len=16), "cpu")).eval()
    prompt = torch.randint(0, V - 1, (6,), generator=torch.Generator().manual_seed(6)).tolist()
    kw = dict(max_tokens=20, temperature=0.0, stop_at_bos=False)
    with_cache = generate(model, prompt, use_kv_cache=True, **kw)
    assert with_cache == generate(model, prompt, use_kv_cache=False, **kw)
    assert len(with_cache[0]) == 20
    cache = new_kv_cache(model, 1, 26)
    assert cache.routed == {1, 3} and cache.routed_len == 16  # 1.25 * 0.25 * 26 -> at least 16 slots


def _block_matmul_params(d, hidden):
    return 4 * d * d + 2 * d * hidden  # attention q,k,v,proj (n_kv_head == n_head here) + MLP


def test_flops_hand_count():
    d, T, H, hd, L = 64, 32, 2, 32, 4
    c = cfg(n_kv_head=2, mod_capacity=0.25, mod_freq=2)
    model = build_model(c, "cpu")
    k = 8
    plain = 6 * _block_matmul_params(d, 4 * d) + 12 * H * hd * T
    routed = k / T * (6 * _block_matmul_params(d, 4 * d) + 12 * H * hd * k) + 6 * d
    assert model.estimate_flops() == pytest.approx(6 * V * d + 2 * plain + 2 * routed, rel=1e-12)
    # MoE FFNs in the routed blocks: router E*d + top-2 experts of width 2d, times k/T
    m = build_model(cfg(n_kv_head=2, use_moe=True, n_experts=4, expert_topk=2, expert_hidden_mult=2, moe_freq=1), "cpu")
    moe_block = 4 * d * d + 4 * d + 2 * (2 * d * 2 * d)
    plain = 6 * moe_block + 12 * H * hd * T
    routed = k / T * (6 * moe_block + 12 * H * hd * k) + 6 * d
    assert m.estimate_flops() == pytest.approx(6 * V * d + 2 * plain + 2 * routed, rel=1e-12)
    # all parameters active; the routers counted
    counts = m.num_scaling_params()
    assert counts["mod"] == 2 * d and counts["total"] == sum(p.numel() for p in m.parameters())
    assert "MoD blocks: 2 of 4 (layers 1,3), capacity 0.25: top-8 of 32" in describe_params(m)
