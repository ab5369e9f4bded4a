"""scripts/moe_stats.py: PNG pictures of MoE routing from a hand-made metrics.jsonl, and its
one-line errors."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("moe_load_heatmap.png", "moe_routing_final.png")


def run_stats(base, *args):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), MPLBACKEND="Agg", MPLCONFIGDIR=str(base / "mpl"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "scripts.moe_stats", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def layer_stats(load):
    mean = 1 / len(load)
    return dict(load=load, cv=0.1, max_load=max(load) / mean, min_load=min(load) / mean,
                dead=sum(1 for v in load if v == 0), entropy=1.2, dropped=0.0, balance_loss=1.01, z_loss=2.0)


def write_run(run_dir, with_moe=True):
    """header, train records and 3 moe intervals of 2 layers x 4 experts (one expert dies)."""
    run_dir.mkdir(parents=True)
    loads = [
        [[0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]],
        [[0.3, 0.3, 0.2, 0.2], [0.5, 0.3, 0.2, 0.0]],
        [[0.25, 0.35, 0.25, 0.15], [0.6, 0.3, 0.1, 0.0]],
    ]
    records = [dict(type="header", config=dict(use_moe=with_moe, n_experts=4))]
    for i, interval in enumerate(loads):
        step = 10 * (i + 1)
        records.append(dict(type="train", step=step, train_loss=5.0 - i))
        if with_moe:
            records.append(dict(type="moe", step=step, flops=1e9 * step, layers=[layer_stats(l) for l in interval]))
    records.append(dict(type="summary", step=30))
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 200 and height >= 200, (path, width, height)
    assert len(data) > 5000, (path, len(data))
    return data


def test_plots_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run")
    out = tmp_path / "plots"
    p = run_stats(tmp_path, "--run", str(tmp_path / "run"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    pictures = [check_png(out / name) for name in PLOTS]
    assert pictures[0] != pictures[1]
    for name in PLOTS:
        assert str(out / name) in p.stdout
        assert not (tmp_path / "run" / name).exists()  # --out given: the run folder is left alone
    # the heatmap is not a blank canvas
    import matplotlib.image
    img = matplotlib.image.imread(str(out / PLOTS[0]))
    assert img[..., :3].std() > 0.05


def test_model_tag_resolves_under_base_dir_and_defaults_out_to_run_folder(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "runs" / "tagged")
    p = run_stats(tmp_path, "--run", "tagged")
    assert p.returncode == 0, p.stderr
    for name in PLOTS:
        check_png(tmp_path / "runs" / "tagged" / name)


def test_run_without_moe_records_is_one_line_exit_2(tmp_path):
    write_run(tmp_path / "dense", with_moe=False)
    p = run_stats(tmp_path, "--run", str(tmp_path / "dense"), "--out", str(tmp_path / "plots"))
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe_stats: error: ") and "no MoE routing records" in lines[0]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "plots").exists()


def test_missing_run_is_one_line_exit_2(tmp_path):
    p = run_stats(tmp_path, "--run", str(tmp_path / "nowhere"))
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe_stats: error: ") and "no metrics.jsonl" in lines[0]
    assert "Traceback" not in p.stderr
    p = run_stats(tmp_path)  # --run is required
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--run" in p.stderr


def test_corrupt_metrics_line_is_one_line_exit_2(tmp_path):
    write_run(tmp_path / "moe", with_moe=True)
    with open(tmp_path / "moe" / "metrics.jsonl", "a") as f:
        f.write('{"type": "moe", "step": \n')  # a line cut by a crash
    p = run_stats(tmp_path, "--run", str(tmp_path / "moe"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics.jsonl:" in lines[0] and "not valid JSON" in lines[0]
