"""MoE: router, dispatch, grouped experts and combine, checked against the per-expert loop."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import GPTConfig
from nanochat.moe import (MoE, route, dispatch, switch_balance_loss, grouped_linear, naive_moe_forward,
                          expert_hidden_dim, expert_counts, inverse_permutation, gather_tokens, combine, capacity_slots)


def make_moe(d=32, n_experts=4, topk=2, mult=2, seed=0, router="softmax"):
    torch.manual_seed(seed)
    moe = MoE(GPTConfig(n_embd=d, n_head=2, n_kv_head=2, use_moe=True, n_experts=n_experts,
                        expert_topk=topk, expert_hidden_mult=mult, router=router))
    # Random (non-zero) weights everywhere, so every path carries signal.
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    torch.nn.init.normal_(moe.w_fc, std=d**-0.5)
    torch.nn.init.normal_(moe.w_proj, std=0.1)
    return moe


def test_route_matches_softmax_topk():
    torch.manual_seed(0)
    x, gate = torch.randn(50, 16), torch.randn(6, 16)
    weights, ids, probs, _ = route(x, gate, 3)
    ref_probs = torch.softmax(x @ gate.T, dim=-1)
    assert torch.allclose(probs, ref_probs, atol=1e-6)
    for t in range(50):
        top = sorted(range(6), key=lambda e: -ref_probs[t, e].item())[:3]
        assert sorted(ids[t].tolist()) == sorted(top)
        expected = ref_probs[t, ids[t]] / ref_probs[t, ids[t]].sum()
        assert torch.allclose(weights[t], expected, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(50), atol=1e-6)


def test_top1_weight_is_raw_probability():
    torch.manual_seed(0)
    x, gate = torch.randn(20, 8), torch.randn(4, 8)
    weights, ids, probs, _ = route(x, gate, 1)
    assert torch.allclose(weights[:, 0], probs.gather(1, ids)[:, 0])


def test_dispatch_groups_each_assignment_once():
    torch.manual_seed(0)
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(37)])  # (37, 2), distinct per token
    order, token_ids, offsets = dispatch(ids, 5)
    flat = ids.flatten()
    assert sorted(order.tolist()) == list(range(74))                  # a permutation
    assert (torch.diff(flat[order]) >= 0).all()                         # grouped by expert
    assert torch.equal(token_ids, order // 2)
    counts = [int((flat == e).sum()) for e in range(5)]
    assert offsets.tolist() == list(torch.tensor(counts).cumsum(0))
    assert offsets.dtype == torch.int32
    # every token appears exactly k times
    assert torch.bincount(token_ids, minlength=37).tolist() == [2] * 37


def test_expert_counts_match_bincount_with_empty_experts():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3]])
    assert expert_counts(ids, 6).tolist() == [2, 1, 0, 3, 0, 0]
    ids = torch.randint(0, 7, (100, 3))
    assert torch.equal(expert_counts(ids, 9), torch.bincount(ids.flatten(), minlength=9))


@pytest.mark.parametrize("topk", [1, 2, 3])
def test_gather_and_combine_gradients_match_plain_indexing(topk):
    """The permutation gathers with gather-only backward give the gradients autograd computes
    for plain indexing / index_copy (the scatter-add formulation)."""
    torch.manual_seed(topk)
    n, d, e = 23, 5, 4
    ids = torch.stack([torch.randperm(e)[:topk] for _ in range(n)])
    order, token_ids, _ = dispatch(ids, e)
    inverse = inverse_permutation(order)
    assert torch.equal(order[inverse], torch.arange(n * topk))
    x = torch.randn(n, d, requires_grad=True)
    g_sorted = torch.randn(n * topk, d)
    ours = gather_tokens(x, token_ids, inverse, topk)
    (gx,) = torch.autograd.grad(ours, x, g_sorted)
    ref = x[token_ids]
    (gx_ref,) = torch.autograd.grad(ref, x, g_sorted)
    assert torch.equal(ours, ref) and torch.allclose(gx, gx_ref, atol=1e-6)
    y_sorted = torch.randn(n * topk, d, requires_grad=True)
    w = torch.rand(n, topk, requires_grad=True)
    g_out = torch.randn(n, d)
    out = combine(y_sorted, order, inverse, w)
    y_tok = torch.zeros(n * topk, d).index_copy(0, order, y_sorted).view(n, topk, d)
    out_ref = (w.unsqueeze(-1) * y_tok).sum(1)
    assert torch.allclose(out, out_ref, atol=1e-6)
    grads = torch.autograd.grad(out, (y_sorted, w), g_out)
    grads_ref = torch.autograd.grad(out_ref, (y_sorted, w), g_out)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("d,n_experts,topk,mult", [(32, 4, 2, 2), (32, 8, 1, 4), (16, 8, 8, 0.5), (6, 3, 2, 1)])
def test_moe_matches_reference_loop_forward_and_backward(d, n_experts, topk, mult, router):
    # (6, 3, 2, 1): width 6 fp32 is not 16-byte aligned -> exercises the slice-loop fallback.
    moe = make_moe(d, n_experts, topk, mult, router=router)
    x = torch.randn(3, 11, d, requires_grad=True)
    y, _ = moe(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in (moe.router.weight, moe.w_fc, moe.w_proj)]

    x2 = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in (moe.router.weight, moe.w_fc, moe.w_proj)]
    ref = naive_moe_forward(x2.view(-1, d), *params, topk, router).view_as(y)
    (ref * g).sum().backward()
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, [x2.grad] + [p.grad for p in params]):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_gradients_reach_selected_experts_and_router_only():
    moe = make_moe(d=32, n_experts=8, topk=2)
    x = torch.randn(1, 5, 32)  # few tokens: some experts are not selected
    y, _ = moe(x)
    (y * torch.randn_like(y)).sum().backward()
    _, ids, _, _ = route(x.view(-1, 32), moe.router.weight, 2)
    selected = set(ids.flatten().tolist())
    assert len(selected) < 8
    for e in range(8):
        got_grad = moe.w_fc.grad[e].abs().sum() > 0 and moe.w_proj.grad[e].abs().sum() > 0
        assert got_grad == (e in selected), f"expert {e}"
    assert moe.router.weight.grad.abs().sum() > 0


def test_experts_with_no_tokens_are_fine():
    moe = make_moe(d=32, n_experts=6, topk=2)
    with torch.no_grad():  # make experts 0 and 1 win every token by a wide margin
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 50.0
        moe.router.weight[1, 0] = 40.0
    x = torch.randn(2, 9, 32)
    x[..., 0] = x[..., 0].abs() + 1.0
    y, losses = moe(x)
    balance = losses["balance_loss"]
    _, ids, _, _ = route(x.view(-1, 32), moe.router.weight, 2)
    assert set(ids.flatten().tolist()) == {0, 1}
    ref = naive_moe_forward(x.view(-1, 32), moe.router.weight, moe.w_fc, moe.w_proj, 2)
    assert torch.allclose(y.view(-1, 32), ref, atol=1e-5)
    y.sum().backward()
    assert moe.w_fc.grad[2:].abs().sum() == 0 and moe.w_proj.grad[2:].abs().sum() == 0
    assert torch.isfinite(moe.w_fc.grad).all()
    # all assignments on 2 of 6 experts: f = (1/2, 1/2, 0, 0, 0, 0) -> loss = 6 * (P0 + P1) / 2 ~ 3
    assert balance.item() == pytest.approx(3.0, abs=1e-3)


def test_balance_loss_uniform_router_is_one():
    # Gate at zero (its init): P_i = 1/E for every token, so N * sum f_i / N = sum f_i = 1
    # whatever the (tie-broken) top-k picked.
    moe = MoE(GPTConfig(n_embd=16, n_head=1, n_kv_head=1, use_moe=True, n_experts=8, expert_topk=2, expert_hidden_mult=2))
    torch.nn.init.zeros_(moe.router.weight)
    torch.nn.init.normal_(moe.w_fc)
    torch.nn.init.zeros_(moe.w_proj)
    _, losses = moe(torch.randn(2, 7, 16))
    balance = losses["balance_loss"]
    assert balance.item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_hand_computed():
    # 2 tokens, 3 experts, top-1.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1]])
    ids = torch.tensor([[0], [1]])
    # f = (1/2, 1/2, 0), P = (0.55, 0.35, 0.10) -> 3 * (0.275 + 0.175) = 1.35
    assert switch_balance_loss(probs, ids, 3).item() == pytest.approx(1.35, abs=1e-6)
    # top-2 on the same probs: ids (0,1) and (1,0): f = (1/2, 1/2, 0) again
    assert switch_balance_loss(probs, torch.tensor([[0, 1], [1, 0]]), 3).item() == pytest.approx(1.35, abs=1e-6)
    # perfectly balanced routing with matching probabilities reaches the minimum, 1
    uniform = torch.full((4, 4), 0.25)
    assert switch_balance_loss(uniform, torch.tensor([[0], [1], [2], [3]]), 4).item() == pytest.approx(1.0)


def test_balance_loss_gradient_pushes_away_from_overloaded_expert():
    logits = torch.zeros(4, 3, requires_grad=True)
    probs = torch.softmax(logits, -1)
    loss = switch_balance_loss(probs, torch.tensor([[0], [0], [0], [1]]), 3)
    loss.backward()
    # dL/dlogit_j = (N/T) * P_j (f_j - sum_i f_i P_i): overloaded expert 0 gets a positive gradient
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 2] < 0).all()


def test_grouped_linear_fallback_equals_grouped_mm():
    torch.manual_seed(0)
    x, w = torch.randn(20, 16), torch.randn(3, 8, 16)
    offsets = torch.tensor([5, 5, 20], dtype=torch.int32)
    fast = grouped_linear(x, w, offsets)
    ref = torch.cat([x[:5] @ w[0].T, x[5:5] @ w[1].T, x[5:] @ w[2].T])
    assert torch.allclose(fast, ref, atol=1e-5)
    # unaligned width (fp32 row stride 12 bytes) takes the slice loop and gives the same math
    x6, w6 = x[:, :3].contiguous(), w[:, :, :3].contiguous()
    ref6 = torch.cat([x6[:5] @ w6[0].T, x6[5:] @ w6[2].T])
    assert torch.allclose(grouped_linear(x6, w6, offsets), ref6, atol=1e-5)


def test_expert_hidden_dim_allows_fractions():
    cfg = GPTConfig(n_embd=64, use_moe=True, expert_hidden_mult=0.5)
    assert expert_hidden_dim(cfg) == 32
    assert expert_hidden_dim(GPTConfig(n_embd=64, use_moe=True, expert_hidden_mult=2)) == 128


def test_moe_iso_flops_output_scale_matches_dense_mlp_at_init():
    # With uniform routing and renormalised top-k weights, the MoE output is a convex
    # combination of expert outputs: its scale stays that of one MLP (not k times it).
    moe = make_moe(d=32, n_experts=4, topk=2)
    x = torch.randn(4, 8, 32)
    y, _ = moe(x)
    per_expert = [F.linear(F.relu(F.linear(x.view(-1, 32), moe.w_fc[e])).square(), moe.w_proj[e]) for e in range(4)]
    bound = torch.stack(per_expert).abs().amax(0)
    assert (y.view(-1, 32).abs() <= bound + 1e-5).all()
    assert math.isfinite(y.abs().mean().item())


# ---------------------------------------------------------------------------------------------
# Router precision, capacity priority, dropless evaluation

def test_route_is_fp32_inside_bf16_autocast():
    # Under CPU bf16 autocast, F.linear runs in bf16 even on fp32 operands; near-equal logits
    # then flip top-k choices (measured 0.8-2.7% of tokens). route() must not be affected.
    g = torch.Generator().manual_seed(0)
    x, gate = torch.randn(4096, 64, generator=g), torch.randn(64, 64, generator=g) * 0.1
    for router in ("softmax", "sigmoid"):
        ref = route(x, gate, 2, router)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = route(x, gate, 2, router)
        assert torch.equal(got[1], ref[1]), (router, (got[1] != ref[1]).any(-1).float().mean().item())
        for a, b in zip(got[:1] + got[2:], ref[:1] + ref[2:]):
            assert a.dtype == torch.float32 and torch.equal(a, b)


def test_capacity_first_choices_win_over_second_choices():
    # Expert 0 has room for 1 assignment. Token 0 picks it second, token 1 picks it first:
    # token 1's first choice wins (GShard), although token 0 comes earlier.
    ids = torch.tensor([[1, 0], [0, 2], [2, 1]])
    order, token_ids, offsets = dispatch(ids, 3, choice_major=True)
    assert offsets.tolist() == [2, 4, 6]
    # within every expert: first choices in token order, then second choices
    assert token_ids.tolist() == [1, 0, 0, 2, 2, 1]
    slots, kept = capacity_slots(ids, order, offsets, capacity=1)
    kept_pairs = {(int(order[i]) // 2, int(order[i]) % 2) for i in range(6) if kept[i]}
    assert kept_pairs == {(1, 0), (0, 0), (2, 0)}  # (token, choice): every first choice kept
    # token order alone (no capacity) is the plain stable sort
    _, token_ids, _ = dispatch(ids, 3)
    assert token_ids.tolist() == [0, 1, 0, 2, 1, 2]


def test_eval_is_dropless_whatever_the_capacity_factor():
    torch.manual_seed(0)
    capped = MoE(GPTConfig(n_embd=32, n_head=1, n_kv_head=1, use_moe=True, n_experts=4, expert_topk=2,
                           expert_hidden_mult=2, capacity_factor=1.0))
    dropless = MoE(GPTConfig(n_embd=32, n_head=1, n_kv_head=1, use_moe=True, n_experts=4, expert_topk=2,
                             expert_hidden_mult=2))
    capped.init_weights()
    with torch.no_grad():
        nn.init.normal_(capped.w_proj, std=0.2)
        capped.router.weight[0] += 0.5  # skewed: expert 0 overflows its training capacity
    dropless.load_state_dict(capped.state_dict())
    x = torch.randn(3, 16, 32)
    assert not torch.allclose(capped(x)[0], dropless(x)[0], atol=1e-4)  # training: capacity drops tokens
    capped.eval()
    with torch.no_grad():
        alone = capped(x[:1])[0]
        together = capped(x)[0]
    # one sequence's output does not depend on its batch mates, and equals the dropless layer
    assert torch.allclose(alone, together[:1], atol=1e-6)
    assert torch.allclose(together, dropless(x)[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The GPU-cost changes: each gives the same numbers as before (fp32), or within a stated
# tolerance where it changes a bf16 path


def test_combine_is_each_tokens_weighted_sum_forward_and_backward():
    """combine (a gather back to token order and an fp32 sum over k) against the batched
    (1 x k) @ (k x d) product it replaces, on the same dispatch: outputs and gradients."""
    torch.manual_seed(0)
    n, k, d, E = 37, 3, 16, 5
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(n)])
    order, token_ids, offsets = dispatch(ids, E)
    inverse = inverse_permutation(order)
    y_sorted = torch.randn(n * k, d, requires_grad=True)
    weights = torch.rand(n, k, requires_grad=True)
    out = combine(y_sorted, order, inverse, weights)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (y_sorted, weights))
    y_tok = y_sorted[inverse].view(n, k, d)  # row t*k + j of token-major order
    ref = torch.bmm(weights.unsqueeze(1), y_tok).squeeze(1)
    ref_grads = torch.autograd.grad((ref * g).sum(), (y_sorted, weights))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_experts", [8, 300])
@pytest.mark.parametrize("choice_major", [False, True])
def test_dispatch_with_narrow_keys_is_the_stable_int64_sort(n_experts, choice_major):
    torch.manual_seed(1)
    ids = torch.stack([torch.randperm(n_experts)[:2] for _ in range(500)])
    order, token_ids, offsets = dispatch(ids, n_experts, choice_major=choice_major)
    if choice_major:
        by_choice = torch.argsort(ids.t().flatten(), stable=True)
        ref = (by_choice % 500) * 2 + by_choice // 500
    else:
        ref = torch.argsort(ids.flatten(), stable=True)
    assert torch.equal(order, ref) and torch.equal(token_ids, ref // 2)
    assert torch.equal(offsets.long(), torch.bincount(ids.flatten(), minlength=n_experts).cumsum(0))


def test_bf16_dispatch_and_combine_stay_close_to_fp32(monkeypatch):
    """The bf16 path as CUDA autocast runs it (tokens gathered in bf16, bf16 grouped GEMMs, the
    combine in fp32), emulated on the CPU by making the experts' dtype bf16: outputs within 1%
    and gradients within 3% (relative max error) of the fp32 layer."""
    import nanochat.moe as moe_mod
    moe = make_moe(d=64, n_experts=8, topk=2, mult=2, router="sigmoid")
    x = torch.randn(4, 32, 64)
    g = torch.randn(4, 32, 64)

    def run():
        xi = x.clone().requires_grad_()
        moe.zero_grad()
        y, _ = moe(xi)
        (y.float() * g).sum().backward()
        return y.float(), [xi.grad.clone()] + [p.grad.clone() for p in (moe.router.weight, moe.w_fc, moe.w_proj)]

    y32, g32 = run()
    monkeypatch.setattr(moe_mod, "_autocast_dtype", lambda t: torch.bfloat16)
    seen = []
    real_gather = moe_mod.gather_tokens
    monkeypatch.setattr(moe_mod, "gather_tokens", lambda t, *a: seen.append(t.dtype) or real_gather(t, *a))
    y16, g16 = run()
    assert seen == [torch.bfloat16]  # the gather moved bf16 rows
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    assert y16.dtype == torch.float32 and rel(y16, y32) < 1e-2
    for a, b in zip(g16, g32):
        assert rel(a, b) < 3e-2


def test_router_logits_stay_fp32_accurate_where_matmuls_run_as_tf32(monkeypatch):
    """On CUDA with TF32 allowed, a plain fp32 matmul reads 10-bit mantissas: emulated here by
    rounding F.linear's operands. The three-product split keeps the logits fp32-accurate and
    chooses the experts fp32 chooses, where plain TF32 flips near-tied choices."""
    from nanochat.moe import fp32_linear, tf32_round
    torch.manual_seed(0)
    d, E = 256, 8
    x = F.rms_norm(torch.randn(16384, d), (d,))
    w = torch.randn(E, d) * 0.1 * d**-0.5  # the router's init: near-uniform scores, many near-ties
    exact = x.double() @ w.double().T
    fp32 = F.linear(x, w)
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda a, b: real_linear(tf32_round(a), tf32_round(b)))
    plain = fp32_linear(x, w, split=False)
    split = fp32_linear(x, w, split=True)
    err = lambda t: (t.double() - exact).abs().max().item()
    assert err(split) < 2 * err(fp32) + 1e-9 and err(plain) > 20 * err(split)
    choose = lambda logits: torch.topk(torch.sigmoid(logits.double()), 2).indices.sort(-1).values
    flips = lambda t: int((choose(t) != choose(fp32)).any(-1).sum())
    assert flips(split) == 0 and flips(plain) > 0
    assert torch.equal(tf32_round(torch.tensor([1 + 2**-10, 1 + 2**-11, 1 + 3 * 2**-11])),
                       torch.tensor([1 + 2**-10, 1.0, 1 + 2**-9]))  # round to nearest, ties to even


def test_a_training_step_asks_for_no_host_sync(monkeypatch):
    """An eager MoE training step (forward, backward, the optimizer with its bookkeeping) in
    which our code reads nothing back to the host: .item(), .tolist(), bool(), float(), int()
    on a tensor, or torch.tensor(number, device=...), called from nanochat/, raise. On a GPU
    each would stall the host until the queue drains (torch.cuda.set_sync_debug_mode checks the
    same there)."""
    import os
    import sys
    import nanochat
    from nanochat.gpt import build_model
    from nanochat.optim import setup_optimizers
    from nanochat.train_step import train_step
    root = os.path.dirname(nanochat.__file__)

    def guard(real, name):
        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(root):
                raise AssertionError(f"host sync: {name} called from {caller}:{sys._getframe(1).f_lineno}")
            return real(*args, **kwargs)
        return wrapped

    cfg = GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, use_moe=True,
                    n_experts=8, expert_topk=2, balance_loss_coeff=0.01, router_z_loss=0.001)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    optimizers = setup_optimizers(model)
    batch = torch.randint(0, 128, (4, 32))
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, guard(getattr(torch.Tensor, name), f"Tensor.{name}"))
    monkeypatch.setattr(torch, "tensor", guard(torch.tensor, "torch.tensor"))
    losses = train_step(model, model, optimizers, lambda: (batch, batch), 2)
    monkeypatch.undo()
    # the step ran whole: losses, and the bookkeeping moved the aux-free bias
    assert torch.isfinite(losses).all() and model.transformer.h[0].mlp.expert_bias.abs().sum() > 0
