"""Tests for nanochat/dataset.py: downloads against a local HTTP server (never the
internet), building shards from .txt/.jsonl/.parquet, and listing/splitting shards."""

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.dataset import (
    build_shards, download_shards, list_shards, read_documents, read_entropy_floor,
    split_shards, write_shard,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
FAST = dict(max_retries=3, backoff=0.01, timeout=5)  # keep retries quick in tests


# -----------------------------------------------------------------------------
# A local shard server that can misbehave on request

class ShardHandler(BaseHTTPRequestHandler):
    files = {}      # "/shard_00000.parquet" -> bytes
    faults = {}     # path -> (mode, n): mode in "500", "truncate", "garbage", "404"; n = how many requests fail (None = all)
    requests = {}   # path -> how many GETs it saw
    lock = threading.Lock()

    def do_GET(self):
        with self.lock:
            count = self.requests[self.path] = self.requests.get(self.path, 0) + 1
        mode, n = self.faults.get(self.path, (None, 0))
        failing = mode is not None and (n is None or count <= n)
        body = self.files.get(self.path)
        if body is None or (failing and mode == "404"):
            self.send_error(404)
        elif failing and mode == "500":
            self.send_error(500)
        elif failing and mode == "truncate":
            # Promise the whole file, send half, hang up.
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif failing and mode == "garbage":
            # A "complete" response (no Content-Length to check) that is not parquet.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not a shard</html>")
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass  # keep test output quiet


@pytest.fixture
def server(tmp_path):
    """Serves 3 small real shards; yields (base_url, {index: bytes})."""
    src = tmp_path / "src"
    src.mkdir()
    shards = {}
    for i in range(3):
        path = str(src / f"shard_{i:05d}.parquet")
        write_shard([f"doc {i}.{j} " * 20 for j in range(50)], path, row_group_size=16)
        shards[i] = Path(path).read_bytes()
    ShardHandler.files = {f"/shard_{i:05d}.parquet": b for i, b in shards.items()}
    ShardHandler.faults, ShardHandler.requests = {}, {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", shards
    httpd.shutdown()
    httpd.server_close()


def hits(i):
    return ShardHandler.requests.get(f"/shard_{i:05d}.parquet", 0)


def leftovers(dest):
    return sorted(os.listdir(dest)) if os.path.isdir(dest) else []


def test_download_ok(server, tmp_path):
    url, shards = server
    dest = tmp_path / "data"
    paths = download_shards(url, [2, 0, 1], str(dest), **FAST)
    assert paths == [str(dest / f"shard_{i:05d}.parquet") for i in range(3)]
    for i in range(3):
        assert Path(paths[i]).read_bytes() == shards[i]
        assert hits(i) == 1
    assert leftovers(dest) == [f"shard_{i:05d}.parquet" for i in range(3)]
    assert list_shards(str(dest)) == paths


@pytest.mark.parametrize("mode", ["500", "truncate", "garbage"])
def test_download_transient_failure_is_retried(server, tmp_path, mode):
    url, shards = server
    ShardHandler.faults = {"/shard_00001.parquet": (mode, 2)}
    dest = tmp_path / "data"
    paths = download_shards(url, [0, 1], str(dest), **FAST)
    assert Path(paths[1]).read_bytes() == shards[1]
    assert hits(0) == 1 and hits(1) == 3  # two failures, then success
    assert leftovers(dest) == ["shard_00000.parquet", "shard_00001.parquet"]


def test_download_permanent_failure(server, tmp_path):
    url, shards = server
    ShardHandler.faults = {"/shard_00002.parquet": ("500", None)}
    dest = tmp_path / "data"
    with pytest.raises(UserError, match=r"1 of 3 shards \(shard_00002.parquet: HTTP Error 500"):
        download_shards(url, [0, 1, 2], str(dest), **FAST)
    assert hits(2) == 1 + FAST["max_retries"]
    # The good shards are kept; the bad one leaves neither a shard nor a .tmp.
    assert leftovers(dest) == ["shard_00000.parquet", "shard_00001.parquet"]


def test_download_truncated_every_time(server, tmp_path):
    url, _ = server
    ShardHandler.faults = {"/shard_00000.parquet": ("truncate", None)}
    dest = tmp_path / "data"
    with pytest.raises(UserError, match=r"shard_00000.parquet: incomplete body"):
        download_shards(url, [0], str(dest), **FAST)
    assert leftovers(dest) == []


def test_download_404_is_not_retried(server, tmp_path):
    url, _ = server
    dest = tmp_path / "data"
    with pytest.raises(UserError, match=r"shard_00007.parquet: HTTP Error 404"):
        download_shards(url, [7], str(dest), **FAST)
    assert hits(7) == 1
    assert leftovers(dest) == []


def test_download_connection_refused(tmp_path):
    with socket.socket() as s:  # grab a free port, then free it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "data"
    with pytest.raises(UserError, match=r"2 of 2 shards .*shard_00000.parquet"):
        download_shards(f"http://127.0.0.1:{port}", [0, 1], str(dest), **FAST)
    assert leftovers(dest) == []


def test_download_skips_present_shards(server, tmp_path):
    url, shards = server
    dest = tmp_path / "data"
    dest.mkdir()
    write_shard(["already here"], str(dest / "shard_00000.parquet"))
    before = (dest / "shard_00000.parquet").read_bytes()
    download_shards(url, [0, 1], str(dest), **FAST)
    assert hits(0) == 0 and hits(1) == 1
    assert (dest / "shard_00000.parquet").read_bytes() == before
    assert (dest / "shard_00001.parquet").read_bytes() == shards[1]


# -----------------------------------------------------------------------------
# Building shards from the user's files

def read_split(dest):
    """All train documents in order, and all val documents."""
    paths = list_shards(str(dest))
    train = [d for p in split_shards(paths, "train") for d in read_documents(p)]
    val = [d for p in split_shards(paths, "val") for d in read_documents(p)]
    return train, val


def test_build_txt_blank_lines(tmp_path):
    docs = [f"Document {i} line one.\nDocument {i} line two." for i in range(10)]
    # Mixed separators: one blank line, several, and whitespace-only ones; leading/trailing junk.
    text = "\n\n  \n" + docs[0]
    for i, d in enumerate(docs[1:]):
        text += ["\n\n", "\n\n\n", "\n   \n\t\n"][i % 3] + "  " + d + "  "
    (tmp_path / "a.txt").write_text(text + "\n\n")
    dest = tmp_path / "shards"
    paths = build_shards([str(tmp_path / "a.txt")], str(dest), val_fraction=0.2, docs_per_shard=3)
    # 8 train docs in shards of 3 (3+3+2) then 2 val docs in the last shard.
    assert [os.path.basename(p) for p in paths] == [f"shard_{i:05d}.parquet" for i in range(4)]
    train, val = read_split(dest)
    assert train == docs[:8] and val == docs[8:]
    info = json.loads((dest / "build_info.json").read_text())
    assert (info["n_docs"], info["n_train_docs"], info["n_val_docs"], info["n_shards"]) == (10, 8, 2, 4)
    assert info["total_chars"] == sum(map(len, docs))
    assert not [n for n in os.listdir(dest) if n.endswith(".tmp")]


def test_build_txt_separator_and_folder_order(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "b.txt").write_text("three<|endoftext|>  four\n\nstill four  <|endoftext|><|endoftext|>")
    (src / "a.txt").write_text("one\n\nstill one<|endoftext|>two")
    (src / "notes.md").write_text("ignored")
    dest = tmp_path / "shards"
    build_shards([str(src)], str(dest), separator="<|endoftext|>", val_fraction=0.01)
    train, val = read_split(dest)
    assert train == ["one\n\nstill one", "two", "three"]
    assert val == ["four\n\nstill four"]  # max(1, round(...)) = 1 doc: the tail


def test_build_jsonl_and_parquet(tmp_path):
    lines = [json.dumps({"body": f"j{i}", "id": i}) for i in range(4)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    pq.write_table(pa.table({"id": [1, 2], "body": ["p0", "p1"]}), tmp_path / "b.parquet")
    dest = tmp_path / "shards"
    build_shards([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], str(dest),
                 text_field="body", val_fraction=0.4)
    train, val = read_split(dest)
    assert train == ["j0", "j1", "j2", "j3"] and val == ["p0", "p1"]
    assert pq.ParquetFile(list_shards(str(dest))[0]).schema_arrow.names == ["text"]


def test_build_row_groups(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"d{i}" for i in range(100)))
    dest = tmp_path / "shards"
    paths = build_shards([str(tmp_path / "a.txt")], str(dest), docs_per_shard=40, row_group_size=16)
    pf = pq.ParquetFile(paths[0])
    assert pf.metadata.num_rows == 40 and pf.num_row_groups == 3


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": "ok"\n', r"bad.jsonl line 2: not valid JSON"),
    ('{"text": "ok"}\n\n{"other": "x"}\n', r"bad.jsonl line 3: no 'text' field"),
    ('{"text": 5}\n', r"bad.jsonl line 1: field 'text' is not a string"),
])
def test_build_bad_jsonl(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(UserError, match=match):
        build_shards([str(tmp_path / "bad.jsonl")], str(tmp_path / "shards"))
    assert not (tmp_path / "shards").exists()  # validated before anything is written


def test_build_input_errors(tmp_path):
    dest = str(tmp_path / "shards")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(UserError, match=r"a.csv: unknown file type"):
        build_shards([str(tmp_path / "a.csv")], dest)
    with pytest.raises(UserError, match=r"nope.txt: no such file or folder"):
        build_shards([str(tmp_path / "nope.txt")], dest)
    (tmp_path / "one.txt").write_text("only one document\n")
    with pytest.raises(UserError, match=r"found 1 document"):
        build_shards([str(tmp_path / "one.txt")], dest)
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match=r"c.parquet: no column 'text'"):
        build_shards([str(tmp_path / "c.parquet")], dest)
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"d.parquet: not a readable parquet file"):
        build_shards([str(tmp_path / "d.parquet")], dest)
    (tmp_path / "e.txt").write_bytes(b"\xff\xfe bad utf8\n\nsecond")
    with pytest.raises(UserError, match=r"e.txt: not valid UTF-8"):
        build_shards([str(tmp_path / "e.txt")], dest)
    (tmp_path / "two.txt").write_text("a\n\nb")
    build_shards([str(tmp_path / "two.txt")], dest)
    with pytest.raises(UserError, match=r"already holds .parquet shards"):
        build_shards([str(tmp_path / "two.txt")], dest)


