"""scripts/compare.py: alignment by FLOPs, interpolation, compute multiplier, outputs."""

import json
import subprocess
import sys

import pytest

from scripts.compare import (bpb_at, flops_to_reach, compute_multiplier, frontier_multiplier, load_run, build_rows,
                             plot, table_notes, REPEATED,
                             markdown_table)
from nanochat.common import UserError


def write_run(run_dir, evals, total, active, use_moe, floor=1.0, tok_s=1234.5):
    run_dir.mkdir(parents=True)
    records = [dict(type="header", config=dict(use_moe=use_moe), total=total, active_total=active, flops_per_token=6e6)]
    records += [dict(type="eval", step=i, flops=f, val_bpb=b) for i, (f, b) in enumerate(evals)]
    records += [dict(type="train", step=1, flops=evals[1][0], train_loss=5.0, mfu=None)]
    records.append(dict(type="summary", step=len(evals), flops=evals[-1][0], tokens=int(evals[-1][0] / 6e6),
                        final_val_bpb=evals[-1][1], entropy_floor=floor, total=total, active_total=active,
                        flops_per_token=6e6, tok_per_sec=tok_s, wall_time=42.0, peak_memory_mb=321.0))
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


DENSE = [(0, 3.0), (1e12, 2.0), (1e13, 1.5), (1e14, 1.2)]


def test_interpolation_is_linear_in_log_flops():
    assert bpb_at(DENSE, 1e13) == 1.5
    # halfway between 1e13 and 1e14 in log space: 10**13.5
    assert bpb_at(DENSE, 10**13.5) == pytest.approx(1.35)
    assert bpb_at(DENSE, 2e14) is None
    assert flops_to_reach(DENSE, 1.35) == pytest.approx(10**13.5)
    assert flops_to_reach(DENSE, 1.5) == pytest.approx(1e13)
    assert flops_to_reach(DENSE, 1.1) is None
    # the first segment starts at the step-0 eval (0 FLOPs): linear there, not log
    assert bpb_at(DENSE, 5e11) == pytest.approx(2.5)
    assert flops_to_reach(DENSE, 2.5) == pytest.approx(5e11)
    assert flops_to_reach(DENSE, 3.0) == 0


def test_compute_multiplier_hand_computed():
    # An MoE that reaches 1.35 with 1e13 FLOPs: the dense run needed 10**13.5 -> 10**0.5 = 3.162
    value, reached = compute_multiplier(DENSE, 1.35, 1e13)
    assert reached and value == pytest.approx(10**0.5)
    # never reached: dense ends at 1.2 with 1e14, the MoE got 1.1 with 5e13 -> "> 2"
    value, reached = compute_multiplier(DENSE, 1.1, 5e13)
    assert not reached and value == pytest.approx(2.0)


def test_rows_align_by_flops_and_name_the_baseline(tmp_path):
    write_run(tmp_path / "dense", DENSE, 1_310_720, 1_310_720, use_moe=False)
    write_run(tmp_path / "moe", [(0, 3.0), (1e12, 1.9), (1e13, 1.35)], 2_890_000, 1_313_000, use_moe=True, floor=None)
    runs = [load_run(str(tmp_path / "moe")), load_run(str(tmp_path / "dense"))]
    rows, common = build_rows(runs, baseline_idx=1)
    assert common == 1e13  # the largest FLOPs both runs reached
    moe, dense = rows
    assert dense["multiplier"] == "1 (baseline)"
    assert moe["multiplier"] == f"{10**0.5:.2f}"
    assert moe["at_common"] == "1.3500" and dense["at_common"] == "1.5000"
    assert moe["final"] == "1.3500" and dense["final"] == "1.2000"
    assert moe["floor"] == "n/a" and dense["floor"] == "1.0000"
    text = markdown_table(rows)
    assert text.count("\n") == 3 and "compute multiplier" in text and "2.89M" in text


