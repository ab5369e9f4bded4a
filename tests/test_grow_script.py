"""scripts/grow.py, base_train --init-from, scripts/grow_summary.py and runs/grow.sh, end to end
on the built-in corpus: a dense run is upcycled, trained on, grown in width and depth, trained
on; every transform passes the fp32 check, each phase's step-0 eval equals the last eval of the
phase before (same validation batches), the data stream continues, and the bad inputs are one
line each; the bf16 autocast report and the no-growth control (the MoE trained on for the grown
phase's FLOPs) are recomputed from the runs. The recipe itself runs with tiny horizons."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plain import PLAIN_FLAGS
from tests.test_base_train import TINY, run_train, read_metrics, of_type, train_env, REPO

HEAD = ["--head-dim", "32", "--n-embd", "64"]
assert TINY[:2] == ["--depth", "2"]
NO_DEPTH = TINY[2:]  # a run started --init-from takes its shape from the checkpoint


def run_py(base_dir, module, args, check=True):
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=train_env(base_dir), capture_output=True,
                       text=True, timeout=300)
    if check:
        assert p.returncode == 0, f"{module} {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        assert "Traceback" not in p.stderr, p.stderr
    return p


def ckpt(base_dir, tag, step):
    return Path(base_dir) / "runs" / tag / "checkpoints" / f"step_{step:06d}"


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """dense (8 steps) -> upcycle -> MoE (6 steps) -> width x2, +2 layers -> grown MoE (4 steps);
    control: the MoE trained on for the grown phase's FLOPs."""
    base = tmp_path_factory.mktemp("grow")
    common = NO_DEPTH + ["--eval-every", "2", "--save-every", "-1"]
    # the plain model: depth growth refuses value embeddings, backout and short windows
    run_train(base, common + HEAD + PLAIN_FLAGS + ["--depth", "2", "--num-iterations", "8", "--model-tag", "dense",
                                                   "--warmdown-ratio", "0"])
    out = {"upcycle": run_py(base, "scripts.grow", ["--from", "dense", "--to", "moe", "--upcycle", "--n-experts", "4"])}
    run_train(base, common + ["--init-from", "moe", "--num-iterations", "6", "--model-tag", "moe", "--warmdown-ratio", "0"])
    out["grow"] = run_py(base, "scripts.grow", ["--from", "moe", "--to", "grown", "--width-mult", "2", "--add-layers", "2",
                                                "--source-layer", "0"])
    run_train(base, common + ["--init-from", "grown", "--num-iterations", "4", "--model-tag", "grown"])
    out["flops"] = run_py(base, "scripts.grow_summary", ["--flops-of", "grown"])
    run_train(base, common + ["--init-from", "moe", "--target-flops", out["flops"].stdout.strip(), "--model-tag", "control"])
    out["summary"] = run_py(base, "scripts.grow_summary", ["dense", "moe", "grown", "--names", "dense,moe,grown",
                                                           "--history", str(base / "history.jsonl"), "--control", "control"])
    return base, out


def test_each_transform_passes_and_says_so_last(lineage):
    base, out = lineage
    for key in ("upcycle", "grow"):
        last = out[key].stdout.strip().splitlines()[-1]
        assert last.startswith("verification: max abs logit difference ") and "(PASSED < 0.0001)" in last
        assert float(last.split()[5]) < 1e-4
    assert "flip when not forced" in out["grow"].stdout  # an MoE source: choices forced, flips reported
    meta = json.loads((ckpt(base, "grown", 0) / "meta.json").read_text())
    cfg = meta["config"]
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["use_moe"], cfg["n_experts"]) == (4, 128, 4, True, 4)
    assert meta["grown_from"]["step"] == 6 and meta["grown_from"]["verification"]["max_abs_diff"] < 1e-4
    assert not (ckpt(base, "grown", 0) / "optim.pt").exists()  # fresh optimizer by construction


