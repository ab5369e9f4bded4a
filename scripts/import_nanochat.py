"""
Turn a nanochat base-model checkpoint (karpathy/nanochat, checked against commit 92d63d4) into
the step-0 checkpoint of a run of ours, with its tokenizer, ready for scripts.grow and
base_train --init-from.

    python -m scripts.import_nanochat --from ~/.cache/nanochat/base_checkpoints/d20 --to d20_nc \\
        --data path/to/shards
    python -m scripts.grow --from d20_nc --to d20_nc_moe --upcycle --n-experts 8 --expert-topk 2
    python -m scripts.base_train --init-from d20_nc_moe:0 --model-tag d20_nc_moe ...

What it reads (nanochat's layout: $NANOCHAT_BASE_DIR/base_checkpoints/<tag>/ and
$NANOCHAT_BASE_DIR/tokenizer/):
    model_<step:06d>.pt    the state dict, read with torch.load(weights_only=True) (no code runs);
                           keys with torch.compile's `_orig_mod.` prefix are accepted; bf16 (or
                           any float) tensors become our fp32 master weights
    meta_<step:06d>.json   its "model_config"; an older checkpoint without `window_pattern` is
                           patched to "L", and one without `resid_lambdas` / `x0_lambdas` to
                           ones / zeros, as nanochat's checkpoint_manager patches them; any other
                           missing or unknown key is refused, named
    tokenizer/tokenizer.pkl  a pickled tiktoken Encoding. Read by an unpickler that admits the
                           one global such a pickle references (tiktoken.core.Encoding), and
                           that only as an inert stand-in which keeps the pickled state: nothing
                           of the file is called; any other global is refused in one line. The
                           ranks and special tokens (ids unchanged) are written in our format
                           (nanochat/tokenizer.py: JSON + tiktoken text, no pickle).

What it writes: $NANOCHAT_BASE_DIR/runs/<to>/ (refused if it exists) with tokenizer/ and
checkpoints/step_000000/ (weights, meta.json, a fresh data position per rank on --data). Built
in <to>.importing and renamed at the end, so an interrupted import leaves no half run behind.
The model is nanochat's architecture as GPTConfig fields (model_args' "nanochat" preset); its fp32
logits equal nanochat's own forward on the same checkpoint (tests/test_import_nanochat.py,
against reference logits made with nanochat's code: tests/fixtures/nanochat/README.md).
"""

import json
import os
import pickle
import re
import shutil

from nanochat.common import ArgumentParser, UserError, require, run_main, get_base_dir, git_commit
from scripts.prepare_data import DATA_SOURCES, add_data_args, validate_data_args, prepare_shards

# nanochat's GPTConfig fields (model_config in its meta_<step>.json)
NANOCHAT_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")
NANOCHAT_VOCAB_PAD = 64  # nanochat's GPT(pad_vocab_size_to=64): the checkpoint's wte / lm_head / value-embedding rows
COMPILE_PREFIX = "_orig_mod."


