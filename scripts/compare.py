"""
Compare finished runs at equal training FLOPs (never at equal steps).

    python -m scripts.compare --runs cpu_dense cpu_moe --out comparison/

A run is a model tag (a folder under $NANOCHAT_BASE_DIR/runs) or a path to a run folder.
Prints a table and, with --out, writes comparison.md and comparison.png (val bpb vs
cumulative training FLOPs, log-x).

Compute multiplier of a run = (FLOPs the baseline needed to reach the run's final val bpb) /
(the run's FLOPs), reading the baseline's val-bpb curve with linear interpolation in
log-FLOPs between its evaluations. 1.4 means the baseline needs 1.4x the compute for the
same quality. When the baseline never got that low, it is "> x" with x = the baseline's
total FLOPs / the run's FLOPs. The baseline is --baseline, else the first dense run.

A single curve flatters the run being compared: the baseline's intermediate evals are taken
before its learning-rate warmdown, so they sit above what a run trained for exactly that
budget reaches. With `--frontier D1 D2 ...` (dense runs trained to different --target-flops)
the multiplier reads the curve through their *final* (FLOPs, val bpb) points instead, each
fully annealed (the IsoFLOP practice of Hoffmann et al. 2022): "> x" beyond the largest,
"<= x" when even the smallest frontier run was at least as good.

Every run shows its epochs (passes over its training data). A multiplier that involves a run
trained past one epoch (the run itself, its baseline or a frontier run) is marked "†":
on repeated data more compute can make a model *worse* (memorisation), so the number then
measures how the models cope with repetition, not how efficiently they use compute.

Time multiplier of a run = (training seconds the frontier, or the baseline curve, needed to
reach the run's final val bpb) / (the run's training seconds), read like the compute
multiplier on the same runs with seconds in place of FLOPs. Training seconds are step time
only: the sum of the `dt` of every optimizer step in metrics.jsonl (all segments of a resumed
run), so evaluations, samples and checkpoints are not in it, and a step whose time includes
torch.compile's compilation (the first step of each start under --compile) counts at the run's
median step time. The seconds at an eval are those of the steps up to it. Seconds compare only
on the same hardware (device name, processes, threads, from the metrics header): otherwise
"n/a (hardware differs)"; runs from before the header recorded it show "n/a (hardware unknown)".
"""

import math
import os
import statistics
from typing import NamedTuple

from nanochat.common import UserError, ArgumentParser, run_main, run_dir, read_metrics, atomic_write_text
from nanochat.report import init_source


class Run(NamedTuple):
    name: str
    header: dict
    evals: list      # [(cumulative training FLOPs, val bpb)], the --init-from lineage first
    summary: dict
    mfu: float       # mean MFU of the train records, or None
    clock: list      # [(training seconds, val bpb)] at the run's evals, or None (see step_clock)
    hardware: object  # dict(device, world_size, threads); None: not recorded; a str: it changed on resume
    core: dict = None  # the last "core" record (scripts/base_eval.py, base_train --core-every), or None


def load_run(run):
    """A finished run's records, as a Run."""
    folder = run_dir(run)
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"--runs {run}: no metrics.jsonl at {path}")
    records = read_metrics(path)
    header = next((r for r in records if r.get("type") == "header"), None)
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), None)
    if header is None or summary is None:
        raise UserError(f"--runs {run}: {path} has no header or no summary (unfinished run?)")
    own = sorted((r["step"], r["flops"], r["val_bpb"]) for r in records if r.get("type") == "eval")
    evals = [(f, b) for _, f, b in own]
    if evals:  # a run started --init-from: its curve begins where its sources' ended (FLOPs are cumulative)
        evals = [e for e in lineage_evals(header) if e[0] < evals[0][0]] + evals
    trains = [r for r in records if r.get("type") == "train"]
    mfus = [r["mfu"] for r in trains if r.get("mfu") is not None]
    mfu = sum(mfus) / len(mfus) if mfus else None
    # the seconds of the steps before an --init-from run are another run's: no clock for it
    clock = step_clock(trains, own) if not init_source(header) else None
    hardware = header.get("hardware")
    if hardware is not None and summary.get("hardware", hardware) != hardware:
        hardware = "changed on resume"  # equals no other run's: its seconds compare with nothing
    core = next((r for r in reversed(records) if r.get("type") == "core"), None)
    return Run(os.path.basename(os.path.normpath(folder)), header, evals, summary, mfu, clock, hardware, core)


