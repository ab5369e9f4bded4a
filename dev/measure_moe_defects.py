"""
Dev-only: the size of the five MoE defects fixed in nanochat (idle experts moved by Muon,
aux losses averaged over layers, zero router init, bf16 routing under autocast, capacity in
evaluation), each measured with the old behaviour re-enacted next to the current code.
Numbers go to dev/LOG.md.

    OMP_NUM_THREADS=2 python dev/measure_moe_defects.py
"""

import torch
import torch.nn.functional as F

from nanochat.gpt import GPTConfig, build_model
from nanochat.moe import route, moe_layers, collect_step_loads, active_expert_masks
from nanochat.optim import setup_optimizers


def small_moe(**kw):
    cfg = dict(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, use_moe=True,
               n_experts=8, expert_topk=2, expert_hidden_mult=2, aux_free_bias=1e-9)
    return build_model(GPTConfig(**{**cfg, **kw}), "cpu")


def idle_expert_update_rms(masked, warm_steps=10, idle_steps=40):
    """RMS per step of an expert's w_proj update while it receives no token."""
    torch.manual_seed(0)
    model = small_moe()
    adamw, muon = setup_optimizers(model)
    g = torch.Generator().manual_seed(1)
    rms = []
    for step in range(warm_steps + idle_steps):
        if step == warm_steps:
            for m in moe_layers(model):
                m.expert_bias[3] = -1e4
        before = moe_layers(model)[0].w_proj[3].detach().clone()
        idx = torch.randint(0, 512, (8, 64), generator=g)
        loss, aux = model(idx, idx)
        (loss + 0.01 * aux["balance_loss"]).backward()
        loads = collect_step_loads(model)
        adamw.step()
        muon.step(active_experts=active_expert_masks(model, loads) if masked else None)
        model.zero_grad(set_to_none=True)
        if step >= warm_steps:
            rms.append((moe_layers(model)[0].w_proj[3] - before).square().mean().sqrt().item())
    return rms


def dead_experts_at_init(zero_router, n_experts=64):
    torch.manual_seed(0)
    model = small_moe(n_experts=n_experts, n_layer=1)
    if zero_router:
        torch.nn.init.zeros_(moe_layers(model)[0].router.weight)
    idx = torch.randint(0, 512, (16, 64))
    model(idx, idx)
    return int((moe_layers(model)[0].load_since_step == 0).sum())


def top2_changed_under_autocast(fp32_route):
    torch.manual_seed(0)
    x, gate = torch.randn(16384, 128), torch.randn(8, 128) * 0.1
    ref = route(x, gate, 2)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if fp32_route:
            got = route(x, gate, 2)[1]
        else:  # the old router: F.linear on fp32 operands, which autocast runs in bf16
            got = torch.topk(torch.softmax(F.linear(x.float(), gate.float()).float(), -1), 2).indices
    return (got.sort(-1).values != ref.sort(-1).values).any(-1).float().mean().item()


def batch_mate_effect(capacity_in_eval):
    """Max |logit difference| of one sequence evaluated alone vs with 7 batch mates."""
    torch.manual_seed(0)
    model = small_moe(capacity_factor=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.train(capacity_in_eval)  # the old eval ran the capacity path: what train() does now
    idx = torch.randint(0, 512, (8, 64))
    with torch.no_grad():
        return (model(idx[:1]) - model(idx)[:1]).abs().max().item()


if __name__ == "__main__":
    old, new = idle_expert_update_rms(False), idle_expert_update_rms(True)
    print(f"1. idle expert w_proj update RMS per step over 40 idle steps: old first/last/min "
          f"{old[0]:.2e}/{old[-1]:.2e}/{min(old):.2e}; new max {max(new):.1e}")
    model = small_moe(n_layer=4)
    print(f"2. aux losses: {model.num_moe_layers()} MoE layers; old coefficient per router = coeff/{model.num_moe_layers()}, "
          f"new = coeff (GPT.forward sums)")
    print(f"3. dead experts of 64 (top-2) after one forward of 1024 tokens at init: zero router "
          f"{dead_experts_at_init(True)}, small random router {dead_experts_at_init(False)}")
    print(f"4. tokens whose top-2 set changes under CPU bf16 autocast: old {100 * top2_changed_under_autocast(False):.2f}%, "
          f"new {100 * top2_changed_under_autocast(True):.2f}%")
    print(f"5. max logit change of a sequence from its 7 batch mates (capacity 1.0): old {batch_mate_effect(True):.3f}, "
          f"new {batch_mate_effect(False):.3g}")
