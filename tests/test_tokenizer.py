"""Tokenizer: training, round trips, BOS, persistence, token_bytes and the tok_train script."""

import os
import sys
import random
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.common import UserError
from nanochat.tokenizer import Tokenizer, train_tokenizer, load_token_bytes, get_tokenizer_dir, BOS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 400

SAMPLES = [
    "",
    "hello world",
    "Hello, World! The year 2024 had 365 days; π ≈ 3.14159.",
    "naïve café résumé — “quotes” ‘and’ dashes…",
    "日本語のテキストと中文文本",
    "emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "tabs\tand\nnewlines\r\n  and   spaces   ",
    "a literal <|bos|> inside text is just text",
    "x" * 500,
    "1234567890 000 42 3.5e-7",
]


def make_docs(n, seed):
    """Varied English-ish sentences from random syllable words, with digits, unicode and emoji,
    so there are plenty of pairs to merge."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ter", "an", "ing", "the", "re", "ou", "st", "pro", "ble", "ion", "ed", "qu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    extras = ["café", "naïve", "😀", "🎉", "日本", "über", "2024", "3.14", "—", "!", "?", ","]
    docs = []
    for _ in range(n):
        sent = [rng.choice(words) for _ in range(rng.randint(5, 25))] + [rng.choice(extras)]
        rng.shuffle(sent)
        docs.append(" ".join(sent).capitalize() + f" {rng.randint(0, 99999)}.")
    return docs


def write_shards(data_dir, shard_docs):
    os.makedirs(data_dir, exist_ok=True)
    for i, docs in enumerate(shard_docs):
        pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, f"shard_{i:05d}.parquet"), row_group_size=100)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tokenizer trained on two train shards + a val shard, shared by the tests."""
    root = tmp_path_factory.mktemp("tok")
    data_dir = os.path.join(root, "data")
    write_shards(data_dir, [make_docs(300, 0), make_docs(300, 1), make_docs(100, 2)])
    out_dir = os.path.join(root, "tokenizer")
    tok = train_tokenizer(data_dir, out_dir, VOCAB)
    return tok, out_dir


def test_vocab_size_and_bos(trained):
    tok, _ = trained
    assert tok.get_vocab_size() == VOCAB
    assert tok.get_bos_token_id() == VOCAB - 1  # the only special token, right after the ranks
    assert tok.id_to_token(tok.get_bos_token_id()) == BOS


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text


def test_prepend_bos(trained):
    tok, _ = trained
    bos = tok.get_bos_token_id()
    ids = tok.encode("hello world", prepend_bos=True)
    assert ids[0] == bos and ids[1:] == tok.encode("hello world")
    assert tok.decode(ids) == "<|bos|>hello world"
    assert tok.decode([bos]) == "<|bos|>"
    # a literal "<|bos|>" in the text must not become the BOS id
    assert bos not in tok.encode("a literal <|bos|> inside")


