"""nanochat's training recipe (nanochat/optim.py, nanochat/train_step.py): each optimizer piece
against a hand computation on a small matrix (Polar Express, MuonEq, Muon+, NorMuon, cautious
weight decay), the schedules against hand values, the AdamW groups per role, the defaults
bit for bit today's Muon, and idle experts untouched with every piece on."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from nanochat.gpt import GPTConfig, build_model
from nanochat.moe import moe_layers
from nanochat.optim import (Muon, setup_optimizers, zeropower_via_newtonschulz5, zeropower_via_polar_express,
                            equilibrate_rows, renormalize, normuon_scale, ADAMW_GROUPS)
from nanochat.train_step import optimizer_step, get_lr_multiplier, get_muon_momentum, get_muon_weight_decay
from tests.test_base_train import TINY, MOE, run_train, read_metrics, of_type
from tests.test_optim import idle_moe_model, force_idle, train_step as moe_step, expert_weights, stacked_and_single_muon
from tests.plain import PLAIN

ALL_ON = dict(coeffs="polar", row_equil=True, renorm=True, normuon=True, weight_decay=0.3, cautious_wd=True)

# ---------------------------------------------------------------------------------------------
# Polar Express: on a diagonal matrix the iteration acts on each singular value alone,
# s -> a s + b s^3 + c s^5 with step i's (a, b, c), after scaling by 1 / (1.01 ||G||_F + 1e-6)


def polar_by_hand(s, steps):
    coeffs = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
    for a, b, c in coeffs[:steps]:
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_polar_express_iteration_by_hand(steps):
    G = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]], dtype=torch.float64)  # ||G||_F = 5
    X = zeropower_via_polar_express(G, steps=steps)
    scale = 5 * 1.01 + 1e-6
    expected = torch.tensor([[polar_by_hand(3 / scale, steps), 0, 0], [0, polar_by_hand(4 / scale, steps), 0]],
                            dtype=torch.float64)
    torch.testing.assert_close(X, expected, rtol=1e-5, atol=1e-6)  # (computed in fp32 on CPU)
    torch.testing.assert_close(zeropower_via_polar_express(G.T, steps=steps), expected.T, rtol=1e-5, atol=1e-6)  # tall


def test_polar_express_is_per_expert_and_orthogonalises():
    torch.manual_seed(0)
    G = torch.randn(3, 32, 16) @ torch.diag(torch.logspace(-1, 1, 16))
    G[1] *= 1000.0
    batched = zeropower_via_polar_express(G)
    for e in range(3):
        torch.testing.assert_close(batched[e], zeropower_via_polar_express(G[e]), rtol=1e-5, atol=1e-6)
        s = torch.linalg.svdvals(batched[e])
        assert s.min() > 0.6 and s.max() < 1.2  # condition number ~100 in, ~1 out


def test_quintic_stays_the_default_coefficients():
    G = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    X = zeropower_via_newtonschulz5(G, steps=1)
    s = torch.tensor([3.0, 4.0]) / (5 + 1e-7)
    torch.testing.assert_close(torch.diagonal(X), 3.4445 * s - 4.7750 * s**3 + 2.0315 * s**5)


# ---------------------------------------------------------------------------------------------
# MuonEq and Muon+

def test_muoneq_gives_every_row_the_rms_row_norm():
    G = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # row norms 5 and 1, ||G||_F = sqrt(26)
    target = math.sqrt(26) / math.sqrt(2)
    torch.testing.assert_close(equilibrate_rows(G), torch.tensor([[3 * target / 5, 4 * target / 5], [0.0, target]]))
    stacked = torch.stack([G, 10 * G])  # per expert matrix
    torch.testing.assert_close(equilibrate_rows(stacked)[1], 10 * equilibrate_rows(G))


def test_muon_plus_snaps_the_norm_to_sqrt_min_dim():
    U = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # norm 5, min(m, n) = 2
    torch.testing.assert_close(renormalize(U), U * math.sqrt(2) / 5)


# ---------------------------------------------------------------------------------------------
# NorMuon: a tall 4x3 matrix has one statistic per row

U_TALL = torch.tensor([[1.0, 1.0, 1.0],     # mean square 1
                       [2.0, 2.0, 2.0],     # 4
                       [0.0, 0.0, 3.0],     # 3
                       [1.0, -1.0, 1.0]])   # 1


def test_normuon_first_step_by_hand():
    """From a zero buffer, v = (1 - 0.9) x row mean squares = [0.1, 0.4, 0.3, 0.1]; dividing
    each row by sqrt(v) makes every row's mean square 10, so the rescale back to the update's
    norm sqrt(27) (sum of squares 3 + 12 + 9 + 3) makes each row's RMS sqrt(27 / 12) = 1.5."""
    out, v = normuon_scale(U_TALL, torch.zeros(4, 1), beta2=0.9)
    torch.testing.assert_close(v, torch.tensor([[0.1], [0.4], [0.3], [0.1]]))
    expected = torch.tensor([[1.5, 1.5, 1.5], [1.5, 1.5, 1.5], [0.0, 0.0, 1.5 * math.sqrt(3)], [1.5, -1.5, 1.5]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(), U_TALL.norm())  # the step size is kept


def test_normuon_second_step_by_hand():
    """Then an all-ones update (every row mean square 1): v = 0.9 v + 0.1 = [0.19, 0.46, 0.37,
    0.19]; row i is scaled by v_i^-1/2, then all by sqrt(12) / sqrt(3 sum_i 1 / v_i)."""
    _, v = normuon_scale(U_TALL, torch.zeros(4, 1), beta2=0.9)
    out, v = normuon_scale(torch.ones(4, 3), v, beta2=0.9)
    v_hand = [0.19, 0.46, 0.37, 0.19]
    torch.testing.assert_close(v, torch.tensor(v_hand).view(4, 1))
    norm_scale = math.sqrt(12) / math.sqrt(3 * sum(1 / x for x in v_hand))
    torch.testing.assert_close(out, torch.tensor([[norm_scale / math.sqrt(x)] * 3 for x in v_hand]))


def test_normuon_wide_matrix_has_one_statistic_per_column_and_stacks_per_expert():
    wide_out, wide_v = normuon_scale(U_TALL.T, torch.zeros(1, 4), beta2=0.9)  # 3x4: columns
    tall_out, tall_v = normuon_scale(U_TALL, torch.zeros(4, 1), beta2=0.9)
    torch.testing.assert_close(wide_out, tall_out.T)
    torch.testing.assert_close(wide_v, tall_v.T)
    stacked, v = normuon_scale(torch.stack([U_TALL, 5 * U_TALL.flip(0)]), torch.zeros(2, 4, 1), beta2=0.9)
    torch.testing.assert_close(stacked[0], tall_out)  # expert 1's 5x rows do not change expert 0's scales
    torch.testing.assert_close(stacked[1], normuon_scale(5 * U_TALL.flip(0), torch.zeros(4, 1), 0.9)[0])


# ---------------------------------------------------------------------------------------------
# Cautious weight decay: p -= lr (update + wd p mask), mask = (update * p >= 0)

def test_cautious_mask_by_hand():
    """momentum 0 and no Nesterov: the update is the orthogonalised gradient. For a gradient
    that is already orthogonal, Q = [[1, 1], [-1, 1]] / sqrt(2), the update is s Q (s > 0), so
    its signs are Q's: against p = [[1, -2], [3, 4]] the mask is [[1, 0], [0, 1]]."""
    p0 = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    Q = torch.tensor([[1.0, 1.0], [-1.0, 1.0]]) / math.sqrt(2)
    lr, wd = 0.1, 0.5
    results = {}
    for name, kw in (("plain", {}), ("cautious", dict(weight_decay=wd, cautious_wd=True)),
                     ("decay", dict(weight_decay=wd))):
        p = torch.nn.Parameter(p0.clone())
        p.grad = Q.clone()
        Muon([p], lr=lr, momentum=0.0, nesterov=False, **kw).step()
        results[name] = p.detach()
    update = (p0 - results["plain"]) / lr
    assert (torch.sign(update) == torch.sign(Q)).all()
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(results["cautious"], p0 - lr * update - lr * wd * p0 * mask)
    torch.testing.assert_close(results["decay"], p0 - lr * update - lr * wd * p0)


def test_decay_uses_the_tall_matrix_lr_scale():
    """nanochat decays at the update's lr, the aspect-ratio scale included: lr x sqrt(4/2)."""
    p0 = torch.ones(4, 2)
    p = torch.nn.Parameter(p0.clone())
    p.grad = torch.zeros(4, 2)  # zero update: every entry agrees (0 >= 0), decay alone moves p
    Muon([p], lr=0.1, weight_decay=0.5, cautious_wd=True).step()
    torch.testing.assert_close(p.detach(), p0 * (1 - 0.1 * math.sqrt(2) * 0.5))


# ---------------------------------------------------------------------------------------------
# Schedules against hand values

def test_lr_warmup_in_steps_and_nanochat_warmdown():
    lrm = lambda s: get_lr_multiplier(s, 1000, 0.0, 0.65, 0.05, warmup_steps=40)
    assert lrm(0) == 1 / 40 and lrm(39) == 1.0 and lrm(350) == 1.0  # warm-down starts after step 350
    assert lrm(675) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lrm(999) == pytest.approx(1 / 650 + 649 / 650 * 0.05)
    assert get_lr_multiplier(10, 100, 0.2, 0.2, 0.0) == get_lr_multiplier(10, 100, 0.2, 0.2, 0.0, None) == 11 / 20


def test_muon_momentum_schedules():
    assert [get_muon_momentum(s) for s in (0, 150, 300, 5000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    m = lambda s: get_muon_momentum(s, "nanochat", 2000, 0.65)  # warm-down 1300 steps from step 700
    assert [m(0), m(200), m(400), m(700)] == pytest.approx([0.85, 0.91, 0.97, 0.97])
    assert m(1350) == pytest.approx(0.935)
    assert m(1999) == pytest.approx(0.97 / 1300 + 0.90 * 1299 / 1300)
    assert get_muon_momentum(350, "nanochat", 1000, 0.65) == pytest.approx(0.85 + 350 / 400 * 0.12)  # warm-up wins


def test_muon_weight_decay_schedules():
    assert get_muon_weight_decay(7, 100, 0.28) == 0.28
    cos = lambda s: get_muon_weight_decay(s, 100, 0.28, "cosine")
    assert [cos(0), cos(50), cos(100)] == pytest.approx([0.28, 0.14, 0.0])
    assert cos(25) == pytest.approx(0.28 * 0.5 * (1 + math.sqrt(0.5)))


# ---------------------------------------------------------------------------------------------
# Defaults: today's optimizers bit for bit

def reference_muon_step(params, state, lr, momentum):
    """Muon before the recipe options, written out: Nesterov momentum, quintic Newton-Schulz,
    the tall-matrix scale."""
    for p in params:
        buf = state.setdefault(p, torch.zeros_like(p))
        buf.lerp_(p.grad, 1 - momentum)
        g = p.grad.lerp(buf, momentum)
        p.data.add_(zeropower_via_newtonschulz5(g), alpha=-lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)


def test_default_setup_equals_todays_optimizers_bit_for_bit():
    torch.manual_seed(0)
    # the optimizers' defaults on the plain model (its only AdamW roles: lm_head and embedding)
    cfg = GPTConfig(**PLAIN, sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, mtp_heads=1)
    a = build_model(cfg, "cpu")
    b = copy.deepcopy(a)
    optimizers = setup_optimizers(a, weight_decay=0.01)
    roles = b.param_roles()
    s = (32 / 768) ** -0.5
    ref_adam = torch.optim.AdamW([dict(params=roles["lm_head"], lr=0.004 * s), dict(params=roles["embedding"], lr=0.2 * s)],
                                 betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01)
    for group in ref_adam.param_groups:
        group["initial_lr"] = group["lr"]
    ref_state = {}
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randint(0, 128, (2, 16), generator=g)
        for model in (a, b):
            loss, aux = model(x, x)
            model.training_loss(loss, aux).backward()
        momentum = get_muon_momentum(step)
        optimizer_step(a, optimizers, lr_multiplier=0.5, muon_momentum=momentum, muon_weight_decay=0.0)
        for group in ref_adam.param_groups:
            group["lr"] = group["initial_lr"] * 0.5
        ref_adam.step()
        reference_muon_step(roles["matrix"], ref_state, 0.02 * 0.5, momentum)
        b.zero_grad(set_to_none=True)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------
# Experts: per expert matrix, and idle experts untouched with every piece on

def test_stacked_experts_equal_each_expert_alone_with_every_piece_on():
    stacked, singles, opt_a, opt_b = stacked_and_single_muon(big_expert=100.0, **ALL_ON)
    for e in range(3):
        torch.testing.assert_close(stacked[e], singles[e], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt_a.state[stacked]["second_momentum_buffer"][e],
                                   opt_b.state[singles[e]]["second_momentum_buffer"])
    assert opt_a.state[stacked]["second_momentum_buffer"].shape == (3, 8, 1)


def test_idle_expert_untouched_with_normuon_and_cautious_decay():
    model = idle_moe_model()
    adamw, muon = setup_optimizers(model, muon_coeffs="polar", muon_row_equil=True, muon_renorm=True, normuon=True,
                                   muon_weight_decay=0.5, cautious_wd=True)
    g = torch.Generator().manual_seed(1)
    batch = lambda: [torch.randint(0, 128, (4, 16), generator=g) for _ in range(2)]
    for _ in range(3):
        moe_step(model, adamw, muon, batch())
    force_idle(model, 3)
    idle_before, busy_before = expert_weights(model, 3), expert_weights(model, 0)
    v_before = [muon.state[m.w_proj]["second_momentum_buffer"].clone() for m in moe_layers(model)]
    for _ in range(3):
        loads = moe_step(model, adamw, muon, batch())
        assert (loads[:, 3] == 0).all()
    for a, b in zip(expert_weights(model, 3), idle_before):
        assert torch.equal(a, b)  # no update, no decay
    assert all(not torch.equal(a, b) for a, b in zip(expert_weights(model, 0), busy_before))
    for m, v in zip(moe_layers(model), v_before):
        v_now = muon.state[m.w_proj]["second_momentum_buffer"]
        assert torch.equal(v_now[3], v[3])  # the idle expert's statistics are kept as they were
        assert not torch.equal(v_now[0], v[0])


# ---------------------------------------------------------------------------------------------
# AdamW groups per role, from a table; roles the model lacks get no group

class RolesModel(torch.nn.Module):
    """A stand-in with nanochat's parameter roles (and no Mamba, router or conv roles at all)."""

    def __init__(self, n_embd=1536):
        super().__init__()
        self.config = GPTConfig(n_embd=n_embd)
        self.wte, self.head = torch.nn.Parameter(torch.zeros(8, 4)), torch.nn.Parameter(torch.zeros(8, 4))
        self.w, self.ve = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(8, 4))
        self.resid, self.x0 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))
        self.smear_gate, self.smear, self.backout = (torch.nn.Parameter(torch.zeros(1, 24)),
                                                     torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1)))

    def param_roles(self):
        return dict(embedding=[self.wte], lm_head=[self.head], matrix=[self.w], router=[], value_embedding=[self.ve],
                    resid_lambdas=[self.resid], x0_lambdas=[self.x0],
                    smear_backout=[self.smear_gate, self.smear, self.backout])


