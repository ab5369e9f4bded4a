"""Muon (per-expert orthogonalisation, idle experts left alone) and the optimizer split."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.common import compute_cleanup, exit_distributed_worker
from nanochat.gpt import GPTConfig, build_model
from nanochat.moe import moe_layers
from nanochat.optim import Muon, zeropower_via_newtonschulz5, setup_optimizers, all_reduce_grads
from nanochat.train_step import optimizer_step


def test_newton_schulz_flattens_the_spectrum():
    torch.manual_seed(0)
    G = torch.randn(32, 64) @ torch.diag(torch.logspace(-2, 1, 64))  # condition number 1000
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(G))
    # The quintic iteration trades exactness for speed: singular values land roughly in
    # [0.7, 1.2] (Muon's design), versus 1e-2..1e1 before.
    assert s.min() > 0.5 and s.max() < 1.3


def test_newton_schulz_is_per_matrix_for_stacked_experts():
    torch.manual_seed(0)
    G = torch.randn(4, 48, 16)
    G[2] *= 1000.0  # one expert with a huge gradient must not shrink the others' updates
    batched = zeropower_via_newtonschulz5(G)
    for e in range(4):
        assert torch.allclose(batched[e], zeropower_via_newtonschulz5(G[e]), atol=1e-5)


def stacked_and_single_muon(steps=3, big_expert=1.0, **options):
    """Muon on one stacked (3, 8, 4) expert weight and on its 3 matrices one by one, the same
    gradients (expert 2's times big_expert) for `steps` steps. Returns (stacked, singles, the
    stacked optimizer, the singles' optimizer)."""
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 8, 4))
    singles = [torch.nn.Parameter(stacked[e].detach().clone()) for e in range(3)]
    opt_a, opt_b = Muon([stacked], lr=0.1, **options), Muon(singles, lr=0.1, **options)
    for _ in range(steps):
        g = torch.randn(3, 8, 4)
        g[2] *= big_expert
        stacked.grad = g.clone()
        for e in range(3):
            singles[e].grad = g[e].clone()
        opt_a.step()
        opt_b.step()
    return stacked, singles, opt_a, opt_b


def test_muon_on_stacked_experts_equals_muon_on_each_expert():
    stacked, singles, _, _ = stacked_and_single_muon()
    for e in range(3):
        assert torch.allclose(stacked[e], singles[e], atol=1e-5)


def test_every_parameter_gets_exactly_one_optimizer_and_router_uses_adamw():
    cfg = GPTConfig(sequence_len=16, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                    use_moe=True, n_experts=4, expert_topk=2, expert_hidden_mult=2)
    model = build_model(cfg, "cpu")
    adamw, muon = setup_optimizers(model)
    adam_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert not adam_ids & muon_ids
    assert adam_ids | muon_ids == {id(p) for p in model.parameters()}
    for block in model.transformer.h:
        assert id(block.mlp.router.weight) in adam_ids
        assert id(block.mlp.w_fc) in muon_ids and id(block.mlp.w_proj) in muon_ids
    assert all("initial_lr" in g for opt in (adamw, muon) for g in opt.param_groups)


def test_mamba_scalars_are_never_weight_decayed():
    """--weight-decay decays AdamW's parameters, but not Mamba-2's A_log, D and dt_bias (the
    reference marks them no-decay). With a zero gradient Adam's update is 0, so a parameter
    moves by decoupled weight decay alone: p * (1 - lr * wd)."""
    cfg = GPTConfig(sequence_len=16, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, layer_pattern="AM",
                    mamba_d_state=8, mamba_head_dim=16, mamba_chunk=8)
    model = build_model(cfg, "cpu")
    adamw, muon = setup_optimizers(model, weight_decay=0.1, scalar_lr=0.01, embedding_lr=0.2)
    mamba = model.transformer.h[1].mamba
    with torch.no_grad():
        mamba.conv1d.bias.fill_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    adamw.step()
    for name in ("A_log", "D", "dt_bias"):
        assert torch.equal(getattr(mamba, name), before[f"transformer.h.1.mamba.{name}"]), name
    torch.testing.assert_close(mamba.conv1d.bias, before["transformer.h.1.mamba.conv1d.bias"] * (1 - 0.01 * 0.1))
    wte_lr = 0.2 * (32 / 768) ** -0.5
    torch.testing.assert_close(model.transformer.wte.weight, before["transformer.wte.weight"] * (1 - wte_lr * 0.1))


