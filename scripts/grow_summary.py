"""
The end of a growth recipe (runs/grow.sh): one training history across the phases, the
BOUNDARY SUMMARY and the growth table.

    python -m scripts.grow_summary grow_dense grow_moe grow_grown --names dense,moe,grown \
        --history $NANOCHAT_BASE_DIR/runs/grow_history.jsonl [--control grow_control]
    python -m scripts.grow_summary --flops-of grow_grown     # the FLOPs that run trained for

Each phase is a finished base_train run; phase k > 1 must have been started with --init-from
phase k-1 (checked). The jump at a boundary is phase k's step-0 val bpb minus phase k-1's last
val bpb: both are evaluated on the same validation batches (same data, same --eval-tokens), so
for a function-preserving transform it is ~0. training_history.jsonl: every record of every
phase's metrics.jsonl, in order, with a `phase` field (FLOPs are cumulative over the lineage).
--control: a no-growth control, a run started --init-from the checkpoint the last phase grew
from and trained for the same FLOPs (runs/grow.sh: --target-flops from --flops-of); its final
val bpb is printed beside the grown model's. Growth only pays if it beats this: both models
spent the same compute after the same source.
"""

import json
import os

from nanochat.common import require, ArgumentParser, run_main, run_dir, read_metrics, atomic_write_text
from nanochat.report import init_source


def parse_args(argv=None):
    p = ArgumentParser(prog="grow_summary", description="Boundary summary and history of a multi-phase growth run.")
    p.add_argument("runs", nargs="*", help="the phases' runs in order (model tags or run folders)")
    p.add_argument("--names", default="", help="comma-separated phase names (default: the run names)")
    p.add_argument("--history", default="", help="write the concatenated training_history.jsonl here")
    p.add_argument("--control", default="", help="a no-growth control run: the last phase's source trained for its FLOPs")
    p.add_argument("--flops-of", default="", help="print the FLOPs this finished run trained for (not its lineage's) and exit")
    args = p.parse_args(argv)
    require(args.runs or args.flops_of, "give the phases' runs (or --flops-of RUN)")
    return args


def load_phase(run):
    path = os.path.join(run_dir(run), "metrics.jsonl")
    records = read_metrics(path)
    header = next((r for r in records if r.get("type") == "header"), None)
    summary = next((r for r in records if r.get("type") == "summary"), None)
    evals = [r for r in records if r.get("type") == "eval"]
    require(header is not None and summary is not None and evals, f"{path}: no header, evals or summary (unfinished run?)")
    return dict(run=run, folder=run_dir(run), records=records, header=header, summary=summary, evals=evals)


def state_memory_mb(header):
    """Weights + gradients + optimizer state, fp32, from the run's parameter counts: AdamW keeps
    two moments (the model's non-matrix roles: embedding, lm_head, routers, Mamba scalars), Muon
    one momentum buffer (every matrix)."""
    p = header["params"]
    adamw = p["adamw"] if "adamw" in p else p["wte"] + p["lm_head"] + p.get("router", 0)  # (older headers)
    muon = p["total"] - adamw
    return (adamw * (4 + 4 + 8) + muon * (4 + 4 + 4)) / 2**20


def check_lineage(phases):
    for prev, cur in zip(phases, phases[1:]):
        source_ckpt = os.path.normpath(init_source(cur["header"]) or "")
        require(source_ckpt.startswith(os.path.abspath(prev["folder"]) + os.sep),
                f"{cur['run']} was not started from {prev['run']} (its --init-from source is {source_ckpt or 'none'})")


def boundary_rows(phases, names):
    rows, first_bpb = [], phases[0]["evals"][0]["val_bpb"]
    for i, (ph, name) in enumerate(zip(phases, names)):
        first, final = ph["evals"][0], ph["evals"][-1]
        jump = first["val_bpb"] - phases[i - 1]["evals"][-1]["val_bpb"] if i else None
        rows.append(dict(phase=name, run=ph["run"], first=first["val_bpb"], final=final["val_bpb"],
                         jump=jump, drop=first["val_bpb"] - final["val_bpb"], steps=ph["summary"]["step"],
                         wall=ph["summary"]["wall_time"]))
    return rows, first_bpb - phases[-1]["evals"][-1]["val_bpb"]


def own_flops(ph):
    """FLOPs this run trained for: its summary counts the whole lineage (cumulative)."""
    return ph["summary"]["flops"] - ((ph["header"].get("init_from") or {}).get("flops") or 0.0)


def growth_rows(phases, names):
    rows = []
    for ph, name in zip(phases, names):
        h, s = ph["header"], ph["summary"]
        rows.append(dict(phase=name, total=h["params"]["total"], active=h["params"]["active_total"],
                         efficiency=100 * h["params"]["active_total"] / h["params"]["total"],
                         flops_per_token=h["flops_per_token"], tokens=s["tokens"], flops=own_flops(ph),
                         state_mb=state_memory_mb(h), peak_mb=s.get("peak_memory_mb")))
    return rows