def test_nanochat_adamw_groups():
    model = RolesModel(n_embd=1536)  # d = 2 x 768: the AdamW lrs of embeddings and head x 1/sqrt(2)
    adamw, muon = setup_optimizers(model, embedding_lr=0.3, unembedding_lr=0.008, lambda_lr=0.5, adamw_groups="nanochat")
    groups = {g["role"]: g for g in adamw.param_groups}
    assert list(groups) == ["lm_head", "embedding", "value_embedding", "resid_lambdas", "x0_lambdas", "smear_backout"]
    r = 2 ** -0.5
    expected = dict(lm_head=(0.008 * r, (0.8, 0.96), 0.01), embedding=(0.3 * r, (0.8, 0.995), 0.001),
                    value_embedding=(0.15 * r, (0.8, 0.995), 0.01), resid_lambdas=(0.005, (0.8, 0.95), 0.05),
                    x0_lambdas=(0.5, (0.96, 0.95), 0.0), smear_backout=(0.2, (0.8, 0.95), 0.0))
    for role, (lr, betas, wd) in expected.items():
        g = groups[role]
        assert g["lr"] == pytest.approx(lr) and g["initial_lr"] == g["lr"], role
        assert g["betas"] == betas and g["weight_decay"] == wd and g["eps"] == 1e-10, role
    assert len(groups["smear_backout"]["params"]) == 3
    ids = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each in exactly one optimizer
    # default: today's betas and weight decay for embedding and head, the new roles as nanochat's
    adamw, _ = setup_optimizers(model, weight_decay=0.02)
    groups = {g["role"]: g for g in adamw.param_groups}
    assert groups["embedding"]["betas"] == (0.8, 0.95) and groups["embedding"]["weight_decay"] == 0.02
    assert groups["x0_lambdas"]["betas"] == (0.96, 0.95) and groups["x0_lambdas"]["lr"] == 0.5


