"""Expert parallelism (nanochat/expert_parallel.py) under torchrun on CPU (gloo): 2 and 4
processes reproduce one process with the same global batch (gradient accumulation), each rank
holds 1/N of the experts, checkpoints hold the full experts, resume is exact."""

import pytest
import torch
from safetensors.torch import load_file

from tests.test_base_train import TINY, run_train, read_metrics, of_type

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

# 4 experts, 1,024 tokens per step: 1 process x 4 micro-batches = 2 x 2 = 4 x 1
EP = TINY + ["--use-moe", "--n-experts", "4", "--total-batch-size", "1024", "--eval-every", "-1"]


def losses(base_dir, tag):
    return [r["train_loss"] for r in of_type(read_metrics(base_dir, tag), "train")]


def test_ep_2_and_4_processes_match_one_process(base_dir):
    run_train(base_dir, EP + ["--num-iterations", "10", "--model-tag", "ep1"])
    one = losses(base_dir, "ep1")
    full = load_file(str(base_dir / "runs" / "ep1" / "checkpoints" / "step_000010" / "model.safetensors"))
    for n in (2, 4):
        p = run_train(base_dir, EP + ["--num-iterations", "10", "--expert-parallel", str(n), "--model-tag", f"ep{n}"],
                      nproc=n)
        assert f"Expert parallelism: {n} ranks per group, {4 // n} experts per rank" in p.stdout
        other = losses(base_dir, f"ep{n}")
        assert len(other) == 10 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, other)), (n, one, other)
        # the checkpoint holds every expert, gathered, and equals the 1-process weights
        saved = load_file(str(base_dir / "runs" / f"ep{n}" / "checkpoints" / "step_000010" / "model.safetensors"))
        assert saved["transformer.h.0.mlp.w_fc"].shape == full["transformer.h.0.mlp.w_fc"].shape
        experts = [k for k in full if k.endswith((".w_fc", ".w_proj"))]
        assert len(experts) == 4 and all(torch.allclose(saved[k], full[k], atol=1e-5) for k in experts)
        # (the embedding differs by up to ~3e-4: Adam turns float-order noise in near-zero
        # gradients of rare tokens into whole steps; the losses above agree to 1e-5)
        assert all(torch.allclose(saved[k], full[k], atol=1e-3) for k in full)


def test_expert_memory_per_rank_is_one_nth(base_dir):
    """In-process: build the model, split its experts as rank r of 4 would (no exchange runs)."""
    from nanochat.expert_parallel import enable_expert_parallel
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.moe import moe_layers
    cfg = GPTConfig(sequence_len=16, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                    use_moe=True, n_experts=8, expert_topk=2, expert_hidden_mult=2)
    torch.manual_seed(0)
    whole = build_model(cfg, "cpu")
    total = sum(m.w_fc.numel() + m.w_proj.numel() for m in moe_layers(whole))
    for r in range(4):
        torch.manual_seed(0)  # every rank builds the same model (base_train seeds it), then keeps its block
        model = build_model(cfg, "cpu")
        local = enable_expert_parallel(model, 4, r, ep_group=None)
        assert sum(p.numel() for p in local) * 4 == total
        for m, w in zip(moe_layers(model), moe_layers(whole)):
            assert torch.equal(m.w_fc, w.w_fc[2 * r:2 * r + 2]) and m.local_experts == slice(2 * r, 2 * r + 2)


def test_ep_resume_is_exact_and_bad_layouts_are_one_line(base_dir):
    args = EP + ["--num-iterations", "6", "--save-every", "3", "--expert-parallel", "2", "--model-tag", "ep_resume"]
    run_train(base_dir, args, nproc=2)
    full = losses(base_dir, "ep_resume")
    ckpt = base_dir / "runs" / "ep_resume" / "checkpoints"
    before = load_file(str(ckpt / "step_000006" / "model.safetensors"))
    assert sorted(f.name for f in (ckpt / "step_000003").glob("optim*.pt")) == ["optim_rank0.pt", "optim_rank1.pt"]
    run_train(base_dir, args + ["--resume-from-step", "3"], nproc=2)
    assert losses(base_dir, "ep_resume") == full
    after = load_file(str(ckpt / "step_000006" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    p = run_train(base_dir, EP + ["--expert-parallel", "3", "--num-iterations", "1", "--model-tag", "x"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--expert-parallel 3 must divide the number of processes 1" in p.stderr
    p = run_train(base_dir, EP + ["--num-iterations", "1", "--expert-parallel", "2", "--capacity-factor", "1.25",
                                  "--model-tag", "x"], nproc=2, check=False)
    assert p.returncode != 0 and "--expert-parallel is dropless" in p.stderr


def test_ep_evaluation_stops_together_when_a_rank_runs_out(base_dir):
    """Asking for more validation batches than the val shard has: the ranks' shares differ by
    a batch, and under EP a forward is a collective, so every rank must stop at the same step
    (before the fix the rank with one more batch waited forever in the exchange)."""
    p = run_train(base_dir, EP + ["--num-iterations", "1", "--eval-tokens", "20000000", "--expert-parallel", "4",
                                  "--model-tag", "ep_eval"], nproc=4, timeout=240)
    evals = of_type(read_metrics(base_dir, "ep_eval"), "eval")
    assert len(evals) == 1 and 0 < evals[0]["val_bpb"] < 20, p.stdout[-2000:]
