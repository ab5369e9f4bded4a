"""
The techmix study (issue "Does the MoE earn its parameters?"): dense frontiers and MoE
variants at equal training FLOPs on ../shared/data/text/techmix.jsonl, run in the background,
resumable, results logged as they arrive.

    python dev/techmix_study.py                     # run every unfinished run, 2 at a time
    python dev/techmix_study.py --only s_moe8_1e13  # just these (comma-separated)
    python dev/techmix_study.py --list              # the runs and their commands, nothing run
    python dev/techmix_study.py --report            # the results table of finished runs

Everything goes to $NANOCHAT_BASE_DIR (default /work/tm here): runs/<tag>/, study/logs/<tag>.log,
study/results.jsonl (one line per finished run, appended when it finishes) and
study/results.md (the table, rewritten each time). A finished run (summary in its
metrics.jsonl) is skipped; an interrupted one restarts from its latest checkpoint
(--save-every), so killing the driver loses at most a few minutes per run.

Each run uses one thread (OMP_NUM_THREADS=1) and --jobs runs share the machine, so the tok/s
of all runs are measured under the same load (2 single-thread jobs on our 2-core CPU).
"""

import argparse
import json
import os
import subprocess
import sys
import time

from nanochat.checkpoint import complete_steps
from nanochat.common import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "text", "techmix.jsonl")

# Shared by every run: a 1024-token vocab (so the embedding does not dominate a small model),
# 256-token rows, 16k tokens per optimizer step, the first 512k val tokens for every eval.
# The model these studies ran on: none of nanochat's pieces (the defaults since the nanochat study
# include value embeddings, SSSL windows and q·k scale 1.2; a piece's own flags come later and win)
BEFORE_PIECES = ["--no-value-embeds", "--window-pattern", "L", "--qk-scale", "1"]
COMMON = BEFORE_PIECES + ["--vocab-size", "1024", "--max-seq-len", "256", "--head-dim", "32", "--total-batch-size", "16384",
          "--device-batch-size", "64", "--eval-tokens", "524288", "--sample-every", "-1", "--log-every", "50",
          "--moe-stats-every", "50", "--save-every", "100", "--keep-checkpoints", "1"]
SMALL = ["--depth", "2", "--n-embd", "64", "--eval-every", "200"]    # 98k non-embedding params
LARGE = ["--depth", "4", "--n-embd", "128", "--eval-every", "200"]   # 786k non-embedding params
# Every routing flag spelled out, so the runs do not depend on the CLI defaults (which this
# study changed: sigmoid + aux-free since 2026-11-26; softmax + Switch 0.01 before).
SWITCH = ["--router", "softmax", "--aux-free-bias", "0", "--balance-loss-coeff", "0.01"]
AUXFREE = ["--router", "sigmoid", "--aux-free-bias", "0.01", "--balance-loss-coeff", "0"]
MOE8 = ["--use-moe", "--n-experts", "8", "--expert-topk", "2"] + SWITCH   # top-2 of 8, width 2d (iso-FLOPs)
MOE32 = ["--use-moe", "--n-experts", "32", "--expert-topk", "2"] + SWITCH
FINE64 = ["--use-moe", "--n-experts", "64", "--expert-topk", "8"] + SWITCH  # width 4/8 = d/2
MOE8_AF = ["--use-moe", "--n-experts", "8", "--expert-topk", "2"] + AUXFREE
MOE32_AF = ["--use-moe", "--n-experts", "32", "--expert-topk", "2"] + AUXFREE
HYBRID = ["--layer-pattern", "AM", "--mamba-expand", "2", "--mamba-head-dim", "32", "--mamba-d-state", "32",
          "--mamba-chunk", "64", "--mamba-d-conv", "4"]


def flops_tag(f):
    return f"{f:g}".replace("e+", "e")  # 5.5e13


