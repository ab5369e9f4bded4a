"""Loader: BOS-prefixed packing, x/y shift, rank sharding and exact state restore."""

import itertools

import torch

from nanochat.dataloader import data_loader
from nanochat.dataset import write_shard


class ByteTokenizer:
    """Bytes as ids 0..255, BOS = 256: makes the expected stream easy to compute by hand."""
    bos = 256

    def encode(self, texts, prepend_bos=False):
        return [([self.bos] if prepend_bos else []) + list(t.encode()) for t in texts]


def make_shards(tmp_path, n_shards=3, docs_per_shard=7, row_group_size=3):
    docs_all, paths = [], []
    for s in range(n_shards):
        docs = [f"doc{s}-{i}:" + "x" * (i * 5 % 13) for i in range(docs_per_shard)]
        path = str(tmp_path / f"shard_{s:05d}.parquet")
        write_shard(docs, path, row_group_size=row_group_size)
        docs_all += docs
        paths.append(path)
    return paths, docs_all


def expected_stream(docs):
    return [t for d in docs for t in [256] + list(d.encode())]


def test_rows_are_the_bos_packed_stream(tmp_path):
    paths, docs = make_shards(tmp_path)
    B, T = 2, 9
    stream = expected_stream(docs)
    loader = data_loader(ByteTokenizer(), paths, B, T, loop=False)
    rows = []
    for x, y, _ in loader:
        assert x.shape == y.shape == (B, T)
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        for r in range(B):
            rows.append(x[r].tolist() + [y[r, -1].item()])
    n = len(stream) // (B * (T + 1)) * B
    assert len(rows) == n
    assert [t for row in rows for t in row] == stream[: n * (T + 1)]
    assert stream[0] == 256 and rows[0][0] == 256  # every document starts with BOS


def test_state_restore_continues_exactly(tmp_path):
    paths, _ = make_shards(tmp_path)
    reference = data_loader(ByteTokenizer(), paths, 2, 5, loop=True)
    batches = [next(reference) for _ in range(40)]  # several epochs over the data
    assert batches[-1][2]["epoch"] >= 1
    for cut in (1, 7, 13, 29):
        resumed = data_loader(ByteTokenizer(), paths, 2, 5, state=batches[cut - 1][2], loop=True)
        for i in range(cut, min(cut + 8, 40)):
            x, y, state = next(resumed)
            assert torch.equal(x, batches[i][0]) and torch.equal(y, batches[i][1])
            assert state == batches[i][2]


def test_ranks_take_interleaved_global_batches(tmp_path):
    paths, _ = make_shards(tmp_path)
    single = [b[0] for b in itertools.islice(data_loader(ByteTokenizer(), paths, 2, 4), 12)]
    rank0 = [b[0] for b in itertools.islice(data_loader(ByteTokenizer(), paths, 2, 4, rank=0, world_size=2), 6)]
    rank1 = [b[0] for b in itertools.islice(data_loader(ByteTokenizer(), paths, 2, 4, rank=1, world_size=2), 6)]
    for i in range(6):
        assert torch.equal(rank0[i], single[2 * i]) and torch.equal(rank1[i], single[2 * i + 1])


def test_per_rank_state_restore(tmp_path):
    paths, _ = make_shards(tmp_path)
    ref = list(itertools.islice(data_loader(ByteTokenizer(), paths, 1, 6, rank=1, world_size=2), 10))
    resumed = data_loader(ByteTokenizer(), paths, 1, 6, rank=1, world_size=2, state=ref[3][2])
    for i in range(4, 10):
        assert torch.equal(next(resumed)[0], ref[i][0])


def test_loop_false_stops_and_loop_true_counts_epochs(tmp_path):
    paths, docs = make_shards(tmp_path, n_shards=1)
    stream_len = len(expected_stream(docs))
    finite = list(data_loader(ByteTokenizer(), paths, 1, 7, loop=False))
    assert len(finite) == stream_len // 8
    looping = data_loader(ByteTokenizer(), paths, 1, 7, loop=True)
    epochs = [next(looping)[2]["epoch"] for _ in range(3 * stream_len // 8)]
    assert epochs[0] == 0 and max(epochs) >= 2


def test_fractional_epochs_follow_the_tokens_consumed(tmp_path):
    # one shard, one row group: the fraction is exactly tokens consumed / tokens in the pass
    docs = [f"document {i} " + "y" * (i % 7) for i in range(20)]
    path = str(tmp_path / "shard_00000.parquet")
    write_shard(docs, path, row_group_size=1024)
    n = len(expected_stream(docs))
    loader = data_loader(ByteTokenizer(), [path], 2, 7, loop=True)
    for b in range(1, 2 * n // 16 + 1):
        state = next(loader)[2]
        consumed = b * 16
        assert abs(state["epochs"] - (state["epoch"] + (consumed % n) / n)) < 1e-9, (b, state)
    assert 1.0 < state["epochs"] < 2.0 and state["epoch"] == 1
    # several shards and row groups: epochs grow monotonically and one pass ends near 1.0
    (tmp_path / "multi").mkdir()
    paths, docs = make_shards(tmp_path / "multi", n_shards=3)
    n = len(expected_stream(docs))
    loader = data_loader(ByteTokenizer(), paths, 1, 7, loop=True)
    values = [next(loader)[2]["epochs"] for _ in range(n // 8)]
    assert values == sorted(values) and 0.9 < values[-1] <= 1.0
    assert abs(values[len(values) // 2] - 0.5) < 0.1
