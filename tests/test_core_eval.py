"""nanochat/core_eval.py: CORE's prompts, spans, truncation, seeds and scoring, checked against
strings and numbers written out here by hand, against models whose score follows from the task
files alone (an oracle; constant logits), and against nanochat's own evaluation of a nanochat
checkpoint (tests/fixtures/nanochat/core_reference.json). Task files: tests/fixtures/core (made up;
a fresh clone has no ../shared)."""

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanochat import core_eval as ce
from nanochat.common import UserError

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "tests" / "fixtures" / "core"
SHARED_EVAL = REPO.parent / "shared" / "data" / "eval"
SPEC = {label: (label, rel, shots, delim, kind) for label, rel, shots, delim, kind in ce.TASKS}


class ByteTokenizer:
    """One token per UTF-8 byte, BOS = 256: an independent tokenizer whose ids can be read off."""
    def get_bos_token_id(self):
        return 256

    def encode(self, text, prepend_bos=False):
        if isinstance(text, list):
            return [self.encode(t, prepend_bos) for t in text]
        return ([256] if prepend_bos else []) + list(text.encode("utf-8"))


def fixture_rows(label):
    path = ce.task_path(str(BUNDLE), SPEC[label][1])
    return [json.loads(line) for line in open(path)]


# 1. Prompts, written out by hand

