"""scripts/compare.py: alignment by FLOPs, interpolation, compute multiplier, outputs."""

import json
import subprocess
import sys

import pytest

from scripts.compare import (bpb_at, flops_to_reach, compute_multiplier, frontier_multiplier, load_run, build_rows,
                             plot, table_notes, REPEATED, step_seconds, markdown_table)
from nanochat.common import UserError
from nanochat.report import MetricsLog

H100x8 = dict(device="NVIDIA H100 80GB HBM3", world_size=8, threads=1)


def write_run(run_dir, evals, total, active, use_moe, floor=1.0, tok_s=1234.5, dts=None, hardware=None, warmup=()):
    """A finished run's metrics.jsonl. Without dts (older runs: no step times, no hardware) eval i
    is at step i; with dts, one train record per step (dt seconds, steps in `warmup` flagged as
    compile warm-up) and the evals spread evenly: eval i at step i * len(dts) / (len(evals) - 1)."""
    run_dir.mkdir(parents=True)
    n = len(evals) - 1
    eval_steps = [i * len(dts) // n for i in range(n + 1)] if dts else list(range(n + 1))
    records = [dict(type="header", config=dict(use_moe=use_moe), total=total, active_total=active, flops_per_token=6e6)]
    if hardware:
        records[0]["hardware"] = hardware
    records += [dict(type="eval", step=s, flops=f, val_bpb=b) for s, (f, b) in zip(eval_steps, evals)]
    if dts:
        records += [dict(type="train", step=s, flops=0, train_loss=5.0, mfu=None, dt=dt)
                    | (dict(compile_warmup=True) if s in warmup else {}) for s, dt in enumerate(dts, 1)]
    else:
        records += [dict(type="train", step=1, flops=evals[1][0], train_loss=5.0, mfu=None)]
    records.append(dict(type="summary", step=eval_steps[-1], flops=evals[-1][0], tokens=int(evals[-1][0] / 6e6),
                        final_val_bpb=evals[-1][1], entropy_floor=floor, total=total, active_total=active,
                        flops_per_token=6e6, tok_per_sec=tok_s, wall_time=42.0, peak_memory_mb=321.0)
                   | (dict(hardware=hardware) if hardware else {}))
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
    assert "Baseline for the compute and time multipliers: dense" in md
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
    assert not any("repeated data" in n for n in table_notes(rows, [0, 1]))
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
    grown = load_run(str(tmp_path / "grown"))
    evals, summary = grown.evals, grown.summary
    # the dense evals up to the step it was grown at (not its later step 3), then the grown run's own
    assert evals == [(0, 3.0), (1e12, 2.0), (2e12, 1.8), (5e12, 1.5), (8e12, 1.4)]
    assert summary["final_val_bpb"] == 1.4
    assert len(load_run(str(tmp_path / "dense")).evals) == 4  # a run without init_from is unchanged


# ---------------------------------------------------------------------------------------------
# Wall clock: training step seconds, read like FLOPs, only between runs on the same hardware


def test_step_seconds_leave_out_the_compile_warmup():
    trains = [dict(type="train", step=1, dt=9.0, compile_warmup=True), dict(type="train", step=2, dt=1.0),
              dict(type="train", step=3, dt=2.0), dict(type="train", step=4, dt=3.0)]
    # the warm-up step counts at the median of the others (2.0): it trained, its compilation is not training
    assert step_seconds(trains) == {1: 2.0, 2: 1.0, 3: 2.0, 4: 3.0}
    assert step_seconds([dict(trains[0], compile_warmup=False)] + trains[1:])[1] == 9.0


def test_clock_at_each_eval_is_the_seconds_of_the_steps_up_to_it(tmp_path):
    evals = [(0, 3.0), (1e12, 2.0), (2e12, 1.8)]
    write_run(tmp_path / "r", evals, 100, 100, False, dts=[9.0, 1.0, 2.0, 3.0], hardware=H100x8, warmup=(1,))
    run = load_run(str(tmp_path / "r"))
    assert run.clock == [(0, 3.0), (2.0 + 1.0, 2.0), (2.0 + 1.0 + 2.0 + 3.0, 1.8)]  # evals at steps 0, 2, 4
    assert run.hardware == H100x8
    write_run(tmp_path / "old", evals, 100, 100, False)  # metrics from before step times and hardware
    assert load_run(str(tmp_path / "old")).hardware is None


def test_a_resumed_run_sums_its_segments(tmp_path):
    """Written through MetricsLog as base_train writes it: a first segment that got to step 5, a
    crash, a resume from the step-3 checkpoint (steps 4 and 5 are trained again and counted once)."""
    path = tmp_path / "resumed" / "metrics.jsonl"
    train = lambda step, dt, warmup=False: dict(type="train", step=step, flops=step * 1e12, train_loss=4.0, mfu=None,
                                                dt=dt, **(dict(compile_warmup=True) if warmup else {}))
    log = MetricsLog(str(path), True)
    log.write(dict(type="header", config=dict(use_moe=False), total=10, active_total=10, flops_per_token=6e6,
                   hardware=H100x8))
    log.write(dict(type="eval", step=0, flops=0, val_bpb=3.0))
    for record in (train(1, 30.0, True), train(2, 1.0), train(3, 1.5), train(4, 1.0), train(5, 1.25)):
        log.write(record)
    log.write(dict(type="eval", step=4, flops=4e12, val_bpb=2.5))
    log.close()
    log = MetricsLog(str(path), True, resume_step=3)
    for record in (train(4, 20.0, True), train(5, 2.0), train(6, 2.0)):
        log.write(record)
    log.write(dict(type="eval", step=6, flops=6e12, val_bpb=2.0))
    log.write(dict(type="summary", step=6, flops=6e12, tokens=10, final_val_bpb=2.0, total=10, active_total=10,
                   flops_per_token=6e6, tok_per_sec=1.0, wall_time=99.0, hardware=H100x8))
    log.close()
    run = load_run(str(tmp_path / "resumed"))
    # steps 1-3 of the first segment, 4-6 of the second; each start's warm-up step at the median of
    # the other steps (1.0, 1.5, 2.0, 2.0 -> 1.75)
    assert run.clock == [(0, 3.0), (1.75 + 1.0 + 1.5 + 1.75 + 2.0 + 2.0, 2.0)] == [(0, 3.0), (10.0, 2.0)]
    # resumed on another machine: its seconds compare with no other run's
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[-1]["hardware"] = dict(H100x8, device="NVIDIA A100-SXM4-80GB")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_run(str(tmp_path / "resumed")).hardware == "changed on resume"


D1, D4, MOE = ([(0, 3.0), (5e12, 1.9), (1e13, 1.6)], [(0, 3.0), (1e13, 1.7), (2e13, 1.55), (4e13, 1.4)],
               [(0, 3.0), (5e12, 1.8), (1e13, 1.5)])


def write_timed_runs(tmp_path, moe_hardware=H100x8):
    """d1: 10 s to 1.6; d4: 40 s to 1.4 (evals at 10, 20 and 40 s); the MoE reaches 1.5 at 1e13 FLOPs in
    20 s of steps (10 s each: its first step compiled for 300 s). So it is worth 2x the dense compute
    (FLOPs) but its steps cost 2x the dense steps."""
    write_run(tmp_path / "d1", D1, 1_000, 1_000, False, dts=[5.0, 5.0], hardware=H100x8)
    write_run(tmp_path / "d4", D4, 1_000, 1_000, False, dts=[10.0] * 4, hardware=H100x8)
    write_run(tmp_path / "moe", MOE, 2_000, 1_000, True, dts=[300.0, 10.0], hardware=moe_hardware, warmup=(1,))
    return [load_run(str(tmp_path / n)) for n in ("d1", "d4", "moe")]


def test_time_multiplier_hand_computed(tmp_path):
    runs = write_timed_runs(tmp_path)
    assert [r.clock[-1][0] for r in runs] == [10.0, 40.0, 20.0]
    rows, _ = build_rows(runs, baseline_idx=0, frontier_idx=[0, 1])
    # frontier (10 s, 1.6) - (40 s, 1.4): 1.5 halfway in bpb = halfway in log-seconds = 20 s; 20 / 20
    assert [(r["multiplier"], r["time_multiplier"]) for r in rows] == [
        ("frontier", "frontier"), ("frontier", "frontier"), ("2.00", "1.00")]
    assert [r["train_s"] for r in rows] == ["10.00", "40.00", "20.00"]
    # on d4's own curve: 1.5 a third of the way from (20 s, 1.55) to (40 s, 1.4) in log-seconds
    rows, _ = build_rows(runs, baseline_idx=1)
    assert rows[2]["multiplier"] == "2.52" and rows[2]["time_multiplier"] == f"{20 * 2 ** (1 / 3) / 20:.2f}" == "1.26"
    assert rows[1]["time_multiplier"] == "1 (baseline)"
    # beyond the frontier: the MoE at 1.3 -> "> 40 / 20"
    write_run(tmp_path / "moe_low", [(0, 3.0), (5e12, 1.6), (1e13, 1.3)], 2_000, 1_000, True, dts=[10.0, 10.0],
              hardware=H100x8)
    rows, _ = build_rows(runs + [load_run(str(tmp_path / "moe_low"))], baseline_idx=0, frontier_idx=[0, 1])
    assert rows[3]["time_multiplier"] == "> 2.00"


def test_time_multiplier_only_on_the_same_hardware(tmp_path):
    runs = write_timed_runs(tmp_path, moe_hardware=dict(H100x8, threads=2))
    rows, _ = build_rows(runs, baseline_idx=0, frontier_idx=[0, 1])
    assert rows[2]["multiplier"] == "2.00" and rows[2]["time_multiplier"] == "n/a (hardware differs)"
    notes = table_notes(rows, [0, 1], runs)
    assert any(n.startswith("Hardware: ") and "moe: NVIDIA H100 80GB HBM3, 8 process(es), 2 thread(s)" in n for n in notes)
    assert any("step time only" in n for n in notes)
    write_run(tmp_path / "old_moe", MOE, 2_000, 1_000, True)  # no hardware recorded
    rows, _ = build_rows(runs[:2] + [load_run(str(tmp_path / "old_moe"))], baseline_idx=0, frontier_idx=[0, 1])
    assert rows[2]["time_multiplier"] == "n/a (hardware unknown)"


def test_cli_prints_time_multipliers_and_plots_seconds(tmp_path):
    pytest.importorskip("matplotlib")
    runs = write_timed_runs(tmp_path)
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "scripts.compare", "--runs", *(str(tmp_path / n) for n in ("d1", "d4", "moe")),
                        "--frontier", str(tmp_path / "d1"), str(tmp_path / "d4"), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    header, _, _, _, moe = r.stdout.splitlines()[:5]
    assert "| compute multiplier | step seconds | time multiplier (step time) |" in header
    assert moe.startswith("| moe ") and moe.endswith("| 2.00               | 20.00        | 1.00                        |")
    assert "evaluations, samples, checkpoints and torch.compile's compilation" in r.stdout
    assert "time multiplier (step time)" in (out / "comparison.md").read_text()
    lines = plot(runs, 1e13, str(tmp_path / "p.png"), frontier_idx=[0, 1])
    assert lines["time: frontier: d1, d4 (final points)"] == [(10.0, 1.6), (40.0, 1.4)]
    assert lines["frontier: d1, d4 (final points)"] == [(1e13, 1.6), (4e13, 1.4)]
    moe_time = next(v for k, v in lines.items() if k.startswith("time: moe "))
    assert moe_time == [(10.0, 1.8), (20.0, 1.5)]  # the step-0 eval at 0 s is off the log axis
    runs = write_timed_runs(tmp_path / "other", moe_hardware=dict(H100x8, world_size=4))
    assert not any(k.startswith("time: ") for k in plot(runs, 1e13, str(tmp_path / "q.png")))


def test_a_run_started_from_another_has_no_time_multiplier(tmp_path):
    # its curve starts at its source's FLOPs, but the seconds its source's steps took are another run's
    write_run(tmp_path / "dense", D4, 1_000, 1_000, False, dts=[10.0] * 4, hardware=H100x8)
    write_run(tmp_path / "grown", [(1e13, 1.7), (2e13, 1.5)], 2_000, 1_000, True, dts=[10.0], hardware=H100x8)
    path = tmp_path / "grown" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0]["init_from"] = dict(checkpoint=str(tmp_path / "gone" / "checkpoints" / "step_000001"), flops=1e13)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = [load_run(str(tmp_path / n)) for n in ("dense", "grown")]
    assert runs[1].clock is None
    rows, _ = build_rows(runs, baseline_idx=0)
    assert rows[1]["multiplier"] == f"{2e13 * 2 ** (1 / 3) / 2e13:.2f}" and rows[1]["time_multiplier"] == "n/a (--init-from)"
