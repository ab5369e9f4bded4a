"""Tests for the synthetic corpus: determinism, rendering, exact bits, the analytic floor, prepare."""

import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from nanochat.dataset import list_shards, read_entropy_floor, split_shards
from nanochat.synthetic import (analytic_bits_per_byte, analytic_stats, make_generator, parse_document,
                                prepare_synthetic, render_document, sample_document)


@pytest.fixture(scope="module")
def gen():
    return make_generator(seed=0)


def recompute_bits(gen, text):
    """Independent recomputation from the text: parse it, then walk the transition tables.
    The first word is drawn from the start row (row V, the '.' row), and it also pays log2 K
    for the domain; after '.' the next word costs start-row probability with no (1 - p_end)."""
    domain, words = parse_document(gen, text)
    V = gen["vocab_per_domain"]
    index = {w: i for i, w in enumerate(gen["words"][domain])}
    bits, prev = math.log2(gen["n_domains"]), V
    for w in words:
        i = index[w]
        bits -= math.log2(gen["trans"][domain][prev, i])
        prev = i
    return bits


def test_generator_is_deterministic():
    a, b, c = make_generator(seed=3), make_generator(seed=3), make_generator(seed=4)
    assert a["words"] == b["words"] and np.array_equal(a["trans"], b["trans"])
    assert np.array_equal(a["p_end"], b["p_end"])
    assert a["words"] != c["words"]
    docs1 = [sample_document(a, np.random.default_rng(7)) for _ in range(3)]
    docs2 = [sample_document(b, np.random.default_rng(7)) for _ in range(3)]
    assert docs1 == docs2


@pytest.mark.parametrize("n_domains", [4, 6])
def test_vocabularies_disjoint(n_domains):
    g = make_generator(seed=1, n_domains=n_domains, vocab_per_domain=100)
    vocabs = [set(ws[:-1]) for ws in g["words"]]
    for d, ws in enumerate(g["words"]):
        assert ws[-1] == "." and len(vocabs[d]) == 100
        assert all(w.isascii() and w.isalpha() and w.islower() for w in ws[:-1])
    for i in range(n_domains):
        for j in range(i + 1, n_domains):
            assert not vocabs[i] & vocabs[j]
    # Rows are distributions; '.' never follows '.' and never starts a document.
    assert np.allclose(g["trans"].sum(axis=2), 1.0)
    assert np.all(g["trans"][:, -1, -1] == 0)


def test_render_parse_round_trip(gen):
    rng = np.random.default_rng(11)
    domains = set()
    for _ in range(300):
        text, _ = sample_document(gen, rng)
        assert text.endswith(".") and "  " not in text and text[0].isupper()
        domain, words = parse_document(gen, text)
        domains.add(domain)
        assert words[-1] == "." and all(w in gen["words"][domain] for w in words)
        assert render_document(words) == text
    assert domains == set(range(gen["n_domains"]))
    assert render_document(["ab", "cd", ".", "ef", "."]) == "Ab cd. Ef."


def test_parse_rejects_non_documents(gen):
    text, _ = sample_document(gen, np.random.default_rng(5))
    w0, w1 = gen["words"][0][0], gen["words"][1][0]
    bad = [text[0].lower() + text[1:], text + " ", text.replace(" ", "  ", 1), text[:-1] + " .",
           w0.capitalize() + " " + w1 + ".", "Notaword.", w0.capitalize()]
    for b in bad:
        with pytest.raises(ValueError):
            parse_document(gen, b)


def test_bits_match_independent_recomputation(gen):
    rng = np.random.default_rng(12)
    for _ in range(200):
        text, bits = sample_document(gen, rng)
        assert bits == pytest.approx(recompute_bits(gen, text), rel=1e-12)


def step_bytes(word):
    """Bytes a word adds to the text: a space plus its letters, or just '.' (glued)."""
    return 1 if word == "." else len(word) + 1


def test_byte_accounting_matches_renderer(gen):
    rng = np.random.default_rng(13)
    for _ in range(200):
        text, _ = sample_document(gen, rng)
        _, words = parse_document(gen, text)
        assert len(text.encode("utf-8")) == sum(step_bytes(w) for w in words) - 1  # first word: no space