def parse_args(argv=None):
    p = ArgumentParser(prog="import_nanochat", description="Import a nanochat base checkpoint as a run of ours.")
    p.add_argument("--from", dest="source", required=True,
                   help="nanochat checkpoint folder with model_<step>.pt and meta_<step>.json "
                        "(nanochat: $NANOCHAT_BASE_DIR/base_checkpoints/<model tag>)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest in --from)")
    p.add_argument("--to", dest="target", required=True, help="model tag of the new run (under $NANOCHAT_BASE_DIR/runs)")
    p.add_argument("--tokenizer-dir", default="",
                   help="folder with nanochat's tokenizer.pkl (default: <--from>/../../tokenizer, nanochat's layout)")
    add_data_args(p, tokenizer=False,  # the checkpoint brings its tokenizer
                  data_help="what base_train --init-from continues on: synthetic | fineweb | PATH (a folder of parquet "
                            "shards, or .txt/.jsonl/.parquet files to build shards from); a fresh data position")
    p.add_argument("--world-size", type=int, default=1,
                   help="processes the run will train with (base_train --init-from needs one data position per rank)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# nanochat's files

def checkpoint_files(source, step):
    """(step, model path, meta path) in nanochat's checkpoint folder; step None = the latest."""
    require(os.path.isdir(source), f"--from {source}: no such folder")
    steps = sorted(int(m.group(1)) for n in os.listdir(source) if (m := re.fullmatch(r"model_(\d+)\.pt", n)))
    require(steps, f"--from {source}: no model_<step>.pt in it (nanochat keeps base checkpoints in "
                   f"$NANOCHAT_BASE_DIR/base_checkpoints/<model tag>)")
    if step is None:
        step = steps[-1]
    require(step in steps, f"--step {step}: no model_{step:06d}.pt in {source} (have steps {steps})")
    model_path = os.path.join(source, f"model_{step:06d}.pt")
    meta_path = os.path.join(source, f"meta_{step:06d}.json")
    require(os.path.isfile(meta_path), f"--from {source}: {os.path.basename(model_path)} has no {os.path.basename(meta_path)}")
    return step, model_path, meta_path


def read_model_config(meta_path):
    """(nanochat meta, its model_config patched as nanochat patches it, the patches applied)."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})")
    require(isinstance(meta, dict) and isinstance(meta.get("model_config"), dict),
            f"{meta_path}: no 'model_config' object (not a nanochat base checkpoint's metadata?)")
    cfg = dict(meta["model_config"])
    patches = []
    if "window_pattern" not in cfg:  # nanochat: older models were trained with full context
        cfg["window_pattern"] = "L"
        patches.append("window_pattern 'L' (missing: an older checkpoint, full context)")
    unknown = [k for k in cfg if k not in NANOCHAT_CONFIG_KEYS]
    if unknown:
        raise UserError(f"{meta_path}: model_config key {unknown[0]!r} is not one this importer knows "
                         f"({', '.join(NANOCHAT_CONFIG_KEYS)}): a newer nanochat? nothing was imported")
    missing = [k for k in NANOCHAT_CONFIG_KEYS if k not in cfg]
    if missing:
        raise UserError(f"{meta_path}: model_config has no {missing[0]!r}")
    for k in NANOCHAT_CONFIG_KEYS:
        if k == "window_pattern":
            require(isinstance(cfg[k], str) and cfg[k] and set(cfg[k].upper()) <= set("SL"),
                    f"{meta_path}: model_config window_pattern {cfg[k]!r} is not a string of S and L")
            cfg[k] = cfg[k].upper()
        else:
            require(isinstance(cfg[k], int) and not isinstance(cfg[k], bool) and cfg[k] > 0,
                    f"{meta_path}: model_config {k} {cfg[k]!r} is not a positive integer")
    require(cfg["n_embd"] % cfg["n_head"] == 0 and cfg["n_head"] % cfg["n_kv_head"] == 0,
            f"{meta_path}: model_config n_embd {cfg['n_embd']}, n_head {cfg['n_head']}, n_kv_head {cfg['n_kv_head']} "
            f"do not divide")
    return meta, cfg, patches


def has_value_embed(i, n_layer):
    """nanochat's rule: value embeddings on alternating layers, the last always."""
    return i % 2 == (n_layer - 1) % 2


def expected_shapes(cfg):
    """{key: shape} of a nanochat GPT's state dict for this model_config (its gpt.py at 92d63d4)."""
    d, n_layer = cfg["n_embd"], cfg["n_layer"]
    head_dim = d // cfg["n_head"]
    kv = cfg["n_kv_head"] * head_dim
    vocab = -(-cfg["vocab_size"] // NANOCHAT_VOCAB_PAD) * NANOCHAT_VOCAB_PAD
    shapes = {"transformer.wte.weight": (vocab, d), "lm_head.weight": (vocab, d),
              "resid_lambdas": (n_layer,), "x0_lambdas": (n_layer,),
              "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes.update({p + "attn.c_q.weight": (d, d), p + "attn.c_k.weight": (kv, d), p + "attn.c_v.weight": (kv, d),
                       p + "attn.c_proj.weight": (d, d), p + "mlp.c_fc.weight": (4 * d, d),
                       p + "mlp.c_proj.weight": (d, 4 * d)})
        if has_value_embed(i, n_layer):
            shapes[p + "attn.ve_gate.weight"] = (cfg["n_kv_head"], 12)
            shapes[f"value_embeds.{i}.weight"] = (vocab, kv)
    return shapes


def read_weights(model_path, cfg):
    """nanochat's state dict as fp32 tensors under its own names (no `_orig_mod.`), checked
    against the config's keys and shapes; resid/x0 lambdas patched as nanochat patches them.
    Returns (state, patches)."""
    import torch
    try:
        raw = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types: all mean "not a plain state dict"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{model_path}: cannot read it as a plain state dict with weights_only=True "
                        f"({type(e).__name__}: {first})")
    require(isinstance(raw, dict), f"{model_path}: holds a {type(raw).__name__}, not a state dict")
    state = {}
    for key, value in raw.items():
        require(isinstance(key, str) and isinstance(value, torch.Tensor),
                f"{model_path}: entry {key!r} is not a named tensor")
        name = key.removeprefix(COMPILE_PREFIX)
        require(name not in state, f"{model_path}: {name!r} appears twice (with and without {COMPILE_PREFIX!r})")
        require(value.is_floating_point(), f"{model_path}: {key!r} is {value.dtype}, not a float tensor")
        state[name] = value.float()
    patches = []
    n_layer = cfg["n_layer"]
    if "resid_lambdas" not in state:  # as nanochat's checkpoint_manager: identity scaling
        state["resid_lambdas"] = torch.ones(n_layer)
        patches.append("resid_lambdas 1.0 (missing: an older checkpoint)")
    if "x0_lambdas" not in state:  # ... and no x0 blending
        state["x0_lambdas"] = torch.zeros(n_layer)
        patches.append("x0_lambdas 0.0 (missing: an older checkpoint)")
    shapes = expected_shapes(cfg)
    missing = [k for k in shapes if k not in state]
    if missing:
        raise UserError(f"{model_path}: no {missing[0]!r} ({len(missing)} key(s) missing) for the model in its "
                         f"meta's model_config; nanochat 92d63d4 could not load it either")
    unexpected = [k for k in state if k not in shapes]
    if unexpected:
        raise UserError(f"{model_path}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all) for the model "
                            f"in its meta's model_config")
    for k, shape in shapes.items():
        require(tuple(state[k].shape) == shape, f"{model_path}: {k!r} has shape {tuple(state[k].shape)}, "
                                                f"the model_config says {shape}")
    return state, patches


