"""Inference engine: the KV cache against full-context recomputation (dense and MoE), the
samplers on hand-made logits, seeding, BOS stops; then scripts/generate.py and
scripts/bench_infer.py as subprocesses on tiny checkpoints trained for a few steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.common import UserError
from nanochat.engine import generate, generate_batch, new_kv_cache, sample_next_token, apply_repetition_penalty
from nanochat.gpt import GPTConfig, build_model

REPO = Path(__file__).resolve().parents[1]
V = 256


def random_model(use_moe, seed=0, **kw):
    """A tiny model with every weight random (router included): at init the lm_head is
    near zero and blocks are the identity, so greedy outputs would be degenerate."""
    cfg = dict(sequence_len=16, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)  # GQA: 2 kv heads
    if use_moe:
        cfg.update(use_moe=True, n_experts=4, expert_topk=2, expert_hidden_mult=2)
    model = build_model(GPTConfig(**{**cfg, **kw}), "cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.fixture(scope="module", params=["dense", "moe", "moe_capacity"])
def model(request):
    # moe_capacity: a capacity factor that would drop tokens in training (1.0 of the balanced
    # share); inference is dropless, so the cache paths must still equal the full forward
    kw = dict(capacity_factor=1.0) if request.param == "moe_capacity" else {}
    return random_model(request.param != "dense", **kw)


PROMPT = [V - 1, 17, 42, 99, 3]  # BOS (the last id, by the tokenizer's convention) + 4 tokens


def test_greedy_with_cache_equals_without(model):
    a = generate(model, PROMPT, 24, temperature=0.0, stop_at_bos=False)
    b = generate(model, PROMPT, 24, temperature=0.0, stop_at_bos=False, use_kv_cache=False)
    assert len(a[0]) == 24 and a == b
    assert len(set(a[0])) > 3  # not degenerate
    # one-token prompt too, and several rows (the cache replicated after one prefill)
    a = generate(model, [V - 1], 10, num_samples=2, temperature=0.0, stop_at_bos=False)
    b = generate(model, [V - 1], 10, num_samples=2, temperature=0.0, stop_at_bos=False, use_kv_cache=False)
    assert a == b and a[0] == a[1]


def test_sampling_with_cache_equals_without(model):
    # rows diverge after the shared prefill; the same seed draws the same tokens on both paths
    kw = dict(num_samples=3, temperature=1.0, seed=7, stop_at_bos=False)
    a = generate(model, PROMPT, 16, **kw)
    assert a == generate(model, PROMPT, 16, use_kv_cache=False, **kw)
    assert len({tuple(r) for r in a}) == 3


def test_cached_chunks_give_the_full_forward_logits(model):
    idx = torch.randint(0, V, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = new_kv_cache(model, 2, 14)
        # prefill, a chunk after a cached prefix (masked), single-token decodes, a last chunk
        pieces = [model(idx[:, a:b], kv_cache=cache) for a, b in [(0, 5), (5, 9), (9, 10), (10, 11), (11, 14)]]
    assert cache.get_pos() == 14
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_training_forward_unchanged_by_cache_argument():
    model = random_model(False)
    idx = torch.randint(0, V, (2, 12))
    loss, _ = model(idx, idx)
    loss.backward()  # the default path still trains
    assert model.lm_head.weight.grad is not None


def test_seed_reproducible_and_different_seeds_differ(model):
    a = generate(model, PROMPT, 12, num_samples=3, temperature=1.0, seed=1, stop_at_bos=False)
    b = generate(model, PROMPT, 12, num_samples=3, temperature=1.0, seed=1, stop_at_bos=False)
    c = generate(model, PROMPT, 12, num_samples=3, temperature=1.0, seed=2, stop_at_bos=False)
    assert a == b and a != c
    assert len(a) == 3 and all(len(r) == 12 for r in a)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPT, 12, temperature=0.0, stop_at_bos=False)
    assert generate(model, PROMPT, 12, temperature=1.0, top_k=1, seed=3, stop_at_bos=False) == greedy
    assert generate(model, PROMPT, 12, temperature=1.0, top_p=1e-6, seed=3, stop_at_bos=False) == greedy


def test_stop_at_bos_truncates_each_row_at_its_first_bos():
    model = random_model(False)
    free = generate(model, PROMPT, 20, num_samples=4, temperature=1.5, seed=5, stop_at_bos=False)
    # make a token that occurs in some rows the "BOS": those rows stop there, the others run on
    bos = next(t for t in free[0] if sum(t in r for r in free) < 4)
    stopped = generate(model, PROMPT, 20, num_samples=4, temperature=1.5, seed=5, bos_token_id=bos)
    for row, full in zip(stopped, free):
        assert row == (full[:full.index(bos)] if bos in full else full)
    assert any(len(r) < 20 for r in stopped) and any(len(r) == 20 for r in stopped)
    # greedy rows that all hit BOS end the generation early
    greedy = generate(model, PROMPT, 20, temperature=0.0, stop_at_bos=False)[0]
    timings = {}
    assert generate(model, PROMPT, 20, temperature=0.0, bos_token_id=greedy[2], timings=timings)[0] == greedy[:greedy.index(greedy[2])]
    assert timings["steps"] == greedy.index(greedy[2]) + 1


def test_length_never_exceeds_the_rotary_table():
    model = random_model(False, sequence_len=4)  # rotary table: 10 x 4 = 40 positions
    out = generate(model, PROMPT * 7, 100, temperature=0.0, stop_at_bos=False)  # 35-token prompt
    assert len(out[0]) == 5
    with pytest.raises(UserError, match="40 positions"):
        generate(model, PROMPT * 8, 4)


def test_batch_of_prompts():
    model = random_model(True)
    prompts = [PROMPT, [V - 1, 1, 2, 3, 4]]
    rows = generate_batch(model, prompts, 8, num_samples=2, temperature=0.0, stop_at_bos=False)
    assert len(rows) == 4 and rows[0] == rows[1] and rows[2] == rows[3]
    assert rows[0] == generate(model, PROMPT, 8, temperature=0.0, stop_at_bos=False)[0]
    assert rows[2] == generate(model, prompts[1], 8, temperature=0.0, stop_at_bos=False)[0]


# ---------------------------------------------------------------------------- samplers


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    history = torch.tensor([[0, 1, 1]])  # tokens 0 and 1 seen (1 twice: penalised once)
    out = apply_repetition_penalty(logits, history, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 0.0]]))  # positive / 2, negative x 2
    p0, p1 = torch.softmax(logits, -1)[0], torch.softmax(out, -1)[0]
    assert p1[0] < p0[0] and p1[1] < p0[1] and p1[2] > p0[2]
    # greedy follows: 2/5 = 0.4 < 0.5, so token 2 wins once 0 is penalised by 5
    assert sample_next_token(logits, temperature=0.0).item() == 0
    assert sample_next_token(logits, temperature=0.0, repetition_penalty=5.0, history=history).item() == 2


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    rng = torch.Generator().manual_seed(0)
    seen = lambda **kw: set(sample_next_token(logits, rng, 1.0, **kw)[:, 0].tolist())
    assert seen() == {0, 1, 2, 3}
    assert seen(top_k=2) == {0, 1}
    assert seen(top_p=0.5) == {0}          # 0.5 alone reaches 0.5
    assert seen(top_p=0.51) == {0, 1}      # needs the second
    assert seen(top_p=0.9) == {0, 1, 2}    # 0.5 + 0.3 < 0.9 <= 0.95
    # temperature -> 0 sharpens; at 0 it is argmax with no draw at all
    assert sample_next_token(logits[:1], None, 0.0).item() == 0


# ---------------------------------------------------------------------------- command line

TINY = ["--depth", "1", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "64",
        "--num-iterations", "3", "--eval-every", "-1", "--eval-tokens", "32", "--sample-every", "-1",
        "--vocab-size", "300", "--synthetic-train-docs", "200"]


def run(module, args, base_dir, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(NANOCHAT_BASE_DIR=str(base_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    if check:
        assert p.returncode == 0, f"{module} {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        assert "Traceback" not in p.stderr
    return p


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A dense and an MoE checkpoint, and two of depth 2, attention-only and hybrid (attention +
    Mamba), a few steps each (a few seconds)."""
    d = tmp_path_factory.mktemp("engine_base")
    run("scripts.base_train", TINY + ["--model-tag", "dense"], d)
    run("scripts.base_train", TINY + ["--use-moe", "--n-experts", "4", "--model-tag", "moe"], d)
    run("scripts.base_train", TINY + ["--depth", "2", "--model-tag", "attn2"], d)
    run("scripts.base_train", TINY + ["--depth", "2", "--layer-pattern", "AM", "--mamba-head-dim", "32", "--mamba-d-state",
                                      "16", "--model-tag", "hybrid"], d)
    return d