def test_build_tinystories():
    path = SHARED / "data" / "text" / "tinystories_train_head.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_shards([str(path)], tmp, docs_per_shard=1000)
        train, val = read_split(tmp)
        assert len(train) + len(val) > 100 and len(paths) >= 2
        assert all(d.strip() for d in train + val)
        assert len(val) == round(0.05 * (len(train) + len(val)))


# -----------------------------------------------------------------------------
# Listing and splitting

def test_list_and_split_shards(tmp_path):
    with pytest.raises(UserError, match=r"missing: no such folder"):
        list_shards(str(tmp_path / "missing"))
    write_shard(["a"], str(tmp_path / "shard_00000.parquet"))
    (tmp_path / "shard_00001.parquet.tmp").write_text("half written")
    (tmp_path / "README").write_text("x")
    with pytest.raises(UserError, match=r"found 1 .parquet shard"):
        list_shards(str(tmp_path))
    write_shard([], str(tmp_path / "shard_00002.parquet"))
    paths = list_shards(str(tmp_path))
    assert paths == [str(tmp_path / "shard_00000.parquet"), str(tmp_path / "shard_00002.parquet")]
    assert split_shards(paths, "train") == paths[:1] and split_shards(paths, "val") == paths[1:]
    with pytest.raises(ValueError):
        split_shards(paths, "test")
    assert list(read_documents(paths[1])) == []


def test_read_entropy_floor(tmp_path):
    assert read_entropy_floor(str(tmp_path)) is None
    (tmp_path / "entropy.json").write_text(json.dumps({"val_bits_per_byte": 1.25}))
    assert read_entropy_floor(str(tmp_path)) == 1.25