class _Refused(pickle.UnpicklingError):
    """A global or persistent id the tokenizer unpickler does not admit."""


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: the pickle's NEWOBJ makes one of
    these (no __init__ runs) and its BUILD hands the pickled state to __setstate__, which only
    keeps it. Nothing the file names is ever called."""

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    """Admits only the one global a pickled tiktoken Encoding references; refuses any other
    (os.system, builtins.eval, ...) before it is looked up, and persistent ids."""
    ADMITTED = {("tiktoken.core", "Encoding"): _EncodingState}

    def find_class(self, module, name):
        if (module, name) in self.ADMITTED:
            return self.ADMITTED[(module, name)]
        raise _Refused(f"it references {module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("it uses a persistent id")


def read_tokenizer_pickle(path):
    """nanochat's tokenizer.pkl -> (pattern, mergeable ranks {bytes: int}, special tokens {str: int})."""
    admitted = ", ".join(f"{m}.{n}" for m, n in _TokenizerUnpickler.ADMITTED)
    try:
        with open(path, "rb") as f:
            obj = _TokenizerUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"no tokenizer.pkl at {path} (nanochat keeps it in $NANOCHAT_BASE_DIR/tokenizer/): "
                        f"give --tokenizer-dir")
    except _Refused as e:
        raise UserError(f"{path}: refused, {e}; only {admitted} is admitted (nanochat's tokenizer) and nothing was run")
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {str(e)[:200]})")
    state = getattr(obj, "state", None) if isinstance(obj, _EncodingState) else None
    if isinstance(state, str):
        raise UserError(f"{path}: names the registered tiktoken encoding {state!r} instead of holding its ranks; "
                        f"not supported (nanochat's own trained tokenizer is)")
    ok = (isinstance(state, dict) and isinstance(state.get("pat_str"), str)
          and isinstance(state.get("mergeable_ranks"), dict) and isinstance(state.get("special_tokens"), dict)
          and all(isinstance(k, bytes) and type(v) is int for k, v in state["mergeable_ranks"].items())
          and all(isinstance(k, str) and type(v) is int for k, v in state["special_tokens"].items()))
    require(ok, f"{path}: not a pickled tiktoken Encoding (expected its state: pat_str, mergeable_ranks {{bytes: int}}, "
                f"special_tokens {{str: int}})")
    return state["pat_str"], dict(state["mergeable_ranks"]), dict(state["special_tokens"])


