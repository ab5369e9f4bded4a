"""
Train the BPE tokenizer of a dataset.

    python -m scripts.tok_train --data NAME             # shards in $NANOCHAT_BASE_DIR/data/NAME
    python -m scripts.tok_train --data-dir PATH         # shards anywhere

The tokenizer goes to $NANOCHAT_BASE_DIR/tokenizers/NAME (NAME = --data, or the folder name
of --data-dir) unless --out-dir says otherwise. It learns from the train shards only (all but
the last); the last shard is validation and is only used to report compression.
"""

import os
import argparse

from nanochat.common import UserError, ArgumentParser, run_main, get_base_dir
from nanochat.tokenizer import train_tokenizer, get_tokenizer_dir


def count(s):
    """An integer flag that also accepts 2e9 / 2_000_000_000."""
    try:
        value = float(s.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}")
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {s!r}")
    return int(value)


def main():
    parser = ArgumentParser(prog="tok_train", description="Train a BPE tokenizer on a folder of parquet shards.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="NAME", help="dataset name: shards in <base dir>/data/NAME")
    source.add_argument("--data-dir", metavar="PATH", help="folder of shard_*.parquet files (last one = validation)")
    parser.add_argument("--vocab-size", type=count, default=4096, help="vocabulary size including special tokens (default 4096)")
    parser.add_argument("--max-chars", type=count, default=2_000_000_000, help="train on at most this many characters (default 2e9)")
    parser.add_argument("--doc-cap", type=count, default=10_000, help="crop each document to this many characters (default 10000)")
    parser.add_argument("--out-dir", default=None, help="where to save the tokenizer (default <base dir>/tokenizers/NAME)")
    args = parser.parse_args()

    if args.data is not None:
        flag, data_dir, name = "--data", os.path.join(get_base_dir(), "data", args.data), args.data
    else:
        flag, data_dir = "--data-dir", args.data_dir
        name = os.path.basename(os.path.normpath(os.path.abspath(data_dir)))
    if not os.path.isdir(data_dir):
        raise UserError(f"{flag}: data folder {data_dir} does not exist")
    out_dir = args.out_dir or get_tokenizer_dir(name)
    train_tokenizer(data_dir, out_dir, args.vocab_size, max_chars=args.max_chars, doc_cap=args.doc_cap)


if __name__ == "__main__":
    run_main(main)
