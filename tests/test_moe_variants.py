"""MoE routing variants (nanochat/moe.py, GPTConfig router / route_scale / n_shared_experts /
aux_free_bias / capacity_factor) checked against hand computations and independent loop
references, and the routing statistics. End-to-end runs are in test_moe_variants_e2e.py."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nanochat.moe as moe_mod
from nanochat.checkpoint import save_checkpoint, load_checkpoint
from nanochat.gpt import GPTConfig, build_model
from nanochat.moe import MoE, route, router_z_loss, update_expert_bias, collect_moe_stats, collect_step_loads
from tests.plain import PLAIN


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These are tiny tensors: a second intra-op thread only adds spin-waits, and on a busy
    2-core machine it can make the loops below 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_moe(d=16, n_experts=4, topk=2, mult=2, seed=0, **variant):
    """An MoE layer with random (non-zero) weights everywhere, and zeroed buffers. Switch's
    routing (softmax, no bias updates) unless the variant says otherwise."""
    torch.manual_seed(seed)
    variant = {"router": "softmax", "aux_free_bias": 0.0, **variant}
    moe = MoE(GPTConfig(n_embd=d, n_head=1, n_kv_head=1, use_moe=True, n_experts=n_experts, expert_topk=topk,
                        expert_hidden_mult=mult, **variant))
    nn.init.normal_(moe.router.weight, std=0.5)
    nn.init.normal_(moe.w_fc, std=d**-0.5)
    nn.init.normal_(moe.w_proj, std=0.2)
    if moe.n_shared:
        nn.init.normal_(moe.shared_fc.weight, std=d**-0.5)
        nn.init.normal_(moe.shared_proj.weight, std=0.2)
    for buf in (moe.expert_bias, moe.load_since_step, moe.stats):
        buf.zero_()
    return moe


def ref_route(x, gate, topk, router="softmax", bias=None, route_scale=1.0):
    """Independent router: explicit exp formulas and a sort instead of topk."""
    logits = x.double() @ gate.double().T
    if router == "sigmoid":
        scores = 1.0 / (1.0 + torch.exp(-logits))
    else:
        e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        scores = e / e.sum(dim=-1, keepdim=True)
    choice = scores if bias is None else scores + bias.double()
    ids = torch.argsort(choice, dim=-1, descending=True)[:, :topk]
    chosen = scores.gather(1, ids)
    if router == "softmax" and topk == 1:
        weights = chosen
    else:
        weights = chosen / chosen.sum(dim=-1, keepdim=True)
    return (weights * route_scale).float(), ids, scores.float()


def expert_out(x, w_fc, w_proj):
    return F.relu(x @ w_fc.T).square() @ w_proj.T


def ref_moe_forward(moe, x_flat, capacity=None):
    """Per-token loop: sum over kept assignments of weight x expert MLP output (+ shared MLP).
    With a capacity, an expert takes at most `capacity` assignments, first choices before
    second choices (GShard), in token order within a choice. Returns (out (N, d), assignments
    dropped). Differentiable."""
    _, ids, _ = ref_route(x_flat, moe.router.weight, moe.topk, moe.router_kind,
                          moe.expert_bias, moe.route_scale)
    n_tokens = x_flat.size(0)
    kept = [[True] * moe.topk for _ in range(n_tokens)]
    if capacity is not None:
        used = [0] * moe.n_experts
        for j in range(moe.topk):
            for t in range(n_tokens):
                e = int(ids[t, j])
                kept[t][j] = used[e] < capacity
                used[e] += kept[t][j]
    dropped, rows = sum(not k for row in kept for k in row), []
    for t in range(n_tokens):
        y = torch.zeros_like(x_flat[t])
        for j in range(moe.topk):
            if not kept[t][j]:
                continue
            e = int(ids[t, j])
            # the weight must carry the router gradient: recompute it from the live gate
            y = y + weights_live(moe, x_flat[t], ids[t])[j] * expert_out(x_flat[t], moe.w_fc[e], moe.w_proj[e])
        if moe.n_shared:
            y = y + expert_out(x_flat[t], moe.shared_fc.weight, moe.shared_proj.weight)
        rows.append(y)
    return torch.stack(rows), dropped


def weights_live(moe, x_t, ids_t):
    """Combine weights of one token at the given experts, as a differentiable function of the gate."""
    logits = moe.router.weight @ x_t
    scores = torch.sigmoid(logits) if moe.router_kind == "sigmoid" else torch.softmax(logits, dim=-1)
    chosen = scores[ids_t]
    if not (moe.router_kind == "softmax" and moe.topk == 1):
        chosen = chosen / chosen.sum()
    return chosen * moe.route_scale


def cv_of(counts):
    counts = [float(c) for c in counts]
    mean = sum(counts) / len(counts)
    return math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts)) / mean


# ---------------------------------------------------------------------------------------------
# 1. Routers: sigmoid (DeepSeek-V3), route scale, the balancing bias, softmax top-1

@pytest.mark.parametrize("route_scale", [1.0, 2.5])
def test_sigmoid_router_weights_are_renormalised_chosen_sigmoids(route_scale):
    torch.manual_seed(1)
    x, gate = torch.randn(40, 12), torch.randn(6, 12)
    weights, ids, probs, logits = route(x, gate, 3, "sigmoid", route_scale=route_scale)
    ref_w, ref_ids, ref_scores = ref_route(x, gate, 3, "sigmoid", route_scale=route_scale)
    assert torch.allclose(logits, x @ gate.T, atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.full((40,), route_scale), atol=1e-5)
    for t in range(40):
        assert sorted(ids[t].tolist()) == sorted(ref_ids[t].tolist())
        s = ref_scores[t, ids[t]]
        assert torch.allclose(weights[t], route_scale * s / s.sum(), atol=1e-6)
    # probs: the normalised affinities sigmoid / sum(sigmoid), rows summing to 1
    assert torch.allclose(probs, ref_scores / ref_scores.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(40), atol=1e-6)
    # a sigmoid is not a softmax: the chosen weights differ from renormalised softmax probs
    soft = torch.softmax(x @ gate.T, -1).gather(1, ids)
    assert not torch.allclose(weights, route_scale * soft / soft.sum(-1, keepdim=True), atol=1e-3)


@pytest.mark.parametrize("router,topk", [("sigmoid", 2), ("softmax", 2), ("softmax", 1)])
def test_bias_changes_which_experts_not_the_weight_formula(router, topk):
    torch.manual_seed(2)
    x, gate = torch.randn(64, 8), torch.randn(4, 8)
    bias = torch.tensor([0.6, -0.6, 0.0, 0.3])
    w0, ids0, probs0, _ = route(x, gate, topk, router)
    w1, ids1, probs1, _ = route(x, gate, topk, router, bias=bias)
    assert torch.equal(probs0, probs1)  # the bias never touches the affinities
    changed = [t for t in range(64) if sorted(ids0[t].tolist()) != sorted(ids1[t].tolist())]
    assert len(changed) > 5
    ref_w, ref_ids, scores = ref_route(x, gate, topk, router, bias=bias)
    for t in range(64):
        assert sorted(ids1[t].tolist()) == sorted(ref_ids[t].tolist())  # chosen by score + bias
        s = scores[t, ids1[t]]                                           # weighted by score alone
        expected = s if (router == "softmax" and topk == 1) else s / s.sum()
        assert torch.allclose(w1[t], expected, atol=1e-6)


def test_softmax_top1_keeps_the_raw_probability_times_route_scale():
    torch.manual_seed(3)
    x, gate = torch.randn(30, 8), torch.randn(5, 8)
    w, ids, probs, _ = route(x, gate, 1, "softmax", route_scale=2.5)
    ref = torch.softmax(x @ gate.T, -1)
    assert torch.equal(ids[:, 0], ref.argmax(-1))
    assert torch.allclose(w[:, 0], 2.5 * ref.max(-1).values, atol=1e-6)
    assert (w[:, 0] < 2.5).all()  # not renormalised to route_scale


@pytest.mark.parametrize("router,topk,route_scale", [("sigmoid", 2, 1.0), ("sigmoid", 3, 2.5), ("softmax", 2, 2.5)])
def test_moe_variant_forward_and_backward_match_loop_reference(router, topk, route_scale):
    moe = make_moe(d=16, n_experts=6, topk=topk, router=router, route_scale=route_scale)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y, _ = moe(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in (moe.router.weight, moe.w_fc, moe.w_proj)]
    moe.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    ref, _ = ref_moe_forward(moe, x2.view(-1, 16))
    (ref.view_as(y) * g).sum().backward()
    want = [x2.grad] + [p.grad for p in (moe.router.weight, moe.w_fc, moe.w_proj)]
    assert torch.allclose(y.view(-1, 16), ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert moe.router.weight.grad.abs().sum() > 0


def test_route_scale_scales_the_routed_output():
    a, b = make_moe(router="sigmoid"), make_moe(router="sigmoid", route_scale=2.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 16)
    assert torch.allclose(b(x)[0], 2.5 * a(x)[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. Router z-loss

def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    # logsumexp = [ln 4, 1 + ln 2]
    expected = (math.log(4.0) ** 2 + (1 + math.log(2.0)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_moe_returns_z_loss_with_analytic_router_gradient():
    moe = make_moe(d=8, n_experts=4, topk=2)
    x = torch.randn(1, 6, 8)
    _, aux = moe(x)
    xf = x.view(-1, 8).double()
    logits = xf @ moe.router.weight.double().T
    lse = torch.log(torch.exp(logits).sum(-1))
    assert aux["z_loss"].item() == pytest.approx((lse ** 2).mean().item(), rel=1e-5)
    moe.zero_grad()
    aux["z_loss"].backward()
    # d/dW mean_t lse_t^2 = (2/N) sum_t lse_t softmax(logits_t) x_t^T
    grad = (2 / 6) * ((lse[:, None] * torch.softmax(logits, -1)).T @ xf)
    assert moe.router.weight.grad.abs().sum() > 0
    assert torch.allclose(moe.router.weight.grad.double(), grad, atol=1e-5)
    assert moe.w_fc.grad is None or moe.w_fc.grad.abs().sum() == 0  # z-loss touches only the router


def test_gpt_forward_sums_z_and_balance_loss_over_layers_with_zero_routers():
    # zero routers: every logit is 0, so each layer has lse = ln E, z = (ln E)^2 and a Switch
    # loss of exactly 1; GPT.forward returns the SUM over the 3 MoE layers (Switch/GShard/
    # DeepSeek: each layer's router feels the full coefficient), not the mean
    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=3, n_head=1, n_kv_head=1, n_embd=32,
                                  use_moe=True, n_experts=4, expert_topk=2, expert_hidden_mult=2), "cpu")
    for m in moe_mod.moe_layers(model):
        nn.init.zeros_(m.router.weight)
    idx = torch.randint(0, 64, (2, 16))
    ce, aux = model(idx, idx)
    assert set(aux) == {"balance_loss", "z_loss", "mtp_losses", "mod_stats"} and aux["mtp_losses"].numel() == 0
    assert aux["mod_stats"].shape == (0, 2)
    assert aux["z_loss"].item() == pytest.approx(3 * math.log(4) ** 2, rel=1e-6)
    assert aux["balance_loss"].item() == pytest.approx(3.0, abs=1e-6)


def test_gpt_forward_aux_losses_are_the_sum_of_each_layers_losses():
    # random routers and weights: every layer has its own balance and z-loss; record them
    # from each MoE's own output and check GPT.forward adds them up
    torch.manual_seed(3)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=4, n_head=1, n_kv_head=1, n_embd=32,
                                  use_moe=True, n_experts=4, expert_topk=2, expert_hidden_mult=2, moe_freq=2), "cpu")
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    per_layer = []
    for m in moe_mod.moe_layers(model):
        m.register_forward_hook(lambda mod, inp, out: per_layer.append({k: v.item() for k, v in out[1].items()}))
    _, aux = model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    assert len(per_layer) == 2 and per_layer[0]["balance_loss"] != per_layer[1]["balance_loss"]
    for name in ("balance_loss", "z_loss"):
        assert aux[name].item() == pytest.approx(sum(layer[name] for layer in per_layer), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. Capacity factor

def rigged_moe(topk, capacity_factor, d=16, n_experts=4):
    """Every token prefers expert 0, then expert 1 (by a wide but finite margin)."""
    moe = make_moe(d=d, n_experts=n_experts, topk=topk, capacity_factor=capacity_factor)
    with torch.no_grad():
        moe.router.weight.mul_(0.1)
        moe.router.weight[0, 0] = 4.0
        moe.router.weight[1, 0] = 2.0
    return moe


def rigged_input(B=2, T=9, d=16, seed=5):
    torch.manual_seed(seed)
    x = torch.randn(B, T, d)
    x[..., 0] = x[..., 0].abs() + 1.0
    return x


@pytest.mark.parametrize("topk,cf,capacity", [(1, 1.0, 5), (2, 1.25, 12), (2, 1.0, 9)])
def test_capacity_keeps_the_earliest_tokens_and_drops_the_rest(monkeypatch, topk, cf, capacity):
    # N = 18 tokens, E = 4: C = ceil(cf * 18 * k / 4) -> 5 (k=1), ceil(11.25) = 12, 9 (k=2)
    assert capacity == math.ceil(cf * 18 * topk / 4)
    moe = rigged_moe(topk, cf)
    x = rigged_input()
    shapes = []
    real = moe_mod.expert_mlp_padded
    monkeypatch.setattr(moe_mod, "expert_mlp_padded", lambda xs, *w: shapes.append(tuple(xs.shape)) or real(xs, *w))
    moe.train()
    y, _ = moe(x)
    xf = x.view(-1, 16)
    _, ids, _ = ref_route(xf, moe.router.weight, topk)
    assert (ids[:, 0] == 0).all() and (topk == 1 or (ids[:, 1] == 1).all())
    # kept: tokens 0..C-1 for expert 0 (and expert 1); tokens >= C lose those assignments
    ref, dropped = ref_moe_forward(moe, xf, capacity=capacity)
    assert dropped == topk * (18 - capacity)
    assert torch.allclose(y.view(-1, 16), ref, atol=1e-5, rtol=1e-4)
    assert (y.view(-1, 16)[capacity:] == 0).all()          # nothing else routed: a dropped token reads 0
    assert (y.view(-1, 16)[:capacity].abs().sum(-1) > 0).all()
    assert shapes == [(4, capacity, 16)]                   # one padded (E, C, d) batch
    stats = collect_moe_stats(moe)[0]
    assert stats["dropped"] == pytest.approx(dropped / (18 * topk))
    assert stats["load"][0] == pytest.approx(1 / topk, abs=1e-5)

    # another routing of the same number of tokens runs on the same fixed shapes
    y2, _ = moe(torch.randn(2, 9, 16))
    assert shapes[1] == shapes[0] and y2.shape == y.shape


def test_capacity_random_routing_forward_and_backward_match_reference():
    moe = make_moe(d=16, n_experts=4, topk=2, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight[0] += 0.8  # skewed but not degenerate: some experts overflow
    x = rigged_input(B=2, T=16, seed=7).requires_grad_()
    y, _ = moe(x)
    capacity = math.ceil(1.0 * 32 * 2 / 4)
    x2 = x.detach().clone().requires_grad_()
    ref, dropped = ref_moe_forward(moe, x2.view(-1, 16), capacity=capacity)
    assert dropped > 0
    assert torch.allclose(y.view(-1, 16), ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in (moe.router.weight, moe.w_fc, moe.w_proj)]
    moe.zero_grad()
    (ref.view_as(y) * g).sum().backward()
    for a, b in zip(got, [x2.grad] + [p.grad for p in (moe.router.weight, moe.w_fc, moe.w_proj)]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("topk", [1, 2])
def test_large_capacity_factor_equals_dropless(topk):
    dropless = make_moe(d=16, n_experts=4, topk=topk)
    capped = make_moe(d=16, n_experts=4, topk=topk, capacity_factor=8.0)
    capped.load_state_dict(dropless.state_dict())
    x = rigged_input(B=2, T=8, seed=9)
    x[..., 0] *= 0.2  # some skew, still every expert used
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, _ = dropless(xa)
    yb, _ = capped(xb)
    assert torch.allclose(ya, yb, atol=1e-5, rtol=1e-4)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    for pa, pb in zip(dropless.parameters(), capped.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4)
    assert collect_moe_stats(capped)[0]["dropped"] == 0.0


# ---------------------------------------------------------------------------------------------
# 4. Shared experts and the accounting

@pytest.mark.parametrize("n_shared", [1, 2])
def test_shared_experts_add_an_always_on_mlp(n_shared):
    moe = make_moe(d=16, n_experts=4, topk=1, mult=2, n_shared_experts=n_shared)
    assert moe.shared_fc.weight.shape == (n_shared * 32, 16) and moe.shared_proj.weight.shape == (16, n_shared * 32)
    routed_only = make_moe(d=16, n_experts=4, topk=1, mult=2)
    routed_only.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared_")})
    x = torch.randn(2, 6, 16)
    y, _ = moe(x)
    xf = x.view(-1, 16)
    shared = F.relu(xf @ moe.shared_fc.weight.T).square() @ moe.shared_proj.weight.T
    assert torch.allclose(y.view(-1, 16), routed_only(x)[0].view(-1, 16) + shared, atol=1e-5)
    assert torch.allclose(y.view(-1, 16), ref_moe_forward(moe, xf)[0], atol=1e-5)


def small_config(**kw):
    base = dict(PLAIN, sequence_len=32, vocab_size=100, n_layer=2, n_head=1, n_kv_head=1, n_embd=64)
    return GPTConfig(**(base | kw))


def test_shared_expert_params_are_active_and_flops_by_hand():
    # d=64, E=4, top-1, 1 shared, mult 2: hidden 128, per MoE layer
    #   experts 2*4*128*64 = 65536, shared 2*64*128 = 16384, router 4*64 = 256, attention 4*64^2 = 16384,
    #   inactive (4-1) * 2*128*64 = 49152; wte = lm_head = 100*64 = 6400
    model = build_model(small_config(use_moe=True, n_experts=4, expert_topk=1, n_shared_experts=1,
                                     expert_hidden_mult=2), "cpu")
    c = model.num_scaling_params()
    assert c["shared_experts"] == 2 * 16384 and c["experts"] == 2 * 65536 and c["router"] == 2 * 256
    assert c["attn"] == 2 * 16384 and c["mlp"] == 0 and c["wte"] == c["lm_head"] == 6400
    assert c["moe_inactive"] == 2 * 49152
    total = 2 * 6400 + 2 * (16384 + 65536 + 16384 + 256)
    assert c["total"] == total == sum(p.numel() for p in model.parameters())
    assert c["active_total"] == total - 2 * 49152
    attention = 12 * 2 * 1 * 64 * 32
    assert model.estimate_flops() == 6 * (total - 2 * 49152 - 6400) + attention


@pytest.mark.parametrize("moe_freq", [1, 2])
def test_top1_plus_shared_at_mult2_is_iso_flops_with_dense_up_to_the_router(moe_freq):
    dense = build_model(small_config(), "cpu")
    moe = build_model(small_config(use_moe=True, n_experts=4, expert_topk=1, n_shared_experts=1,
                                   expert_hidden_mult=2, moe_freq=moe_freq), "cpu")
    n_moe = moe.num_moe_layers()
    assert n_moe == 2 // moe_freq
    assert moe.estimate_flops() - dense.estimate_flops() == 6 * 4 * 64 * n_moe
    assert moe.num_scaling_params()["active_total"] - dense.num_scaling_params()["active_total"] == 4 * 64 * n_moe


# ---------------------------------------------------------------------------------------------
# 5. Aux-loss-free balancing bias

def test_update_expert_bias_hand_computed():
    layers = nn.ModuleList([make_moe(n_experts=4, aux_free_bias=0.1), make_moe(n_experts=4, aux_free_bias=0.1)])
    layers[0].expert_bias.copy_(torch.tensor([0.5, 0.0, -0.25, 0.0]))
    layers[0].load_since_step.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5: sign = (-1, 1, 1, 1), mean 0.5
    layers[1].load_since_step.copy_(torch.tensor([5.0, 5.0, 10.0, 0.0]))  # mean 5: sign = (0, 0, -1, 1), mean 0
    update_expert_bias(layers, 0.1, collect_step_loads(layers))
    assert torch.allclose(layers[0].expert_bias, torch.tensor([0.5 - 0.15, 0.05, -0.25 + 0.05, 0.05]), atol=1e-7)
    assert torch.allclose(layers[1].expert_bias, torch.tensor([0.0, 0.0, -0.1, 0.1]), atol=1e-7)
    for m in layers:
        assert (m.load_since_step == 0).all()


def test_load_is_accumulated_in_training_with_or_without_the_bias():
    # the optimizer needs the per-step load to leave idle experts alone, so it is always kept
    with_bias, without = make_moe(aux_free_bias=0.01), make_moe()
    without.load_state_dict(with_bias.state_dict())
    x1, x2 = torch.randn(1, 10, 16), torch.randn(2, 3, 16)
    counts = torch.zeros(4)
    for x in (x1, x2):
        with_bias(x)
        without(x)
        _, ids, _ = ref_route(x.view(-1, 16), with_bias.router.weight, 2)
        counts += torch.bincount(ids.flatten(), minlength=4).float()
    assert torch.equal(with_bias.load_since_step, counts) and counts.sum() == 2 * 16
    assert torch.equal(without.load_since_step, counts)
    with_bias.eval()
    with_bias(x1)
    assert torch.equal(with_bias.load_since_step, counts)
    assert torch.equal(collect_step_loads(nn.ModuleList([with_bias, without])), torch.stack([counts, counts]))
    assert (with_bias.load_since_step == 0).all() and (without.load_since_step == 0).all()  # read resets


def test_bias_updates_balance_a_skewed_router_without_gradient_steps():
    E, k, N, rate = 8, 2, 256, 0.01
    moe = make_moe(d=16, n_experts=E, topk=k, mult=1, aux_free_bias=rate)
    with torch.no_grad():
        moe.router.weight[0, 0] = 3.0  # most tokens put expert 0 in their top-2
    torch.manual_seed(11)
    x = torch.randn(1, N, 16)
    x[..., 0] = x[..., 0].abs() + 0.5
    weights_before = {k_: v.clone() for k_, v in moe.named_parameters()}

    def counts(bias):
        _, ids, _, _ = route(x.view(-1, 16), moe.router.weight, k, bias=bias)
        return torch.bincount(ids.flatten(), minlength=E).tolist()

    cv_none = cv_of(counts(None))
    assert counts(None)[0] > 0.8 * N and cv_none > 0.8
    moe.train()
    with torch.no_grad():
        for _ in range(150):
            moe(x)
            update_expert_bias(moe, rate, collect_step_loads(moe))
    cv_bias = cv_of(counts(moe.expert_bias))
    assert cv_bias < 0.35 * cv_none, (cv_none, cv_bias, counts(moe.expert_bias))
    assert abs(moe.expert_bias.mean().item()) < 1e-6
    assert moe.expert_bias[0] == moe.expert_bias.min() and moe.expert_bias[0] < -0.3
    for name, p in moe.named_parameters():  # only the buffer moved
        assert torch.equal(p, weights_before[name]), name


def test_expert_bias_is_zero_at_build_and_survives_a_checkpoint(tmp_path):
    config = small_config(use_moe=True, n_experts=4, expert_topk=2, expert_hidden_mult=1, aux_free_bias=0.01,
                          router="sigmoid")
    model = build_model(config, "cpu")
    for m in moe_mod.moe_layers(model):  # built on the meta device: buffers must be zeroed by init
        assert (m.expert_bias == 0).all() and (m.load_since_step == 0).all() and (m.stats == 0).all()
    state = model.state_dict()
    assert "transformer.h.0.mlp.expert_bias" in state and "transformer.h.1.mlp.expert_bias" in state
    assert not any("load_since_step" in k or k.endswith(".stats") for k in state)  # accumulators are transient
    torch.manual_seed(0)
    for m in moe_mod.moe_layers(model):
        m.expert_bias.copy_(torch.randn(4) / 7)
    save_checkpoint(str(tmp_path), 5, model, [], 0, False, loader_state={}, meta={"step": 5})
    other = build_model(config, "cpu")
    load_checkpoint(str(tmp_path), 5, other, None, 0, "cpu")
    for a, b in zip(moe_mod.moe_layers(model), moe_mod.moe_layers(other)):
        assert torch.equal(a.expert_bias, b.expert_bias) and a.expert_bias.abs().sum() > 0
    idx = torch.randint(0, 100, (1, 32))
    model.eval(), other.eval()
    assert torch.equal(model(idx), other(idx))


# ---------------------------------------------------------------------------------------------
# 6. collect_moe_stats on a rigged routing

@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_collect_moe_stats_hand_computed(router):
    # router = 2 * identity and one-hot tokens: token "e" has logit 2 for expert e and 0 elsewhere
    moe = make_moe(d=4, n_experts=4, topk=1, router=router, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(2 * torch.eye(4))
    first = [0, 0, 1, 0, 3, 0, 1, 0, 3, 1]  # counts (5, 3, 0, 2), N=10: C = 3 -> expert 0 drops 2
    second = [1, 1, 1, 0, 0, 3]             # counts (2, 3, 0, 1), N=6:  C = 2 -> expert 1 drops 1
    moe.train()
    z_seen, bal_seen = [], []
    for tokens, shape in ((first, (2, 5)), (second, (2, 3))):
        _, aux = moe(F.one_hot(torch.tensor(tokens), 4).float().view(*shape, 4))
        z_seen.append(aux["z_loss"].item())
        bal_seen.append(aux["balance_loss"].item())
    # every token has the same affinity vector: p for its expert, q for the 3 others
    if router == "softmax":
        p, q = math.e ** 2 / (math.e ** 2 + 3), 1 / (math.e ** 2 + 3)
    else:
        s, h = 1 / (1 + math.exp(-2)), 0.5
        p, q = s / (s + 3 * h), h / (s + 3 * h)
    entropy = -(p * math.log(p) + 3 * q * math.log(q))
    z = math.log(math.e ** 2 + 3) ** 2

    def balance(tokens):
        n = len(tokens)
        f = [tokens.count(e) / n for e in range(4)]
        P = [(tokens.count(e) * p + (n - tokens.count(e)) * q) / n for e in range(4)]
        return 4 * sum(fi * Pi for fi, Pi in zip(f, P))

    assert bal_seen == pytest.approx([balance(first), balance(second)], rel=1e-5)
    assert z_seen == pytest.approx([z, z], rel=1e-5)

    (stats,) = collect_moe_stats(moe)
    counts = [7, 6, 0, 3]  # 16 assignments, mean 4
    assert stats["load"] == pytest.approx([c / 16 for c in counts], abs=1e-5)
    assert stats["cv"] == pytest.approx(math.sqrt((9 + 4 + 16 + 1) / 4) / 4, rel=1e-6)
    assert stats["max_load"] == pytest.approx(7 / 4) and stats["min_load"] == 0.0
    assert stats["dead"] == 1
    assert stats["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert stats["dropped"] == pytest.approx(3 / 16)
    assert stats["balance_loss"] == pytest.approx((balance(first) + balance(second)) / 2, rel=1e-5)
    assert stats["z_loss"] == pytest.approx(z, rel=1e-5)

    # reset after collection; eval-mode forwards do not accumulate
    assert (moe.stats == 0).all()
    moe.eval()
    moe(F.one_hot(torch.tensor(first), 4).float().view(2, 5, 4))
    assert (moe.stats == 0).all()
    (empty,) = collect_moe_stats(moe)
    assert empty["load"] == [0.0] * 4 and empty["dead"] == 4 and empty["cv"] == 0.0 and empty["dropped"] == 0.0


def test_collect_moe_stats_entropy_matches_independent_computation_on_random_routing():
    moe = make_moe(d=16, n_experts=6, topk=2, router="sigmoid")
    x = torch.randn(3, 7, 16)
    moe(x)
    logits = x.view(-1, 16).double() @ moe.router.weight.double().T
    s = torch.sigmoid(logits)
    p = s / s.sum(-1, keepdim=True)
    entropy = -(p * p.log()).sum(-1).mean().item()
    _, ids, _ = ref_route(x.view(-1, 16), moe.router.weight, 2, "sigmoid")
    counts = torch.bincount(ids.flatten(), minlength=6).tolist()
    (stats,) = collect_moe_stats(nn.Sequential(moe))
    assert stats["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert stats["load"] == pytest.approx([c / 42 for c in counts], abs=1e-5)
    assert stats["cv"] == pytest.approx(cv_of(counts), rel=1e-6)
    assert stats["dropped"] == 0.0


def test_top1_router_gets_a_gradient_for_both_routers():
    # With one expert per token, renormalising its weight would give exactly 1 and cut the
    # router off from the loss; top-1 keeps the raw score (Switch) for softmax and sigmoid.
    from nanochat.moe import route
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    for router in ("softmax", "sigmoid"):
        gate = torch.randn(4, 8, requires_grad=True)
        weights, ids, _, logits = route(x, gate, 1, router)
        scores = torch.sigmoid(logits) if router == "sigmoid" else torch.softmax(logits, -1)
        assert torch.allclose(weights, scores.gather(1, ids))
        (weights * torch.randn_like(weights)).sum().backward()
        assert gate.grad.abs().sum() > 1e-3, router