def test_analytic_matches_value_iteration(gen):
    """Same expectations by a different method: iterate g(s) = sum_j T[s,j] (cost(s,j) + c_j g(j)),
    c_j the probability of going on after word j, until the fixed point (no matrix inverse)."""
    K, V = gen["n_domains"], gen["vocab_per_domain"]
    bits = nbytes = 0.0
    for d in range(K):
        T = gen["trans"][d]
        step_bits = np.where(T > 0, -np.log2(np.where(T > 0, T, 1.0)), 0.0)
        cost_bytes = np.array([step_bytes(w) for w in gen["words"][d]], dtype=float)
        cont = np.ones(V + 1)
        cont[V] = 1 - gen["p_end"][d]
        gb, gy = np.zeros(V + 1), np.zeros(V + 1)
        for _ in range(20000):
            nb = (T * (step_bits + cont * gb)).sum(axis=1)
            ny = T @ (cost_bytes + cont * gy)
            done = np.abs(nb - gb).max() < 1e-11 and np.abs(ny - gy).max() < 1e-11
            gb, gy = nb, ny
            if done:
                break
        bits += (math.log2(K) + gb[V]) / K   # a document starts as if right after a '.'
        nbytes += (gy[V] - 1) / K
    stats = analytic_stats(gen)
    assert stats["bits_per_doc"] == pytest.approx(bits, rel=1e-9)
    assert stats["bytes_per_doc"] == pytest.approx(nbytes, rel=1e-9)
    assert analytic_bits_per_byte(gen) == pytest.approx(bits / nbytes, rel=1e-9)


@pytest.mark.parametrize("seed,n_domains,vocab,n_docs", [(0, 4, 300, 4000), (1, 2, 40, 3000)])
def test_monte_carlo_matches_analytic(seed, n_domains, vocab, n_docs):
    g = make_generator(seed=seed, n_domains=n_domains, vocab_per_domain=vocab)
    rng = np.random.default_rng(100 + seed)
    docs = [sample_document(g, rng) for _ in range(n_docs)]
    bits = np.array([b for _, b in docs])
    nbytes = np.array([len(t.encode("utf-8")) for t, _ in docs], dtype=float)
    words = np.array([len(parse_document(g, t)[1]) for t, _ in docs], dtype=float)
    stats = analytic_stats(g)
    # Ratio estimator R = sum bits / sum bytes; delta-method standard error.
    R = bits.sum() / nbytes.sum()
    se = np.std(bits - R * nbytes, ddof=1) / math.sqrt(n_docs) / nbytes.mean()
    assert abs(R - analytic_bits_per_byte(g)) < 4 * se
    for sample, key in [(nbytes, "bytes_per_doc"), (words, "words_per_doc"), (bits, "bits_per_doc")]:
        assert abs(sample.mean() - stats[key]) < 4 * sample.std(ddof=1) / math.sqrt(n_docs), key


def test_default_floor_and_length():
    stats = analytic_stats(make_generator())
    assert 1.0 < stats["bits_per_byte"] < 2.0
    assert 60 < stats["words_per_doc"] < 250


def read_texts(path):
    return pq.read_table(path).column("text").to_pylist()


def test_prepare_synthetic(tmp_path, gen):
    data_dir = str(tmp_path / "synthetic")
    kwargs = dict(num_val_docs=120, docs_per_shard=100, seed=0)
    info = prepare_synthetic(data_dir, num_train_docs=250, **kwargs)
    paths = list_shards(data_dir)
    assert [os.path.basename(p) for p in paths] == [f"shard_{i:05d}.parquet" for i in range(4)]
    assert [len(read_texts(p)) for p in paths] == [100, 100, 50, 120]
    val_texts = read_texts(split_shards(paths, "val")[0])

    with open(os.path.join(data_dir, "entropy.json")) as f:
        on_disk = json.load(f)
    assert on_disk == info
    assert info["train_docs"] == 250 and info["val_docs"] == 120 and info["seed"] == 0 and info["n_domains"] == 4
    expected = sum(recompute_bits(gen, t) for t in val_texts) / sum(len(t.encode("utf-8")) for t in val_texts)
    assert info["val_bits_per_byte"] == pytest.approx(expected, rel=1e-12)
    assert read_entropy_floor(data_dir) == pytest.approx(expected, rel=1e-12)
    assert info["analytic_bits_per_byte"] == pytest.approx(analytic_bits_per_byte(gen), rel=1e-12)
    # Train and val documents are all parseable, and train shards are not the val documents.
    train_texts = [t for p in split_shards(paths, "train") for t in read_texts(p)]
    assert all(parse_document(gen, t) for t in train_texts[:50])
    assert train_texts[:120] != val_texts

    # Idempotent: a second call with the same parameters rewrites nothing.
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths + [os.path.join(data_dir, "entropy.json")]}
    assert prepare_synthetic(data_dir, num_train_docs=250, **kwargs) == info
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes

    # Different num_train_docs: regenerated in place, stale shards gone, same val documents.
    info2 = prepare_synthetic(data_dir, num_train_docs=150, **kwargs)
    paths2 = list_shards(data_dir)
    assert len(paths2) == 3 and info2["train_docs"] == 150
    assert read_texts(paths2[-1]) == val_texts
    assert info2["val_bits_per_byte"] == info["val_bits_per_byte"]
