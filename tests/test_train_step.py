"""nanochat/train_step.py: the one training step. The loss terms and their coefficients against a
hand-written sum, gradient accumulation against one big batch, the benchmark's halves against
base_train's call, and the bookkeeping a plain optimizer.step() does (idle experts stay, the
aux-free bias and the MoD thresholds move)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import setup_optimizers
from nanochat.train_step import accumulate_gradients, optimizer_step, train_step, get_lr_multiplier
from tests.plain import PLAIN

BASE = dict(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**{**PLAIN, **BASE, **kw}), "cpu")
    model.train()
    return model


def batch(seed, rows=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, BASE["vocab_size"], (rows, BASE["sequence_len"]), generator=g)
    return x, torch.randint(0, BASE["vocab_size"], (rows, BASE["sequence_len"]), generator=g)


def test_training_loss_is_the_hand_written_sum_of_the_configs_terms():
    model = make(use_moe=True, n_experts=4, balance_loss_coeff=0.03, router_z_loss=0.002, mtp_heads=2, mtp_weight=0.4)
    x, y = batch(1)
    ce, aux = model(x, y)
    expected = ce + 0.03 * aux["balance_loss"] + 0.002 * aux["z_loss"] + 0.4 * (aux["mtp_losses"][0] + aux["mtp_losses"][1]) / 2
    assert model.training_loss(ce, aux).item() == pytest.approx(expected.item(), rel=1e-6)
    assert aux["balance_loss"].item() > 0.5 and aux["z_loss"].item() > 0  # the terms are there to weigh
    dense = make(mtp_weight=0.4)  # a dense model without heads: the cross-entropy alone
    ce, aux = dense(x, y)
    assert torch.equal(dense.training_loss(ce, aux), ce)


def test_accumulation_over_two_halves_equals_one_batch():
    """grad_accum micro-batches of the same rows give the gradient of the whole batch (the loss
    is a mean over equal-size micro-batches), and the logged losses are the micro-batch mean."""
    a, b = make(), make()
    x, y = batch(2, rows=8)
    halves = iter([(x[:4], y[:4]), (x[4:], y[4:])])
    logged = accumulate_gradients(a, a, lambda: next(halves), 2)
    ce, aux = b(x, y)
    b.training_loss(ce, aux).backward()
    assert logged[0].item() == pytest.approx(ce.item(), rel=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bench_step_times_what_base_train_runs():
    """The same batch through bench_step's variant (the step it times) and through train_step as
    base_train calls it: the same loss and the same update, bit for bit."""
    from scripts.bench_step import parse_args, build_variant
    args = parse_args(["--depth", "2", "--n-embd", "64", "--head-dim", "32", "--max-seq-len", "32", "--vocab-size", "128",
                       "--rows", "2", "--variant", "moe:--use-moe --n-experts 4 --mtp-heads 1 --balance-loss-coeff 0.01"])
    (name, flags), = args.variants
    torch.manual_seed(0)
    case = build_variant(name, flags, args, torch.device("cpu"))
    model = case["model"]
    twin = copy.deepcopy(model)
    optimizers = setup_optimizers(twin)
    logged_bench = case["fwd_bwd"]()
    case["opt_step"]()
    logged_train = train_step(twin, twin, optimizers, lambda: case["batch"], 1, lr_multiplier=1.0)
    assert torch.equal(logged_bench, logged_train)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    for a, b in zip(model.buffers(), twin.buffers()):  # the aux-free bias moved alike
        assert torch.equal(a, b)


def test_a_plain_optimizer_step_leaves_idle_experts_alone_and_moves_the_bias():
    """No caller has to remember the idle-expert masks: setup_optimizers' Muon does the
    bookkeeping in a pre-step hook. After a first step in which every expert learns (and builds
    momentum), expert 3 is never chosen (a large negative bias): its weights must not move
    while the others do, and the bias moves by rate x the mean-centred sign of (mean load -
    load), from the step's counts."""
    model = make(use_moe=True, n_experts=4, aux_free_bias=0.05)
    moe = model.transformer.h[0].mlp
    adamw, muon = setup_optimizers(model)
    x, y = batch(3)
    ce, aux = model(x, y)
    model.training_loss(ce, aux).backward()
    adamw.step()
    muon.step()
    model.zero_grad(set_to_none=True)
    assert muon.state[moe.w_proj]["momentum_buffer"][3].norm() > 0  # expert 3 was used: it has momentum
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.expert_bias[3] = -100.0
    before_fc, before_proj, before_bias = moe.w_fc.detach().clone(), moe.w_proj.detach().clone(), moe.expert_bias.clone()
    ce, aux = model(x, y)
    load = moe.load_since_step.clone()
    assert load[3] == 0 and load[:3].sum() == x.numel() * 2
    model.training_loss(ce, aux).backward()
    adamw.step()
    muon.step()  # plain: no active_experts argument
    assert torch.equal(moe.w_fc[3], before_fc[3]) and torch.equal(moe.w_proj[3], before_proj[3])
    assert all(not torch.equal(moe.w_proj[e], before_proj[e]) for e in range(3))
    sign = torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.expert_bias, before_bias + 0.05 * (sign - sign.mean()))
    assert moe.load_since_step.sum() == 0  # counted once per step, then reset


