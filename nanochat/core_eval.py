"""
CORE: the centred in-context-learning score of the DCLM paper (Li et al. 2024, "DataComp-LM",
arXiv:2406.11794, section 3.5 and appendix G), as nanochat evaluates its base models.

Sources, read at these commits (nothing copied):
- the 22 tasks, their files, shots and continuation delimiters: mlfoundations/dclm 15af3ce,
  eval/mmlu_and_lowvar.yaml (its MMLU row left out: the other 22 rows are DCLM's "core"
  low-variance set, the set nanochat's eval bundle lists in core.yaml);
- prompts, scoring, seeds, truncation, centring: karpathy/nanochat 92d63d4,
  nanochat/core_eval.py and scripts/base_eval.py;
- random baselines: the bundle's eval_meta_data.csv (llm-foundry's v1 file, as nanochat uses).
  DCLM's later v2 file changes three of the baselines, so a CORE computed with it is a
  different number: compare CORE only between runs scored with the same file.

How one task is scored:
1. rows shuffled with random.Random(1337), the first --max-per-task kept;
2. example i draws its shots from the other kept rows with random.Random(1234 + i);
3. prompts rendered (multiple choice: one per option; schema: one per context option;
   language modelling: the context without and with the continuation), each encoded with BOS
   in front;
4. the scored tokens: after the options' common token prefix (multiple choice), the
   contexts' common token suffix (schema), or the continuation (language modelling);
   a prompt longer than the model's context loses tokens on the left, indices shifted;
5. multiple choice / schema: the option whose scored tokens have the lowest mean
   cross-entropy wins (ties: the first); language modelling: correct when the greedy
   prediction equals every continuation token;
6. centred accuracy = (acc - b) / (1 - b) with b the random baseline; CORE = the mean over
   tasks. With fewer than 22 task files the score is marked partial.
"""

import csv
import json
import math
import os
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import UserError, require

MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
# (label, file under the bundle's eval_data/, shots, continuation delimiter, type)
TASKS = [
    ("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", 0, " ", MC),
    ("jeopardy", "world_knowledge/jeopardy_all.jsonl", 10, "\nAnswer: ", LM),
    ("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", 10, " ", LM),
    ("arc_easy", "world_knowledge/arc_easy.jsonl", 10, "\nAnswer: ", MC),
    ("arc_challenge", "world_knowledge/arc_challenge.jsonl", 10, "\nAnswer: ", MC),
    ("copa", "commonsense_reasoning/copa.jsonl", 0, " ", MC),
    ("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", 10, " ", MC),
    ("piqa", "commonsense_reasoning/piqa.jsonl", 10, "\nAnswer: ", MC),
    ("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", 0, " ", MC),
    ("lambada_openai", "language_understanding/lambada_openai.jsonl", 0, " ", LM),
    ("hellaswag", "language_understanding/hellaswag.jsonl", 10, " ", MC),
    ("winograd", "language_understanding/winograd_wsc.jsonl", 0, " ", SCHEMA),
    ("winogrande", "language_understanding/winogrande.jsonl", 0, " ", SCHEMA),
    ("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", 10, " ", LM),
    ("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", 3, " ", MC),
    ("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", 10, " ", LM),
    ("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", 10, " ", LM),
    ("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", 10, " ", LM),
    ("squad", "reading_comprehension/squad.jsonl", 10, " ", LM),
    ("coqa", "reading_comprehension/coqa.jsonl", 0, " ", LM),
    ("boolq", "reading_comprehension/boolq.jsonl", 10, "\nAnswer: ", MC),
    ("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl", 10, " ", MC),
]
SHUFFLE_SEED, FEWSHOT_SEED = 1337, 1234
REQUIRED = {MC: ("query", "choices", "gold"), SCHEMA: ("context_options", "continuation", "gold"), LM: ("context", "continuation")}


# -----------------------------------------------------------------------------
# Task files

def task_path(eval_dir, rel):
    """The task file in either layout: the bundle's nested eval_data/<category>/<file>,
    <category>/<file>, or flat <file>. None when absent."""
    for path in (os.path.join(eval_dir, "eval_data", rel), os.path.join(eval_dir, rel),
                 os.path.join(eval_dir, os.path.basename(rel))):
        if os.path.isfile(path):
            return path
    return None


