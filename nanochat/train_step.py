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

plus the schedules base_train feeds it (nanochat's trapezoid LR, Muon's momentum warm-up).
"""

from contextlib import nullcontext

import torch

from nanochat.optim import Muon


def get_lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, linear warmdown to final_lr_frac (nanochat's trapezoid)."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress * 1.0 + (1 - progress) * final_lr_frac


def get_muon_momentum(step):
    """Muon's momentum, 0.85 -> 0.95 over the first 300 steps (nanochat)."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


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


def optimizer_step(model, optimizers, lr_multiplier=1.0, muon_momentum=None, sync_grads=None, after_update=None):
    """sync_grads() (the gradients every rank must agree on), every param group's lr =
    initial_lr x lr_multiplier, Muon's momentum (when given), each optimizer's step (Muon's
    pre-step hook: idle experts stay, the aux-free bias and MoD thresholds move), then
    after_update() and the gradients are freed."""
    if sync_grads is not None:
        sync_grads()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if muon_momentum is not None and isinstance(opt, Muon):
                group["momentum"] = muon_momentum
    for opt in optimizers:
        opt.step()
    if after_update is not None:
        after_update()
    model.zero_grad(set_to_none=True)


def train_step(model, forward, optimizers, next_batch, grad_accum, autocast=nullcontext(), lr_multiplier=1.0,
               muon_momentum=None, sync_grads=None, after_update=None):
    """One optimizer step: accumulate_gradients, then optimizer_step. Returns the step's mean
    logged losses (a device tensor, this rank's)."""
    losses = accumulate_gradients(model, forward, next_batch, grad_accum, autocast)
    optimizer_step(model, optimizers, lr_multiplier, muon_momentum, sync_grads, after_update)
    return losses
