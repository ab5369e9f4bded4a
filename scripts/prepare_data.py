"""
Prepare the training data and its tokenizer, in one process, then exit.

    python -m scripts.prepare_data --data synthetic --vocab-size 2048
    python -m scripts.prepare_data --data fineweb --num-shards 64 --vocab-size 65536
    python -m scripts.prepare_data --data path/to/texts          # .txt/.jsonl/.parquet files or a shard folder

base_train prepares whatever is missing on first use too (rank 0 works, the other ranks wait at
a barrier). Under torchrun, run this first: a download or a tokenizer training that takes
longer than the process group's timeout (10 minutes for NCCL) would kill the waiting ranks.
It prints where the shards and the tokenizer are; base_train finds them there by --data.
"""

import os

import torch.distributed as dist

from nanochat.common import require, ArgumentParser, run_main, print0, get_base_dir

DATA_SOURCES = ("synthetic", "fineweb")


def add_data_args(p, default_data=None, tokenizer=True, data_help=None):
    """The flags that say which data a run trains on and how it is prepared (base_train and
    import_nanochat have them too). tokenizer=False: no --vocab-size (one that brings its own)."""
    p.add_argument("--data", default=default_data, required=default_data is None and data_help is not None,
                   help=data_help or "synthetic (default) | fineweb | PATH (folder of shards, or .txt/.jsonl/.parquet)")
    if tokenizer:
        p.add_argument("--vocab-size", type=int, default=4096, help="vocab size when a tokenizer must be trained for --data")
    p.add_argument("--synthetic-train-docs", type=int, default=20000, help="train documents of the built-in corpus")
    p.add_argument("--text-field", default="text", help="--data PATH: the text field of .jsonl / column of .parquet inputs")
    p.add_argument("--doc-separator", default=None, help="--data PATH: split .txt files on this string (default: blank lines)")
    p.add_argument("--num-shards", type=int, default=8, help="--data fineweb: shards to download (the last is validation)")
    p.add_argument("--data-url", default="", help="--data fineweb: base URL of the shards (default: FineWeb-Edu 100B shuffle)")


def validate_data_args(args):
    """The cheap checks of the data flags, before anything is downloaded or built. Raises UserError."""
    if hasattr(args, "vocab_size"):
        require(args.vocab_size >= 257, f"--vocab-size must be >= 257 (256 bytes + BOS), got {args.vocab_size}")
    if args.data not in DATA_SOURCES:
        require(os.path.exists(args.data), f"--data {args.data!r}: not one of {', '.join(DATA_SOURCES)} and no such file or folder")
    if args.data == "fineweb":
        require(args.num_shards >= 2, f"--num-shards must be >= 2 (the last shard is validation), got {args.num_shards}")
    if args.data == "synthetic":
        require(args.synthetic_train_docs >= 1, f"--synthetic-train-docs must be >= 1, got {args.synthetic_train_docs}")


def data_location(args):
    """(corpus name, shard folder, True when the shards are built from the user's files) for --data.
    The tokenizer belongs to the corpus name."""
    if args.data in DATA_SOURCES:
        return args.data, os.path.join(get_base_dir(), "data", args.data), False
    path = os.path.abspath(args.data)
    is_shard_folder = os.path.isdir(path) and any(f.startswith("shard_") and f.endswith(".parquet") for f in os.listdir(path))
    name = "local_" + os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return name, path if is_shard_folder else os.path.join(get_base_dir(), "data", name), not is_shard_folder


def prepare_shards(args):
    """Make sure --data's shards exist (one process: generated, downloaded or built from the
    user's files, each only when missing). Returns the shard folder."""
    from nanochat import dataset, synthetic
    _, data_dir, built = data_location(args)
    if args.data == "synthetic":
        if not os.path.exists(os.path.join(data_dir, "entropy.json")):
            print0(f"Preparing the built-in corpus in {data_dir} (first use) ...")
        synthetic.prepare_synthetic(data_dir, num_train_docs=args.synthetic_train_docs)
    elif args.data == "fineweb":
        url = args.data_url or dataset.DEFAULT_FINEWEB_URL
        print0(f"Making sure {args.num_shards} shards from {url} are in {data_dir} ...")
        dataset.download_shards(url, range(args.num_shards), data_dir)
    elif built and not os.path.exists(os.path.join(data_dir, "build_info.json")):
        print0(f"Building shards from {args.data} into {data_dir} ...")
        dataset.build_shards([args.data], data_dir, text_field=args.text_field, separator=args.doc_separator)
    elif built:
        print0(f"Using shards built earlier from {args.data} in {data_dir} (delete that folder to rebuild)")
    dataset.list_shards(data_dir)  # fails with a clear line when the folder is unusable
    return data_dir


def prepare_data(args, rank, ddp):
    """Make sure the shards and the tokenizer for --data exist (rank 0 prepares, others wait).
    Returns (data_dir, tokenizer_dir)."""
    from nanochat import tokenizer as tok
    name, data_dir, _ = data_location(args)
    tokenizer_dir = tok.get_tokenizer_dir(name)  # a tokenizer belongs to the corpus it was trained on
    if rank == 0:
        prepare_shards(args)
        if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
            print0(f"No tokenizer for this data yet: training one (vocab {args.vocab_size}) into {tokenizer_dir} ...")
            tok.train_tokenizer(data_dir, tokenizer_dir, args.vocab_size)
    if ddp:
        dist.barrier()
    return data_dir, tokenizer_dir


def build_parser():
    p = ArgumentParser(prog="prepare_data", description="Prepare the shards and the tokenizer for --data, then exit.")
    add_data_args(p, default_data="synthetic")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    validate_data_args(args)
    from nanochat.dataset import list_shards
    from nanochat.tokenizer import get_tokenizer
    data_dir, tokenizer_dir = prepare_data(args, rank=0, ddp=False)
    vocab = get_tokenizer(tokenizer_dir).get_vocab_size()
    print(f"data: {data_dir} ({len(list_shards(data_dir))} shards)")
    note = f" (trained earlier; --vocab-size {args.vocab_size} applies only to a new one)" if vocab != args.vocab_size else ""
    print(f"tokenizer: {tokenizer_dir} (vocab {vocab:,}){note}")


if __name__ == "__main__":
    run_main(main)
