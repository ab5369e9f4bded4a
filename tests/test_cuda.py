"""The MoE on a CUDA GPU (skipped without one; `runs/gpu_check.sh` runs them on a GPU):
router precision under bf16 autocast, the bf16 grouped-GEMM experts against the per-expert
loop, and idle experts left alone by Muon when the GPU kernels run."""

import pytest
import torch

from nanochat.gpt import GPTConfig, build_model
from nanochat.moe import MoE, route, naive_moe_forward, moe_layers, collect_step_loads, active_expert_masks
from nanochat.optim import setup_optimizers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_route_is_fp32_inside_cuda_bf16_autocast():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(65536, 256, device="cuda", generator=g)
    gate = torch.randn(64, 256, device="cuda", generator=g) * 0.05
    for router in ("softmax", "sigmoid"):
        ref = route(x, gate, 2, router)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = route(x, gate, 2, router)
        assert torch.equal(got[1], ref[1]), (got[1] != ref[1]).any(-1).float().mean().item()
        assert got[0].dtype == torch.float32 and torch.allclose(got[0], ref[0], atol=1e-6)


def test_bf16_grouped_experts_match_the_per_expert_loop():
    torch.manual_seed(0)
    moe = MoE(GPTConfig(n_embd=256, n_head=4, n_kv_head=4, use_moe=True, n_experts=8, expert_topk=2,
                        expert_hidden_mult=2)).cuda()
    moe.init_weights()
    with torch.no_grad():
        torch.nn.init.normal_(moe.router.weight, std=0.5)
        torch.nn.init.normal_(moe.w_proj, std=0.05)
    x = torch.randn(4, 512, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = moe(x)
    ref = naive_moe_forward(x.view(-1, 256), moe.router.weight, moe.w_fc, moe.w_proj, 2, moe.router_kind)
    err = (y.view(-1, 256).float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err


def test_idle_expert_is_not_moved_with_gpu_kernels():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128,
                    use_moe=True, n_experts=8, expert_topk=2, expert_hidden_mult=2, aux_free_bias=1e-9)
    model = build_model(cfg, "cuda")
    adamw, muon = setup_optimizers(model, device_type="cuda")
    for m in moe_layers(model):
        m.expert_bias[5] = -1e4  # expert 5 never chosen
    before = [t[5].clone() for m in moe_layers(model) for t in (m.w_fc, m.w_proj)]
    for _ in range(4):
        idx = torch.randint(0, 512, (8, 128), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, aux = model(idx, idx)
        (loss + 0.01 * aux["balance_loss"]).backward()
        loads = collect_step_loads(model)
        adamw.step()
        muon.step(active_experts=active_expert_masks(model, loads))
        model.zero_grad(set_to_none=True)
        assert (loads[:, 5] == 0).all() and (loads[:, :5] > 0).all()
    after = [t[5] for m in moe_layers(model) for t in (m.w_fc, m.w_proj)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mod_kv_cache_matches_full_forward_on_cuda():
    """Mixture-of-Depths under the causal rule on the GPU (fp32, so the two paths make the same
    choices): a prefill and single decode steps with the packed routed-layer cache give the
    full forward's logits."""
    from nanochat.engine import new_kv_cache
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=512, n_layer=4, n_head=2, n_kv_head=1, n_embd=128, use_moe=True,
                    n_experts=4, expert_topk=2, expert_hidden_mult=2, mod_capacity=0.25, mod_freq=2)
    model = build_model(cfg, "cuda").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "wte" not in name:
                p.normal_(0, p.shape[-1] ** -0.5)
        idx = torch.randint(0, 512, (2, 40), device="cuda")
        full = model(idx)
        cache = new_kv_cache(model, 2, 40)
        pieces = [model(idx[:, :16], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(16, 40)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-3)
    lengths = [cache.lengths[i] for i in model.mod_layers()]
    assert all(0 < n.min() and n.max() < 40 for n in lengths)
