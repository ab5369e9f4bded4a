"""
BPE tokenizer: trained with rustbpe (fast, Rust), run with tiktoken (fast, Rust).

rustbpe only learns the merges; tiktoken is what encodes and decodes at training and
inference time. The saved format is plain text and JSON (never pickle: loading a pickle can
run arbitrary code), so a tokenizer directory can be shared and inspected safely:

    tokenizer.json    pattern, special tokens with their ids, vocab size, format version
    ranks.tiktoken    one "base64(token bytes) rank" line per mergeable token (tiktoken's format)
    token_bytes.npy   int32[vocab_size]: UTF-8 bytes of each token (0 for special tokens),
                      for evaluating loss in bits per byte, which is comparable across vocabularies

Tokenizers are per dataset (see get_tokenizer_dir): merges learned on one corpus are a poor
fit for another, and a model's embedding table only makes sense with the tokenizer it was
trained with.
"""

import os
import json
import time
import base64

import numpy as np
import torch
import pyarrow.parquet as pq
import tiktoken
from tqdm import tqdm

from nanochat.common import UserError, print0, get_base_dir, atomic_write, atomic_write_text, atomic_write_json
from nanochat.dataset import list_shards, read_documents

# GPT-4 style split pattern, as in nanochat: \p{N}{1,2} rather than GPT-4's \p{N}{1,3}, so that
# numbers split into chunks of at most 2 digits (a small vocab should not spend ids on 3-digit numbers).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# Special tokens get the ids right after the mergeable tokens, in this order. <|bos|> starts
# every document, so it also acts as the delimiter between documents packed into one row.
# Append here to add more (e.g. chat tokens); existing ids stay put.
SPECIAL_TOKENS = ["<|bos|>"]
BOS = "<|bos|>"

FORMAT_VERSION = 1
CONFIG_FILE = "tokenizer.json"
RANKS_FILE = "ranks.tiktoken"
TOKEN_BYTES_FILE = "token_bytes.npy"


def get_tokenizer_dir(data_name):
    """Where the tokenizer for the dataset called data_name lives (one tokenizer per dataset)."""
    return os.path.join(get_base_dir(), "tokenizers", data_name)