def read_baselines(eval_dir):
    """{label: random baseline as a fraction} from eval_meta_data.csv (percent in the file)."""
    path = os.path.join(eval_dir, "eval_meta_data.csv")
    require(os.path.isfile(path), f"--eval-dir {eval_dir}: no eval_meta_data.csv (the random baselines CORE is centred on)")
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            try:
                out[row["Eval Task"]] = float(row["Random baseline"]) / 100
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{path}:{n}: expected columns 'Eval Task' and a numeric 'Random baseline'")
    return out


def load_rows(path, task_type):
    """Every row of a task file, checked: [(line number, row)]. A bad row is an error naming
    the file and line (the file is broken; scoring the rest would be a different task)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{n}: not a JSON object ({e})")
            where = f"{path}:{n}"
            require(isinstance(row, dict) and all(k in row for k in REQUIRED[task_type]),
                    f"{where}: a {task_type} row needs the fields {', '.join(REQUIRED[task_type])}")
            options = row.get("choices", row.get("context_options"))
            if task_type != LM:
                require(isinstance(options, list) and len(options) >= 2 and all(isinstance(o, str) for o in options),
                        f"{where}: needs a list of at least 2 strings")
                gold = row["gold"]
                require(isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(options),
                        f"{where}: gold index {gold!r} out of range for {len(options)} options")
            rows.append((n, row))
    return rows


def select_rows(rows, shots, max_per_task, path):
    """The rows a task is scored on: shuffled with random.Random(1337), the first max_per_task
    kept (<= 0: all). Each example's shots come from the other kept rows, so a task needs
    shots + 1 of them."""
    rows = list(rows)
    random.Random(SHUFFLE_SEED).shuffle(rows)
    if max_per_task > 0:
        rows = rows[:max_per_task]
    if len(rows) < shots + 1:
        limit = f" (--max-per-task {max_per_task})" if max_per_task > 0 else ""
        raise UserError(f"{path}: {len(rows)} rows{limit}, fewer than {shots} shots + 1")
    return rows


def fewshot_rows(rows, idx, shots):
    if shots == 0:
        return []
    rng = random.Random(FEWSHOT_SEED + idx)
    return [rows[i] for i in rng.sample([i for i in range(len(rows)) if i != idx], shots)]


# -----------------------------------------------------------------------------
# Prompts (the strings nanochat's templates render, in plain Python)

def render(item, task_type, delimiter, shots):
    """The prompts of one example: one per option (multiple choice, schema), or the context
    without and with its continuation (language modelling). Shots are separated by a blank line."""
    if task_type == MC:
        head = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == SCHEMA:
        head = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    # contexts are trimmed (some files keep trailing spaces that would merge into the next token)
    head = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    without = f"{head}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


def common_length(seqs, from_end=False):
    """Length of the common prefix (or suffix) of token lists."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(s[j] != seqs[0][j] for s in seqs[1:]):
            return i
    return n


def score_spans(tokens, task_type):
    """(rows, starts, ends): the token rows the model reads and, per row, the span of scored
    tokens [start, end). None when the prompts give nothing to score."""
    if task_type == MC:
        start = common_length(tokens)
        spans = [(start, len(t)) for t in tokens]
        rows = tokens
    elif task_type == SCHEMA:
        suffix = common_length(tokens, from_end=True)
        spans = [(len(t) - suffix, len(t)) for t in tokens]
        rows = tokens
    else:
        without, with_ = tokens
        if with_[:len(without)] != without:
            return None  # the continuation merged into the context's last token
        spans, rows = [(len(without), len(with_))], [with_]
    if any(s >= e for s, e in spans):
        return None
    return rows, [s for s, _ in spans], [e for _, e in spans]


def truncate_left(rows, starts, ends, max_len):
    """Rows longer than max_len keep their last max_len tokens; indices shift with them.
    None when a scored span would lose its first token's context (start < 1)."""
    out_rows, out_s, out_e = [], [], []
    for r, s, e in zip(rows, starts, ends):
        crop = max(0, len(r) - max_len)
        if s - crop < 1:
            return None
        out_rows.append(r[crop:])
        out_s.append(s - crop)
        out_e.append(e - crop)
    return out_rows, out_s, out_e


def prepare_example(rows, idx, spec, tokenizer, max_len):
    """(token rows, starts, ends) of example idx, or (None, reason) when it cannot be scored."""
    label, _, shots, delimiter, task_type = spec
    item = rows[idx][1]
    prompts = render(item, task_type, delimiter, [r for _, r in fewshot_rows(rows, idx, shots)])
    tokens = tokenizer.encode(prompts, prepend_bos=True)
    spans = score_spans(tokens, task_type)
    if spans is None:
        return None, "nothing to score (options equal, or the continuation merged into the context)"
    cut = truncate_left(*spans, max_len)
    if cut is None:
        return None, f"the scored tokens alone fill the model's {max_len}-token context"
    return cut, None


# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def forward_rows(model, rows, pad_id, device):
    """logits (B, T, V) of right-padded rows (causal: padding never changes earlier positions)."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return model(idx.to(device)).float(), idx.to(device)


def judge(logits, idx, starts, ends, task_type, gold):
    """Whether one example is answered right, from its rows' logits."""
    if task_type == LM:
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1:e - 1].argmax(-1), idx[0, s:e]))
    means = [F.cross_entropy(logits[i, s - 1:e - 1], idx[i, s:e]).item() for i, (s, e) in enumerate(zip(starts, ends))]
    return means.index(min(means)) == gold  # ties: the first option, as min/index gives


def plan_batches(prepared, budget):
    """Groups of example indices whose rows, padded to the group's longest, fit `budget`
    tokens (longest first, so each group pads little). One example always fits alone."""
    order = sorted(prepared, key=lambda i: -max(len(r) for r in prepared[i][0]))
    batches, cur, cur_rows, cur_len = [], [], 0, 0
    for i in order:
        rows = prepared[i][0]
        n, length = len(rows), max(len(r) for r in rows)
        if cur and (cur_rows + n) * max(cur_len, length) > budget:
            batches.append(cur)
            cur, cur_rows, cur_len = [], 0, 0
        cur.append(i)
        cur_rows += n
        cur_len = max(cur_len, length)
    return batches + ([cur] if cur else [])