# ---------------------------------------------------------------------------------------------
# Idle experts: an expert that got no token in an optimizer step is not moved by that step

def idle_moe_model(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                    use_moe=True, n_experts=4, expert_topk=2, expert_hidden_mult=2, aux_free_bias=1e-9)
    return build_model(cfg, "cpu")


def force_idle(model, expert, idle=True):
    """A large negative choice bias: the expert is never picked (a forced-idle expert, the way
    real routing starves one), while the router itself still computes its scores."""
    for m in moe_layers(model):
        m.expert_bias[expert] = -1e4 if idle else 0.0


def step_loads(model):
    """The tokens per expert counted since the last optimizer step, (L, E), read without resetting."""
    return torch.stack([m.load_since_step.clone() for m in moe_layers(model)])


def train_step(model, adamw, muon, micro_batches, before_micro=None):
    """One optimizer step as base_train takes it (train_step.optimizer_step: Muon's pre-step
    hook masks the idle experts; nothing passed here). Returns the step's loads."""
    for i, idx in enumerate(micro_batches):
        if before_micro:
            before_micro(i)
        loss, aux = model(idx, idx)
        (loss + 0.01 * aux["balance_loss"]).backward()
    loads = step_loads(model)
    optimizer_step(model, [adamw, muon])
    return loads


def expert_weights(model, e):
    return [t[e].detach().clone() for m in moe_layers(model) for t in (m.w_fc, m.w_proj)]


def test_forced_idle_expert_is_not_moved_by_muon_but_router_and_others_are():
    model = idle_moe_model()
    adamw, muon = setup_optimizers(model)
    g = torch.Generator().manual_seed(1)
    batch = lambda: [torch.randint(0, 128, (4, 16), generator=g) for _ in range(2)]
    for _ in range(3):  # every expert is used and builds up momentum
        loads = train_step(model, adamw, muon, batch())
    assert (loads > 0).all()
    momentum_before = [muon.state[m.w_fc]["momentum_buffer"][3].norm().item() for m in moe_layers(model)]
    assert min(momentum_before) > 0
    force_idle(model, 3)
    idle_before, busy_before = expert_weights(model, 3), expert_weights(model, 0)
    router_before = [m.router.weight.detach().clone() for m in moe_layers(model)]
    for _ in range(5):
        loads = train_step(model, adamw, muon, batch())
        assert (loads[:, 3] == 0).all() and (loads[:, :3] > 0).all()
    for a, b in zip(expert_weights(model, 3), idle_before):
        assert torch.equal(a, b)  # exactly: not a small step, no step
    assert all(not torch.equal(a, b) for a, b in zip(expert_weights(model, 0), busy_before))
    assert all(not torch.equal(m.router.weight, r) for m, r in zip(moe_layers(model), router_before))
    # its momentum decays (x 0.95 per idle step), it does not keep pushing
    for m, before in zip(moe_layers(model), momentum_before):
        assert muon.state[m.w_fc]["momentum_buffer"][3].norm().item() == pytest.approx(before * 0.95**5, rel=1e-4)