def convert_tokenizer(path, vocab_size):
    """Our Tokenizer with nanochat's pattern, ranks and special tokens (ids unchanged), checked
    against what our format holds and the model's vocab size."""
    from nanochat.tokenizer import Tokenizer, BOS
    pattern, ranks, special = read_tokenizer_pickle(path)
    n = len(ranks)
    require(sorted(ranks.values()) == list(range(n)), f"{path}: the ranks are not the ids 0..{n - 1}")
    require(n >= 256, f"{path}: {n} ranks, fewer than the 256 bytes")
    require(sorted(special.values()) == list(range(n, n + len(special))),
            f"{path}: the special token ids are not {n}..{n + len(special) - 1}, right after the ranks (our format)")
    require(BOS in special, f"{path}: no {BOS} special token (nanochat's documents start with it)")
    require(n + len(special) == vocab_size, f"{path}: {n + len(special)} tokens, the model's vocab_size is {vocab_size}: "
                                            f"not this checkpoint's tokenizer? give --tokenizer-dir")
    try:
        return Tokenizer(ranks, pattern=pattern, special_tokens=special, name="nanochat")
    except ValueError as e:  # tiktoken rejects the pattern
        raise UserError(f"{path}: tiktoken refuses its pattern or tokens ({e})")


# -----------------------------------------------------------------------------
# our side

def nanochat_features():
    """nanochat's architecture (its gpt.py at 92d63d4) as our GPTConfig fields: the "nanochat"
    preset of nanochat/model_args.py (value embeddings, per-layer lambdas, smear, backout, rotary
    base 1e5, q/k x1.2, its init, weights cast to the activation dtype), less its shape and window
    pattern, which are the checkpoint's own, as are the vocab rows (padded to a multiple of 64)."""
    from nanochat.model_args import MODEL_PRESETS, NANOCHAT_FLAGS
    features = {k: v for k, v in MODEL_PRESETS["nanochat"].items() if k in NANOCHAT_FLAGS and k != "window_pattern"}
    features["vocab_pad"] = NANOCHAT_VOCAB_PAD
    return features


def our_config(cfg):
    """Our GPTConfig for nanochat's model_config: its shape and window pattern, nanochat's features."""
    from nanochat.gpt import GPTConfig
    return GPTConfig(**cfg, **nanochat_features())


def fresh_loader_state():
    """The data position of a run that has read nothing yet (nanochat/dataloader.py's start)."""
    return dict(epoch=0, shard=0, row_group=0, offset=0, batch=0)


def validate_args(args):
    require(os.sep not in args.target and args.target not in ("", ".", "..") and not args.target.endswith(".importing"),
            f"--to {args.target!r}: give a model tag (a folder name)")
    target_dir = os.path.join(get_base_dir(), "runs", args.target)
    require(not os.path.exists(target_dir), f"--to {args.target}: {target_dir} already exists; choose a new name "
                                            f"(nothing is overwritten)")
    require(args.world_size >= 1, f"--world-size must be >= 1 (got {args.world_size})")
    require(args.step is None or args.step >= 0, f"--step must be >= 0 (got {args.step})")
    validate_data_args(args)
    tok_dir = args.tokenizer_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.source))), "tokenizer")
    return target_dir, os.path.join(tok_dir, "tokenizer.pkl")