def samples_of(stdout):
    """The sample blocks of generate's output (without the timing line, which varies)."""
    return stdout[:stdout.rindex("\n---\n")]


def test_generate_cli(base_dir):
    args = ["--model-tag", "moe", "--prompt", "The", "--num-samples", "2", "--max-tokens", "16", "--seed", "3"]
    a = run("scripts.generate", args, base_dir).stdout
    assert "--- sample 1/2" in a and "--- sample 2/2" in a and "tokens/s" in a.splitlines()[-1]
    assert samples_of(a) == samples_of(run("scripts.generate", args, base_dir).stdout)
    # greedy: the KV cache changes the speed, not the text; --path takes a run folder
    greedy = ["--temperature", "0", "--max-tokens", "12", "--step", "latest"]
    b = run("scripts.generate", ["--model-tag", "dense", *greedy], base_dir).stdout
    c = run("scripts.generate", ["--path", str(base_dir / "runs" / "dense"), "--no-kv-cache", *greedy], base_dir).stdout
    assert samples_of(b) == samples_of(c)
    assert "KV cache off" in c


@pytest.mark.parametrize("args, flag", [
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "-2"], "--top-k"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--num-samples", "0"], "--num-samples"),
    (["--step", "last"], "--step"),
    (["--path", "x"], "one of --model-tag"),
])
def test_generate_validates_flags_before_loading(args, flag):
    from scripts.generate import parse_args, validate_args
    with pytest.raises(UserError, match=flag):
        validate_args(parse_args(["--model-tag", "dense", *args]))