def test_cli_writes_markdown_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "dense", DENSE, 1_310_720, 1_310_720, use_moe=False)
    write_run(tmp_path / "moe", [(0, 3.0), (1e12, 1.9), (1e14, 1.1)], 2_890_000, 1_313_000, use_moe=True)
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "scripts.compare", "--runs", str(tmp_path / "dense"), str(tmp_path / "moe"),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "> 1.00" in r.stdout  # dense never reached 1.1
    md = (out / "comparison.md").read_text()
    assert "Baseline for the compute multiplier: dense" in md
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_unfinished_or_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        load_run(str(tmp_path / "nothing"))
    d = tmp_path / "unfinished"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps(dict(type="header")) + "\n")
    with pytest.raises(UserError, match="no header or no summary"):
        load_run(str(d))
    r = subprocess.run([sys.executable, "-m", "scripts.compare", "--runs", str(d)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_frontier_reads_final_points_of_separate_runs(tmp_path):
    # Two dense runs trained to 1e13 and 4e13 FLOPs end at 1.6 and 1.4. An MoE ending at 1.5 with
    # 1e13: halfway in bpb = halfway in log-FLOPs -> the dense frontier needs 2e13 -> 2.00.
    points = [(1e13, 1.6), (4e13, 1.4)]
    assert frontier_multiplier(points, 1.5, 1e13) == (pytest.approx(2.0), "=")
    assert frontier_multiplier(points, 1.3, 1e13) == (pytest.approx(4.0), ">")
    assert frontier_multiplier(points, 1.7, 1e13) == (pytest.approx(1.0), "<=")
    # The same MoE read on the longer run's own (un-annealed) curve looks better: its eval at
    # 1e13 (1.7, mid-schedule) is above the 1e13 run's final 1.6.
    write_run(tmp_path / "d1", [(0, 3.0), (5e12, 1.9), (1e13, 1.6)], 1_000, 1_000, use_moe=False)
    write_run(tmp_path / "d4", [(0, 3.0), (1e13, 1.7), (2e13, 1.55), (4e13, 1.4)], 1_000, 1_000, use_moe=False)
    write_run(tmp_path / "moe", [(0, 3.0), (5e12, 1.8), (1e13, 1.5)], 2_000, 1_000, use_moe=True)
    runs = [load_run(str(tmp_path / n)) for n in ("d1", "d4", "moe")]
    rows, _ = build_rows(runs, baseline_idx=1)
    # on d4's curve 1.5 lies a third of the way from (2e13, 1.55) to (4e13, 1.4): 2e13 * 2**(1/3)
    assert rows[2]["multiplier"] == f"{2 * 2 ** (1 / 3):.2f}" == "2.52"
    rows, _ = build_rows(runs, baseline_idx=0, frontier_idx=[0, 1])
    assert [r["multiplier"] for r in rows] == ["frontier", "frontier", "2.00"]
    r = subprocess.run([sys.executable, "-m", "scripts.compare", "--runs", *(str(tmp_path / n) for n in ("d1", "d4", "moe")),
                        "--frontier", str(tmp_path / "d9")], capture_output=True, text=True)
    assert r.returncode != 0 and "--frontier" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_epochs_column_and_repeated_data_marks_the_multiplier(tmp_path):
    def with_epochs(name, epochs):
        path = tmp_path / name / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        records[-1]["epochs"] = epochs
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")

    write_run(tmp_path / "d1", [(0, 3.0), (5e12, 1.9), (1e13, 1.6)], 1_000, 1_000, use_moe=False)
    write_run(tmp_path / "d4", [(0, 3.0), (1e13, 1.7), (2e13, 1.55), (4e13, 1.4)], 1_000, 1_000, use_moe=False)
    write_run(tmp_path / "moe", [(0, 3.0), (5e12, 1.8), (1e13, 1.5)], 2_000, 1_000, use_moe=True)
    for name, epochs in (("d1", 0.25), ("d4", 1.0), ("moe", 0.25)):
        with_epochs(name, epochs)
    load = lambda: [load_run(str(tmp_path / n)) for n in ("d1", "d4", "moe")]
    rows, _ = build_rows(load(), baseline_idx=0, frontier_idx=[0, 1])
    assert [r["epochs"] for r in rows] == ["0.25", "1.00", "0.25"]
    assert rows[2]["multiplier"] == "2.00"  # exactly one pass is not a repeat
    assert table_notes(rows, [0, 1]) == []
    with_epochs("d4", 1.3)  # the larger frontier run repeats: the MoE's multiplier is marked
    rows, _ = build_rows(load(), baseline_idx=0, frontier_idx=[0, 1])
    assert rows[2]["multiplier"] == "2.00" + REPEATED and "repeated data" in table_notes(rows, [0, 1])[0]
    with_epochs("d4", 0.9)
    with_epochs("moe", 2)  # an older run (completed passes only): 2 means it repeated
    rows, _ = build_rows(load(), baseline_idx=0, frontier_idx=[0, 1])
    assert rows[2]["epochs"] == "2+" and rows[2]["multiplier"].endswith(REPEATED)
    # no frontier: the note says the single-curve multiplier flatters
    rows, _ = build_rows(load(), baseline_idx=1)
    assert any("--frontier" in n for n in table_notes(rows, []))


def test_plot_draws_the_frontier_through_the_final_points(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "d1", [(0, 3.0), (5e12, 1.9), (1e13, 1.6)], 1_000, 1_000, use_moe=False)
    write_run(tmp_path / "d4", [(0, 3.0), (1e13, 1.7), (2e13, 1.55), (4e13, 1.4)], 1_000, 1_000, use_moe=False)
    write_run(tmp_path / "moe", [(0, 3.0), (5e12, 1.8), (1e13, 1.5)], 2_000, 1_000, use_moe=True)
    runs = [load_run(str(tmp_path / n)) for n in ("d1", "d4", "moe")]
    lines = plot(runs, 1e13, str(tmp_path / "p.png"), frontier_idx=[1, 0])
    frontier = [v for k, v in lines.items() if k.startswith("frontier: d4, d1")]
    assert frontier == [[(1e13, 1.6), (4e13, 1.4)]]
    assert not any(k.startswith("frontier") for k in plot(runs, 1e13, str(tmp_path / "q.png")))


def test_a_grown_run_shows_its_whole_lineage(tmp_path):
    # dense (evals to step 3) -> grown at step 2 -> trained on: the grown run's curve starts at 0 FLOPs
    write_run(tmp_path / "dense", [(0, 3.0), (1e12, 2.0), (2e12, 1.8), (3e12, 1.7)], 100, 100, False)
    grown_ckpt = tmp_path / "grown" / "checkpoints" / "step_000000"
    write_run(tmp_path / "grown", [(2e12, 1.8), (5e12, 1.5), (8e12, 1.4)], 800, 300, True)
    lines = (tmp_path / "grown" / "metrics.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    header["init_from"] = dict(checkpoint=str(grown_ckpt), flops=2e12,
                               grown_from=dict(checkpoint=str(tmp_path / "dense" / "checkpoints" / "step_000002")))
    (tmp_path / "grown" / "metrics.jsonl").write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    _, _, evals, summary, _ = load_run(str(tmp_path / "grown"))
    # the dense evals up to the step it was grown at (not its later step 3), then the grown run's own
    assert evals == [(0, 3.0), (1e12, 2.0), (2e12, 1.8), (5e12, 1.5), (8e12, 1.4)]
    assert summary["final_val_bpb"] == 1.4
    _, _, dense_evals, _, _ = load_run(str(tmp_path / "dense"))
    assert len(dense_evals) == 4  # a run without init_from is unchanged