def test_a_role_without_settings_is_refused():
    model = RolesModel()
    roles = model.param_roles()
    model.param_roles = lambda: {**roles, "mystery": [model.x0], "x0_lambdas": []}
    with pytest.raises(AssertionError, match="mystery"):
        setup_optimizers(model)
    assert set(ADAMW_GROUPS["default"]) == set(ADAMW_GROUPS["nanochat"])


def test_a_muon_state_saved_before_the_options_loads_and_steps():
    """Checkpoints written before these options have Muon groups without their keys."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    old = Muon([p], lr=0.1)
    p.grad = torch.randn(8, 4)
    old.step()
    state = old.state_dict()
    for group in state["param_groups"]:
        for key in ("coeffs", "row_equil", "renorm", "normuon", "beta2", "weight_decay", "cautious_wd"):
            del group[key]
    new = Muon([p], lr=0.1)
    new.load_state_dict(state)
    assert new.param_groups[0]["coeffs"] == "quintic" and new.param_groups[0]["weight_decay"] == 0.0
    new.step()


# ---------------------------------------------------------------------------------------------
# base_train end to end: recipe flags default to today's, the preset holds nanochat's values

RECIPE = ["--adamw-groups", "nanochat", "--muon-coeffs", "polar", "--muon-eq", "--muon-plus", "--normuon",
          "--muon-weight-decay", "0.28", "--cautious-wd", "--muon-wd-schedule", "cosine", "--warmup-steps", "2",
          "--warmdown-ratio", "0.65", "--final-lr-frac", "0.05", "--muon-momentum-schedule", "nanochat"]


def test_recipe_flags_default_to_todays_training():
    from scripts.base_train import parse_args
    args = parse_args([])
    assert (args.adamw_groups, args.muon_coeffs, args.muon_eq, args.muon_plus, args.normuon) == \
        ("default", "quintic", False, False, False)
    assert (args.muon_weight_decay, args.cautious_wd, args.muon_wd_schedule) == (0.0, False, "constant")
    assert (args.warmup_steps, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac) == (None, 0.0, 0.2, 0.0)
    assert (args.muon_momentum_schedule, args.weight_decay) == ("default", 0.0)
    assert (args.embedding_lr, args.unembedding_lr, args.matrix_lr) == (0.2, 0.004, 0.02)


def test_nanochat_recipe_preset_as_defaults_explicit_flags_win():
    from nanochat.model_args import apply_preset_defaults
    from scripts.base_train import build_parser, RECIPE_PRESETS
    preset = RECIPE_PRESETS["nanochat"]
    args = apply_preset_defaults(build_parser(), preset).parse_args([])
    assert all(getattr(args, k) == v for k, v in preset.items())
    assert (args.muon_coeffs, args.normuon, args.cautious_wd, args.muon_weight_decay) == ("polar", True, True, 0.28)
    assert (args.warmup_steps, args.warmdown_ratio, args.final_lr_frac) == (40, 0.65, 0.05)
    assert (args.embedding_lr, args.unembedding_lr, args.matrix_lr, args.lambda_lr) == (0.3, 0.008, 0.02, 0.5)
    args = apply_preset_defaults(build_parser(), preset).parse_args(["--muon-coeffs", "quintic", "--warmup-steps", "5"])
    assert (args.muon_coeffs, args.warmup_steps, args.normuon) == ("quintic", 5, True)
    with pytest.raises(AssertionError, match="not flags"):
        apply_preset_defaults(build_parser(), {"no_such_flag": 1})


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_cast_weights_models_train_without_autocast():
    from types import SimpleNamespace
    from contextlib import nullcontext
    from scripts.base_train import training_autocast
    assert isinstance(training_autocast("cuda", SimpleNamespace(cast_weights=True)), nullcontext)
    assert isinstance(training_autocast("cpu", SimpleNamespace()), nullcontext)
    assert isinstance(training_autocast("cuda", SimpleNamespace()), torch.amp.autocast)


def test_nanochat_recipe_trains_and_resumes_exactly(base_dir):
    """Every recipe flag on, an MoE: the NorMuon second moments and the schedules survive a
    checkpoint, so resuming from step 3 gives the uninterrupted run's losses and weights."""
    tag = "recipe_resume"
    args = TINY + MOE + RECIPE + ["--num-iterations", "6", "--eval-every", "-1", "--save-every", "3", "--model-tag", tag]
    p = run_train(base_dir, args)
    assert "Polar Express, MuonEq, Muon+, NorMuon, cautious wd 0.28" in p.stdout and "nanochat groups" in p.stdout
    ckpts = base_dir / "runs" / tag / "checkpoints"
    full = of_type(read_metrics(base_dir, tag), "train")
    full_weights = load_file(str(ckpts / "step_000006" / "model.safetensors"))
    assert full[-1]["train_loss"] < full[0]["train_loss"]
    assert [r["lr_mult"] for r in full][:2] == [0.5, 1.0]  # --warmup-steps 2
    run_train(base_dir, args + ["--resume-from-step", "3"])
    resumed = of_type(read_metrics(base_dir, tag), "train")
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]
    resumed_weights = load_file(str(ckpts / "step_000006" / "model.safetensors"))
    assert all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_nanochat_recipe_sharded_over_2_processes_matches_one(base_dir):
    """ZeRO-1 with the recipe's extra state (NorMuon's second moments live with their owner)."""
    args = TINY + MOE + RECIPE + ["--total-batch-size", "1024", "--num-iterations", "4", "--eval-every", "-1"]
    losses = {}
    for n in (1, 2):
        run_train(base_dir, args + ["--model-tag", f"recipe_zero{n}"], nproc=n)
        losses[n] = [r["train_loss"] for r in of_type(read_metrics(base_dir, f"recipe_zero{n}"), "train")]
    assert len(losses[2]) == 4 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(losses[1], losses[2])), losses