def test_bf16_report_matches_a_recomputation(lineage):
    # the line above the fp32 verdict: source and grown under CPU bf16 autocast on the same
    # validation batches, recomputed here from the saved checkpoints
    import torch
    from nanochat.checkpoint import load_model
    from scripts.grow import validation_batches
    base, out = lineage
    for key, src_tag, src_step in (("upcycle", "dense", 8), ("grow", "moe", 6)):
        line = out[key].stdout.strip().splitlines()[-2]
        assert line.startswith("training dtype (bfloat16 autocast): max abs logit difference "), line
        source, tokenizer, meta = load_model(str(ckpt(base, src_tag, src_step)), torch.device("cpu"))
        grown, _, grown_meta = load_model(str(ckpt(base, "grown" if key == "grow" else "moe", 0)), torch.device("cpu"))
        batches = validation_batches(meta, tokenizer, 2, 8, source.config.sequence_len, "cpu")
        diff = gap = 0.0
        with torch.no_grad():
            for idx in batches:
                ref32 = source.eval()(idx).float()
                with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                    ref, got = source(idx).float(), grown.eval()(idx).float()
                diff = max(diff, (got - ref).abs().max().item())
                gap = max(gap, (ref - ref32).abs().max().item())
        assert f"max abs logit difference {diff:.3g} (the source's own bfloat16-vs-fp32 gap: {gap:.3g})" in line, line
        saved = grown_meta["grown_from"]["verification_autocast"]
        assert saved["max_abs_diff"] == pytest.approx(diff, rel=1e-6) and saved["source_gap"] == pytest.approx(gap, rel=1e-6)
        assert diff > 1e-3 and gap > 1e-3  # bf16 is not exact, for the source either
        if key == "grow":  # an MoE source: 2 batches x 2 layers x 8x64 tokens x top-2
            assert saved["choices"] == 2 * 2 * 8 * 64 * 2 and f"of {saved['choices']:,} flip" in line
        else:
            assert saved["choices"] == 0 and "expert choices" not in line


def test_grown_checkpoint_carries_the_source_position_tokenizer_and_flops(lineage):
    base, _ = lineage
    src, new = ckpt(base, "dense", 8), ckpt(base, "moe", 0)
    assert (src / "loader_rank0.json").read_text() == (new / "loader_rank0.json").read_text()
    src_meta, new_meta = json.loads((src / "meta.json").read_text()), json.loads((new / "meta.json").read_text())
    assert new_meta["tokenizer_dir"] == src_meta["tokenizer_dir"] and new_meta["data_dir"] == src_meta["data_dir"]
    assert new_meta["flops"] == src_meta["flops"] > 0


def test_init_from_starts_where_the_source_ended(lineage):
    base, _ = lineage
    for prev, cur in (("dense", "moe"), ("moe", "grown")):
        p, c = read_metrics(base, prev), read_metrics(base, cur)
        header = of_type(c, "header")[0]
        assert header["init_from"]["checkpoint"] == str(ckpt(base, cur, 0))
        assert header["init_from"]["grown_from"]["checkpoint"].endswith(f"runs/{prev}/checkpoints/step_{of_type(p, 'summary')[0]['step']:06d}")
        # step-0 eval of the new run equals the source's last eval: same function, same val batches
        assert abs(of_type(c, "eval")[0]["val_bpb"] - of_type(p, "eval")[-1]["val_bpb"]) < 2e-3
        # FLOPs are cumulative over the lineage and the data stream continues (no token seen twice)
        assert of_type(c, "eval")[0]["flops"] == pytest.approx(of_type(p, "summary")[0]["flops"])
        assert of_type(c, "train")[0]["epochs"] > of_type(p, "train")[-1]["epochs"]
        assert header["args"]["warmup_ratio"] == 0.05
    moe_header = of_type(read_metrics(base, "moe"), "header")[0]
    assert moe_header["config"]["use_moe"] and moe_header["config"]["expert_hidden_mult"] == 4


def test_summary_and_history(lineage):
    base, out = lineage
    text = out["summary"].stdout
    assert "BOUNDARY SUMMARY" in text and "GROWTH TABLE" in text
    boundary = text.split("BOUNDARY SUMMARY")[1].split("total drop")[0]
    rows = {line.split()[0]: line.split() for line in boundary.splitlines()[2:] if line.strip()}
    assert list(rows) == ["dense", "moe", "grown"] and rows["dense"][3] == "-"
    assert abs(float(rows["moe"][3])) < 2e-3 and abs(float(rows["grown"][3])) < 2e-3  # the boundary jumps
    history = [json.loads(line) for line in (base / "history.jsonl").read_text().splitlines()]
    per_phase = {name: len(read_metrics(base, name)) for name in ("dense", "moe", "grown")}
    assert len(history) == sum(per_phase.values())
    assert [r["phase"] for r in history] == [n for n in ("dense", "moe", "grown") for _ in range(per_phase[n])]


