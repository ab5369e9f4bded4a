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
"""

import math
import os

from nanochat.common import UserError, ArgumentParser, run_main, run_dir, read_metrics, atomic_write_text
from nanochat.report import init_source


def load_run(run):
    """(name, header, evals [(flops, val_bpb)], summary, mean MFU or None) of a finished run."""
    folder = run_dir(run)
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"--runs {run}: no metrics.jsonl at {path}")
    records = read_metrics(path)
    header = next((r for r in records if r.get("type") == "header"), None)
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), None)
    if header is None or summary is None:
        raise UserError(f"--runs {run}: {path} has no header or no summary (unfinished run?)")
    evals = sorted((r["flops"], r["val_bpb"]) for r in records if r.get("type") == "eval")
    if evals:  # a run started --init-from: its curve begins where its sources' ended (FLOPs are cumulative)
        evals = [e for e in lineage_evals(header) if e[0] < evals[0][0]] + evals
    mfus = [r["mfu"] for r in records if r.get("type") == "train" and r.get("mfu") is not None]
    mfu = sum(mfus) / len(mfus) if mfus else None
    return os.path.basename(os.path.normpath(folder)), header, evals, summary, mfu


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


def build_rows(runs, baseline_idx, frontier_idx=()):
    common = min(evals[-1][0] for _, _, evals, _, _ in runs)
    base_evals = runs[baseline_idx][2]
    frontier = sorted((runs[i][2][-1][0], runs[i][3]["final_val_bpb"]) for i in frontier_idx)
    reference_repeats = any(repeats_data(runs[i][3]) for i in (frontier_idx or [baseline_idx]))
    rows = []
    for i, (name, header, evals, s, mfu) in enumerate(runs):
        floor = s.get("entropy_floor")
        at_common = bpb_at(evals, common)
        repeated = REPEATED if reference_repeats or repeats_data(s) else ""
        if i in frontier_idx:
            mult = "frontier"
        elif frontier:
            value, relation = frontier_multiplier(frontier, s["final_val_bpb"], evals[-1][0])
            mult = (f"{value:.2f}" if relation == "=" else f"{relation} {value:.2f}") + repeated
        elif i == baseline_idx:
            mult = "1 (baseline)"
        else:
            value, reached = compute_multiplier(base_evals, s["final_val_bpb"], evals[-1][0])
            mult = (f"{value:.2f}" if reached else f"> {value:.2f}") + repeated
        rows.append(dict(run=name, total=f"{s['total'] / 1e6:.2f}M", active=f"{s['active_total'] / 1e6:.2f}M",
                         flops_per_token=f"{s['flops_per_token']:.3e}", tokens=f"{s['tokens']:,}",
                         flops=f"{evals[-1][0]:.3e}", epochs=format_epochs(s), final=f"{s['final_val_bpb']:.4f}",
                         at_common=f"{at_common:.4f}" if at_common is not None else "n/a",
                         tok_s=f"{s['tok_per_sec']:,.0f}", mfu=f"{mfu:.1f}%" if mfu is not None else "n/a",
                         memory=f"{s.get('peak_memory_mb', float('nan')):,.0f} MiB",
                         floor=f"{floor:.4f}" if floor is not None else "n/a", multiplier=mult))
    return rows, common


COLUMNS = [("run", "run"), ("total", "params total"), ("active", "params active"), ("flops_per_token", "FLOPs/token"),
           ("tokens", "tokens"), ("flops", "FLOPs"), ("epochs", "epochs"), ("final", "final val bpb"), ("at_common", "val bpb @ common FLOPs"),
           ("tok_s", "tok/s"), ("mfu", "MFU"), ("memory", "peak mem"), ("floor", "entropy floor"),
           ("multiplier", "compute multiplier")]


def markdown_table(rows):
    cells = [[title for _, title in COLUMNS]] + [[r[key] for key, _ in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def table_notes(rows, frontier_idx):
    """The lines printed under the table: repeated data, and how the multiplier was read."""
    notes = []
    if any(r["multiplier"].endswith(REPEATED) for r in rows):
        notes.append(f"{REPEATED} measured on repeated data (a run involved trained past one epoch, where more "
                     f"compute can make a model worse): it reflects repetition, not compute efficiency. "
                     f"Train on more data, under one epoch, for a compute-efficiency claim.")
    if not frontier_idx and len(rows) > 1:
        notes.append("Multipliers read on the baseline's own eval curve (no --frontier): its intermediate evals come "
                     "before its learning-rate warmdown, which flatters the other runs. For a claim, train the "
                     "baseline at a second budget and pass both as --frontier.")
    return notes


def plot(runs, common, path, frontier_idx=()):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, header, evals, s, _ in runs:
        pts = [(f, b) for f, b in evals if f > 0]
        label = f"{name} ({s['active_total'] / 1e6:.2f}M active / {s['total'] / 1e6:.2f}M)"
        ax.plot([f for f, _ in pts], [b for _, b in pts], marker="o", markersize=3, label=label)
    if frontier_idx:
        points = sorted((runs[i][2][-1][0], runs[i][3]["final_val_bpb"]) for i in frontier_idx)
        ax.plot([f for f, _ in points], [b for _, b in points], color="black", linestyle="--", linewidth=1.5,
                marker="s", markersize=6, label="frontier: " + ", ".join(runs[i][0] for i in frontier_idx) + " (final points)", zorder=5)
    floor = next((s.get("entropy_floor") for _, _, _, s, _ in runs if s.get("entropy_floor") is not None), None)
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", linewidth=1, label=f"entropy floor {floor:.4f}")
    ax.axvline(common, color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (active params)")
    ax.set_ylabel("val bits per byte")
    ax.set_title("validation loss at equal training compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    lines = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines()}
    plt.close(fig)
    return lines  # label -> points drawn, for tests


def main():
    p = ArgumentParser(prog="compare", description="Compare finished runs at equal training FLOPs.")
    p.add_argument("--runs", nargs="+", required=True, help="model tags or run folders")
    p.add_argument("--baseline", default="", help="run to measure compute multipliers against (default: first dense run)")
    p.add_argument("--frontier", nargs="+", default=[],
                   help="runs of --runs trained to different budgets (dense): multipliers read their final points")
    p.add_argument("--out", default="", help="folder for comparison.md and comparison.png")
    args = p.parse_args()
    runs = [load_run(r) for r in args.runs]
    for name, _, evals, _, _ in runs:
        if not evals:
            raise UserError(f"--runs {name}: no eval records (train with --eval-every)")
    names = [r[0] for r in runs]
    if args.baseline:
        key = os.path.basename(os.path.normpath(args.baseline))
        if key not in names:
            raise UserError(f"--baseline {args.baseline} is not one of --runs ({', '.join(names)})")
        baseline_idx = names.index(key)
    else:
        baseline_idx = next((i for i, r in enumerate(runs) if not r[1].get("config", {}).get("use_moe")), 0)
    frontier_idx = []
    for f in args.frontier:
        key = os.path.basename(os.path.normpath(f))
        if key not in names:
            raise UserError(f"--frontier {f} is not one of --runs ({', '.join(names)})")
        frontier_idx.append(names.index(key))
    rows, common = build_rows(runs, baseline_idx, frontier_idx)
    table = markdown_table(rows)
    notes = table_notes(rows, frontier_idx)
    print("\n".join([table] + notes))
    if frontier_idx:
        basis = f"the final points of {', '.join(names[i] for i in frontier_idx)} (--frontier)"
    else:
        basis = names[baseline_idx]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        md = os.path.join(args.out, "comparison.md")
        atomic_write_text(md, f"# Comparison at equal training FLOPs\n\nBaseline for the compute multiplier: "
                              f"{basis}. Common FLOPs: {common:.3e}.\n\n{table}\n" + "".join(f"\n{n}\n" for n in notes))
        png = os.path.join(args.out, "comparison.png")
        try:
            plot(runs, common, png, frontier_idx)
            print(f"wrote {md}\nwrote {png}")
        except ImportError:
            print(f"wrote {md}; no plot: matplotlib is missing (the set-up installs it: pip install -e .)")


if __name__ == "__main__":
    run_main(main)