def test_multiple_choice_prompt():
    shots = [{"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}, {"query": "Q: sky?", "choices": ["red", "blue"], "gold": 1}]
    item = {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0}
    assert ce.render(item, ce.MC, "\nAnswer: ", shots) == [
        "Q: 1+1?\nAnswer: 2\n\nQ: sky?\nAnswer: blue\n\nQ: 2+2?\nAnswer: 4",
        "Q: 1+1?\nAnswer: 2\n\nQ: sky?\nAnswer: blue\n\nQ: 2+2?\nAnswer: 5"]
    assert ce.render(item, ce.MC, " ", []) == ["Q: 2+2? 4", "Q: 2+2? 5"]


def test_schema_prompt():
    shot = {"context_options": ["A cat", "A dog"], "continuation": "barked.", "gold": 1}
    item = {"context_options": ["The box held the ball because the box", "... the ball"], "continuation": "was big.", "gold": 0}
    assert ce.render(item, ce.SCHEMA, " ", [shot]) == [
        "A dog barked.\n\nThe box held the ball because the box was big.", "A dog barked.\n\n... the ball was big."]


def test_language_modelling_prompts_trim_contexts():
    shot = {"context": "  op(1, 2) =  ", "continuation": "3"}
    item = {"context": "the cat sat on the  ", "continuation": "mat"}
    without, with_ = ce.render(item, ce.LM, " ", [shot])
    assert with_ == "op(1, 2) = 3\n\nthe cat sat on the mat"
    assert without == "op(1, 2) = 3\n\nthe cat sat on the"  # the delimiter's space stripped too
    assert ce.render(item, ce.LM, "\nAnswer: ", []) == ["the cat sat on the\nAnswer:", "the cat sat on the\nAnswer: mat"]


# 2. Which tokens are scored

def test_common_prefix_and_suffix():
    assert ce.common_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    assert ce.common_length([[9, 2, 3], [1, 2, 3]], from_end=True) == 2
    assert ce.common_length([[1, 2], [1, 2]]) == 2 and ce.common_length([[1], [2]]) == 0


def test_spans_per_type():
    # multiple choice: after the common prefix, to each row's end
    rows, s, e = ce.score_spans([[256, 5, 6, 7], [256, 5, 8]], ce.MC)
    assert (s, e) == ([2, 2], [4, 3])
    # schema: the common suffix
    rows, s, e = ce.score_spans([[256, 1, 9, 9], [256, 2, 3, 9, 9]], ce.SCHEMA)
    assert (s, e) == ([2, 3], [4, 5])
    # language modelling: the continuation, one row
    rows, s, e = ce.score_spans([[256, 1, 2], [256, 1, 2, 3, 4]], ce.LM)
    assert (rows, s, e) == ([[256, 1, 2, 3, 4]], [3], [5])
    assert ce.score_spans([[256, 1, 2], [256, 1, 7, 3]], ce.LM) is None  # not a token-level extension
    assert ce.score_spans([[256, 5], [256, 5, 6]], ce.MC) is None  # one option is the common prefix: nothing to score


def test_left_truncation_shifts_indices():
    rows, s, e = ce.truncate_left([[256, 1, 2, 3, 4, 5, 6], [256, 1, 2, 3, 4, 9]], [4, 4], [7, 6], max_len=5)
    assert rows == [[2, 3, 4, 5, 6], [1, 2, 3, 4, 9]] and s == [2, 3] and e == [5, 5]
    assert ce.truncate_left([[256, 1, 2, 3]], [2], [4], max_len=4) == ([[256, 1, 2, 3]], [2], [4])  # fits: unchanged
    assert ce.truncate_left([[256, 1, 2, 3, 4]], [2], [5], max_len=3) is None  # the span alone fills the context


def test_shuffle_and_fewshot_draw_are_nanochats_seeds():
    rows = [(n, {"i": n}) for n in range(1, 21)]
    kept = ce.select_rows(rows, 3, 8, "f.jsonl")
    expected = list(rows)
    random.Random(1337).shuffle(expected)
    assert kept == expected[:8]
    for idx in (0, 5):
        draw = ce.fewshot_rows(kept, idx, 3)
        pool = [i for i in range(8) if i != idx]
        assert draw == [kept[i] for i in random.Random(1234 + idx).sample(pool, 3)]
        assert kept[idx] not in draw and draw == ce.fewshot_rows(kept, idx, 3)
    assert ce.fewshot_rows(kept, 0, 0) == []


# 3. Scores that follow from the task files alone

class LogitModel(torch.nn.Module):
    """A 'model' whose logits are a function of the row: constant, or an oracle."""
    def __init__(self, kind, vocab=257, seq_len=512):
        super().__init__()
        self.kind = kind
        self.config = SimpleNamespace(vocab_size=vocab, sequence_len=seq_len)

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        if self.kind == "oracle":  # the next token, surely, on rows without a '#'
            nxt = torch.roll(idx, -1, dims=1)
            for b in range(B):
                if not (idx[b] == ord("#")).any():
                    logits[b].scatter_(1, nxt[b:b + 1].T, 30.0)
        return logits


def write_bundle(tmp_path, files, baselines):
    """A flat eval dir: {file name: rows}, and baselines {label: percent}."""
    d = tmp_path / "eval"
    d.mkdir()
    for name, rows in files.items():
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval_meta_data.csv").write_text("Eval Task,Random baseline\n" + "".join(f"{k},{v}\n" for k, v in baselines.items()))
    return d


def test_an_oracle_scores_one(tmp_path):
    # wrong answers carry a '#': the oracle is sure of the next token on rows without one,
    # uniform on the others
    mc = [{"query": f"what is {i} plus one?", "choices": ["#no", f"x{i + 1}", "n#h"][i % 2:], "gold": 1 - i % 2}
          for i in range(12)]
    schema = [{"context_options": [f"the box {i}", f"the #box {i}"][::1 if i % 2 else -1], "continuation": "was big.",
               "gold": 0 if i % 2 else 1} for i in range(12)]
    lm = [{"context": f"count {i} then", "continuation": f"{i + 1}"} for i in range(12)]
    d = write_bundle(tmp_path, {"arc_easy.jsonl": mc, "winogrande.jsonl": schema, "bigbench_operators.jsonl": lm},
                     {"arc_easy": 25, "winogrande": 50, "bigbench_operators": 0})
    tasks, baselines = ce.load_tasks(str(d), -1)
    s = ce.evaluate_core(LogitModel("oracle"), ByteTokenizer(), tasks, baselines, "cpu", 512, progress=False)
    assert {k: (t["accuracy"], t["centered"]) for k, t in s["tasks"].items()} == {
        "arc_easy": (1.0, 1.0), "winogrande": (1.0, 1.0), "bigbench_operators": (1.0, 1.0)}
    assert s["core"] == 1.0 and s["n_tasks"] == 3 and s["partial"]
    assert ce.core_line(s) == "CORE 1.0000 (3/22 tasks, partial)"


def test_constant_logits_score_follows_from_the_answer_positions(tmp_path):
    # equal-length options (one byte per token): every option's mean loss is the same float,
    # so the first option wins and accuracy = the share of rows whose gold is 0; greedy decoding
    # of constant logits gives token 0, never a continuation: 0 on language modelling
    arc_gold = [0, 3, 1, 0, 2, 2, 0, 1, 3, 3, 1, 0, 2, 1]  # 4 zeros of 14
    copa_gold = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]              # 3 zeros of 10
    files = {
        "arc_easy.jsonl": [{"query": f"pick {i}", "choices": ["cat", "dog", "owl", "bee"], "gold": g} for i, g in enumerate(arc_gold)],
        "copa.jsonl": [{"query": f"why {i}", "choices": ["rain.", "snow."], "gold": g} for i, g in enumerate(copa_gold)],
        "winogrande.jsonl": [{"context_options": ["the box", "the bag"], "continuation": f"was {i}.", "gold": i % 2} for i in range(8)],
        "bigbench_operators.jsonl": [{"context": f"op({i}) =", "continuation": str(i)} for i in range(11)],
    }
    d = write_bundle(tmp_path, files, {"arc_easy": 25, "copa": 50, "winogrande": 50, "bigbench_operators": 0})
    tasks, baselines = ce.load_tasks(str(d), -1)
    s = ce.evaluate_core(LogitModel("constant"), ByteTokenizer(), tasks, baselines, "cpu", 512, progress=False)
    expected = {"arc_easy": (4 / 14, (4 / 14 - 0.25) / 0.75), "copa": (0.3, -0.4), "winogrande": (0.5, 0.0),
                "bigbench_operators": (0.0, 0.0)}
    for label, (acc, cen) in expected.items():
        assert s["tasks"][label]["accuracy"] == pytest.approx(acc) and s["tasks"][label]["centered"] == pytest.approx(cen)
    assert s["core"] == pytest.approx(((4 / 14 - 0.25) / 0.75 - 0.4) / 4)
    # binomial standard errors: sqrt(p (1 - p) / n) / (1 - baseline)
    assert s["tasks"]["arc_easy"]["centered_se"] == pytest.approx((4 / 14 * 10 / 14 / 14) ** 0.5 / 0.75)
    assert s["missing"] == [label for label, *_ in ce.TASKS if label not in expected] and len(s["missing"]) == 18
    assert ce.core_line(s) == f"CORE {s['core']:.4f} (4/22 tasks, partial)"
    rec = ce.core_record(s, 7, 1e9, -1)
    assert rec["type"] == "core" and rec["partial"] and set(rec["tasks"]) == set(expected)


SMALL = dict(sequence_len=512, vocab_size=257, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)


@pytest.mark.parametrize("kind,extra", [
    ("dense", {}), ("moe", dict(use_moe=True, n_experts=4, expert_topk=2)), ("mod", dict(mod_capacity=0.5, mod_freq=2)),
    ("mtp", dict(mtp_heads=1)), ("mamba", dict(layer_pattern="AM", mamba_head_dim=16, mamba_d_state=16, mamba_chunk=32)),
])
def test_batching_does_not_change_answers(kind, extra):
    """Rows padded into shared batches (longest first) answer as one example at a time, for every
    kind of model (MoD: its causal rule at eval; MTP: the heads are not read)."""
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **extra))
    model.init_weights()
    model.eval()
    tok = ByteTokenizer()
    for label in ("arc_easy", "winogrande", "bigbench_operators"):
        rows = ce.select_rows(ce.load_rows(ce.task_path(str(BUNDLE), SPEC[label][1]), SPEC[label][4]), SPEC[label][2], -1, "")
        one = ce.evaluate_task(model, tok, rows, SPEC[label], "cpu", 512, budget_tokens=1, warn=lambda *_: None)
        many = ce.evaluate_task(model, tok, rows, SPEC[label], "cpu", 512, budget_tokens=1 << 20, warn=lambda *_: None)
        assert one["answers"] == many["answers"] and len(one["answers"]) == len(rows), (kind, label)