def runs():
    """(tag, flags) in the order they are run: what answers the question first."""
    out = []
    def add(prefix, shape, extra, flops, seed=42):
        tag = f"{prefix}_{flops_tag(flops)}" + (f"_seed{seed}" if seed != 42 else "")
        out.append((tag, shape + extra + ["--target-flops", f"{flops:g}", "--seed", str(seed)]))
    # small model: dense frontier 2.5e12 .. 4e13 (18 .. 300 tokens per non-embedding parameter)
    for f in (5e12, 1e13, 2e13):
        add("s_dense", SMALL, [], f)
    add("s_moe8", SMALL, MOE8, 1e13)
    add("s_dense", SMALL, [], 4e13)
    add("s_moe8_af", SMALL, MOE8_AF, 1e13)
    add("s_moe32", SMALL, MOE32, 1e13)
    add("s_fine64", SMALL, FINE64, 1e13)
    # larger model at ~10 tokens per non-embedding parameter (longest runs first: 2 slots)
    add("l_dense", LARGE, [], 8e13)
    add("l_moe8", LARGE, MOE8, 5.5e13)
    add("l_dense", LARGE, [], 5.5e13)
    # second seed of the headline pairs
    add("s_moe8_af", SMALL, MOE8_AF, 1e13, seed=43)
    add("s_dense", SMALL, [], 1e13, seed=43)
    add("s_moe8", SMALL, MOE8, 1e13, seed=43)
    # the ceiling of the MoE's parameters: all 8 experts on every token (a 16d-wide FFN, 4.3x the
    # FFN FLOPs) for the tokens of the 1e13 runs. No top-2 of these 8 experts can beat it per token.
    out.append(("s_all8_443steps", SMALL + ["--use-moe", "--n-experts", "8"] + SWITCH + ["--expert-topk", "8", "--expert-hidden-mult", "2",
                                                   "--num-iterations", "443", "--seed", "42"]))
    # seed 43 put the aux-free MoE 0.016 bpb *behind* dense (seed 42: 0.023 ahead): a third seed
    add("s_dense", SMALL, [], 1e13, seed=44)
    add("s_moe8_af", SMALL, MOE8_AF, 1e13, seed=44)
    add("s_moe8", SMALL, MOE8, 1e13, seed=44)
    # the same ceiling at the tokens of the 2e13 runs: does FFN capacity pay more with more tokens?
    # (this one ran with sigmoid + aux-free weights: the CLI defaults had just changed)
    out.append(("s_all8_887steps", SMALL + ["--use-moe", "--n-experts", "8"] + AUXFREE + ["--expert-topk", "8", "--expert-hidden-mult", "2",
                                                   "--num-iterations", "887", "--seed", "42"]))
    # the MoE at other budgets (does it gain more with more tokens per parameter?)
    add("s_moe8_af", SMALL, MOE8_AF, 2e13)
    add("s_moe8_af", SMALL, MOE8_AF, 5e12)
    add("s_moe32_af", SMALL, MOE32_AF, 1e13)
    add("s_dense", SMALL, [], 2.5e12)
    # the aux-free MoE at 2e13 read 1.28: a second seed of that pair, and Switch there
    add("s_moe8_af", SMALL, MOE8_AF, 2e13, seed=43)
    add("s_dense", SMALL, [], 2e13, seed=43)
    add("s_moe8", SMALL, MOE8, 2e13)
    # issue 14 at the 1e13 baselines' budget: one MTP head (run by hand first, listed for the
    # record), and Mixture-of-Depths at Raposo et al.'s 12.5% capacity on every other block
    add("s_dense_mtp1", SMALL, ["--mtp-heads", "1"], 1e13)
    add("s_moe8_af_mtp1", SMALL, MOE8_AF + ["--mtp-heads", "1"], 1e13)
    add("s_dense_mod0.125", SMALL, ["--mod-capacity", "0.125", "--mod-freq", "2"], 1e13)
    add("s_moe8_af_mod0.125", SMALL, MOE8_AF + ["--mod-capacity", "0.125", "--mod-freq", "2"], 1e13)
    add("s_dense_mod0.125", SMALL, ["--mod-capacity", "0.125", "--mod-freq", "2"], 1e13, seed=43)
    add("s_moe8_af_mod0.125", SMALL, MOE8_AF + ["--mod-capacity", "0.125", "--mod-freq", "2"], 1e13, seed=43)
    # the larger shape routes 2 of its 4 blocks (the small one only 1 of 2)
    add("l_dense_mod0.125", LARGE, ["--mod-capacity", "0.125", "--mod-freq", "2"], 5.5e13)
    # control: MoD at 12.5% costs about one block per token; so does a depth-1 dense model
    add("s_d1_dense", ["--depth", "1", "--n-embd", "64", "--eval-every", "200"], [], 1e13)
    # issue 15: hybrids, attention then Mamba-2 (inner 128 in 4 heads of 32, state 32, chunk 64)
    add("s_dense_hybAM", SMALL, HYBRID, 1e13)
    add("s_moe8_af_hybAM", SMALL, MOE8_AF + HYBRID, 1e13)
    # the larger shape's MoD control: depth 2 at width 128 costs about what MoD's 4 blocks do
    add("l_d2_dense", ["--depth", "2", "--n-embd", "128", "--eval-every", "200"], [], 5.5e13)
    add("s_dense_hybAM", SMALL, HYBRID, 1e13, seed=43)
    add("s_moe8_af_hybAM", SMALL, MOE8_AF + HYBRID, 1e13, seed=43)
    return out


