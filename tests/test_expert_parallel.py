"""Expert parallelism (nanochat/expert_parallel.py) under torchrun on CPU (gloo): 2 and 4
processes reproduce one process with the same global batch (gradient accumulation), each rank
holds 1/N of the experts, checkpoints hold the full experts, resume is exact."""

import re

import pytest
import torch
from safetensors.torch import load_file

from tests.plain import PLAIN_FLAGS
from tests.test_base_train import TINY, run_train, read_metrics, of_type

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

# 4 experts, 1,024 tokens per step: 1 process x 4 micro-batches = 2 x 2 = 4 x 1
# the plain model: the weight checks below compare tables Adam updates token by token, and value
# embeddings would add two more of them (the losses agree to 1e-5 either way)
EP = TINY + PLAIN_FLAGS + ["--use-moe", "--n-experts", "4", "--total-batch-size", "1024", "--eval-every", "-1"]


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
    # compiled: the exchange is a graph break (run eager), the graphs around it never recompile
    p = run_train(base_dir, EP + ["--num-iterations", "10", "--expert-parallel", "2", "--compile", "on",
                                  "--model-tag", "ep2c"], nproc=2)
    assert re.search(r"graphs compiled after step 1 +0\n", p.stdout), p.stdout[-2000:]
    other = losses(base_dir, "ep2c")
    assert len(other) == 10 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, other)), (one, other)


def test_expert_memory_per_rank_is_one_nth_and_the_whole_model_is_never_built():
    """In-process: each rank builds only its block of experts (no exchange runs here); the
    block equals the same slice of the whole model built from the same seed, and the largest
    expert tensor a rank ever allocates is one layer's, while it is drawn."""
    from nanochat.expert_parallel import enable_expert_parallel
    from nanochat.gpt import GPTConfig, build_model, meta_model
    from nanochat.moe import moe_layers
    cfg = GPTConfig(sequence_len=16, vocab_size=256, n_layer=3, n_head=2, n_kv_head=2, n_embd=64,
                    use_moe=True, n_experts=8, expert_topk=2, expert_hidden_mult=2)
    torch.manual_seed(0)
    whole = build_model(cfg, "cpu")
    total = sum(m.w_fc.numel() + m.w_proj.numel() for m in moe_layers(whole))
    layer = moe_layers(whole)[0].w_fc.numel()
    for r in range(4):
        torch.manual_seed(0)  # every rank seeds alike (base_train), so the replicated parts agree too
        with TrackAllocations() as allocated:
            model = build_model(cfg, "cpu", expert_shard=(r, 4))
        local = enable_expert_parallel(model, 4, ep_group=None)
        assert sum(p.numel() for p in local) * 4 == total
        # allocated: this rank's tensors, plus one layer's w_fc per MoE layer while it is drawn
        held = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
        assert sum(allocated) == held + len(moe_layers(model)) * layer and max(allocated) == layer
        for m, w in zip(moe_layers(model), moe_layers(whole)):
            assert torch.equal(m.w_fc, w.w_fc[2 * r:2 * r + 2]) and m.local_experts == slice(2 * r, 2 * r + 2)
            assert torch.equal(m.router.weight, w.router.weight)
        assert all(torch.equal(p, whole.get_parameter(n)) for n, p in model.named_parameters() if "w_" not in n)
    # parameter counts and FLOPs are of the whole model (base_train counts on a meta copy)
    assert meta_model(cfg).num_scaling_params() == whole.num_scaling_params()
    assert meta_model(cfg).estimate_flops() == whole.estimate_flops()


class TrackAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The numel of every tensor created by an empty/new-tensor factory inside the block."""

    def __enter__(self):
        self.sizes = []
        super().__enter__()
        return self.sizes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like,
                                   torch.ops.aten.clone) and isinstance(out, torch.Tensor) and not out.is_meta:
            self.sizes.append(out.numel())
        return out


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
    # another layout, same processes: the per-rank optimizer state does not fit it
    p = run_train(base_dir, args[:-6] + ["--expert-parallel", "1", "--model-tag", "ep_resume", "--resume-from-step", "3"],
                  nproc=2, check=False)
    assert p.returncode != 0 and "saved with --expert-parallel 2, this run has 1" in p.stderr, p.stderr[-2000:]
    assert "does not fit" not in p.stderr  # refused on the layout, before the optimizer state is read
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


def test_init_from_under_ep_loads_each_ranks_block(base_dir):
    """--init-from a checkpoint (every expert in it) into an EP run: each rank takes its block,
    so the new run's first evaluation equals the source's last (same ranks, same data)."""
    common = EP + ["--eval-every", "3", "--expert-parallel", "2"]
    run_train(base_dir, common + ["--num-iterations", "3", "--model-tag", "ep_src"], nproc=2)
    # (no --depth: the shape is the checkpoint's)
    run_train(base_dir, common[2:] + ["--init-from", "ep_src", "--num-iterations", "1", "--model-tag", "ep_dst"], nproc=2)
    src, dst = of_type(read_metrics(base_dir, "ep_src"), "eval"), of_type(read_metrics(base_dir, "ep_dst"), "eval")
    assert dst[0]["step"] == 0 and abs(dst[0]["val_bpb"] - src[-1]["val_bpb"]) <= 1e-6 * src[-1]["val_bpb"], (src, dst)


@pytest.mark.parametrize("variant", [["--mod-capacity", "0.5", "--mtp-heads", "1"], ["--layer-pattern", "AM"]],
                         ids=["mod_mtp", "mamba"])
def test_ep_composes_with_the_architecture_variants(base_dir, variant):
    """EP under the other variants (MoD blocks and an MTP head; Mamba layers): 2 processes
    evaluate like 1 process with gradient accumulation, at every eval."""
    args = EP + ["--eval-every", "2", "--num-iterations", "4"] + variant
    run_train(base_dir, args + ["--model-tag", "combo1"])
    run_train(base_dir, args + ["--expert-parallel", "2", "--model-tag", "combo2"], nproc=2)
    one, two = (of_type(read_metrics(base_dir, t), "eval") for t in ("combo1", "combo2"))
    assert [e["step"] for e in one] == [e["step"] for e in two] == [0, 2, 4]
    for key in ("val_bpb", "val_bpb_topk") if "--mod-capacity" in variant else ("val_bpb",):
        assert all(abs(a[key] - b[key]) <= 1e-5 * a[key] for a, b in zip(one, two) if key in a), (key, one, two)
    assert ("val_bpb_topk" in one[-1]) == ("--mod-capacity" in variant)