@pytest.mark.parametrize("args, flag", [
    (["--model-tag", "dense", "--top-p", "0"], "--top-p"),
    (["--model-tag", "dense", "--temperature", "-1"], "--temperature"),
    (["--model-tag", "dense", "--step", "99"], "--step 99"),
    (["--model-tag", "nope"], "--model-tag nope"),
    ([], "--model-tag"),
])
def test_generate_bad_flags_one_line(base_dir, args, flag):
    p = run("scripts.generate", args, base_dir, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and flag in p.stderr


def test_bench_infer_cli(base_dir):
    p = run("scripts.bench_infer", ["--model-tags", "dense", "moe", "--batch-sizes", "1,2", "--gen-tokens", "4",
                                    "--prompt-len", "8", "--repeats", "1"], base_dir)
    lines = p.stdout.strip().splitlines()
    assert any(line.startswith("| model") for line in lines)
    rows = json.loads(lines[-1])["rows"]
    assert sorted((r["model"], r["batch_size"]) for r in rows) == [("dense", 1), ("dense", 2), ("moe", 1), ("moe", 2)]
    assert all(r["tokens_per_s"] > 0 and r["latency_ms"] > 0 for r in rows)
    dense, moe = rows[0], rows[1]
    assert moe["params_total"] > moe["params_active"] and dense["params_total"] == dense["params_active"]
    bad = run("scripts.bench_infer", ["--model-tags", "dense", "--batch-sizes", "1,x"], base_dir, check=False)
    assert bad.returncode == 2 and "--batch-sizes" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_infer_over_context_lengths_attention_vs_hybrid(base_dir):
    """The hybrid's cache grows with its attention layers only: 1 of 2 here, so from prompt 4 to
    prompt 20 it grows exactly half as much as the attention-only model's; its Mamba state is
    a constant."""
    p = run("scripts.bench_infer", ["--model-tags", "attn2", "hybrid", "--batch-sizes", "1", "--gen-tokens", "4",
                                    "--prompt-len", "4,20", "--repeats", "1"], base_dir)
    rows = {(r["model"], r["prompt_len"]): r for r in json.loads(p.stdout.strip().splitlines()[-1])["rows"]}
    assert sorted(rows) == [("attn2", 4), ("attn2", 20), ("hybrid", 4), ("hybrid", 20)]
    grow = lambda m: rows[(m, 20)]["kv_cache_mib"] - rows[(m, 4)]["kv_cache_mib"]
    assert grow("attn2") == pytest.approx(2 * grow("hybrid"), rel=1e-9) and grow("hybrid") > 0
    assert rows[("hybrid", 4)]["mamba_layers"] == 1 and rows[("attn2", 4)]["mamba_layers"] == 0
    assert any(line.startswith("| model") and "| prompt" in line for line in p.stdout.splitlines())
