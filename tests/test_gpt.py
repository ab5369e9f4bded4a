"""GPT: shapes, dense path, parameter and FLOPs accounting against hand counts, iso-FLOPs."""

import math

import pytest
import torch

from nanochat.gpt import GPTConfig, MLP, build_model
from nanochat.report import describe_params
from nanochat.moe import MoE
from tests.plain import PLAIN


def dense_cfg(**kw):
    return GPTConfig(**{**PLAIN, **dict(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64),
                        **kw})


def moe_cfg(**kw):
    return GPTConfig(**{**PLAIN, **dict(sequence_len=32, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                                        use_moe=True, n_experts=8, expert_topk=2, moe_freq=2, expert_hidden_mult=2),
                        **kw})


def test_shapes_and_losses():
    model = build_model(moe_cfg(), "cpu")
    idx = torch.randint(0, 512, (3, 32))
    logits = model(idx)
    assert logits.shape == (3, 32, 512) and logits.dtype == torch.float32
    assert logits.abs().max() < 15.0  # softcap
    loss, aux = model(idx, idx)
    assert loss.shape == () and aux["balance_loss"].shape == () and aux["z_loss"].shape == ()
    per_token, _ = model(idx, idx, loss_reduction="none")
    assert per_token.shape == (3, 32)
    assert per_token.mean().item() == pytest.approx(loss.item(), rel=1e-5)
    # at init the lm_head is tiny, so the loss is ~ln(vocab)
    assert loss.item() == pytest.approx(math.log(512), abs=0.05)
    # ignore_index=-1 drops targets
    targets = idx.clone()
    targets[:, :16] = -1
    masked, _ = model(idx, targets)
    assert masked.item() == pytest.approx(per_token[:, 16:].mean().item(), rel=1e-5)


def test_dense_path_has_no_moe():
    model = build_model(dense_cfg(), "cpu")
    assert all(isinstance(b.mlp, MLP) and not b.is_moe for b in model.transformer.h)
    loss, aux = model(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16)))
    assert aux["balance_loss"].item() == 0.0 and aux["z_loss"].item() == 0.0
    # 2 layers x (4 x 64^2 attention + 8 x 64^2 MLP) + 2 x 512 x 64 embedding/head = 163,840
    assert "Active Params/tok: 163,840 (163.8K) (dense model: every parameter)" in describe_params(model)


def test_report_of_the_quickstart_moe_has_exact_counts_and_sparsity():
    """The quickstart's MoE with the default pieces (value embeddings on layers 1 and 3)."""
    model = build_model(GPTConfig(sequence_len=256, vocab_size=2048, n_layer=4, n_head=2, n_kv_head=2, n_embd=128,
                                  use_moe=True, n_experts=8, expert_topk=2, expert_hidden_mult=2), "cpu")
    # per layer: attention 4 x 128^2 = 65,536; 8 experts x 2 x 128 x 256 = 524,288; router 8 x 128 = 1,024;
    # plus embedding and head 2 x 2048 x 128 = 524,288; value embeddings on layers 1 and 3 (alternating,
    # ending at the last): 2 x 2048 x 128 = 524,288, and their gates 2 x (2 kv heads x 12 channels) = 48.
    # Inactive: 6 of 8 experts x 4 layers = 1,572,864 (a value embedding is read for every token: active)
    total = 4 * (65_536 + 524_288 + 1_024) + 524_288 + 524_288 + 48
    active = total - 1_572_864
    assert (total, active) == (3_412_016, 1_839_152)
    report = describe_params(model).splitlines()
    assert report[:5] == ["Total Parameters: 3,412,016 (3.41M)",
                          "Active Params/tok: 1,839,152 (1.84M), top-2 of 8 experts",
                          "Inactive Params: 1,572,864 (1.57M), 24 experts idle per token",
                          f"Sparsity: {100 * 1_572_864 / total:.1f}% (inactive per forward pass)",
                          f"Efficiency: {100 * active / total:.1f}% active per forward pass"]
    assert report[3] == "Sparsity: 46.1% (inactive per forward pass)"