def evaluate_task(model, tokenizer, rows, spec, device, max_len, budget_tokens=16384, autocast=None,
                  lockstep=False, on_example=None, warn=print):
    """Score one task's selected rows; under torch.distributed the examples are split over the
    ranks (example i on rank i % world) and the counts summed. An example that cannot be scored
    (its scored tokens alone fill the context) is skipped and counted, with one line per task.
    Returns dict(correct, scored, skipped, answers={example index: correct} of this rank).
    lockstep: every rank runs the same number of forwards (expert parallelism)."""
    label, path, _, _, task_type = spec
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    prepared, skipped = {}, []
    for i in range(rank, len(rows), world):
        cut, reason = prepare_example(rows, i, spec, tokenizer, max_len)
        if cut is None:
            skipped.append((rows[i][0], reason))
            if on_example:
                on_example()
            continue
        prepared[i] = cut
    batches = plan_batches(prepared, max(budget_tokens, max_len))
    n_forwards = len(batches)
    if lockstep:
        n = torch.tensor([n_forwards], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        n_forwards = int(n.item())
    answers = {}
    bos = tokenizer.get_bos_token_id()
    for b in range(n_forwards):
        group = batches[b] if b < len(batches) else []
        rows_b = [r for i in group for r in prepared[i][0]] or [[bos]]  # a dummy forward keeps ranks in step
        with autocast or torch.no_grad():
            logits, idx = forward_rows(model, rows_b, bos, device)
        at = 0
        for i in group:
            r, s, e = prepared[i]
            gold = rows[i][1].get("gold")
            answers[i] = judge(logits[at:at + len(r)], idx[at:at + len(r)], s, e, task_type, gold)
            at += len(r)
            if on_example:
                on_example()
    counts = torch.tensor([sum(answers.values()), len(prepared), len(skipped)], dtype=torch.long, device=device)
    if world > 1:
        dist.all_reduce(counts)
    c, n, k = counts.tolist()
    if k:
        first = f" (e.g. {path} line {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        warn(f"core: {label}: {k} example(s) skipped and counted, not scored{first}")
    return dict(correct=c, scored=n, skipped=k, answers=answers)


def centred(acc, baseline):
    return (acc - baseline) / (1 - baseline)


def summarize(results, baselines):
    """Per-task accuracy, centred accuracy and standard errors (binomial, sqrt(p(1-p)/n)), and
    CORE = the mean centred accuracy over the tasks scored, its standard error (tasks taken
    as independent), the count and whether it is partial (not all 22 tasks)."""
    tasks = {}
    for label, r in results.items():
        n = r["scored"]
        acc = r["correct"] / n if n else float("nan")
        se = math.sqrt(acc * (1 - acc) / n) if n else float("nan")
        b = baselines[label]
        r = {k: v for k, v in r.items() if k != "answers"}
        tasks[label] = dict(r, accuracy=acc, se=se, centered=centred(acc, b), centered_se=se / (1 - b), baseline=b)
    k = len(tasks)
    core = sum(t["centered"] for t in tasks.values()) / k if k else float("nan")
    core_se = math.sqrt(sum(t["centered_se"] ** 2 for t in tasks.values())) / k if k else float("nan")
    missing = [label for label, *_ in TASKS if label not in tasks]
    return dict(core=core, core_se=core_se, n_tasks=k, partial=bool(missing), missing=missing, tasks=tasks)


def core_line(summary):
    """CORE <x> (<n>/22 tasks[, partial])"""
    partial = ", partial" if summary["partial"] else ""
    return f"CORE {summary['core']:.4f} ({summary['n_tasks']}/{len(TASKS)} tasks{partial})"


def format_table(summary):
    lines = [f"{'task':<34} {'shots':>5} {'type':<18} {'examples':>8} {'accuracy':>9} {'centred':>8} {'s.e.':>7}"]
    for label, path, shots, _, task_type in TASKS:
        t = summary["tasks"].get(label)
        if t is None:
            lines.append(f"{label:<34} {shots:>5} {task_type:<18} {'missing':>8}")
            continue
        skipped = f" ({t['skipped']} skipped)" if t["skipped"] else ""
        lines.append(f"{label:<34} {shots:>5} {task_type:<18} {t['scored']:>8} {t['accuracy']:>9.4f} "
                     f"{t['centered']:>8.4f} {t['centered_se']:>7.4f}{skipped}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# All tasks

def load_tasks(eval_dir, max_per_task):
    """(tasks, baselines): [(spec, path, selected rows)] for the task files present in eval_dir
    (flat or nested layout), every file read and checked, and the random baselines. Cheap: run
    it before loading or training a model, so a bad file stops the run before the work."""
    require(os.path.isdir(eval_dir), f"--eval-dir {eval_dir}: no such folder")
    baselines = read_baselines(eval_dir)
    tasks = []
    for spec in TASKS:
        label, rel, shots, _, task_type = spec
        path = task_path(eval_dir, rel)
        if path is None:
            continue
        require(label in baselines, f"{os.path.join(eval_dir, 'eval_meta_data.csv')}: no random baseline for {label}")
        tasks.append((spec, path, select_rows(load_rows(path, task_type), shots, max_per_task, path)))
    require(tasks, f"--eval-dir {eval_dir}: none of the {len(TASKS)} CORE task files found "
                   f"(e.g. {os.path.basename(TASKS[0][1])}, flat or under eval_data/<category>/)")
    return tasks, baselines


def evaluate_core(model, tokenizer, tasks, baselines, device, max_len, autocast=None, lockstep=False,
                  progress=True, budget_tokens=None):
    """Score every loaded task (load_tasks) and summarize: the dict of summarize() plus
    max_per_task-independent counts. A progress bar over this rank's examples when progress."""
    from tqdm import tqdm
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if budget_tokens is None:  # logits of one batch stay near 64 MiB in fp32
        budget_tokens = max(max_len, (1 << 24) // max(1, model.config.vocab_size))
    total = sum(len(range(rank, len(rows), world)) for _, _, rows in tasks)
    results = {}
    was_training = model.training
    model.eval()
    with tqdm(total=total, unit="ex", desc="CORE", disable=not progress or rank != 0) as bar:
        warn = bar.write if rank == 0 else (lambda *_: None)
        for spec, path, rows in tasks:
            bar.set_description(f"CORE {spec[0]}")
            results[spec[0]] = evaluate_task(model, tokenizer, rows, (spec[0], path, *spec[2:]), device, max_len, budget_tokens, autocast,
                                             lockstep, on_example=lambda: bar.update(1), warn=warn)
    model.train(was_training)
    return summarize(results, baselines)


def core_record(summary, step, flops, max_per_task):
    """The metrics.jsonl record of a CORE evaluation."""
    tasks = {label: {k: t[k] for k in ("accuracy", "centered", "se", "scored", "skipped")} for label, t in summary["tasks"].items()}
    return dict(type="core", step=step, flops=flops, core=summary["core"], core_se=summary["core_se"],
                n_tasks=summary["n_tasks"], partial=summary["partial"], missing=summary["missing"],
                max_per_task=max_per_task, tasks=tasks)