def main(argv=None):
    args = parse_args(argv)
    target_dir, tok_path = validate_args(args)
    step, model_path, meta_path = checkpoint_files(args.source, args.step)
    nc_meta, cfg, patches = read_model_config(meta_path)
    require(os.path.isfile(tok_path), f"no tokenizer.pkl at {tok_path} (nanochat keeps it in "
                                      f"$NANOCHAT_BASE_DIR/tokenizer/): give --tokenizer-dir")
    tokenizer = convert_tokenizer(tok_path, cfg["vocab_size"])
    config = our_config(cfg)  # refuses before any weights are read when this checkout lacks the features
    state, weight_patches = read_weights(model_path, cfg)
    patches += weight_patches

    import torch
    from nanochat.gpt import build_model
    from nanochat.report import describe_params
    model = build_model(config, torch.device("cpu"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # our model's names or shapes differ from nanochat's
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise UserError(f"{model_path}: does not fit our model of its config: {detail[:300]}")
    del state
    print(f"Source: {model_path} (nanochat step {step}, val bpb {nc_meta.get('val_bpb')}); "
          f"tokenizer {tok_path} ({tokenizer.get_vocab_size():,} tokens, {len(tokenizer.special_tokens)} special)")
    for p in patches:
        print(f"patched, as nanochat does: {p}")
    print(describe_params(model))

    data_dir = prepare_shards(args)
    # FLOPs the weights cost, as nanochat counts them (flops_so_far = per token x batch x step),
    # with our per-token estimate; the run's records are cumulative from there
    flops = float(step * nc_meta["total_batch_size"] * model.estimate_flops()) if nc_meta.get("total_batch_size") else 0.0
    meta = dict(step=0, world_size=args.world_size, config=config.to_dict(),
                args=dict(data=args.data if args.data in DATA_SOURCES else os.path.abspath(args.data),
                          import_nanochat=vars(args)),
                val_bpb=None, flops=flops, tokenizer_dir=os.path.join(target_dir, "tokenizer"), data_dir=data_dir,
                commit=git_commit(),
                imported_from=dict(checkpoint=os.path.abspath(model_path), meta=os.path.abspath(meta_path),
                                   tokenizer=os.path.abspath(tok_path), step=step, model_config=nc_meta["model_config"],
                                   val_bpb=nc_meta.get("val_bpb"), total_batch_size=nc_meta.get("total_batch_size"),
                                   patched=patches))
    write_run(target_dir, model, tokenizer, meta)
    print(f"Data: {data_dir} (a fresh position) | tokenizer: {meta['tokenizer_dir']}")
    print(f"Saved {os.path.join(target_dir, 'checkpoints', 'step_000000')} (grow it with: python -m scripts.grow --from "
          f"{args.target} --to {args.target}_moe --upcycle; train it with: python -m scripts.base_train --init-from "
          f"{args.target}:0 --model-tag {args.target})")


def write_run(target_dir, model, tokenizer, meta):
    """The run folder: written in <target_dir>.importing (its paths already naming target_dir),
    then renamed; on any failure the partial folder is removed."""
    from nanochat.checkpoint import save_weights_checkpoint
    work_dir = target_dir + ".importing"
    shutil.rmtree(work_dir, ignore_errors=True)  # an earlier import interrupted before its rename
    try:
        tokenizer.save(os.path.join(work_dir, "tokenizer"))
        save_weights_checkpoint(os.path.join(work_dir, "checkpoints"), 0, model, meta,
                                [fresh_loader_state() for _ in range(meta["world_size"])])
        require(not os.path.exists(target_dir), f"{target_dir} appeared while importing; nothing written there")
        os.rename(work_dir, target_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise


if __name__ == "__main__":
    run_main(main)
