"""
Bits per byte: the validation metric that does not depend on the tokenizer.

Cross-entropy in nats per token changes with the vocabulary (a bigger vocab has fewer,
harder tokens). Summing the loss over target tokens and dividing by ln(2) times the number of
UTF-8 bytes those tokens stand for gives bits per byte, comparable across tokenizers and with
the entropy floor of the built-in corpus. Special tokens (BOS, 0 bytes) are left out of both
sums: they mark document boundaries, they are not text.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, lockstep=False):
    """Mean bits per byte over `steps` batches of (x, y, state) from `batches`, summed over
    all ranks. token_bytes: (vocab,) int tensor on the model's device. lockstep: every rank
    stops as soon as one runs out of batches (expert parallelism: a forward is a collective,
    and ranks' shares of the validation data may differ by a batch)."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    for _ in range(steps):
        try:
            x, y, _ = next(batches)
        except StopIteration:
            x = None
        if lockstep:
            have = torch.tensor([0 if x is None else 1], device=token_bytes.device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if have.item() == 0:
                break
        if x is None:
            break
        loss, _ = model(x, y, loss_reduction="none")
        num_bytes = token_bytes[y]
        counted = num_bytes > 0
        total_nats += (loss * counted).sum().double()
        total_bytes += num_bytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
