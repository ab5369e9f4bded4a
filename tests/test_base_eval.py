"""scripts/base_eval.py: the CORE command (table, CORE line, metrics record), the eval bundle
downloaded from a local HTTP server (retried, temp-then-rename), base_train --core-every (one
process, and two ranks with expert parallelism), compare's CORE column, one-line errors."""

import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from nanochat import core_eval as ce
from nanochat.common import UserError
from scripts import base_eval
from tests.test_base_train import REPO, TINY, MOE, train_env, run_train, read_metrics, of_type

BUNDLE = REPO / "tests" / "fixtures" / "core"


def load_run(base, tag):
    from nanochat.checkpoint import load_model, checkpoint_for
    return load_model(checkpoint_for("--path", str(Path(base) / "runs" / tag), None, False), torch.device("cpu"))


def run_eval(base, args, check=True):
    p = subprocess.run([sys.executable, "-m", "scripts.base_eval", *args], cwd=REPO, env=train_env(base),
                       capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def trained(base_dir):
    run_train(base_dir, TINY + ["--num-iterations", "4", "--eval-every", "-1", "--model-tag", "core_tiny"])
    return base_dir


def test_base_eval_prints_the_table_and_records_core(trained):
    p = run_eval(trained, ["--model-tag", "core_tiny", "--eval-dir", str(BUNDLE)])
    out = p.stdout
    assert "arc_easy" in out and "missing" in out and "(5/22 tasks, partial)" in out
    core = of_type(read_metrics(trained, "core_tiny"), "core")
    assert len(core) == 1 and core[0]["n_tasks"] == 5 and core[0]["partial"] and len(core[0]["missing"]) == 17
    # the record holds what the library computes on the same checkpoint
    model, tok, meta = load_run(trained, "core_tiny")
    assert core[0]["step"] == meta["step"] == 4
    tasks, baselines = ce.load_tasks(str(BUNDLE), -1)
    s = ce.evaluate_core(model, tok, tasks, baselines, "cpu", model.config.sequence_len, progress=False)
    assert {k: v["accuracy"] for k, v in s["tasks"].items()} == {k: v["accuracy"] for k, v in core[0]["tasks"].items()}
    assert f"CORE {s['core']:.4f} (5/22 tasks, partial)" in out


@pytest.mark.parametrize("args,needle", [
    (["--model-tag", "core_tiny", "--max-per-task", "0"], "--max-per-task must be >= 1 or -1"),
    (["--model-tag", "core_tiny", "--eval-dir", "/nonexistent"], "--eval-dir /nonexistent: no such folder"),
    (["--model-tag", "nope", "--eval-dir", str(BUNDLE)], "--model-tag nope: no run folder"),
    (["--model-tag", "core_tiny", "--eval-dir", str(BUNDLE), "--max-per-task", "3"], "fewer than 10 shots + 1"),
])
def test_bad_input_is_one_line(trained, args, needle):
    p = run_eval(trained, args, check=False)
    assert p.returncode != 0 and needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# The bundle download, against a local server

def bundle_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in BUNDLE.rglob("*"):
            if f.is_file():
                z.write(f, "eval_bundle/" + str(f.relative_to(BUNDLE)))
    return buf.getvalue()


@pytest.fixture
def server():
    """Serves /eval_bundle.zip; `plan` lists what each request gets: 'ok', 'cut' (a short body
    under the full Content-Length), '404'."""
    body = bundle_zip()
    state = dict(plan=[], hits=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            what = state["plan"][min(state["hits"], len(state["plan"]) - 1)]
            state["hits"] += 1
            if what == "404":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if what == "ok" else body[:len(body) // 2])

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/eval_bundle.zip", state
    httpd.shutdown()


def test_bundle_downloads_once_retrying_a_cut_body(tmp_path, server, monkeypatch):
    url, state = server
    state["plan"] = ["cut", "ok"]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr("time.sleep", lambda s: None)
    d = base_eval.resolve_eval_dir("", url=url)
    assert d == str(tmp_path / "eval_bundle") and state["hits"] == 2
    assert sorted(os.listdir(tmp_path)) == ["eval_bundle"]  # no zip, no .tmp left
    tasks, _ = ce.load_tasks(d, -1)
    assert len(tasks) == 5
    base_eval.resolve_eval_dir("", url=url)  # present: no second download
    assert state["hits"] == 2


def test_bundle_download_failure_is_one_error_and_leaves_nothing(tmp_path, server, monkeypatch):
    url, state = server
    state["plan"] = ["404"]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="eval bundle download failed"):
        base_eval.resolve_eval_dir("", url=url)
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match="--core-eval-dir: no eval bundle at"):
        base_eval.resolve_eval_dir("", "--core-eval-dir", url=url, download=False)


# CORE during training, and in the comparison

def test_base_train_core_every_and_compare_column(base_dir):
    run_train(base_dir, TINY + ["--num-iterations", "4", "--eval-every", "-1", "--model-tag", "core_every",
                                "--core-every", "2", "--core-max-per-task", "12", "--core-eval-dir", str(BUNDLE)])
    records = read_metrics(base_dir, "core_every")
    core = of_type(records, "core")
    assert [r["step"] for r in core] == [2, 4] and all(r["max_per_task"] == 12 for r in core)
    assert of_type(records, "summary")[0]["core"] == core[-1]["core"]
    assert all(t["scored"] + t["skipped"] == min(12, n) for r in core for t, n in
               zip(r["tasks"].values(), [14, 12, 12, 12, 13]))  # arc_easy copa lambada winogrande operators
    p = subprocess.run([sys.executable, "-m", "scripts.compare", "--runs", "core_every", "core_tiny"], cwd=REPO,
                       env=train_env(base_dir), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    header = p.stdout.splitlines()[0]
    assert header.rstrip(" |").endswith("CORE")
    assert f"{core[-1]['core']:.4f} ± {core[-1]['core_se']:.4f} (5/22, partial)" in p.stdout


def test_base_train_refuses_a_missing_core_dir_before_training(tmp_path):
    p = run_train(tmp_path, TINY + ["--num-iterations", "2", "--core-every", "1", "--core-eval-dir", "/nonexistent"],
                  check=False, timeout=120)
    assert p.returncode != 0 and "--core-eval-dir /nonexistent: no such folder" in p.stderr
    assert not (tmp_path / "data").exists()  # nothing prepared


def test_core_under_expert_parallelism_matches_one_process(base_dir):
    """Two ranks, each holding half the experts (every forward a collective): the examples are
    split over the ranks in lock step and give the scores one process gets from the same weights."""
    tag = "core_ep"
    run_train(base_dir, TINY + MOE + ["--num-iterations", "2", "--eval-every", "-1", "--model-tag", tag,
                                      "--expert-parallel", "2", "--core-every", "-1", "--core-eval-dir", str(BUNDLE)],
              nproc=2)
    core = of_type(read_metrics(base_dir, tag), "core")
    assert len(core) == 1 and core[0]["step"] == 2
    p = run_eval(base_dir, ["--model-tag", tag, "--eval-dir", str(BUNDLE), "--max-per-task", "500", "--no-metrics"])
    for label, t in core[0]["tasks"].items():
        assert f"{label}" in p.stdout
    model, tok, _ = load_run(base_dir, tag)
    tasks, baselines = ce.load_tasks(str(BUNDLE), 500)
    s = ce.evaluate_core(model, tok, tasks, baselines, "cpu", model.config.sequence_len, progress=False)
    assert {k: (v["scored"], v["accuracy"]) for k, v in s["tasks"].items()} == \
        {k: (v["scored"], v["accuracy"]) for k, v in core[0]["tasks"].items()}