# The nanochat study (issue 26): nanochat's architecture and recipe pieces, each alone and as a
# set, against today's dense model at depth 4, width 64 (where backout and the short windows can
# act: at depth 2 the final norm undoes backout), 2e13 FLOPs (43 tokens per non-embedding
# parameter, 0.23 epochs). Rotary base, vocab padding and weight casting are GPU-speed or
# long-context matters and are not ablated here.
ABLATION_SHAPE = ["--depth", "4", "--n-embd", "64", "--eval-every", "-1"]
PIECES = {  # name -> flags, each nanochat's value (MODEL_PRESETS / RECIPE_PRESETS["nanochat"])
    "ve": ["--value-embeds"],
    "lambdas": ["--layer-lambdas"],
    "smear": ["--smear"],
    "backout": ["--backout"],
    "window": ["--window-pattern", "SSSL"],  # short = 128 of the 256-token rows on 3 of 4 layers
    "qk": ["--qk-scale", "1.2"],
    "init": ["--embedding-init-std", "0.8", "--fc-init-scale", "0.4"],
    "adamw": ["--adamw-groups", "nanochat", "--embedding-lr", "0.3", "--unembedding-lr", "0.008"],  # its betas with its lrs
    "polar": ["--muon-coeffs", "polar"],
    "eqplus": ["--muon-eq", "--muon-plus"],  # nanochat's Muon does both
    "normuon": ["--normuon"],
    "wd": ["--muon-weight-decay", "0.28", "--cautious-wd", "--muon-wd-schedule", "cosine"],
    "sched": ["--warmup-steps", "40", "--warmdown-ratio", "0.65", "--final-lr-frac", "0.05"],
    "momentum": ["--muon-momentum-schedule", "nanochat"],
}
ABLATION_SEEDS = (42, 43, 44)


def frontier_2e13_tag(adopted):
    """The ablation run (seed 42) that is the dense model with exactly the adopted pieces, if any."""
    adopted = sorted(adopted)
    if not adopted:
        return "a_base_2e13_seed42"
    if adopted == sorted(PIECES):
        return "a_set_2e13_seed42"
    if len(adopted) == 1:
        return f"a_{adopted[0]}_2e13_seed42"
    return None


def nanochat_runs(adopted=()):
    """The ablation (every piece alone and the set, 3 seeds, paired with the baseline by seed),
    then dense vs MoE with the adopted pieces (see below)."""
    out = []
    def add(prefix, flags, flops, seed):
        out.append((f"{prefix}_{flops_tag(flops)}_seed{seed}", ABLATION_SHAPE + flags + ["--target-flops", f"{flops:g}", "--seed", str(seed)]))
    for seed in ABLATION_SEEDS:
        add("a_base", [], 2e13, seed)
        for name, flags in PIECES.items():
            add(f"a_{name}", flags, 2e13, seed)
        add("a_set", [f for flags in PIECES.values() for f in flags], 2e13, seed)
    # dense vs MoE with the adopted pieces: the MoE at 5e12 and 1e13 (11 and 21 tokens per
    # non-embedding parameter), 2 seeds; a dense frontier of 3 annealed budgets around them (its
    # 2e13 point is the ablation's run when the adopted pieces are one piece or the set); one
    # shared expert and router lr 0.001 at 5e12; in the order they answer the question
    new = [f for name in adopted for f in PIECES[name]]
    moe = ["--use-moe", "--n-experts", "8", "--expert-topk", "2"] + AUXFREE
    add("n_dense", new, 5e12, 42)
    add("n_moe8_af", new + moe, 5e12, 42)
    add("n_dense", new, 1e13, 42)
    add("n_moe8_af", new + moe, 1e13, 42)
    if frontier_2e13_tag(adopted) is None:
        add("n_dense", new, 2e13, 42)
    add("n_moe8_af", new + moe, 5e12, 43)
    add("n_moe8_af_shared1", new + moe + ["--n-shared-experts", "1"], 5e12, 42)  # routed width 4d/3 pays for it
    add("n_moe8_af_routerlr0.001", new + moe + ["--router-lr", "0.001"], 5e12, 42)
    add("n_moe8_af", new + moe, 1e13, 43)
    add("n_dense", new, 1e13, 43)
    return out