def format_core(core):
    """'0.0123 ± 0.0050' (standard error), with the task count when not all 22 were scored."""
    if core is None:
        return "n/a"
    partial = f" ({core['n_tasks']}/22, partial)" if core.get("partial") else ""
    return f"{core['core']:.4f} ± {core['core_se']:.4f}{partial}"


def step_seconds(trains):
    """{step: seconds} of a run's optimizer steps, from the `dt` of its train records: a resumed
    run's metrics.jsonl holds every segment's (a step written twice counts once, as last
    written). A compile warm-up step counts at the median of the others: the step trained, the
    compilation in its dt is set-up, not training."""
    last = {r["step"]: r for r in trains if "dt" in r}
    plain = [r["dt"] for r in last.values() if not r.get("compile_warmup")]
    typical = statistics.median(plain) if plain else None
    return {s: (typical if r.get("compile_warmup") and typical is not None else r["dt"]) for s, r in last.items()}


def step_clock(trains, evals):
    """[(training seconds, val bpb)] at each eval (step, flops, val bpb): the seconds of the steps
    up to the eval's step. None when the run has no step times."""
    seconds = step_seconds(trains)
    if not seconds:
        return None
    steps = sorted(seconds)
    clock, total, i = [], 0.0, 0
    for step, _, bpb in evals:
        while i < len(steps) and steps[i] <= step:
            total += seconds[steps[i]]
            i += 1
        clock.append((total, bpb))
    return clock


def lineage_evals(header, depth=0):
    """Evals (flops, val_bpb) of the runs a run was started from (base_train --init-from, through
    scripts.grow), oldest first and up to the checkpoint each one was taken at, so a grown run's
    curve shows all its phases on the FLOPs axis. Sources that are gone are skipped."""
    source = init_source(header)
    if not source or depth > 32:
        return []
    name = os.path.basename(os.path.normpath(source))
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.normpath(source))), "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    records = read_metrics(path)
    last = int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else float("inf")
    source_header = next((r for r in records if r.get("type") == "header"), {})
    evals = sorted((r["flops"], r["val_bpb"]) for r in records if r.get("type") == "eval" and r["step"] <= last)
    earlier = lineage_evals(source_header, depth + 1)
    return [e for e in earlier if not evals or e[0] < evals[0][0]] + evals


def _fraction(f0, f1, f):
    """Where f lies between f0 and f1, in log-FLOPs (linearly from the step-0 eval at 0 FLOPs)."""
    if f0 <= 0:
        return f / f1
    return (math.log(f) - math.log(f0)) / (math.log(f1) - math.log(f0))


def bpb_at(evals, flops):
    """Val bpb at `flops`, interpolated linearly in log-FLOPs; None outside the curve."""
    for (f0, b0), (f1, b1) in zip(evals, evals[1:]):
        if f0 <= flops <= f1 and f1 > f0:
            return b0 + _fraction(f0, f1, flops) * (b1 - b0)
    if evals and flops == evals[-1][0]:
        return evals[-1][1]
    return None


def flops_to_reach(evals, target):
    """First FLOPs at which the curve gets down to `target` (log-FLOPs interpolation), or None."""
    for (f0, b0), (f1, b1) in zip(evals, evals[1:]):
        if b0 <= target:
            return f0
        if b1 <= target < b0:
            t = (b0 - target) / (b0 - b1)
            if f0 <= 0:  # the step-0 eval: no log, interpolate linearly
                return t * f1
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    if evals and evals[-1][1] <= target:
        return evals[-1][0]
    return None