def test_no_growth_control_at_equal_flops(lineage):
    base, out = lineage
    grown, control = read_metrics(base, "grown"), read_metrics(base, "control")
    own = lambda r: of_type(r, "summary")[0]["flops"] - of_type(r, "header")[0]["init_from"]["flops"]
    assert float(out["flops"].stdout) == pytest.approx(own(grown), rel=1e-6)
    # equal compute to within half a step of the smaller model, on ~5x the steps
    header = of_type(control, "header")[0]
    assert abs(own(control) - own(grown)) <= 0.5 * header["flops_per_token"] * header["tokens_per_step"]
    assert of_type(control, "summary")[0]["step"] > 4 * of_type(grown, "summary")[0]["step"]
    # same source checkpoint and data position as the growth, same schedule
    assert header["init_from"]["checkpoint"] == of_type(grown, "header")[0]["init_from"]["grown_from"]["checkpoint"]
    assert of_type(control, "eval")[0]["val_bpb"] == pytest.approx(of_type(read_metrics(base, "moe"), "eval")[-1]["val_bpb"], abs=1e-6)
    assert header["args"]["warmup_ratio"] == 0.05 and header["args"]["warmdown_ratio"] == of_type(grown, "header")[0]["args"]["warmdown_ratio"]
    text = out["summary"].stdout.split("NO-GROWTH CONTROL")[1]
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:4]}
    g, c = of_type(grown, "eval")[-1]["val_bpb"], of_type(control, "eval")[-1]["val_bpb"]
    assert (float(rows["grown"][4]), float(rows["control"][4])) == (pytest.approx(g, abs=5e-5), pytest.approx(c, abs=5e-5))
    verdict = text.splitlines()[4]
    if g > c:
        assert verdict.startswith(f"growth does not pay: the control is better than grown by {g - c:.4f} bpb"), verdict
    else:
        assert verdict.startswith(f"growth pays: grown is better than the control by {c - g:.4f} bpb"), verdict


