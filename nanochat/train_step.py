"""
One training step, the one base_train runs and the benchmarks time (bench_step, bench_moe):

    accumulate_gradients   grad_accum micro-batches: forward, GPT.training_loss (the loss terms
                           with the config's coefficients), backward
    optimizer_step         the caller's gradient sync (data parallel, sharded, expert parallel),
                           the LR multiplier and Muon momentum, every optimizer's step (Muon's
                           pre-step hook does the MoE/MoD bookkeeping, optim.step_bookkeeping),
                           the caller's after-update (sharded: parameters from their owners),
                           gradients freed
    train_step             both, in that order

plus the schedules base_train feeds it (nanochat's trapezoid LR, Muon's momentum and weight decay),
base_train's optimizer flags (add_optimizer_args) and the named recipes (RECIPE_PRESETS, which
`--preset` applies as defaults with model_args.MODEL_PRESETS).
"""

import math
from contextlib import nullcontext

import torch

from nanochat.optim import Muon, ADAMW_GROUPS, MUON_COEFFS


def get_lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac, warmup_steps=None):
    """Linear warmup, constant, linear warmdown to final_lr_frac (nanochat's trapezoid). The
    warm-up is warmup_steps steps when given (nanochat's --warmup-steps), else a fraction of
    the run; where warm-up and warm-down overlap, the warm-up wins."""
    warmup = warmup_steps if warmup_steps is not None else round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress * 1.0 + (1 - progress) * final_lr_frac


MUON_MOMENTUM_SCHEDULES = ("default", "nanochat")


def get_muon_momentum(step, schedule="default", num_iterations=None, warmdown_ratio=None):
    """Muon's momentum. default: 0.85 -> 0.95 over the first 300 steps. nanochat: 0.85 -> 0.97
    over the first 400 steps, held, then down to 0.90 linearly over the LR warm-down (less
    averaging while the LR anneals: the last steps follow the newest gradients); the warm-up
    wins where the two overlap."""
    if schedule == "default":
        frac = min(step / 300, 1)
        return (1 - frac) * 0.85 + frac * 0.95
    assert schedule == "nanochat", f"unknown Muon momentum schedule {schedule!r}"
    warmdown = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown
    if step < 400:
        frac = step / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if step >= warmdown_start:
        progress = (step - warmdown_start) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


MUON_WD_SCHEDULES = ("constant", "cosine")


def get_muon_weight_decay(step, num_iterations, weight_decay, schedule="constant"):
    """Muon's weight decay at this step: constant, or nanochat's cosine from weight_decay at
    step 0 to 0 at the end (strong decay early, none while the LR anneals)."""
    if schedule == "constant":
        return weight_decay
    assert schedule == "cosine", f"unknown Muon weight decay schedule {schedule!r}"
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_iterations))


def logged_losses(model, ce, aux):
    """One micro-batch's logged terms, detached, as one tensor (one host read per step):
    [cross-entropy, balance loss and z-loss per MoE layer (the means; the loss takes their
    sums), each MTP head's loss, each MoD block's (causal rule's fraction, its agreement with
    the top-k)]."""
    n_moe = max(1, model.num_moe_layers())
    return torch.cat([torch.stack([ce.detach(), aux["balance_loss"].detach() / n_moe, aux["z_loss"].detach() / n_moe]),
                      aux["mtp_losses"].detach(), aux["mod_stats"].detach().flatten()])


def accumulate_gradients(model, forward, next_batch, grad_accum, autocast=nullcontext()):
    """grad_accum micro-batches from next_batch() -> (x, y): forward (`forward`: the model or
    its compiled wrapper), the training loss / grad_accum, backward. Returns the mean of
    logged_losses over the micro-batches (on the device, no host sync)."""
    sums = None
    for _ in range(grad_accum):
        x, y = next_batch()
        with autocast:
            ce, aux = forward(x, y)
        (model.training_loss(ce, aux) / grad_accum).backward()
        row = logged_losses(model, ce, aux)
        sums = row if sums is None else sums + row
    return sums / grad_accum


