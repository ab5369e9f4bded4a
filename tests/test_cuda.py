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
    ref = naive_moe_forward(x.view(-1, 256), moe.router.weight, moe.w_fc, moe.w_proj, 2)
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