def test_a_control_from_another_checkpoint_is_refused(lineage):
    base, _ = lineage
    p = run_py(base, "scripts.grow_summary", ["dense", "moe", "grown", "--control", "moe"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "--control moe was not started from the checkpoint grown grew from" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_failed_verification_writes_nothing(lineage, monkeypatch, capsys):
    base, _ = lineage
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    import nanochat.grow
    from scripts import grow
    monkeypatch.setattr(nanochat.grow, "TOLERANCE", 0.0)  # nothing passes a zero tolerance
    with pytest.raises(SystemExit) as e:
        grow.main(["--from", "dense", "--to", "never", "--upcycle"])
    assert e.value.code == 1
    assert "FAILED" in capsys.readouterr().out
    assert not (base / "runs" / "never").exists()


@pytest.mark.parametrize("args,needle", [
    (["--from", "dense", "--to", "x"], "nothing to do"),
    (["--from", "dense", "--to", "moe", "--upcycle"], "--to moe"),
    (["--from", "dense", "--to", "x", "--upcycle", "--expert-topk", "1"], "--expert-topk >= 2"),
    (["--from", "moe", "--to", "x", "--add-layers", "1", "--source-layer", "9"], "--source-layer 9"),
    (["--from", "nope", "--to", "x", "--upcycle"], "--from nope"),
])
def test_grow_bad_input_is_one_line(lineage, args, needle):
    base, _ = lineage
    p = run_py(base, "scripts.grow", args, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (base / "runs" / "x").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--depth", "3"], "--depth 3 contradicts"),
    (["--max-seq-len", "32"], "--max-seq-len 32 contradicts"),
    (["--n-embd", "128"], "--n-embd 128 contradicts"),
    (["--expert-topk", "3"], "--expert-topk 3 contradicts"),
    (["--data", "fineweb"], "--data fineweb contradicts"),
    (["--resume-from-step", "0", "--model-tag", "moe"], "no optimizer state"),
])
def test_init_from_contradictions_are_one_line(lineage, extra, needle):
    base, _ = lineage
    p = run_train(base, NO_DEPTH + ["--init-from", "moe:0", "--num-iterations", "1"] + extra, check=False, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert needle in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]


def test_grow_recipe_end_to_end(tmp_path):
    env = dict(train_env(tmp_path), SEQ_LEN="64", BATCH_ROWS="4", SYNTHETIC_DOCS="3000", OMP_NUM_THREADS="2",
               P1="--num-iterations 6", P2="--num-iterations 4", P3="--num-iterations 4",
               EXTRA="--eval-tokens 1024 --eval-every 2 --vocab-size 512")  # the recipe as users run it
    p = subprocess.run(["bash", "runs/grow.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("PASSED < 0.0001") == 2 and p.stdout.count("PHASE ") == 3
    assert "BOUNDARY SUMMARY" in p.stdout and "GROWTH TABLE" in p.stdout and "NO-GROWTH CONTROL" in p.stdout
    assert p.stdout.count("training dtype (bfloat16 autocast)") == 2
    history = tmp_path / "runs" / "grow_grown" / "training_history.jsonl"
    assert {json.loads(line)["phase"] for line in history.read_text().splitlines()} == {"dense", "moe", "grown"}
    control_steps = of_type(read_metrics(tmp_path, "grow_control"), "summary")[0]["step"]
    assert control_steps > 4 * 4  # the phase-2 MoE, on the grown phase's FLOPs (~5x its steps)
    for tag, steps in (("grow_dense", [6]), ("grow_moe", [0, 4]), ("grow_grown", [0, 4]), ("grow_control", [control_steps])):
        assert sorted(int(d.name[5:]) for d in (tmp_path / "runs" / tag / "checkpoints").glob("step_*")) == steps
    again = subprocess.run(["bash", "runs/grow.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "is never overwritten" in again.stderr


def test_grow_recipe_dry_run():
    p = subprocess.run(["bash", "runs/grow.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DRY_RUN": "1", "NPROC": "8", "DEVICE": "cuda"})
    assert p.returncode == 0, p.stderr
    cmds = [line[2:] for line in p.stdout.splitlines() if line.startswith("+ ")]
    assert len(cmds) == 7
    assert all(c.startswith("python -m torch.distributed.run --standalone --nproc_per_node=8 -m scripts.base_train --")
               for c in (cmds[0], cmds[2], cmds[4]))
    assert "--upcycle" in cmds[1] and "--width-mult 2 --add-layers 2" in cmds[3]
    assert "--init-from grow_moe:0" in cmds[2] and "--init-from grow_grown:0" in cmds[4]
    assert "--total-batch-size 32768" in cmds[0]  # 8 rows x 256 x 8 processes x 2 micro-steps
    # the control: the phase-2 MoE under the same torchrun, for phase 3's FLOPs, the same schedule
    assert cmds[5].startswith(cmds[4].split(" --init-from")[0])
    assert "--init-from grow_moe --target-flops $(python -m scripts.grow_summary --flops-of grow_grown)" in cmds[5]
    assert cmds[5].endswith("--warmdown-ratio 0.2 --model-tag grow_control") and "--warmdown-ratio 0.2" in cmds[4]
    assert cmds[6].startswith("python -m scripts.grow_summary") and cmds[6].endswith("--control grow_control")
    p = subprocess.run(["bash", "runs/grow.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DRY_RUN": "1", "CONTROL": "0"})
    cmds = [line[2:] for line in p.stdout.splitlines() if line.startswith("+ ")]
    assert len(cmds) == 6 and "control" not in p.stdout.lower() and "--synthetic-train-docs 40000" in cmds[0]


def test_growth_under_torchrun_keeps_every_ranks_position(tmp_path):
    # the recipe on GPUs runs every phase under torchrun: each rank continues its own data stream
    common = NO_DEPTH + ["--eval-every", "2", "--total-batch-size", "512"]
    run_train(tmp_path, common + HEAD + ["--depth", "2", "--num-iterations", "2", "--model-tag", "d"], nproc=2)
    run_py(tmp_path, "scripts.grow", ["--from", "d", "--to", "m", "--upcycle", "--n-experts", "4"])
    for rank in (0, 1):
        assert (ckpt(tmp_path, "m", 0) / f"loader_rank{rank}.json").read_text() == \
            (ckpt(tmp_path, "d", 2) / f"loader_rank{rank}.json").read_text()
    p = run_train(tmp_path, common + ["--init-from", "m", "--num-iterations", "1", "--model-tag", "m1"], check=False)
    assert p.returncode == 2 and "saved by 2 process(es), this run has 1" in p.stderr
    run_train(tmp_path, common + ["--init-from", "m", "--num-iterations", "2", "--model-tag", "m"], nproc=2)
    d, m = read_metrics(tmp_path, "d"), read_metrics(tmp_path, "m")
    assert abs(of_type(m, "eval")[0]["val_bpb"] - of_type(d, "eval")[-1]["val_bpb"]) < 2e-3


def test_resuming_an_init_from_run_keeps_its_lineage_flops(lineage):
    base, _ = lineage
    common = NO_DEPTH + ["--eval-every", "-1", "--num-iterations", "4", "--model-tag", "moe_again"]
    run_train(base, common + ["--init-from", "moe:0", "--save-every", "2"])
    first = of_type(read_metrics(base, "moe_again"), "summary")[0]["flops"]
    # resumed with an --init-from that now resolves to another checkpoint (moe's latest, step 6):
    # the FLOPs before this run come from its own checkpoint, not from the new source
    run_train(base, common + ["--init-from", "moe", "--resume-from-step", "2"])
    records = read_metrics(base, "moe_again")
    assert of_type(records, "summary")[0]["flops"] == pytest.approx(first)
    src = json.loads((ckpt(base, "moe", 0) / "meta.json").read_text())["flops"]
    header = of_type(records, "header")[0]
    assert first == pytest.approx(src + 4 * header["flops_per_token"] * header["tokens_per_step"])
