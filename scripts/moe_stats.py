"""
Pictures of MoE routing from a run's metrics.jsonl ("moe" records, one per --moe-stats-every).

    python -m scripts.moe_stats --run d4_moe8k2            # a model tag or a run folder

Writes into the run folder (or --out):
    moe_load_heatmap.png   load of every (layer, expert) over training, relative to a balanced
                           load (1.0 = its fair share; 0 = dead expert)
    moe_routing_final.png  the last interval's load per expert, one bar chart per layer
Draws with matplotlib (a dependency of the project).
"""

import os

from nanochat.common import UserError, ArgumentParser, run_main, run_dir, read_metrics


def read_moe_records(run):
    folder = run_dir(run)
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"--run {run}: no metrics.jsonl at {path}")
    moe = [r for r in read_metrics(path) if r.get("type") == "moe"]
    if not moe:
        raise UserError(f"--run {run}: {path} has no MoE routing records (dense run, or trained without --use-moe?)")
    return folder, moe


def main():
    p = ArgumentParser(prog="moe_stats", description="Plot MoE expert load from a run's metrics.jsonl.")
    p.add_argument("--run", required=True, help="model tag (under $NANOCHAT_BASE_DIR/runs) or run folder")
    p.add_argument("--out", default="", help="folder for the PNGs (default: the run folder)")
    args = p.parse_args()
    run_dir, records = read_moe_records(args.run)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        raise UserError("moe_stats needs matplotlib, which the set-up installs: pip install -e .")
    out_dir = args.out or run_dir
    os.makedirs(out_dir, exist_ok=True)

    steps = [r["step"] for r in records]
    n_layers = len(records[-1]["layers"])
    n_experts = len(records[-1]["layers"][0]["load"])
    # rows: (layer, expert); columns: intervals; value: load x n_experts (1 = balanced)
    grid = np.array([[layer["load"][e] * n_experts for layer in r["layers"] for e in range(n_experts)]
                     for r in records]).T

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(steps) + 3), max(3, 0.22 * n_layers * n_experts + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, float(grid.max())), interpolation="nearest")
    ax.set_xlabel("training step")
    tick_idx = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
    ax.set_xticks(tick_idx, [str(steps[i]) for i in tick_idx])
    ax.set_yticks(range(0, n_layers * n_experts, n_experts), [f"MoE layer {i}" for i in range(n_layers)])
    for i in range(1, n_layers):
        ax.axhline(i * n_experts - 0.5, color="white", linewidth=1)
    ax.set_title("expert load relative to balanced (rows: experts, grouped by layer)")
    fig.colorbar(im, ax=ax, label="load x n_experts")
    fig.tight_layout()
    heatmap = os.path.join(out_dir, "moe_load_heatmap.png")
    fig.savefig(heatmap, dpi=120)
    plt.close(fig)

    final = records[-1]
    cols = min(n_layers, 4)
    rows = (n_layers + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for i, layer in enumerate(final["layers"]):
        ax = axes[i // cols][i % cols]
        ax.bar(range(n_experts), [v * 100 for v in layer["load"]], color="tab:blue")
        ax.axhline(100 / n_experts, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(f"layer {i}: cv {layer['cv']:.2f}, dead {layer['dead']}", fontsize=9)
        ax.set_xlabel("expert")
        if i % cols == 0:
            ax.set_ylabel("% of assignments")
    for j in range(n_layers, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(f"routing at step {final['step']} (dashed: balanced)")
    fig.tight_layout()
    bars = os.path.join(out_dir, "moe_routing_final.png")
    fig.savefig(bars, dpi=120)
    plt.close(fig)
    print(f"wrote {heatmap}\nwrote {bars}")


if __name__ == "__main__":
    run_main(main)