def compute_multiplier(baseline_evals, run_final_bpb, run_flops):
    """(value, reached): baseline FLOPs to reach the run's final bpb / run FLOPs."""
    needed = flops_to_reach(baseline_evals, run_final_bpb)
    if needed is None:
        return baseline_evals[-1][0] / run_flops, False
    return needed / run_flops, True


def frontier_multiplier(points, run_final_bpb, run_flops):
    """points: sorted (FLOPs, final val bpb) of separately trained baseline runs. Returns
    (value, relation) with relation "=", ">" (no frontier run got that low) or "<=" (the
    smallest one already did)."""
    if points[0][1] <= run_final_bpb:
        return points[0][0] / run_flops, "<="
    needed = flops_to_reach(points, run_final_bpb)
    if needed is None:
        return points[-1][0] / run_flops, ">"
    return needed / run_flops, "="


REPEATED = "†"  # marks a multiplier measured where some run involved saw its data more than once


def repeats_data(summary):
    """Did the run pass over its training data more than once? Runs of this version record
    fractional `epochs`; older ones counted completed passes (an int: 1 = somewhere in 1..2)."""
    epochs = summary.get("epochs")
    return epochs is not None and (epochs >= 1 if isinstance(epochs, int) else epochs > 1)


def format_epochs(summary):
    epochs = summary.get("epochs")
    return "n/a" if epochs is None else f"{epochs}+" if isinstance(epochs, int) else f"{epochs:.2f}"


def read_multiplier(i, curves, finals, baseline_idx, frontier_idx):
    """Run i's multiplier cell on `curves` (each run's [(x, val bpb)], x = FLOPs or seconds): on the
    final points of the frontier runs, else on the baseline's curve."""
    if i in frontier_idx:
        return "frontier"
    if frontier_idx:
        points = sorted((curves[j][-1][0], finals[j]) for j in frontier_idx)
        value, relation = frontier_multiplier(points, finals[i], curves[i][-1][0])
        return f"{value:.2f}" if relation == "=" else f"{relation} {value:.2f}"
    if i == baseline_idx:
        return "1 (baseline)"
    value, reached = compute_multiplier(curves[baseline_idx], finals[i], curves[i][-1][0])
    return f"{value:.2f}" if reached else f"> {value:.2f}"


def same_hardware(a, b):
    return isinstance(a, dict) and a == b  # None: unknown; a str: the run changed hardware on resume


def time_unreadable(i, runs, baseline_idx, frontier_idx):
    """Why run i's time multiplier cannot be read ("n/a (...)"), or None when it can."""
    if i in frontier_idx or (not frontier_idx and i == baseline_idx):
        return None
    involved = [i, *(frontier_idx or [baseline_idx])]
    if any(runs[j].hardware is None for j in involved):
        return "n/a (hardware unknown)"
    if not all(same_hardware(runs[j].hardware, runs[i].hardware) for j in involved):
        return "n/a (hardware differs)"
    for j in involved:
        if runs[j].clock is None:
            return "n/a (--init-from)" if init_source(runs[j].header) else "n/a (no step times)"
    return None


def build_rows(runs, baseline_idx, frontier_idx=()):
    frontier_idx = list(frontier_idx)
    common = min(r.evals[-1][0] for r in runs)
    finals = [r.summary["final_val_bpb"] for r in runs]
    reference_repeats = any(repeats_data(runs[i].summary) for i in (frontier_idx or [baseline_idx]))
    rows = []
    for i, (name, header, evals, s, mfu, clock, _, core) in enumerate(runs):
        floor = s.get("entropy_floor")
        at_common = bpb_at(evals, common)
        repeated = REPEATED if reference_repeats or repeats_data(s) else ""
        mark = lambda cell: cell if cell in ("frontier", "1 (baseline)") else cell + repeated
        mult = mark(read_multiplier(i, [r.evals for r in runs], finals, baseline_idx, frontier_idx))
        time_mult = time_unreadable(i, runs, baseline_idx, frontier_idx)
        if time_mult is None:
            time_mult = mark(read_multiplier(i, [r.clock for r in runs], finals, baseline_idx, frontier_idx))
        rows.append(dict(run=name, total=f"{s['total'] / 1e6:.2f}M", active=f"{s['active_total'] / 1e6:.2f}M",
                         flops_per_token=f"{s['flops_per_token']:.3e}", tokens=f"{s['tokens']:,}",
                         flops=f"{evals[-1][0]:.3e}", epochs=format_epochs(s), final=f"{s['final_val_bpb']:.4f}",
                         at_common=f"{at_common:.4f}" if at_common is not None else "n/a",
                         tok_s=f"{s['tok_per_sec']:,.0f}", mfu=f"{mfu:.1f}%" if mfu is not None else "n/a",
                         memory=f"{s.get('peak_memory_mb', float('nan')):,.0f} MiB",
                         floor=f"{floor:.4f}" if floor is not None else "n/a", multiplier=mult,
                         train_s=f"{clock[-1][0]:,.2f}" if clock else "n/a", time_multiplier=time_mult,
                         core=format_core(core)))
    return rows, common