def test_idle_expert_with_garbage_gradient_is_not_moved():
    # Some GPU grouped GEMMs return garbage for empty groups: the rule counts tokens, it does
    # not trust the gradient. Write NaN into the idle expert's gradient before the step.
    model = idle_moe_model()
    adamw, muon = setup_optimizers(model)
    force_idle(model, 1)
    before = expert_weights(model, 1)
    loss, aux = model(torch.randint(0, 128, (4, 16)), torch.randint(0, 128, (4, 16)))
    loss.backward()
    for m in moe_layers(model):
        m.w_fc.grad[1] = float("nan")
        m.w_proj.grad[1] = float("nan")
    muon.step()  # plain: the pre-step hook counts the tokens and masks expert 1
    for a, b in zip(expert_weights(model, 1), before):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_expert_used_in_one_micro_step_only_is_moved():
    # loads count over all micro-steps of the optimizer step: idle in micro-step 0, used in 1
    model = idle_moe_model()
    adamw, muon = setup_optimizers(model)
    before = expert_weights(model, 3)
    micro = [torch.randint(0, 128, (4, 16)) for _ in range(2)]
    loads = train_step(model, adamw, muon, micro, before_micro=lambda i: force_idle(model, 3, idle=(i == 0)))
    assert (loads[:, 3] > 0).all()
    # w_proj moved (at init w_proj = 0, so w_fc has no gradient on this first step)
    assert all(not torch.equal(a, b) for a, b in zip(expert_weights(model, 3)[1::2], before[1::2]))


def _two_rank_worker(rank, port, out):
    # Rank 0 never routes to expert 3, rank 1 does: summed over ranks the expert is active,
    # so both ranks must update it identically.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = idle_moe_model()
    adamw, muon = setup_optimizers(model, world_size=2)
    force_idle(model, 3, idle=(rank == 0))
    idx = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(rank))
    loss, aux = model(idx, idx)
    loss.backward()
    all_reduce_grads(model, 2)
    loads = step_loads(model)
    dist.all_reduce(loads)  # what the hook will sum (it reads the counts itself)
    muon.step()  # plain: the pre-step hook sums the counts over both ranks
    torch.save(dict(loads=loads, w=expert_weights(model, 3)), os.path.join(out, f"rank{rank}.pt"))
    compute_cleanup()
    exit_distributed_worker()  # gloo's threads can abort an interpreter teardown (nanochat/common.py)


def test_idle_on_one_rank_but_used_on_another_is_moved_on_both(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["loads"], r1["loads"]) and (r0["loads"][:, 3] > 0).all()
    before = expert_weights(idle_moe_model(), 3)
    for a, b, w0 in zip(r0["w"], r1["w"], before):
        assert torch.equal(a, b)
    # w_proj moved (at init w_proj = 0, so w_fc has no gradient on this first step)
    assert all(not torch.equal(a, w0) for a, w0 in zip(r0["w"][1::2], before[1::2]))


def test_shard_owners_whole_tensors_balanced_and_deterministic():
    from nanochat.optim import shard_owners
    model = build_model(GPTConfig(sequence_len=16, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                                  use_moe=True, n_experts=4, expert_topk=2, expert_hidden_mult=2), "cpu")
    params = list(model.parameters())
    for world in (2, 3, 4):
        owners = shard_owners(model, world)
        assert set(owners) == set(params) and set(owners.values()) == set(range(world))
        again = shard_owners(model, world)
        assert [owners[p] for p in params] == [again[p] for p in params]  # every rank computes the same map
        loads = [sum(p.numel() for p in params if owners[p] == r) for r in range(world)]
        # greedy largest-first: no rank exceeds the mean by more than the largest tensor
        assert max(loads) - sum(loads) / world <= max(p.numel() for p in params)
    # each rank's optimizers hold exactly its own parameters, all of them between the ranks
    owners = shard_owners(model, 2)
    held = []
    for rank in (0, 1):
        opts = setup_optimizers(model, owners=owners, rank=rank)
        mine = [p for o in opts for g in o.param_groups for p in g["params"]]
        assert all(owners[p] == rank for p in mine)
        held += mine
    assert sorted(map(id, held)) == sorted(map(id, params))