def check_control(grown, control):
    """The control must start where the grown phase's growth started: the same checkpoint."""
    want = os.path.normpath(init_source(grown["header"]) or "")
    got = os.path.normpath(init_source(control["header"]) or "")
    require(bool(init_source(control["header"])) and got == want,
            f"--control {control['run']} was not started from the checkpoint {grown['run']} grew from ({want}); "
            f"its --init-from source is {got or 'none'}")


def control_lines(grown, control, name):
    rows = [(name, grown), ("control", control)]
    lines = ["", "NO-GROWTH CONTROL (the model the last phase grew from, trained on for the same FLOPs)",
             f"{'run':<12} {'FLOPs':>10} {'tokens':>11} {'steps':>6} {'final val bpb':>14}"]
    for label, ph in rows:
        lines.append(f"{label:<12} {own_flops(ph):>10.3e} {ph['summary']['tokens']:>11,} {ph['summary']['step']:>6} "
                     f"{ph['evals'][-1]['val_bpb']:>14.4f}")
    g, c = grown["evals"][-1]["val_bpb"], control["evals"][-1]["val_bpb"]
    if g < c:
        verdict = f"growth pays: {name} is better than the control by {c - g:.4f} bpb"
    elif g > c:
        verdict = f"growth does not pay: the control is better than {name} by {g - c:.4f} bpb"
    else:
        verdict = f"{name} and the control tie"
    lines.append(f"{verdict} (FLOPs control / {name}: {own_flops(control) / own_flops(grown):.3f})")
    return lines


def format_tables(brows, total_drop, grows):
    lines = ["", "BOUNDARY SUMMARY (val bpb; the jump is measured on the same validation batches)",
             f"{'phase':<12} {'first':>8} {'final':>8} {'jump in':>10} {'drop':>8} {'steps':>6} {'time':>8}"]
    for r in brows:
        jump = f"{r['jump']:+.5f}" if r["jump"] is not None else "-"
        lines.append(f"{r['phase']:<12} {r['first']:>8.4f} {r['final']:>8.4f} {jump:>10} {r['drop']:>8.4f} "
                     f"{r['steps']:>6} {r['wall']:>7.0f}s")
    lines.append(f"total drop {total_drop:.4f} bpb ({brows[0]['first']:.4f} -> {brows[-1]['final']:.4f}); "
                 f"total time {sum(r['wall'] for r in brows):.0f}s")
    lines += ["", "GROWTH TABLE (memory: fp32 weights + grads + optimizer state, estimated; peak: measured)",
              f"{'phase':<12} {'params total':>13} {'active':>11} {'eff.':>6} {'FLOPs/token':>12} {'tokens':>11} "
              f"{'FLOPs':>10} {'state MiB':>10} {'peak MiB':>9}"]
    for r in grows:
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] else "n/a"
        lines.append(f"{r['phase']:<12} {r['total']:>13,} {r['active']:>11,} {r['efficiency']:>5.1f}% "
                     f"{r['flops_per_token']:>12.4e} {r['tokens']:>11,} {r['flops']:>10.3e} {r['state_mb']:>10.1f} {peak:>9}")
    lines.append(f"{'all phases':<12} {'':>13} {'':>11} {'':>6} {'':>12} {sum(r['tokens'] for r in grows):>11,} "
                 f"{sum(r['flops'] for r in grows):>10.3e}")
    return "\n".join(lines)


def history_lines(phases, names):
    out = []
    for ph, name in zip(phases, names):
        for r in ph["records"]:
            out.append(json.dumps(dict(r, phase=name, run=ph["run"])))
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.flops_of:
        print(f"{own_flops(load_phase(args.flops_of)):.6e}")
        return
    names = args.names.split(",") if args.names else [os.path.basename(os.path.normpath(r)) for r in args.runs]
    require(len(names) == len(args.runs), f"--names gives {len(names)} names for {len(args.runs)} runs")
    phases = [load_phase(r) for r in args.runs]
    check_lineage(phases)
    brows, total_drop = boundary_rows(phases, names)
    print(format_tables(brows, total_drop, growth_rows(phases, names)))
    if args.control:
        control = load_phase(args.control)
        check_control(phases[-1], control)
        print("\n".join(control_lines(phases[-1], control, names[-1])))
    if args.history:
        atomic_write_text(args.history, history_lines(phases, names))
        print(f"\ntraining history ({sum(len(p['records']) for p in phases)} records, field 'phase'): {args.history}")


if __name__ == "__main__":
    run_main(main)
