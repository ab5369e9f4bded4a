"""
The pretraining data on disk: a folder of parquet shards, and the two ways to fill one.

Format: files named shard_00000.parquet, shard_00001.parquet, ... with exactly one string
column `text`, one document per row, written in row groups of `row_group_size` documents
(the loader reads one row group at a time). In any data folder the LAST shard by sorted
name is the validation split and all the others are train, so a folder is self-describing:
no index file to keep in sync.

Ways to fill a folder:
- download_shards: fetch FineWeb-Edu-style shards over HTTP (parallel, retried, atomic).
- build_shards: turn the user's own .txt / .jsonl / .parquet files into shards, holding
  out a fixed tail of documents as the validation shard.

Every file is written to `<name>.tmp` and renamed into place, so an interrupted run never
leaves a half-written shard under a real name (and *.tmp is never listed as a shard).
"""

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import UserError, atomic_write, atomic_write_json

# Karpathy's reshuffled FineWeb-Edu 100B: shards 0..1822, ~250M characters each.
DEFAULT_FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"

SOURCE_EXTS = (".txt", ".jsonl", ".parquet")


def shard_name(index):
    return f"shard_{index:05d}.parquet"


# -----------------------------------------------------------------------------
# Reading a data folder

def list_shards(data_dir):
    """Sorted absolute paths of the *.parquet shards in data_dir (the last is validation)."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data {data_dir}: no such folder")
    # endswith(".parquet") skips in-flight "shard_00003.parquet.tmp" files.
    paths = sorted(os.path.abspath(os.path.join(data_dir, n)) for n in os.listdir(data_dir)
                   if n.endswith(".parquet") and os.path.isfile(os.path.join(data_dir, n)))
    if len(paths) < 2:
        raise UserError(f"--data {data_dir}: found {len(paths)} .parquet shard(s), need at least 2 "
                        f"(the last one is held out for validation)")
    # Check every shard's schema up front (metadata only, cheap): a bad shard should fail
    # before training, not an hour into it.
    for path in paths:
        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path} is not a readable parquet file: {e}")
        if "text" not in names:
            raise UserError(f"{path} has no 'text' column (columns: {', '.join(names)})")
    return paths


def split_shards(paths, split):
    """The shards of one split: all but the last for 'train', the last for 'val'."""
    if split == "train":
        return paths[:-1]
    if split == "val":
        return paths[-1:]
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def read_documents(path):
    """Yield the documents of one shard, a row group at a time (bounded memory)."""
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        yield from pf.read_row_group(i, columns=["text"]).column("text").to_pylist()


def read_entropy_floor(data_dir):
    """The best achievable val bits/byte if the corpus knows it (the built-in synthetic
    corpus does, from its generating process), else None."""
    path = os.path.join(data_dir, "entropy.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f).get("val_bits_per_byte")
    except (ValueError, AttributeError) as e:
        raise UserError(f"{path}: not a valid JSON object ({e})")
    return None if value is None else float(value)


# -----------------------------------------------------------------------------
# Writing shards

def write_shard(docs, path, row_group_size=1024):
    """Write one shard atomically: to path.tmp first, then rename over path."""
    # An explicit string type: an empty list would otherwise become a `null` column.
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_size))


# -----------------------------------------------------------------------------
# Downloading FineWeb-Edu-style shards

def check_parquet(path):
    """A parquet file ends with its footer, so a cut or garbled body fails to open here."""
    with pq.ParquetFile(path):
        pass


def _fetch_once(url, path, timeout, check, bar=None):
    """One attempt: stream url into path.tmp, check it is whole (the byte count, then
    check(tmp_path)), rename it to path. Raises on any failure; never leaves path.tmp behind."""
    def download(tmp):
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
            expected = resp.headers.get("Content-Length")
            if bar is not None:
                bar.reset(total=int(expected) if expected else None)
            n = 0
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                n += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            # urllib returns a short body without complaint when the connection drops,
            # so the byte count is the only sign of truncation.
            if expected is not None and n != int(expected):
                raise OSError(f"incomplete body: got {n} of {expected} bytes")
        check(tmp)
    atomic_write(path, download)


def download_file(url, path, max_retries, timeout, backoff, check=check_parquet, bar=None):
    """Try 1 + max_retries times with exponential backoff. Returns None or the last error."""
    error = None
    for attempt in range(1 + max_retries):
        try:
            _fetch_once(url, path, timeout, check, bar)
            return None
        except urllib.error.HTTPError as e:
            error = f"{e}"
            e.close()
            # 4xx (a wrong URL or index) will not fix itself; only timeouts and rate limits might.
            if 400 <= e.code < 500 and e.code not in (408, 429):
                return error
        except Exception as e:  # network errors, timeouts, truncation, a bad file: all retried
            error = f"{e}"
        if attempt < max_retries:
            time.sleep(backoff * 2 ** attempt)
    return error


def download_shards(base_url, indices, dest_dir, num_workers=4, max_retries=5, timeout=30, backoff=1.0):
    """Download shard_{i:05d}.parquet for each i in indices from base_url into dest_dir.
    Shards already present are kept (they were renamed into place only once complete).
    Raises UserError, after all workers finish, if any shard could not be fetched; a failed
    shard leaves no file. Returns the sorted paths of the requested shards."""
    indices = sorted(set(indices))
    if any(i < 0 for i in indices):
        raise UserError(f"shard indices must be >= 0, got {indices[0]}")
    os.makedirs(dest_dir, exist_ok=True)
    base_url = base_url.rstrip("/")
    paths = {i: os.path.abspath(os.path.join(dest_dir, shard_name(i))) for i in indices}
    todo = [i for i in indices if not os.path.exists(paths[i])]

    errors = {}
    if todo:
        with ThreadPoolExecutor(max(1, min(num_workers, len(todo)))) as pool, \
                tqdm(total=len(todo), unit="shard", desc="download", disable=None) as bar:
            futures = {pool.submit(download_file, f"{base_url}/{shard_name(i)}", paths[i],
                                   max_retries, timeout, backoff): i for i in todo}
            for future in as_completed(futures):
                if (error := future.result()) is not None:
                    errors[futures[future]] = error
                bar.update(1)
    if errors:
        first = min(errors)
        raise UserError(f"download failed for {len(errors)} of {len(indices)} shards "
                        f"({shard_name(first)}: {errors[first]}) from {base_url}")
    return [paths[i] for i in indices]


# -----------------------------------------------------------------------------
# Building shards from the user's own files

def _input_files(inputs):
    """Expand the inputs (files or folders) into a list of source files, checking each."""
    if not inputs:
        raise UserError("no input files given")
    files = []
    for p in inputs:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p)
                           if os.path.splitext(n)[1].lower() in SOURCE_EXTS and os.path.isfile(os.path.join(p, n)))
            if not found:
                raise UserError(f"{p}: folder has no .txt, .jsonl or .parquet files")
            files += found
        elif os.path.isfile(p):
            if os.path.splitext(p)[1].lower() not in SOURCE_EXTS:
                raise UserError(f"{p}: unknown file type (expected .txt, .jsonl or .parquet)")
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    return files


def _split_blank_lines(lines):
    # Streams line by line, so a large .txt file is never held in memory whole.
    para = []
    for line in lines:
        if line.strip():
            para.append(line)
        elif para:
            yield "".join(para)
            para = []
    if para:
        yield "".join(para)


def _txt_documents(path, separator):
    with open(path, encoding="utf-8") as f:  # universal newlines: \r\n reads as \n
        pieces = _split_blank_lines(f) if separator is None else f.read().split(separator)
        for doc in pieces:
            if doc := doc.strip():
                yield doc


def _jsonl_documents(path, text_field):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # a trailing or stray blank line is not a mistake worth stopping for
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg})")
            if not isinstance(obj, dict) or text_field not in obj:
                raise UserError(f"{path} line {lineno}: no {text_field!r} field (see --text-field)")
            if not isinstance(obj[text_field], str):
                raise UserError(f"{path} line {lineno}: field {text_field!r} is not a string")
            yield obj[text_field]


def _parquet_documents(path, text_field):
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e})")
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for i in range(pf.num_row_groups):
        for doc in pf.read_row_group(i, columns=[text_field]).column(text_field).to_pylist():
            if doc is not None and not isinstance(doc, str):
                raise UserError(f"{path}: column {text_field!r} is not a string column")
            yield doc


def _file_documents(path, text_field, separator):
    """The non-empty documents of one source file, in order."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        docs = _txt_documents(path, separator)
    elif ext == ".jsonl":
        docs = _jsonl_documents(path, text_field)
    else:
        docs = _parquet_documents(path, text_field)
    try:
        for doc in docs:
            # Whitespace-only documents carry nothing to learn; .jsonl/.parquet text is
            # otherwise kept verbatim (leading indentation can matter, e.g. in code).
            if doc and doc.strip():
                yield doc
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})")