def paired_gains(seeds=ABLATION_SEEDS):
    """{piece or 'set': [(seed, base bpb, piece bpb)]} over the seeds where both runs finished."""
    final = lambda tag: (records_of(tag)[1] or {}).get("final_val_bpb")
    out = {}
    for name in [*PIECES, "set"]:
        pairs = [(seed, final(f"a_base_2e13_seed{seed}"), final(f"a_{name}_2e13_seed{seed}")) for seed in seeds]
        out[name] = [p for p in pairs if p[1] is not None and p[2] is not None]
    return out


def adoption(gains):
    """(mean gain, standard error, verdict) of paired gains base - piece (bpb; > 0 = better).
    The rule: adopt when the mean exceeds 2 standard errors over 3 seeds. With 3 seeds a
    piece that loses (gain <= 0) on one of them can never pass it (for gains (0, x, x) the mean
    2x/3 equals 2 SE exactly; any gain below 0 makes the mean smaller than 2 SE), so a loss on
    the first seed settles the verdict without the other two."""
    n = len(gains)
    mean = sum(gains) / n
    se = (sum((g - mean) ** 2 for g in gains) / (n - 1)) ** 0.5 / n ** 0.5 if n > 1 else float("nan")
    if min(gains) <= 0:
        return mean, se, "no (lost on a seed)"
    if n < 3:
        return mean, se, "pending (fewer than 3 seeds)"
    return mean, se, "adopt" if mean > 2 * se else "no (mean <= 2 SE)"