COLUMNS = [("run", "run"), ("total", "params total"), ("active", "params active"), ("flops_per_token", "FLOPs/token"),
           ("tokens", "tokens"), ("flops", "FLOPs"), ("epochs", "epochs"), ("final", "final val bpb"), ("at_common", "val bpb @ common FLOPs"),
           ("tok_s", "tok/s"), ("mfu", "MFU"), ("memory", "peak mem"), ("floor", "entropy floor"),
           ("multiplier", "compute multiplier"), ("train_s", "step seconds"), ("time_multiplier", "time multiplier (step time)"),
           ("core", "CORE")]


def markdown_table(rows):
    # the CORE column only when some run has been evaluated
    columns = [c for c in COLUMNS if c[0] != "core" or any(r["core"] != "n/a" for r in rows)]
    cells = [[title for _, title in columns]] + [[r[key] for key, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def describe_hardware(hw):
    if not isinstance(hw, dict):
        return "unknown" if hw is None else hw
    return f"{hw['device']}, {hw['world_size']} process(es), {hw['threads']} thread(s)"


def table_notes(rows, frontier_idx, runs=None):
    """The lines printed under the table: repeated data, how the multipliers were read, and the
    hardware when it keeps time multipliers from being read."""
    notes = []
    if any(r["multiplier"].endswith(REPEATED) for r in rows):
        notes.append(f"{REPEATED} measured on repeated data (a run involved trained past one epoch, where more "
                     f"compute can make a model worse): it reflects repetition, not compute efficiency. "
                     f"Train on more data, under one epoch, for a compute-efficiency claim.")
    if not frontier_idx and len(rows) > 1:
        notes.append("Multipliers read on the baseline's own eval curve (no --frontier): its intermediate evals come "
                     "before its learning-rate warmdown, which flatters the other runs. For a claim, train the "
                     "baseline at a second budget and pass both as --frontier.")
    if len(rows) > 1:
        notes.append("Step seconds and the time multiplier count training step time only: evaluations, samples, "
                     "checkpoints and torch.compile's compilation (the first step of each start, counted at the "
                     "median step time) are left out. Time multipliers are read only between runs on the same "
                     "hardware (device, processes, threads).")
    if runs and any(r["time_multiplier"] == "n/a (hardware differs)" for r in rows):
        notes.append("Hardware: " + "; ".join(f"{r.name}: {describe_hardware(r.hardware)}" for r in runs) + ".")
    cores = [r.core for r in runs or [] if r.core]
    if cores:
        settings = {(c["n_tasks"], tuple(c.get("missing", [])), c.get("max_per_task")) for c in cores}
        note = ("CORE: the mean centred accuracy over DCLM's 22 tasks, ± its standard error (scripts.base_eval); "
                "partial = some task files were missing.")
        if len(settings) > 1:
            note += " These runs were scored on different task sets or --max-per-task: their CORE values do not compare."
        notes.append(note)
    return notes


def plot(runs, common, path, frontier_idx=()):
    """val bpb against training FLOPs; beside it, against training seconds when every run has step
    times on the same hardware. Returns {label: points drawn} (the seconds panel's labels start
    with "time: "), for tests."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    timed = all(r.clock and same_hardware(r.hardware, runs[0].hardware) for r in runs)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(13 if timed else 7, 4.5), squeeze=False)
    panels = [(axes[0][0], "evals", "training FLOPs (active params)", "validation loss at equal training compute")]
    if timed:
        panels.append((axes[0][1], "clock", "training seconds (step time only)",
                       f"validation loss at equal training time\n({describe_hardware(runs[0].hardware)})"))
    lines = {}
    for ax, curve, xlabel, title in panels:
        for r in runs:
            pts = [(x, b) for x, b in getattr(r, curve) if x > 0]
            label = f"{r.name} ({r.summary['active_total'] / 1e6:.2f}M active / {r.summary['total'] / 1e6:.2f}M)"
            ax.plot([x for x, _ in pts], [b for _, b in pts], marker="o", markersize=3, label=label)
        if frontier_idx:
            points = sorted((getattr(runs[i], curve)[-1][0], runs[i].summary["final_val_bpb"]) for i in frontier_idx)
            ax.plot([x for x, _ in points], [b for _, b in points], color="black", linestyle="--", linewidth=1.5,
                    marker="s", markersize=6, label="frontier: " + ", ".join(runs[i].name for i in frontier_idx)
                    + " (final points)", zorder=5)
        floor = next((r.summary.get("entropy_floor") for r in runs if r.summary.get("entropy_floor") is not None), None)
        if floor is not None:
            ax.axhline(floor, color="gray", linestyle="--", linewidth=1, label=f"entropy floor {floor:.4f}")
        if curve == "evals":
            ax.axvline(common, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val bits per byte")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        prefix = "time: " if curve == "clock" else ""
        lines.update({prefix + line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines()})
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return lines


def build_parser():
    p = ArgumentParser(prog="compare", description="Compare finished runs at equal training FLOPs and step time.")
    p.add_argument("--runs", nargs="+", required=True, help="model tags or run folders")
    p.add_argument("--baseline", default="", help="run to measure multipliers against (default: first dense run)")
    p.add_argument("--frontier", nargs="+", default=[],
                   help="runs of --runs trained to different budgets (dense): multipliers read their final points")
    p.add_argument("--out", default="", help="folder for comparison.md and comparison.png")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = [load_run(r) for r in args.runs]
    for r in runs:
        if not r.evals:
            raise UserError(f"--runs {r.name}: no eval records (train with --eval-every)")
    names = [r.name for r in runs]
    if args.baseline:
        key = os.path.basename(os.path.normpath(args.baseline))
        if key not in names:
            raise UserError(f"--baseline {args.baseline} is not one of --runs ({', '.join(names)})")
        baseline_idx = names.index(key)
    else:
        baseline_idx = next((i for i, r in enumerate(runs) if not r.header.get("config", {}).get("use_moe")), 0)
    frontier_idx = []
    for f in args.frontier:
        key = os.path.basename(os.path.normpath(f))
        if key not in names:
            raise UserError(f"--frontier {f} is not one of --runs ({', '.join(names)})")
        frontier_idx.append(names.index(key))
    rows, common = build_rows(runs, baseline_idx, frontier_idx)
    table = markdown_table(rows)
    notes = table_notes(rows, frontier_idx, runs)
    print("\n".join([table] + notes))
    if frontier_idx:
        basis = f"the final points of {', '.join(names[i] for i in frontier_idx)} (--frontier)"
    else:
        basis = names[baseline_idx]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        md = os.path.join(args.out, "comparison.md")
        atomic_write_text(md, f"# Comparison at equal training FLOPs\n\nBaseline for the compute and time multipliers: "
                              f"{basis}. Common FLOPs: {common:.3e}.\n\n{table}\n" + "".join(f"\n{n}\n" for n in notes))
        png = os.path.join(args.out, "comparison.png")
        try:
            plot(runs, common, png, frontier_idx)
            print(f"wrote {md}\nwrote {png}")
        except ImportError:
            print(f"wrote {md}; no plot: matplotlib is missing (the set-up installs it: pip install -e .)")


if __name__ == "__main__":
    run_main(main)