def test_batch_encode(trained):
    tok, _ = trained
    batch = tok.encode(SAMPLES, prepend_bos=True)
    assert len(batch) == len(SAMPLES)
    for text, ids in zip(SAMPLES, batch):
        assert ids[0] == tok.get_bos_token_id()
        assert ids[1:] == tok.encode(text)
    assert tok.encode(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_save_load_identical(trained, tmp_path):
    tok, out_dir = trained
    assert sorted(os.listdir(out_dir)) == ["ranks.tiktoken", "token_bytes.npy", "tokenizer.json"]  # no .tmp leftovers
    loaded = Tokenizer.load(out_dir)
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    assert loaded.get_bos_token_id() == tok.get_bos_token_id()
    texts = SAMPLES + make_docs(20, 7)
    assert loaded.encode(texts, prepend_bos=True) == tok.encode(texts, prepend_bos=True)
    # and saving the loaded one again gives the same files
    loaded.save(str(tmp_path))
    for name in ["ranks.tiktoken", "tokenizer.json"]:
        with open(os.path.join(out_dir, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read()


def test_token_bytes(trained):
    tok, out_dir = trained
    tb = load_token_bytes(out_dir)
    assert tb.dtype == torch.int32
    assert tb.shape == (VOCAB,)
    assert tb[tok.get_bos_token_id()].item() == 0
    assert (tb[:256] == 1).all()  # the byte tokens
    assert np.array_equal(tb.numpy(), tok.token_bytes())
    # independent check: the bytes of the tokens of a text add up to its UTF-8 length
    for text in SAMPLES + make_docs(10, 9):
        ids = tok.encode(text, prepend_bos=True)
        assert tb[ids].sum().item() == len(text.encode("utf-8"))


def test_merges_learned(tmp_path):
    """A word repeated many times must end up as one token: proof that merges were learned."""
    docs = ["zorblaxian " * 50 + "and some other words " + str(i) for i in range(200)]
    write_shards(tmp_path / "data", [docs, docs[:10]])
    tok = train_tokenizer(str(tmp_path / "data"), str(tmp_path / "tok"), 300)
    assert len(tok.encode(" zorblaxian")) == 1
    assert len(tok.encode(" zorblaxian zorblaxian")) == 2


def test_vocab_too_small(tmp_path):
    with pytest.raises(UserError, match="--vocab-size"):
        train_tokenizer(str(tmp_path), str(tmp_path / "tok"), 100)


def test_vocab_larger_than_corpus_supports(tmp_path):
    write_shards(tmp_path / "data", [["ab ab ab"] * 5, ["ab"]])
    with pytest.raises(UserError, match="--vocab-size"):
        train_tokenizer(str(tmp_path / "data"), str(tmp_path / "tok"), 4096)


def test_load_corrupt_or_missing(trained, tmp_path):
    _, out_dir = trained
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(str(tmp_path / "nope"))
    # missing tokenizer.json
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.load(str(tmp_path))
    # corrupted ranks file
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ["tokenizer.json", "ranks.tiktoken", "token_bytes.npy"]:
        (bad / name).write_bytes(open(os.path.join(out_dir, name), "rb").read())
    lines = (bad / "ranks.tiktoken").read_text().splitlines()
    lines[300] = "%%% not base64 at all"
    (bad / "ranks.tiktoken").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="ranks.tiktoken"):
        Tokenizer.load(str(bad))
    # a truncated ranks file (e.g. a crash mid-copy) is caught too
    (bad / "ranks.tiktoken").write_text("\n".join(lines[:100]) + "\n")
    with pytest.raises(UserError, match="ranks.tiktoken"):
        Tokenizer.load(str(bad))
    # corrupted token_bytes.npy
    (bad / "token_bytes.npy").write_bytes(b"garbage")
    with pytest.raises(UserError, match="token_bytes.npy"):
        load_token_bytes(str(bad))


def run_tok_train(args, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    return subprocess.run([sys.executable, "-m", "scripts.tok_train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_script_missing_data_dir(tmp_path):
    r = run_tok_train(["--data-dir", str(tmp_path / "missing")], tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--data-dir" in lines[0]


def test_script_trains(tmp_path):
    data_dir = tmp_path / "data" / "tiny"  # resolved from --data tiny
    write_shards(data_dir, [make_docs(200, 3), make_docs(50, 4)])
    r = run_tok_train(["--data", "tiny", "--vocab-size", "300", "--max-chars", "1e6"], tmp_path)
    assert r.returncode == 0, r.stderr
    out_dir = tmp_path / "tokenizers" / "tiny"
    assert sorted(os.listdir(out_dir)) == ["ranks.tiktoken", "token_bytes.npy", "tokenizer.json"]
    assert "bytes/token" in r.stdout
    tok = Tokenizer.load(str(out_dir))
    assert tok.get_vocab_size() == 300


def test_get_tokenizer_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert get_tokenizer_dir("fineweb") == os.path.join(str(tmp_path), "tokenizers", "fineweb")
