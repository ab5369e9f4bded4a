"""scripts/prepare_data.py: the one-process preparation of shards and tokenizer before torchrun,
and that base_train's data flags and preparation are the same ones."""

import json
import os
import subprocess
import sys

import pytest

from scripts import base_train, prepare_data
from tests.test_base_train import REPO, train_env


def run_prepare(base, args, timeout=120):
    return subprocess.run([sys.executable, "-m", "scripts.prepare_data", *args], cwd=REPO, env=train_env(base),
                          capture_output=True, text=True, timeout=timeout)


def test_prepares_the_built_in_corpus_and_a_tokenizer_once(tmp_path):
    base = tmp_path / "base"
    args = ["--data", "synthetic", "--vocab-size", "300", "--synthetic-train-docs", "300"]
    p = run_prepare(base, args)
    assert p.returncode == 0, p.stderr
    data, tok = base / "data" / "synthetic", base / "tokenizers" / "synthetic"
    assert f"data: {data} (2 shards)" in p.stdout  # one train shard (300 docs), then the val shard
    assert f"tokenizer: {tok} (vocab 300)" in p.stdout
    assert "Preparing the built-in corpus" in p.stdout and "training one (vocab 300)" in p.stdout
    assert json.loads((data / "entropy.json").read_text())["train_docs"] == 300
    built = {f: os.path.getmtime(data / f) for f in os.listdir(data)}
    # a second call finds everything in place: nothing rebuilt, nothing retrained
    p = run_prepare(base, args)
    assert p.returncode == 0 and "Preparing" not in p.stdout and "training one" not in p.stdout
    assert {f: os.path.getmtime(data / f) for f in os.listdir(data)} == built
    # the tokenizer belongs to the corpus: another --vocab-size is said, not silently applied
    p = run_prepare(base, args[:2] + ["--vocab-size", "512"] + args[4:])
    assert "(vocab 300) (trained earlier; --vocab-size 512 applies only to a new one)" in p.stdout


def test_prepares_own_text_files(tmp_path):
    texts = tmp_path / "notes"
    texts.mkdir()
    (texts / "a.txt").write_text("\n\n".join(f"Document number {i} talks about topic {i % 7}." for i in range(400)))
    base = tmp_path / "base"
    p = run_prepare(base, ["--data", str(texts), "--vocab-size", "260"])
    assert p.returncode == 0, p.stderr
    assert f"Building shards from {texts}" in p.stdout
    assert f"data: {base / 'data' / 'local_notes'}" in p.stdout and f"tokenizer: {base / 'tokenizers' / 'local_notes'}" in p.stdout
    assert (base / "tokenizers" / "local_notes" / "tokenizer.json").exists()


@pytest.mark.parametrize("args,flag", [
    (["--data", "no/such/folder"], "--data"),
    (["--data", "nonsense_name"], "--data"),
    (["--vocab-size", "100"], "--vocab-size"),
    (["--data", "fineweb", "--num-shards", "1"], "--num-shards"),  # refused before any download
    (["--synthetic-train-docs", "0"], "--synthetic-train-docs"),
    (["--num-iterations", "3"], "--num-iterations"),  # a training flag: not this script's
])
def test_bad_input_is_one_line_before_any_work(tmp_path, args, flag):
    base = tmp_path / "base"
    p = run_prepare(base, args)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and line.startswith("prepare_data: error: ") and flag in line
    assert not base.exists() or os.listdir(base) == []


def test_base_train_takes_the_same_data_flags_and_preparation():
    data_flags = {a.dest: a for a in prepare_data.build_parser()._actions if a.dest != "help"}
    train_flags = {a.dest: a for a in base_train.build_parser()._actions}
    for dest, action in data_flags.items():
        assert train_flags[dest].option_strings == action.option_strings, dest
        if dest != "data":  # base_train's --data defaults to None: with --init-from, the checkpoint's
            assert train_flags[dest].default == action.default, dest
    assert base_train.prepare_data is prepare_data.prepare_data
    assert base_train.parse_args([]).data == prepare_data.build_parser().parse_args([]).data == "synthetic"