def test_moe_freq_selects_layers():
    model = build_model(moe_cfg(n_layer=6, moe_freq=3), "cpu")
    assert [b.is_moe for b in model.transformer.h] == [False, False, True, False, False, True]
    model = build_model(moe_cfg(n_layer=3, moe_freq=1), "cpu")
    assert all(isinstance(b.mlp, MoE) for b in model.transformer.h)


def test_accounting_dense_hand_count():
    model = build_model(dense_cfg(), "cpu")
    c = model.num_scaling_params()
    # wte 512*64, lm_head 512*64, attn 2 layers x 4 * 64*64, mlp 2 layers x 2 * 64*256
    assert c["wte"] == 32768 and c["lm_head"] == 32768
    assert c["attn"] == 32768 and c["mlp"] == 65536
    assert c["total"] == 163840 == sum(p.numel() for p in model.parameters())
    assert c["moe_inactive"] == 0 and c["active_total"] == 163840
    # 6 * (163840 - 32768) + 12 * L * H * head_dim * T = 786432 + 12*2*2*32*32
    assert model.estimate_flops() == 835584


def test_accounting_moe_hand_count():
    model = build_model(moe_cfg(), "cpu")
    c = model.num_scaling_params()
    # attn with GQA (4 q heads, 2 kv heads of 16): 4096 + 2048 + 2048 + 4096 per layer, 4 layers
    assert c["attn"] == 49152
    # layers 1, 3 are MoE; 0, 2 dense MLPs of 2 * 64*256
    assert c["mlp"] == 65536
    # each MoE layer: 8 experts x (64*128 + 128*64) = 131072, router 8*64
    assert c["experts"] == 262144 and c["router"] == 1024
    assert c["total"] == 443392 == sum(p.numel() for p in model.parameters())
    # idle per token: 2 layers x 6 experts x 16384
    assert c["moe_inactive"] == 196608
    assert c["active_total"] == 246784
    # 6 * (246784 - 32768) + 12 * 4 * 4 * 16 * 32
    assert model.estimate_flops() == 1382400
    text = describe_params(model)
    assert "top-2 of 8 experts" in text and "12 experts idle per token" in text
    assert "2 MoE + 2 dense" in text


def test_iso_flops_dense_vs_top2_mult2_differ_by_router_only():
    dense = build_model(dense_cfg(n_layer=4), "cpu")
    moe = build_model(dense_cfg(n_layer=4, use_moe=True, n_experts=8, expert_topk=2, expert_hidden_mult=2), "cpu")
    router_term = 6 * 4 * 8 * 64  # 6 FLOPs x (n_experts x d) router weights x 4 MoE layers
    assert moe.estimate_flops() - dense.estimate_flops() == router_term
    assert moe.num_scaling_params()["active_total"] - dense.num_scaling_params()["active_total"] == 4 * 8 * 64


def test_init_blocks_are_identity_and_router_small_random():
    model = build_model(moe_cfg(), "cpu")
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0
        if block.is_moe:
            assert block.mlp.w_proj.abs().sum() == 0
            assert block.mlp.w_fc.std().item() == pytest.approx(64**-0.5, rel=0.1)
            # logit std 0.1 on a unit-RMS input: w std 0.1 / sqrt(d)
            assert block.mlp.router.weight.std().item() == pytest.approx(0.1 * 64**-0.5, rel=0.25)


def test_router_init_spreads_tokens_over_64_experts_at_step_0():
    # A zero gate ties every logit: top-2 then sends every token to the same 2 experts and 62
    # of 64 are dead at step 0. With the small random init, one forward reaches most experts
    # while every token's scores stay near uniform.
    torch.manual_seed(0)
    model = build_model(moe_cfg(n_experts=64, expert_topk=2, moe_freq=1), "cpu")
    idx = torch.randint(0, 512, (4, 32))
    model(idx, idx)
    for m in model.modules():
        if isinstance(m, MoE):
            reached = int((m.load_since_step > 0).sum())
            assert reached > 32, reached
    x = torch.nn.functional.rms_norm(model.transformer.wte(idx), (64,)).view(-1, 64)
    probs = torch.softmax(x @ model.transformer.h[0].mlp.router.weight.T, dim=-1)
    assert probs.max() < 1.5 / 64 and probs.min() > 0.5 / 64