def build_shards(inputs, dest_dir, *, val_fraction=0.05, docs_per_shard=8192, text_field="text",
                 separator=None, row_group_size=1024):
    """Turn the user's .txt / .jsonl / .parquet files (or folders of them) into shards in
    dest_dir. The LAST max(1, round(val_fraction * n_docs)) documents become the validation
    shard: a deterministic tail, so the held-out set is the same on every rebuild.
    Returns list_shards(dest_dir)."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    if docs_per_shard < 1:
        raise UserError(f"--docs-per-shard {docs_per_shard}: must be at least 1")
    if separator == "":
        raise UserError("--separator must not be empty")
    files = _input_files(inputs)
    # Refuse to mix with old shards: a leftover shard from an earlier, bigger build would
    # sort last and silently become the validation split.
    if os.path.isdir(dest_dir) and any(n.endswith(".parquet") for n in os.listdir(dest_dir)):
        raise UserError(f"{dest_dir}: already holds .parquet shards; pick an empty folder or delete them")

    # Pass 1 counts (and validates) every document before anything is written, so the
    # train/val boundary is known up front and memory stays bounded by one shard.
    counts = []
    for path in tqdm(files, unit="file", desc="scan", disable=None):
        counts.append(sum(1 for _ in _file_documents(path, text_field, separator)))
    n_docs = sum(counts)
    if n_docs < 2:
        raise UserError(f"found {n_docs} document(s) in {', '.join(map(str, inputs))}; need at least 2 "
                        f"(one is held out for validation)")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)  # always keep >= 1 train doc
    n_train = n_docs - n_val
    n_train_shards = -(-n_train // docs_per_shard)

    # Pass 2 streams documents into shards: full train shards, a possibly short last train
    # shard, then the validation tail as the final shard.
    os.makedirs(dest_dir, exist_ok=True)
    buf, seen, n_chars, shard = [], 0, 0, 0
    bar = tqdm(total=n_train_shards + 1, unit="shard", desc="write", disable=None)

    def flush():
        nonlocal buf, shard
        write_shard(buf, os.path.join(dest_dir, shard_name(shard)), row_group_size)
        buf, shard = [], shard + 1
        bar.update(1)

    for path, count in zip(files, counts):
        n_file = 0
        for doc in _file_documents(path, text_field, separator):
            buf.append(doc)
            seen, n_file, n_chars = seen + 1, n_file + 1, n_chars + len(doc)
            if seen <= n_train and (len(buf) == docs_per_shard or seen == n_train):
                flush()
        if n_file != count:
            raise UserError(f"{path}: changed while building shards ({count} then {n_file} documents)")
    flush()  # the validation shard
    bar.close()

    atomic_write_json(os.path.join(dest_dir, "build_info.json"), {
        "inputs": [os.path.abspath(p) for p in inputs],
        "files": [os.path.abspath(p) for p in files],
        "n_docs": n_docs,
        "n_train_docs": n_train,
        "n_val_docs": n_val,
        "n_shards": shard,
        "total_chars": n_chars,
        "val_fraction": val_fraction,
        "docs_per_shard": docs_per_shard,
        "text_field": text_field,
        "separator": separator,
    })
    return list_shards(dest_dir)
