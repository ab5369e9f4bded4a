"""dev/techmix_study.py: the study's run list says what each run is, whatever the CLI defaults
(a run queued with bare --use-moe silently changed meaning when the defaults changed)."""

import importlib.util
import os

import pytest

from scripts.base_train import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_study():
    spec = importlib.util.spec_from_file_location("techmix_study", os.path.join(ROOT, "dev", "techmix_study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_moe_run_spells_out_its_routing_and_tags_are_unique():
    study = load_study()
    runs = study.runs()
    tags = [t for t, _ in runs]
    assert len(tags) == len(set(tags))
    for tag, flags in runs:
        assert ("--target-flops" in flags) != ("--num-iterations" in flags), tag  # exactly one length
        if "--use-moe" not in flags:
            continue
        for name in ("--n-experts", "--expert-topk", "--router", "--aux-free-bias", "--balance-loss-coeff"):
            assert name in flags, (tag, name)
        if "_af" in tag:  # what base_train will make of the flags
            args = parse_args(study.COMMON + flags)
            assert (args.router, args.aux_free_bias, args.balance_loss_coeff) == ("sigmoid", 0.01, 0.0), tag


@pytest.mark.parametrize("f,tag", [(5e12, "5e12"), (2.5e12, "2.5e12"), (1e13, "1e13"), (5.5e13, "5.5e13")])
def test_flops_tags(f, tag):
    assert load_study().flops_tag(f) == tag


def test_result_line_counts_tokens_per_non_embedding_parameter():
    study = load_study()
    flags = study.SMALL + ["--target-flops", "1e13"]
    header = dict(params=dict(wte=1024 * 64, lm_head=1024 * 64))
    summary = dict(flops=1e13, tokens=7_258_112, epochs=0.19, final_val_bpb=2.7, tok_per_sec=3e4, total=229_376,
                   active_total=229_376, wall_time=1.0)
    line = study.result_line("s_dense_1e13", flags, header, summary, None)
    # width 64, vocab 1024: 2 x 1024 x 64 embedding + head; 2 layers x 12 d^2 = 98,304 non-embedding
    assert line["tokens_per_active_nonembedding_param"] == pytest.approx(7_258_112 / 98_304)
    assert line["load_cv"] is None


def test_nanochat_study_runs_parse_and_pair_by_seed():
    study = load_study()
    runs = study.nanochat_runs(["ve"])
    tags = [t for t, _ in runs]
    assert len(tags) == len(set(tags))
    for seed in study.ABLATION_SEEDS:  # every piece, the set and the baseline on each seed
        assert {f"a_{n}_2e13_seed{seed}" for n in [*study.PIECES, "set", "base"]} <= set(tags)
    for tag, flags in runs:
        args = parse_args(study.COMMON + flags)
        assert args.depth == 4 and args.n_embd == 64 and args.target_flops > 0, tag
        if tag.startswith("n_"):
            assert args.value_embeds, tag  # the adopted pieces reach the dense-vs-MoE runs


def test_adoption_rule_by_hand():
    study = load_study()
    # gains 0.010, 0.012, 0.014: mean 0.012, sd 0.002, SE 0.002/sqrt(3) = 0.001155 -> 2 SE = 0.00231 < 0.012
    mean, se, verdict = study.adoption([0.010, 0.012, 0.014])
    assert mean == pytest.approx(0.012) and se == pytest.approx(0.002 / 3 ** 0.5) and verdict == "adopt"
    # gains 0.001, 0.030, 0.002: mean 0.011, sd 0.01646, SE 0.0095 -> 2 SE = 0.019 > 0.011
    assert study.adoption([0.001, 0.030, 0.002])[2] == "no (mean <= 2 SE)"
    # (0, x, x): the mean 2x/3 is exactly 2 SE, so one gain <= 0 settles it
    mean, se, _ = study.adoption([1e-9, 0.02, 0.02])
    assert mean == pytest.approx(2 * se, rel=1e-6)
    assert study.adoption([-0.001, 0.05, 0.05])[2] == "no (lost on a seed)"
    assert study.adoption([0.01])[2] == "pending (fewer than 3 seeds)"