def ablation_report():
    lines = ["| piece | flags | seeds | base bpb per seed | piece bpb per seed | paired gain per seed | mean gain | SE | rule |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, pairs in paired_gains().items():
        if not pairs:
            continue
        gains = [b - p for _, b, p in pairs]
        mean, se, verdict = adoption(gains)
        flags = "all of the above" if name == "set" else " ".join(PIECES[name])
        lines.append(f"| {name} | `{flags}` | {', '.join(str(s) for s, _, _ in pairs)} | "
                     f"{' / '.join(f'{b:.4f}' for _, b, _ in pairs)} | {' / '.join(f'{p:.4f}' for _, _, p in pairs)} | "
                     f"{' / '.join(f'{g:+.4f}' for g in gains)} | {mean:+.4f} | {se:.4f} | {verdict} |")
    return "\n".join(lines) + "\n"


def base_dir():
    return os.environ.get("NANOCHAT_BASE_DIR", "/work/tm")


def records_of(tag):
    """(header, summary, last moe record) of a run; summary is None until it has finished."""
    path = os.path.join(base_dir(), "runs", tag, "metrics.jsonl")
    records = read_metrics(path) if os.path.exists(path) else []
    last = lambda kind: next((r for r in reversed(records) if r.get("type") == kind), None)
    return last("header"), last("summary"), last("moe")


def command(tag, flags):
    cmd = [sys.executable, "-m", "scripts.base_train", "--data", DATA, *COMMON, *flags, "--model-tag", tag]
    if complete_steps(os.path.join(base_dir(), "runs", tag, "checkpoints")):
        cmd += ["--resume-from-step", "latest"]
    return cmd


def result_line(tag, flags, header, summary, moe):
    non_embedding = summary["active_total"] - header["params"]["wte"] - header["params"]["lm_head"]
    cv = [round(layer["cv"], 3) for layer in moe["layers"]] if moe else None
    return dict(tag=tag, flags=" ".join(flags), flops=summary["flops"], tokens=summary["tokens"],
                epochs=summary["epochs"], final_val_bpb=summary["final_val_bpb"], tok_per_sec=summary["tok_per_sec"],
                total=summary["total"], active=summary["active_total"],
                tokens_per_active_nonembedding_param=summary["tokens"] / non_embedding, load_cv=cv,
                wall_time=summary["wall_time"])


def write_report(todo=None):
    """The table of every finished run of the study, rebuilt from the run folders (so runs
    finished by an earlier or interrupted driver are in it too)."""
    lines = ["| run | FLOPs | tokens | tokens / non-emb param | epochs | final val bpb | tok/s | load CV (per layer) |",
             "|---|---|---|---|---|---|---|---|"]
    for tag, flags in todo or runs():
        header, summary, moe = records_of(tag)
        if summary is None:
            continue
        r = result_line(tag, flags, header, summary, moe)
        cv = "–" if not r["load_cv"] else " / ".join(f"{c:.2f}" for c in r["load_cv"])
        lines.append(f"| {r['tag']} | {r['flops']:.3e} | {r['tokens']:,} | {r['tokens_per_active_nonembedding_param']:.0f} "
                     f"| {r['epochs']:.2f} | {r['final_val_bpb']:.4f} | {r['tok_per_sec']:,.0f} | {cv} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(base_dir(), "study"), exist_ok=True)
    with open(os.path.join(base_dir(), "study", "results.md"), "w") as f:
        f.write(text)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    p.add_argument("--only", default="", help="comma-separated tags to run")
    p.add_argument("--list", action="store_true", help="print the runs and their commands")
    p.add_argument("--report", action="store_true", help="print the results table")
    p.add_argument("--study", default="moe", choices=["moe", "nanochat"],
                   help="moe: dense frontiers and MoE variants; nanochat: nanochat's pieces, then dense vs MoE again")
    p.add_argument("--adopted", default="", help="--study nanochat: comma-separated pieces the dense-vs-MoE runs use")
    args = p.parse_args()
    adopted = [a for a in args.adopted.split(",") if a]
    if set(adopted) - set(PIECES):
        sys.exit(f"techmix_study: error: --adopted: unknown piece(s) {sorted(set(adopted) - set(PIECES))}")
    todo = runs() if args.study == "moe" else nanochat_runs(adopted)
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {t for t, _ in todo}
        if unknown:
            sys.exit(f"techmix_study: error: --only: unknown run(s) {sorted(unknown)}")
        todo = [(t, f) for t, f in todo if t in wanted]
    if args.list:
        for tag, flags in todo:
            print(f"{tag}: {' '.join(command(tag, flags))}")
        return
    if args.report:
        print(write_report(todo), end="")
        if args.study == "nanochat":
            print("\n" + ablation_report(), end="")
        return
    if not os.path.exists(DATA):
        sys.exit(f"techmix_study: error: {DATA} not found (the study needs ../shared beside the checkout)")
    logs = os.path.join(base_dir(), "study", "logs")
    os.makedirs(logs, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": base_dir()}
    pending = [(t, f) for t, f in todo if records_of(t)[1] is None]
    print(f"{len(todo) - len(pending)} run(s) finished already, {len(pending)} to go, {args.jobs} at a time", flush=True)
    running = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            tag, flags = pending.pop(0)
            if records_of(tag)[1] is not None:  # finished meanwhile (by another driver)
                continue
            cmd = command(tag, flags)
            print(f"[{time.strftime('%H:%M:%S')}] start {tag}: {' '.join(cmd[1:])}", flush=True)
            log = open(os.path.join(logs, f"{tag}.log"), "a")
            running[tag] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), flags, log)
        time.sleep(5)
        for tag in list(running):
            proc, flags, log = running[tag]
            if proc.poll() is None:
                continue
            log.close()
            del running[tag]
            header, summary, moe = records_of(tag)
            if proc.returncode != 0 or summary is None:
                print(f"[{time.strftime('%H:%M:%S')}] FAILED {tag} (exit {proc.returncode}); see {logs}/{tag}.log", flush=True)
                continue
            line = result_line(tag, flags, header, summary, moe)
            with open(os.path.join(base_dir(), "study", "results.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
            write_report(todo)
            print(f"[{time.strftime('%H:%M:%S')}] done {tag}: val bpb {line['final_val_bpb']:.4f}, "
                  f"{line['tokens']:,} tokens, {line['epochs']:.2f} epochs, {line['tok_per_sec']:,.0f} tok/s, "
                  f"load CV {line['load_cv']}", flush=True)


if __name__ == "__main__":
    main()