def test_an_upcycled_model_answers_as_its_source():
    """Growth is function-preserving: the MoE made from a dense model gives the same answers."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.grow import upcycle
    torch.manual_seed(1)
    dense = GPT(GPTConfig(**SMALL))
    dense.init_weights()
    moe = upcycle(dense, n_experts=4, topk=2)
    tok = ByteTokenizer()
    for m in (dense, moe):
        m.eval()
    for label in ("arc_easy", "copa", "winogrande"):
        rows = ce.select_rows(ce.load_rows(ce.task_path(str(BUNDLE), SPEC[label][1]), SPEC[label][4]), SPEC[label][2], -1, "")
        a = ce.evaluate_task(dense, tok, rows, SPEC[label], "cpu", 512)
        b = ce.evaluate_task(moe, tok, rows, SPEC[label], "cpu", 512)
        assert a["answers"] == b["answers"], label


# 4. Bad task files and partial bundles

@pytest.mark.parametrize("line,needle", [
    ("{not json", "arc_easy.jsonl:2: not a JSON object"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "arc_easy.jsonl:2: gold index 2 out of range for 2 options"),
    ('{"query": "q", "choices": ["a"], "gold": 0}', "arc_easy.jsonl:2: needs a list of at least 2 strings"),
    ('{"query": "q", "gold": 0}', "arc_easy.jsonl:2: a multiple_choice row needs the fields query, choices, gold"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, needle):
    good = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0})
    d = tmp_path / "eval"
    d.mkdir()
    (d / "arc_easy.jsonl").write_text(good + "\n" + line + "\n" + (good + "\n") * 12)
    (d / "eval_meta_data.csv").write_text("Eval Task,Random baseline\narc_easy,25\n")
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        ce.load_tasks(str(d), -1)


def test_too_few_rows_for_the_shots(tmp_path):
    with pytest.raises(UserError, match=r"arc_easy.jsonl: 5 rows \(--max-per-task 5\), fewer than 10 shots \+ 1"):
        ce.load_tasks(str(BUNDLE), 5)
    with pytest.raises(UserError, match="no eval_meta_data.csv"):
        ce.load_tasks(str(BUNDLE / "eval_data"), -1)
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "eval_meta_data.csv").write_text("Eval Task,Random baseline\n")
    with pytest.raises(UserError, match="none of the 22 CORE task files found"):
        ce.load_tasks(str(empty), -1)


def test_flat_and_nested_layouts_find_the_same_files(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in BUNDLE.rglob("*.jsonl"):
        shutil.copy(f, flat / f.name)
    shutil.copy(BUNDLE / "eval_meta_data.csv", flat)
    nested, _ = ce.load_tasks(str(BUNDLE), -1)
    flat_tasks, _ = ce.load_tasks(str(flat), -1)
    assert [(s[0], rows) for s, _, rows in nested] == [(s[0], rows) for s, _, rows in flat_tasks]
    assert [s[0] for s, _, _ in nested] == ["arc_easy", "copa", "lambada_openai", "winogrande", "bigbench_operators"]


def test_unscorable_examples_are_skipped_and_counted():
    tasks, baselines = ce.load_tasks(str(BUNDLE), -1)
    lm = [t for t in tasks if t[0][0] == "lambada_openai"]
    warnings = []
    r = ce.evaluate_task(LogitModel("constant"), ByteTokenizer(), lm[0][2], lm[0][0], "cpu", max_len=5, warn=warnings.append)
    # ' mat' (4 bytes) fits after one token of context in 5; ' red mat' (8 bytes) cannot: 4 of 12 rows
    assert (r["scored"], r["skipped"]) == (8, 4)
    assert len(warnings) == 1 and "lambada_openai: 4 example(s) skipped" in warnings[0] and "line" in warnings[0]


@pytest.mark.skipif(not SHARED_EVAL.is_dir(), reason="needs ../shared/data/eval (the 18 local CORE task files)")
def test_the_shared_task_files_load_as_18_of_22():
    tasks, baselines = ce.load_tasks(str(SHARED_EVAL), 100)
    assert len(tasks) == 18 and all(len(rows) == min(100, len(rows)) for _, _, rows in tasks)
    assert {label for label, *_ in ce.TASKS} - {s[0] for s, _, _ in tasks} == {"hellaswag_zeroshot", "hellaswag", "squad", "coqa"}
    assert baselines["boolq"] == 0.62 and baselines["bigbench_language_identification"] == pytest.approx(0.091)


# 5. nanochat's own numbers on a nanochat checkpoint

from tests.test_import_nanochat import imported, ckpt  # noqa: E402,F401  (the imported fixture run)


def test_imported_nanochat_checkpoint_scores_as_nanochats_base_eval(imported):
    from nanochat.checkpoint import load_model
    ref = json.loads((REPO / "tests" / "fixtures" / "nanochat" / "core_reference.json").read_text())["tasks"]
    model, tokenizer, _ = load_model(str(ckpt(imported[0], "nc")), torch.device("cpu"))
    tasks, baselines = ce.load_tasks(str(BUNDLE), -1)
    for spec, path, rows in tasks:
        label, task_type = spec[0], spec[4]
        r = ce.evaluate_task(model, tokenizer, rows, spec, "cpu", model.config.sequence_len)
        want = ref[label]
        assert (spec[2], spec[3], task_type) == (want["num_fewshot"], want["continuation_delimiter"], want["task_type"])
        assert [r["answers"][i] for i in range(len(rows))] == want["correct"], label
        assert r["correct"] / r["scored"] == pytest.approx(want["accuracy"], abs=1e-6)
        for i in range(len(rows)):
            (toks, s, e), _ = ce.prepare_example(rows, i, spec, tokenizer, model.config.sequence_len)
            if task_type == ce.LM:
                assert (toks[0], s[0], e[0]) == (want["lm"][i]["tokens"], want["lm"][i]["start"], want["lm"][i]["end"])
            else:
                logits, idx = ce.forward_rows(model, toks, tokenizer.get_bos_token_id(), "cpu")
                means = [torch.nn.functional.cross_entropy(logits[j, a - 1:b - 1], idx[j, a:b]).item()
                         for j, (a, b) in enumerate(zip(s, e))]
                assert means == pytest.approx(want["mean_losses"][i], abs=1e-5), (label, i)