def test_preset_nanochat_sets_the_model_and_the_recipe_and_given_flags_win(base_dir):
    """--preset nanochat: nanochat's model (model_args.MODEL_PRESETS) and training recipe
    (RECIPE_PRESETS) as defaults; a flag on the command line wins; without it, nothing changes.
    And an MoE with the whole preset trains (3 steps, finite and falling loss)."""
    from nanochat.gpt import GPTConfig
    from scripts.base_train import parse_args, resolve_config, explicit_flags
    argv = ["--preset", "nanochat", "--depth", "4", "--qk-scale", "1.0", "--warmup-steps", "5"]
    args = parse_args(argv)
    cfg = resolve_config(args, explicit_flags(argv))
    assert (cfg.value_embeds, cfg.layer_lambdas, cfg.smear, cfg.backout) == (True, True, True, True)
    assert cfg.window_pattern == "SSSL" and cfg.rotary_base == 100000.0 and cfg.vocab_pad == 64
    assert cfg.qk_scale == 1.0 and cfg.n_embd // cfg.n_head == 128  # given wins; nanochat's head dim
    assert args.muon_coeffs == "polar" and args.normuon and args.cautious_wd and args.warmup_steps == 5
    plain = parse_args(["--depth", "4"])
    assert resolve_config(plain, explicit_flags(["--depth", "4"])) == GPTConfig(vocab_size=plain.vocab_size, n_layer=4,
                                                                                n_embd=256, n_head=4, n_kv_head=4)
    assert plain.muon_coeffs == "quintic" and not plain.normuon
    tag = "preset_nanochat"
    run_train(base_dir, TINY + MOE + ["--preset", "nanochat", "--num-iterations", "3", "--eval-every", "-1",
                                      "--model-tag", tag])
    records = read_metrics(base_dir, tag)
    assert records[0]["config"]["value_embeds"] and records[0]["config"]["use_moe"]
    losses = [r["train_loss"] for r in of_type(records, "train")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