def test_rotary_and_attention_are_causal():
    model = build_model(dense_cfg(), "cpu")
    torch.manual_seed(0)
    for p in model.parameters():  # make every block non-trivial
        torch.nn.init.normal_(p, std=0.2)
    idx = torch.randint(0, 512, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 512
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-5)
    assert not torch.allclose(a[0, 10:], b[0, 10:], atol=1e-3)


# ------------------------------------------------------------------------------- MTP heads

def test_mtp_targets_are_the_shifted_tokens():
    from nanochat.gpt import mtp_targets
    # a row x = [10, 11, 12, 13, 14] has next-token targets y = [11, 12, 13, 14, 15]
    y = torch.tensor([[11, 12, 13, 14, 15], [21, 22, -1, 24, 25]])
    assert mtp_targets(y, 1).tolist() == [[12, 13, 14, 15, -1], [22, -1, 24, 25, -1]]  # token t+2
    assert mtp_targets(y, 2).tolist() == [[13, 14, 15, -1, -1], [-1, 24, 25, -1, -1]]  # token t+3
    assert mtp_targets(y, 7).tolist() == [[-1] * 5, [-1] * 5]


def test_mtp_heads_leave_the_next_token_path_alone():
    torch.manual_seed(0)
    with_heads = build_model(dense_cfg(mtp_heads=2), "cpu")
    plain = build_model(dense_cfg(), "cpu")  # N = 0: today's model
    state = {k: v for k, v in with_heads.state_dict().items() if not k.startswith("mtp.")}
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        for p in with_heads.parameters():  # nothing at init values: heads and trunk random
            p.add_(0.05 * torch.randn_like(p))
        plain.load_state_dict({k: v for k, v in with_heads.state_dict().items() if not k.startswith("mtp.")})
    idx = torch.randint(0, 512, (2, 32))
    ce, aux = with_heads(idx, idx.roll(-1, 1))
    ce0, aux0 = plain(idx, idx.roll(-1, 1))
    assert ce.item() == ce0.item() and aux0["mtp_losses"].numel() == 0 and aux["mtp_losses"].shape == (2,)
    with_heads.eval()  # evaluation and generation: next-token only, no head computed
    assert with_heads(idx, idx.roll(-1, 1))[1]["mtp_losses"].numel() == 0
    assert torch.equal(with_heads(idx), plain.eval()(idx))


def test_mtp_loss_at_init_is_the_trunk_predicting_further_ahead():
    # A head starts as the identity (zero output projections), so head i's logits are the trunk's
    # and its loss is the trunk's logits scored against the tokens i further on.
    torch.manual_seed(0)
    model = build_model(dense_cfg(mtp_heads=3), "cpu")
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.2)
        for b in model.transformer.h:
            b.mlp.c_proj.weight.normal_(std=0.05)
    idx = torch.randint(0, 512, (2, 32))
    y = torch.randint(0, 512, (2, 32))
    _, aux = model(idx, y)
    logits = model(idx)
    for i in range(1, 4):
        ref = torch.nn.functional.cross_entropy(logits[:, :32 - i].reshape(-1, 512), y[:, i:].reshape(-1))
        assert aux["mtp_losses"][i - 1].item() == pytest.approx(ref.item(), rel=1e-5)


def test_mtp_params_and_flops_hand_count():
    from nanochat.optim import setup_optimizers
    d, V, T, L, H = 64, 512, 32, 2, 2
    base = build_model(dense_cfg(), "cpu")
    model = build_model(dense_cfg(mtp_heads=2), "cpu")
    c = model.num_scaling_params()
    block = 4 * d * d + 8 * d * d  # attention q,k,v,proj + MLP 4d in and out
    assert c["mtp"] == 2 * block and c["total"] == base.num_scaling_params()["total"] + 2 * block
    assert c["active_total"] == c["total"]  # heads are trained on every token
    # per head: 6 x (its block + the shared lm_head run again) + its attention term
    per_head = 6 * (block + V * d) + 12 * H * (d // H) * T
    assert model.estimate_flops() - base.estimate_flops() == 2 * per_head
    adamw, muon = setup_optimizers(model)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert all(id(p) in muon_ids for p in model.mtp.parameters())  # hidden matrices -> Muon
    assert "MTP heads: 2" in describe_params(model)
