"""scripts/compare.py: the side-by-side table read from metrics.jsonl files."""

import json
import subprocess
import sys

import pytest

from scripts.compare import load_run, table
from nanochat.common import UserError


def write_run(run_dir, total, active, bpb, floor=1.08):
    run_dir.mkdir(parents=True)
    records = [dict(type="header", total=total, active_total=active, flops_per_token=6e6),
               dict(type="train", step=1, flops=6e6 * 100, train_loss=5.0),
               dict(type="summary", step=10, flops=6e9, tokens=1000, final_val_bpb=bpb, entropy_floor=floor,
                    total=total, active_total=active, flops_per_token=6e6, tok_per_sec=1234.5, wall_time=42.0)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_table_has_each_run_and_its_numbers(tmp_path):
    write_run(tmp_path / "dense", 1_310_720, 1_310_720, 1.2345)
    write_run(tmp_path / "moe", 2_890_000, 1_313_000, 1.2001, floor=None)
    text = table([load_run(str(tmp_path / "dense")), load_run(str(tmp_path / "moe"))])
    lines = text.splitlines()
    assert len(lines) == 4
    dense, moe = lines[2], lines[3]
    assert "dense" in dense and "1.31M" in dense and "1.2345" in dense and "1.0800" in dense and "1,234" in dense
    assert "moe" in moe and "2.89M" in moe and "1.31M" in moe and "1.2001" in moe and "n/a" in moe


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