def test_a_plain_optimizer_step_calibrates_the_mod_threshold():
    """The routed block's threshold after the first step is the step's cut: the (B*k)-th largest
    router score of the micro-batch (k = 8 of 32 tokens), recomputed here from the block's input."""
    model = make(mod_capacity=0.25, mod_freq=2)
    block = model.transformer.h[1]
    optimizers = setup_optimizers(model)
    x, y = batch(4)
    with torch.no_grad():  # block 1's router scores on block 0's output, before the step moves anything
        scores = block.mod.scores(F.rms_norm(model.transformer.h[0](
            F.rms_norm(model.transformer.wte(x), (BASE["n_embd"],)), (model.cos[:, :32], model.sin[:, :32]))[0],
            (BASE["n_embd"],)))
    logged = train_step(model, model, optimizers, lambda: (x, y), 1)
    cut = scores.flatten().topk(4 * 8).values.min()
    assert block.mod.updates.item() == 1 and block.mod.kth_sum.sum() == 0
    assert block.mod.threshold.item() == pytest.approx(cut.item(), rel=1e-5)
    assert logged.numel() == 3 + 2  # ce, balance, z, and the routed block's (fraction, agreement)


def test_lr_multiplier_and_momentum_are_applied_to_every_group():
    model = make(use_moe=True, n_experts=4)
    optimizers = setup_optimizers(model)
    x, y = batch(5)
    lrm = get_lr_multiplier(9, 10, 0.0, 0.5, 0.1)  # warm-down: 0.2 of the way from 1 to 0.1 ... at step 9 of 10
    assert lrm == pytest.approx(0.2 * 1.0 + 0.8 * 0.1)
    train_step(model, model, optimizers, lambda: (x, y), 1, lr_multiplier=lrm, muon_momentum=0.9)
    for opt in optimizers:
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(group["initial_lr"] * lrm)
    assert optimizers[1].param_groups[0]["momentum"] == 0.9
    assert all(p.grad is None for p in model.parameters())  # freed after the step


def test_optimizer_step_sets_muon_momentum_and_weight_decay_only_on_muon():
    model = make()
    adamw, muon = setup_optimizers(model, weight_decay=0.01, muon_weight_decay=0.3, cautious_wd=True)
    ce, aux = model(*batch(3))
    model.training_loss(ce, aux).backward()
    optimizer_step(model, [adamw, muon], lr_multiplier=0.5, muon_momentum=0.9, muon_weight_decay=0.1)
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0.1 and g["lr"] == 0.01 for g in muon.param_groups)
    assert all(g["weight_decay"] == 0.01 and g["lr"] == g["initial_lr"] * 0.5 for g in adamw.param_groups)
    optimizer_step(model, [adamw, muon])  # not given: left as they are
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0.1 for g in muon.param_groups)
