"""
Side-by-side table of finished runs, read from their metrics.jsonl.

    python -m scripts.compare --runs cpu_dense cpu_moe

A run is a model tag (a folder under $NANOCHAT_BASE_DIR/runs) or a path to a run folder.
"""

import json
import os

from nanochat.common import UserError, ArgumentParser, run_main, get_base_dir


def load_run(run):
    run_dir = run if os.path.isdir(run) else os.path.join(get_base_dir(), "runs", run)
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"--runs {run}: no metrics.jsonl at {path}")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not valid JSON")
    header = next((r for r in records if r.get("type") == "header"), None)
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), None)
    if header is None or summary is None:
        raise UserError(f"--runs {run}: {path} has no header or no summary (unfinished run?)")
    return os.path.basename(os.path.normpath(run_dir)), header, summary


def fmt_int(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def table(runs):
    cols = ["run", "params total", "params active", "FLOPs/token", "tokens", "FLOPs", "final val bpb",
            "entropy floor", "tok/s", "wall"]
    rows = []
    for name, header, s in runs:
        floor = s.get("entropy_floor")
        rows.append([name, fmt_int(s["total"]), fmt_int(s["active_total"]), f"{s['flops_per_token']:.3e}",
                     f"{s['tokens']:,}", f"{s['flops']:.3e}", f"{s['final_val_bpb']:.4f}",
                     f"{floor:.4f}" if floor is not None else "n/a", f"{s['tok_per_sec']:,.0f}",
                     f"{s['wall_time']:.0f}s"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep] + [line(r) for r in rows])


def main():
    p = ArgumentParser(prog="compare", description="Compare finished runs side by side.")
    p.add_argument("--runs", nargs="+", required=True, help="model tags or run folders")
    args = p.parse_args()
    print(table([load_run(r) for r in args.runs]))


if __name__ == "__main__":
    run_main(main)
