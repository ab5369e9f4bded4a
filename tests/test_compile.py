"""torch.compile: dense and MoE train with zero recompiles while routing changes step to step.

The MoE has static shapes by construction (N*k sorted rows, offsets as data, not shapes), so
one graph must serve every routing, including steps where most experts get no token. After the
warm-up step, `error_on_recompile` turns any recompile into an exception, and the dynamo
counters must not grow. One small model per case: a CPU compile of a tiny GPT takes tens of
seconds, so the steps are few.
"""

import time

import pytest
import torch
import torch._dynamo

from nanochat.gpt import GPTConfig, build_model
from nanochat.moe import moe_layers, collect_moe_stats
from nanochat.optim import setup_optimizers
from tests.plain import PLAIN

N_EXPERTS = 4


def _skew_router(model, step, generator):
    """Deliberately skewed and changing routing: a zero gate (every token ties, so all go to
    experts 0 and 1 and the others get nothing), then gates that favour a different expert
    each step, then a plain random gate. (The optimizer moves the gate between steps too.)"""
    with torch.no_grad():
        for m in moe_layers(model):
            w = m.router.weight
            if step % 3 == 0:
                w.zero_()
            elif step % 3 == 1:
                w.normal_(0.0, 0.1, generator=generator)
                w[step % N_EXPERTS] += 5.0 * torch.randn(w.size(1), generator=generator)
            else:
                w.normal_(0.0, 1.0, generator=generator)


# nanochat's architecture pieces, the short window (128 at sequence_len 160) masking 160 tokens
NANOCHAT = dict(value_embeds=True, layer_lambdas=True, smear=True, backout=True, window_pattern="SL",
                rotary_base=100000.0, qk_scale=1.2, vocab_pad=64, embedding_init_std=0.8, fc_init_scale=0.4,
                cast_weights=True)


def _train_compiled(use_moe, steps=5, mtp_heads=0, mod_capacity=0.0, layer_pattern="A", seq=32, **extra):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=seq, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                       use_moe=use_moe, n_experts=N_EXPERTS, expert_topk=2, expert_hidden_mult=2, mtp_heads=mtp_heads,
                       mod_capacity=mod_capacity, mod_freq=1, layer_pattern=layer_pattern, mamba_d_state=16,
                       mamba_head_dim=32, mamba_chunk=8, **{**PLAIN, **extra})
    model = build_model(config, torch.device("cpu"))
    optimizers = setup_optimizers(model)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)  # as scripts/base_train.py does
    generator = torch.Generator().manual_seed(1)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    loads, losses, graphs_after_warmup, warmup_seconds = [], [], None, None
    try:
        for step in range(steps):
            if use_moe:
                _skew_router(model, step, generator)
            x = torch.randint(0, 128, (4, seq), generator=generator)
            y = torch.randint(0, 128, (4, seq), generator=generator)
            with torch.no_grad():
                eager_loss, _ = model(x, y)
            t0 = time.time()
            loss, aux = compiled(x, y)
            (loss + 0.01 * aux["balance_loss"] + 0.3 * aux["mtp_losses"].sum()).backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            losses.append((loss.item(), eager_loss.item()))
            if use_moe:
                loads.append([s["load"] for s in collect_moe_stats(model)])
            if step == 0:
                warmup_seconds = time.time() - t0
                graphs_after_warmup = counters["stats"]["unique_graphs"]
                torch._dynamo.config.error_on_recompile = True  # from here on a recompile raises
    finally:
        torch._dynamo.config.error_on_recompile = False
    return dict(graphs_after_warmup=graphs_after_warmup, graphs=counters["stats"]["unique_graphs"],
                recompiles=sum(counters["recompiles"].values()), loads=loads, losses=losses,
                warmup_seconds=warmup_seconds)


@pytest.mark.parametrize("use_moe,mtp_heads,mod_capacity,layer_pattern",
                         [(False, 0, 0.0, "A"), (True, 0, 0.0, "A"), (True, 2, 0.0, "A"), (True, 0, 0.25, "A"), (True, 0, 0.0, "AM")],
                         ids=["dense", "moe", "moe_mtp2", "moe_mod", "moe_hybrid"])
def test_compiled_training_never_recompiles(use_moe, mtp_heads, mod_capacity, layer_pattern):
    """moe_mod: every block routed (MoD picks 8 of 32 tokens, the MoE their experts); which
    tokens changes every step, the shapes never do."""
    r = _train_compiled(use_moe, mtp_heads=mtp_heads, mod_capacity=mod_capacity, layer_pattern=layer_pattern)
    print(f"compile + first step: {r['warmup_seconds']:.1f} s, graphs {r['graphs']}")
    assert r["graphs_after_warmup"] >= 1
    assert r["graphs"] == r["graphs_after_warmup"], "a later step compiled a new graph"
    assert r["recompiles"] == 0
    for compiled_loss, eager_loss in r["losses"]:
        # experts run in bf16 under compile on CPU (the grouped GEMM's compiled kernel wants bf16)
        assert compiled_loss == pytest.approx(eager_loss, rel=2e-2)
    if use_moe:
        per_step = [[round(v, 3) for layer in step for v in layer] for step in r["loads"]]
        # the routing really changed between steps, and some steps left experts without a token
        assert all(a != b for a, b in zip(per_step, per_step[1:]))
        assert any(v == 0 for s in per_step for v in s)


def test_nanochat_features_compile_without_recompiles():
    """Value embeddings, lambdas, smear, backout, a sliding window that masks, padded vocab and
    cast weights, on an MoE with an MTP head: one graph for every step."""
    r = _train_compiled(True, steps=3, mtp_heads=1, seq=160, **NANOCHAT)
    assert r["graphs"] == r["graphs_after_warmup"] >= 1 and r["recompiles"] == 0
    for compiled_loss, eager_loss in r["losses"]:
        assert compiled_loss == pytest.approx(eager_loss, rel=2e-2)