class Tokenizer:
    """A thin wrapper around a tiktoken Encoding, plus save/load and the BOS convention."""

    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN, special_tokens=None, name="nanochat-moe"):
        # special_tokens: {token string: id}; by default SPECIAL_TOKENS numbered after the ranks
        if special_tokens is None:
            special_tokens = {tok: len(mergeable_ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = dict(special_tokens)
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens[BOS]

    # -------------------------------------------------------------------------
    # training

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Learn BPE merges from an iterator of strings; vocab_size counts the special tokens too."""
        import rustbpe  # only needed for training
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise UserError(f"--vocab-size {vocab_size} is too small: need at least {min_size} "
                            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special)")
        n_mergeable = vocab_size - len(SPECIAL_TOKENS)
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, n_mergeable, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
        # rustbpe stops early when the text has no pair left to merge; a silently smaller vocab
        # would surprise whoever sized the model for vocab_size, so say so instead
        if len(mergeable_ranks) != n_mergeable:
            raise UserError(f"the training text only supports {len(mergeable_ranks) + len(SPECIAL_TOKENS)} tokens "
                            f"but --vocab-size is {vocab_size}: lower --vocab-size or train on more text")
        return cls(mergeable_ranks, pattern=SPLIT_PATTERN)

    # -------------------------------------------------------------------------
    # persistence (JSON + tiktoken text format, never pickle)

    def save(self, tokenizer_dir):
        os.makedirs(tokenizer_dir, exist_ok=True)
        config = {
            "format_version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab_size": self.get_vocab_size(),
        }
        atomic_write_json(os.path.join(tokenizer_dir, CONFIG_FILE), config)
        ranks_text = "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
                             for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]))
        atomic_write_text(os.path.join(tokenizer_dir, RANKS_FILE), ranks_text)

        def write_token_bytes(tmp):
            # np.save to an open file (not a path) so it does not append ".npy" to the .tmp name
            with open(tmp, "wb") as f:
                np.save(f, self.token_bytes(), allow_pickle=False)
        atomic_write(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE), write_token_bytes)

    @classmethod
    def load(cls, tokenizer_dir):
        config_path = os.path.join(tokenizer_dir, CONFIG_FILE)
        ranks_path = os.path.join(tokenizer_dir, RANKS_FILE)
        if not os.path.isdir(tokenizer_dir):
            raise UserError(f"tokenizer directory {tokenizer_dir} does not exist (train one with: python -m scripts.tok_train)")
        # the config: every field is checked, a wrong tokenizer would silently produce garbage
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            if config["format_version"] != FORMAT_VERSION:
                raise ValueError(f"format_version {config['format_version']}, expected {FORMAT_VERSION}")
            pattern, vocab_size = config["pattern"], int(config["vocab_size"])
            special_tokens = {str(k): int(v) for k, v in config["special_tokens"].items()}
            if BOS not in special_tokens:
                raise ValueError(f"no {BOS} special token")
        except FileNotFoundError:
            raise UserError(f"{config_path} is missing: not a tokenizer directory (train one with: python -m scripts.tok_train)")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{config_path} is corrupt: {e}")
        # the ranks: parsed here rather than with tiktoken.load so that errors name the file
        try:
            mergeable_ranks = {}
            with open(ranks_path, encoding="ascii") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        tok, rank = line.split()
                        mergeable_ranks[base64.b64decode(tok, validate=True)] = int(rank)
                    except ValueError:
                        raise ValueError(f"line {lineno} is not 'base64 rank': {line.strip()[:60]!r}")
            # ranks must be exactly 0..n-1 with the special tokens right after
            if sorted(mergeable_ranks.values()) != list(range(len(mergeable_ranks))):
                raise ValueError("ranks are not the contiguous ids 0..n-1 (duplicate or missing tokens)")
            n = len(mergeable_ranks)
            if n < 256 or n + len(special_tokens) != vocab_size:
                raise ValueError(f"{n} ranks + {len(special_tokens)} special tokens != vocab_size {vocab_size} in {CONFIG_FILE}")
            if sorted(special_tokens.values()) != list(range(n, vocab_size)):
                raise ValueError(f"special token ids in {CONFIG_FILE} are not {n}..{vocab_size - 1}")
        except FileNotFoundError:
            raise UserError(f"{ranks_path} is missing: incomplete tokenizer directory (retrain with: python -m scripts.tok_train)")
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{ranks_path} is corrupt: {e}")
        return cls(mergeable_ranks, pattern=pattern, special_tokens=special_tokens,
                   name=os.path.basename(os.path.normpath(tokenizer_dir)) or "nanochat-moe")

    # -------------------------------------------------------------------------
    # use

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend_bos=False, num_threads=8):
        """str -> list[int], or list[str] -> list[list[int]] (encoded in parallel).
        Special-token text inside documents (a literal '<|bos|>') is encoded as ordinary
        text: only prepend_bos inserts the real BOS id, so data can never forge one."""
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return [self.bos_token_id] + ids if prepend_bos else ids
        if isinstance(text, (list, tuple)):
            ids = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            if prepend_bos:
                for row in ids:
                    row.insert(0, self.bos_token_id)
            return ids
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        """list[int] -> str. Bytes that are not valid UTF-8 (a cut-off multi-byte character)
        come out as U+FFFD rather than raising."""
        return self.enc.decode(ids)

    def id_to_token(self, token_id):
        """A readable form of one token (special tokens come out as their text)."""
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self):
        """int32[vocab_size]: how many UTF-8 bytes each token stands for, 0 for special tokens
        (they are not text, so they must not count in bits per byte)."""
        out = np.zeros(self.get_vocab_size(), dtype=np.int32)
        for tok, rank in self.mergeable_ranks.items():
            out[rank] = len(tok)
        return out


def get_tokenizer(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


def load_token_bytes(tokenizer_dir, device="cpu"):
    """The token_bytes.npy of a tokenizer directory as an int32 tensor (for bits per byte:
    sum of loss over targets with bytes > 0, divided by ln(2) * their total bytes)."""
    path = os.path.join(tokenizer_dir, TOKEN_BYTES_FILE)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: incomplete tokenizer directory (retrain with: python -m scripts.tok_train)")
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is corrupt: {e}")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise UserError(f"{path} is corrupt: expected a 1-D integer array, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype(np.int32)).to(device)


# -----------------------------------------------------------------------------
# training on a folder of parquet shards

def iter_docs(paths):
    """Yield the non-empty documents of the given shards (bounded memory)."""
    for path in paths:
        yield from (text for text in read_documents(path) if text)


def train_tokenizer(data_dir, out_dir, vocab_size, max_chars=2_000_000_000, doc_cap=10_000):
    """Train a BPE tokenizer on the train shards of data_dir (all but the last), save it to out_dir."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size {vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS)} "
                        f"(256 byte tokens + {len(SPECIAL_TOKENS)} special)")
    if max_chars <= 0 or doc_cap <= 0:
        raise UserError(f"--max-chars ({max_chars}) and --doc-cap ({doc_cap}) must be positive")
    paths = list_shards(data_dir)
    train_paths, val_path = paths[:-1], paths[-1]
    n_docs = sum(pq.ParquetFile(p).metadata.num_rows for p in train_paths)
    print0(f"Training a {vocab_size}-token BPE tokenizer on {len(train_paths)} train shards of {data_dir} "
           f"(up to {max_chars:,} chars, docs cropped to {doc_cap:,} chars)")

    # Cropping long documents keeps one giant doc from dominating the merge statistics.
    nchars = 0
    def text_iterator():
        nonlocal nchars
        with tqdm(total=n_docs, unit="doc", desc="tokenizer text", disable=int(os.environ.get("RANK", 0)) != 0) as bar:
            for doc in iter_docs(train_paths):
                doc = doc[:min(doc_cap, max_chars - nchars)]
                nchars += len(doc)
                bar.update(1)
                yield doc
                if nchars >= max_chars:
                    return

    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(text_iterator(), vocab_size)
    train_time = time.time() - t0
    tokenizer.save(out_dir)

    # Compression on held-out text: UTF-8 bytes per token (higher = fewer tokens per document)
    val_docs, val_chars = [], 0
    for doc in iter_docs([val_path]):
        val_docs.append(doc)
        val_chars += len(doc)
        if val_chars >= 1_000_000:
            break
    val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    val_tokens = sum(len(ids) for ids in tokenizer.encode(val_docs))
    ratio = val_bytes / max(val_tokens, 1)
    print0(f"vocab size: {tokenizer.get_vocab_size():,} | chars used: {nchars:,} | train time: {train_time:.1f}s | "
           f"val compression: {ratio:.2f} bytes/token ({val_bytes:,} bytes, {val_tokens:,} tokens)")
    print0(f"saved tokenizer to {out_dir}")
    return tokenizer
