"""scripts/import_nanochat.py: a nanochat base checkpoint (tests/fixtures/nanochat: a small random
model, its tokenizer pickle and the logits of nanochat's own forward, made with nanochat's code
at 92d63d4 outside this repository; see the README there) becomes a run of ours whose fp32 logits
equal nanochat's, that scripts.grow upcycles exactly and base_train --init-from trains. The
tokenizer pickle is read without running anything it names; bad inputs are one line each.

The tests that build the model need nanochat's architecture features in our GPTConfig
(value_embeds, layer_lambdas, smear, backout, ...): they skip, saying so, until it has them."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.common import UserError
from scripts import import_nanochat as imp
from tests.test_base_train import REPO, train_env, run_train, read_metrics, of_type

FIXTURE = REPO / "tests" / "fixtures" / "nanochat"
SOURCE = FIXTURE / "base_checkpoints" / "d3"
MODEL, META = SOURCE / "model_000005.pt", SOURCE / "meta_000005.json"
TOKENIZER_PKL = FIXTURE / "tokenizer" / "tokenizer.pkl"
NC_CONFIG = dict(sequence_len=512, vocab_size=300, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SSSL")

# nanochat's architecture at 92d63d4 in our GPTConfig's fields (its window pattern is the checkpoint's)
NC_FEATURES = dict(value_embeds=True, layer_lambdas=True, smear=True, backout=True, rotary_base=100000.0, qk_scale=1.2,
                   vocab_pad=64, embedding_init_std=0.8, fc_init_scale=0.4, cast_weights=True)


def run_import(base_dir, args, check=True):
    p = subprocess.run([sys.executable, "-m", "scripts.import_nanochat", *args], cwd=REPO, env=train_env(base_dir),
                       capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, f"import_nanochat {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def one_line_error(p, *needles):
    """Exit 2, one line on stderr, no traceback, naming each needle."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_text_data(path, n_docs=400):
    """Documents separated by blank lines (the last 5% are the validation shard): enough tokens
    of the fixture's tiny tokenizer for 512-token rows."""
    words = ["model", "token", "expert", "router", "layer", "window", "value", "smear", "check", "point", "data"]
    docs = [" ".join(words[(i * 5 + j * 7) % len(words)] for j in range(40 + i % 20)) + f" {i}." for i in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def nanochat_copy(tmp_path, state=None, meta=None, tag="d3", step=5):
    """A nanochat base dir (base_checkpoints/<tag>, tokenizer/) with the fixture's files, or the given state / meta."""
    d = tmp_path / "nc" / "base_checkpoints" / tag
    d.mkdir(parents=True)
    shutil.copytree(FIXTURE / "tokenizer", tmp_path / "nc" / "tokenizer")
    if state is None:
        shutil.copy(MODEL, d / f"model_{step:06d}.pt")
    else:
        torch.save(state, d / f"model_{step:06d}.pt")
    (d / f"meta_{step:06d}.json").write_text(json.dumps(meta if meta is not None else json.loads(META.read_text())))
    return d


# ---------------------------------------------------------------------------------------------
# 1. The fixture: small, numbers only

def test_fixture_is_small_and_plain():
    total = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert total < 1_000_000, total
    state = torch.load(MODEL, weights_only=True)  # a plain state dict
    assert state["transformer.wte.weight"].dtype == torch.bfloat16 and state["resid_lambdas"].dtype == torch.float32
    ref = torch.load(FIXTURE / "reference.pt", weights_only=True)
    assert ref["idx"].shape == (2, 136) and ref["logits"].shape == (2, 136, 300) and ref["logits"].dtype == torch.float32
    assert json.loads(META.read_text())["model_config"] == NC_CONFIG


# ---------------------------------------------------------------------------------------------
# 2. The tokenizer: nanochat's pickle read without running anything, written in our format

def test_tokenizer_converts_with_special_ids_kept(tmp_path):
    from nanochat.tokenizer import get_tokenizer, load_token_bytes
    pattern, ranks, special = imp.read_tokenizer_pickle(TOKENIZER_PKL)
    with open(TOKENIZER_PKL, "rb") as f:
        enc = pickle.load(f)  # the fixture is ours: the plain unpickler gives the reference Encoding
    assert (pattern, ranks, special) == (enc._pat_str, enc._mergeable_ranks, enc._special_tokens)
    imp.convert_tokenizer(TOKENIZER_PKL, 300).save(tmp_path / "tok")
    tok = get_tokenizer(str(tmp_path / "tok"))
    assert tok.get_vocab_size() == enc.n_vocab == 300
    assert tok.special_tokens == enc._special_tokens and tok.get_bos_token_id() == enc.encode_single_token("<|bos|>") == 291
    text = "the model routes 12 tokens to the expert layer; a window of values.\n\nsmear backout 2026!"
    assert tok.encode(text) == enc.encode_ordinary(text)
    assert tok.decode(tok.encode(text, prepend_bos=True)) == "<|bos|>" + text
    token_bytes = load_token_bytes(str(tmp_path / "tok"))
    assert token_bytes[291:].eq(0).all() and token_bytes[:256].eq(1).all()


class _Payload:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _encoding_named(name):
    """A protocol-4 pickle of tiktoken.core.Encoding whose state is a registered encoding's name
    (tiktoken pickles registered encodings so: loading it would fetch the encoding)."""
    s = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()
    return b"\x80\x04" + s("tiktoken.core") + s("Encoding") + b"\x93)\x81" + s(name) + b"b."


@pytest.mark.parametrize("payload,named", [
    (lambda marker: pickle.dumps(_Payload(os.system, f"touch {marker}")), os.system.__module__ + ".system"),
    (lambda marker: pickle.dumps(_Payload(eval, f"open({str(marker)!r}, 'w')")), "builtins.eval"),
    (lambda marker: pickle.dumps(_Payload(subprocess.call, ["touch", str(marker)])), "subprocess.call"),
    (lambda marker: pickle.dumps({"ok": _Payload(os.system, f"touch {marker}")}, protocol=2), ".system"),
], ids=["os.system", "eval", "subprocess", "nested-protocol2"])
def test_unpickler_refuses_code_in_one_line(tmp_path, payload, named):
    marker = tmp_path / "pwned"
    pkl = tmp_path / "tokenizer.pkl"
    pkl.write_bytes(payload(marker))
    with pytest.raises(UserError) as e:
        imp.read_tokenizer_pickle(pkl)
    msg = str(e.value)
    assert "\n" not in msg and "refused" in msg and named in msg and "tiktoken.core.Encoding" in msg, msg
    assert not marker.exists()


def test_unpickler_refuses_other_shapes(tmp_path):
    pkl = tmp_path / "tokenizer.pkl"
    pkl.write_bytes(_encoding_named("gpt2"))
    with pytest.raises(UserError, match="registered tiktoken encoding 'gpt2'"):
        imp.read_tokenizer_pickle(pkl)
    pkl.write_bytes(pickle.dumps({"pat_str": "x"}))
    with pytest.raises(UserError, match="not a pickled tiktoken Encoding"):
        imp.read_tokenizer_pickle(pkl)
    pkl.write_bytes(TOKENIZER_PKL.read_bytes()[:100])
    with pytest.raises(UserError, match="not a readable pickle"):
        imp.read_tokenizer_pickle(pkl)
    with pytest.raises(UserError, match="the model's vocab_size is 320"):
        imp.convert_tokenizer(TOKENIZER_PKL, 320)


def test_malicious_tokenizer_refused_by_the_script(tmp_path):
    src = nanochat_copy(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "nc" / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}")))
    p = run_import(tmp_path / "base", ["--from", str(src), "--to", "x", "--data", "synthetic"], check=False)
    one_line_error(p, "tokenizer.pkl", "refused", ".system")
    assert not marker.exists() and not (tmp_path / "base" / "runs" / "x").exists()


# ---------------------------------------------------------------------------------------------
# 3. The weights and the config: nanochat's names, its patches, one-line refusals

def test_orig_mod_prefix_and_bf16_load_as_fp32(tmp_path):
    plain, patches = imp.read_weights(MODEL, NC_CONFIG)
    assert patches == [] and all(v.dtype == torch.float32 for v in plain.values())
    raw = torch.load(MODEL, weights_only=True)
    assert all(torch.equal(plain[k], v.float()) for k, v in raw.items())
    path = tmp_path / "model.pt"
    torch.save({"_orig_mod." + k: v for k, v in raw.items()}, path)  # as a compiled model's state dict
    prefixed, _ = imp.read_weights(path, NC_CONFIG)
    assert prefixed.keys() == plain.keys() and all(torch.equal(prefixed[k], plain[k]) for k in plain)


def test_missing_or_misshapen_weights_are_named(tmp_path):
    raw = torch.load(MODEL, weights_only=True)
    path = tmp_path / "model.pt"
    torch.save({k: v for k, v in raw.items() if k != "smear_gate.weight"}, path)
    with pytest.raises(UserError, match=r"no 'smear_gate.weight' \(1 key\(s\) missing\)"):
        imp.read_weights(path, NC_CONFIG)
    torch.save({k: v for k, v in raw.items() if not k.startswith("value_embeds.")}, path)
    with pytest.raises(UserError, match=r"no 'value_embeds.0.weight' \(2 key\(s\) missing\)"):
        imp.read_weights(path, NC_CONFIG)
    torch.save(dict(raw, **{"transformer.h.0.attn.c_k.weight": torch.zeros(64, 64)}), path)
    with pytest.raises(UserError, match=r"'transformer.h.0.attn.c_k.weight' has shape \(64, 64\), .* says \(32, 64\)"):
        imp.read_weights(path, NC_CONFIG)
    torch.save(dict(raw, extra=torch.zeros(1)), path)
    with pytest.raises(UserError, match="unexpected key 'extra'"):
        imp.read_weights(path, NC_CONFIG)
    torch.save({"x": _Payload(os.system, "true")}, path)  # not weights_only-loadable
    with pytest.raises(UserError, match="weights_only=True"):
        imp.read_weights(path, NC_CONFIG)


def test_older_checkpoints_patched_as_nanochat_does(tmp_path):
    raw = torch.load(MODEL, weights_only=True)
    path = tmp_path / "model.pt"
    torch.save({k: v for k, v in raw.items() if k not in ("resid_lambdas", "x0_lambdas")}, path)
    state, patches = imp.read_weights(path, NC_CONFIG)
    assert torch.equal(state["resid_lambdas"], torch.ones(3)) and torch.equal(state["x0_lambdas"], torch.zeros(3))
    assert [p.split()[0] for p in patches] == ["resid_lambdas", "x0_lambdas"]
    meta = json.loads(META.read_text())
    del meta["model_config"]["window_pattern"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    _, cfg, patches = imp.read_model_config(tmp_path / "meta.json")
    assert cfg["window_pattern"] == "L" and patches[0].startswith("window_pattern 'L'")
    meta["model_config"]["rope_theta"] = 1e4
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="model_config key 'rope_theta' is not one this importer knows"):
        imp.read_model_config(tmp_path / "meta.json")
    del meta["model_config"]["rope_theta"], meta["model_config"]["n_kv_head"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="model_config has no 'n_kv_head'"):
        imp.read_model_config(tmp_path / "meta.json")


def test_expected_keys_are_nanochats():
    # the value-embedding layers: alternating, the last always (nanochat's has_ve)
    assert [i for i in range(5) if imp.has_value_embed(i, 5)] == [0, 2, 4]
    assert [i for i in range(4) if imp.has_value_embed(i, 4)] == [1, 3]
    assert set(imp.expected_shapes(NC_CONFIG)) == set(torch.load(MODEL, weights_only=True))


def test_latest_step_is_the_default(tmp_path):
    d = tmp_path / "d3"
    d.mkdir()
    for step in (5, 10):
        shutil.copy(MODEL, d / f"model_{step:06d}.pt")
        shutil.copy(META, d / f"meta_{step:06d}.json")
    assert imp.checkpoint_files(str(d), None) == (10, str(d / "model_000010.pt"), str(d / "meta_000010.json"))
    assert imp.checkpoint_files(str(d), 5)[0] == 5
    shutil.copy(MODEL, d / "model_000012.pt")  # as nanochat's find_last_step: the highest model file
    with pytest.raises(UserError, match="model_000012.pt has no meta_000012.json"):
        imp.checkpoint_files(str(d), None)


BAD_INPUTS = [
    pytest.param(lambda t: ["--from", str(t / "nowhere"), "--to", "x", "--data", "synthetic"], ["--from", "no such folder"],
                 id="from-missing"),
    pytest.param(lambda t: ["--from", str(t), "--to", "x", "--data", "synthetic"], ["no model_<step>.pt"], id="from-empty"),
    pytest.param(lambda t: ["--from", str(SOURCE), "--step", "7", "--to", "x", "--data", "synthetic"],
                 ["--step 7", "have steps [5]"], id="step-missing"),
    pytest.param(lambda t: ["--from", str(SOURCE), "--to", "x", "--data", str(t / "nowhere")], ["--data"], id="data-missing"),
    pytest.param(lambda t: ["--from", str(SOURCE), "--to", "x", "--data", "synthetic", "--tokenizer-dir", str(t)],
                 ["no tokenizer.pkl", "--tokenizer-dir"], id="tokenizer-missing"),
    pytest.param(lambda t: ["--from", str(SOURCE), "--to", "a/b", "--data", "synthetic"], ["--to"], id="to-not-a-tag"),
    pytest.param(lambda t: ["--from", str(SOURCE), "--to", "x"], ["--data"], id="no-data"),
    pytest.param(lambda t: ["--from", str(SOURCE), "--to", "x", "--data", "synthetic", "--step", "five"], ["--step"],
                 id="step-not-a-number"),
]


@pytest.mark.parametrize("args,needles", BAD_INPUTS)
def test_bad_inputs_are_one_line(tmp_path, args, needles):
    p = run_import(tmp_path / "base", args(tmp_path), check=False)
    one_line_error(p, *needles)
    assert not (tmp_path / "base" / "runs" / "x").exists()


def test_existing_run_is_refused(tmp_path):
    base = tmp_path / "base"
    (base / "runs" / "taken").mkdir(parents=True)
    (base / "runs" / "taken" / "keep.txt").write_text("mine")
    p = run_import(base, ["--from", str(SOURCE), "--to", "taken", "--data", "synthetic"], check=False)
    one_line_error(p, "--to taken", "already exists")
    assert (base / "runs" / "taken" / "keep.txt").read_text() == "mine"
    assert os.listdir(base / "runs") == ["taken"]


# ---------------------------------------------------------------------------------------------
# 4. The imported run: nanochat's logits, exact upcycling, training with --init-from

@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import")
    base = tmp / "base"
    data = write_text_data(tmp / "texts.txt")
    out = run_import(base, ["--from", str(SOURCE), "--to", "nc", "--data", str(data)])
    return base, data, out


def ckpt(base, tag, step=0):
    return Path(base) / "runs" / tag / "checkpoints" / f"step_{step:06d}"


def test_imported_logits_equal_nanochats(imported):
    from nanochat.checkpoint import load_model
    base, _, out = imported
    model, tokenizer, meta = load_model(str(ckpt(base, "nc")), torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 in the file, fp32 master weights here
    ref = torch.load(FIXTURE / "reference.pt", weights_only=True)
    with torch.no_grad():
        logits = model(ref["idx"])
    assert logits.shape == ref["logits"].shape
    diff = (logits - ref["logits"]).abs().max().item()
    assert diff <= 1e-5, f"max abs logit difference {diff:.3e} from nanochat's forward"
    assert tokenizer.get_vocab_size() == 300 and tokenizer.special_tokens["<|output_end|>"] == 299


def test_imported_run_is_a_step0_checkpoint(imported):
    base, data, out = imported
    d = ckpt(base, "nc")
    meta = json.loads((d / "meta.json").read_text())
    assert meta["step"] == 0 and meta["world_size"] == 1 and not (d / "optim.pt").exists()
    assert {k: meta["config"][k] for k in NC_CONFIG} == NC_CONFIG
    assert {k: meta["config"][k] for k in NC_FEATURES} == NC_FEATURES
    assert meta["tokenizer_dir"] == str(base / "runs" / "nc" / "tokenizer")
    assert meta["data_dir"] == str(base / "data" / "local_texts") and meta["args"]["data"] == str(data)
    assert json.loads((d / "loader_rank0.json").read_text()) == imp.fresh_loader_state()
    nc = meta["imported_from"]
    assert nc["step"] == 5 and nc["checkpoint"] == str(MODEL) and nc["model_config"] == NC_CONFIG and nc["patched"] == []
    assert meta["flops"] > 0  # nanochat's count: step x total_batch_size x FLOPs per token
    assert not (base / "runs" / "nc.importing").exists()
    assert out.stdout.strip().splitlines()[-1].startswith(f"Saved {d}")
    p = run_import(base, ["--from", str(SOURCE), "--to", "nc", "--data", str(data)], check=False)
    one_line_error(p, "--to nc", "already exists")


def test_upcycle_after_import_is_exact_and_trains(imported):
    from tests.test_grow_script import run_py
    base, _, _ = imported
    grow = run_py(base, "scripts.grow", ["--from", "nc", "--to", "nc_moe", "--upcycle", "--n-experts", "4",
                                         "--verify-batches", "1", "--device-batch-size", "2"])
    last = grow.stdout.strip().splitlines()[-1]
    assert last.startswith("verification: max abs logit difference ") and "(PASSED < 0.0001)" in last, grow.stdout
    assert float(last.split()[5]) < 1e-4
    cfg = json.loads((ckpt(base, "nc_moe") / "meta.json").read_text())["config"]
    assert cfg["use_moe"] and cfg["n_experts"] == 4 and {k: cfg[k] for k in NC_FEATURES} == NC_FEATURES
    train = ["--num-iterations", "1", "--device-batch-size", "1", "--total-batch-size", "512", "--eval-every", "-1",
             "--eval-tokens", "512", "--sample-every", "-1", "--device-type", "cpu"]
    for tag in ("nc", "nc_moe"):
        run_train(base, train + ["--init-from", f"{tag}:0", "--model-tag", tag])
        records = read_metrics(base, tag)
        header, steps = of_type(records, "header")[0], of_type(records, "train")
        assert header["init_from"]["checkpoint"] == str(ckpt(base, tag)) and len(steps) == 1
        assert torch.isfinite(torch.tensor(steps[0]["train_loss"]))
        assert (ckpt(base, tag, 1) / "meta.json").exists()


def test_one_data_position_per_process(imported):
    base, data, _ = imported
    run_import(base, ["--from", str(SOURCE), "--to", "nc_x2", "--data", str(data), "--world-size", "2"])
    d = ckpt(base, "nc_x2")
    assert json.loads((d / "meta.json").read_text())["world_size"] == 2
    assert [json.loads((d / f"loader_rank{r}.json").read_text()) for r in range(2)] == [imp.fresh_loader_state()] * 2
    assert not (d / "loader_rank2.json").exists()