def optimizer_step(model, optimizers, lr_multiplier=1.0, muon_momentum=None, sync_grads=None, after_update=None,
                   muon_weight_decay=None):
    """sync_grads() (the gradients every rank must agree on), every param group's lr =
    initial_lr x lr_multiplier, Muon's momentum and weight decay (when given), each optimizer's step (Muon's
    pre-step hook: idle experts stay, the aux-free bias and MoD thresholds move), then
    after_update() and the gradients are freed."""
    if sync_grads is not None:
        sync_grads()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if muon_momentum is not None and isinstance(opt, Muon):
                group["momentum"] = muon_momentum
            if muon_weight_decay is not None and isinstance(opt, Muon):
                group["weight_decay"] = muon_weight_decay
    for opt in optimizers:
        opt.step()
    if after_update is not None:
        after_update()
    model.zero_grad(set_to_none=True)


def train_step(model, forward, optimizers, next_batch, grad_accum, autocast=nullcontext(), lr_multiplier=1.0,
               muon_momentum=None, sync_grads=None, after_update=None, muon_weight_decay=None):
    """One optimizer step: accumulate_gradients, then optimizer_step. Returns the step's mean
    logged losses (a device tensor, this rank's)."""
    losses = accumulate_gradients(model, forward, next_batch, grad_accum, autocast)
    optimizer_step(model, optimizers, lr_multiplier, muon_momentum, sync_grads, after_update, muon_weight_decay)
    return losses


# Training recipes: {name: {flag dest: value}}, applied as the parser's defaults (explicit flags
# win). "nanochat": its scripts/base_train.py and gpt.py setup_optimizer at 92d63d4 (the code,
# where its comments and dev/LOG.md disagree: NorMuon beta2 0.9, weight decay on a cosine).
# Its batch-size lr scaling and T_epoch weight-decay scaling are not here: at its reference batch
# (2**19 tokens, our default) and d12 horizon both are 1 (dev/LOG.md).
RECIPE_PRESETS = {
    "nanochat": dict(
        embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, lambda_lr=0.5, weight_decay=0.0,
        adamw_groups="nanochat", muon_coeffs="polar", muon_eq=True, muon_plus=True, normuon=True,
        muon_weight_decay=0.28, cautious_wd=True, muon_wd_schedule="cosine",
        warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05, muon_momentum_schedule="nanochat",
    ),
}


def add_optimizer_args(p):
    """base_train's optimizer and schedule flags (defaults: our recipe; RECIPE_PRESETS: others)."""
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr (attention, MLP, experts)")
    p.add_argument("--router-lr", type=float, default=0.004, help="AdamW lr of the MoE and MoD routers")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (--adamw-groups default)")
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help="fraction of the steps with a linear LR warm-up (default 0; 0.05 with --init-from: a fresh "
                        "optimizer at full LR on trained weights spikes)")
    p.add_argument("--warmup-steps", type=int, default=None, help="LR warm-up in steps (wins over --warmup-ratio)")
    p.add_argument("--warmdown-ratio", type=float, default=0.2)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    # nanochat's training recipe, piece by piece (all of it: RECIPE_PRESETS["nanochat"])
    p.add_argument("--adamw-groups", default="default", choices=sorted(ADAMW_GROUPS),
                   help="AdamW betas / eps / weight decay per parameter role (nanochat/optim.py ADAMW_GROUPS)")
    p.add_argument("--lambda-lr", type=float, default=0.5,
                   help="AdamW lr of x0_lambdas (resid_lambdas: 0.01x), nanochat's --scalar-lr")
    p.add_argument("--muon-coeffs", default="quintic", choices=MUON_COEFFS,
                   help="Muon's orthogonalisation: quintic Newton-Schulz, or Polar Express's per-step coefficients")
    p.add_argument("--muon-eq", action="store_true", help="MuonEq: equal row norms before Muon's orthogonalisation")
    p.add_argument("--muon-plus", action="store_true", help="Muon+: each update renormalised to sqrt(min(m, n))")
    p.add_argument("--normuon", action="store_true", help="NorMuon: per-neuron second-moment normalisation of Muon's update")
    p.add_argument("--muon-weight-decay", type=float, default=0.0, help="Muon's decoupled weight decay")
    p.add_argument("--cautious-wd", action="store_true",
                   help="Muon's weight decay only where update and weight have the same sign")
    p.add_argument("--muon-wd-schedule", default="constant", choices=MUON_WD_SCHEDULES,
                   help="Muon's weight decay over the run: constant, or cosine to 0 (nanochat)")
    p.add_argument("--muon-momentum-schedule", default="default", choices=MUON_MOMENTUM_SCHEDULES,
                   help="default: 0.85 -> 0.95 over 300 steps; nanochat: 0.85 -> 0.97 over 400, 0.90 at the end of the warm-down")
