"""Muon (per-expert orthogonalisation) and the optimizer split."""

import torch

from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import Muon, zeropower_via_newtonschulz5, setup_optimizers


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


def test_muon_on_stacked_experts_equals_muon_on_each_expert():
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 8, 4))
    singles = [torch.nn.Parameter(stacked[e].detach().clone()) for e in range(3)]
    opt_a, opt_b = Muon([stacked], lr=0.1), Muon(singles, lr=0.1)
    for _ in range(3):
        g = torch.randn(3, 8, 4)
        stacked.grad = g.clone()
        for e in range(3):
            singles[e].grad = g[e].clone()
        opt_a.step()
        opt_b.step()
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
