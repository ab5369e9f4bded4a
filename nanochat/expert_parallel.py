"""
Expert parallelism (GShard, Lepikhin et al. 2020; torchtitan's "EP"): the experts of every MoE
layer are split over the N ranks of an EP group (consecutive ranks; N divides the world). Every
rank reads its own data and routes its own tokens with the replicated router; the MoE's expert
seam (MoE.run_experts, expert_path "expert_parallel") runs `exchange_experts`:

    1. each rank's assignments are already sorted by (global) expert; the per-expert counts go
       to every rank first (all_to_all of N x E/N counts), so each knows what it will receive
    2. the rows go to the rank holding their expert (all_to_all_single, uneven splits: dropless
       routing keeps working, no capacity needed)
    3. the received rows (ordered by source rank, then expert) are regrouped by local expert,
       the local experts run (the same grouped GEMM as one process), the rows are put back
    4. the results return the same way (reverse splits); combine as usual

The exchange is differentiable (torch.distributed.nn.functional.all_to_all_single), so a local
expert's gradient sums the contributions of every token routed to it from any rank of its EP
group. Non-expert parameters are replicated and averaged over the world as in data
parallelism; an expert's gradient is summed over the ranks that hold the same experts (the
replica group, one rank per EP group) and divided by the world size, which makes the update
the one-process update with gradient accumulation over the same micro-batches (tested).

Each rank builds only its experts (gpt.build_model(expert_shard=...)). Checkpoints hold the full
experts (gathered to rank 0, one tensor at a time, to host memory), so a checkpoint is the same
file whatever the layout, and weights load into any layout (each rank reads its block); the
optimizer state is per rank, so a resume needs the same number of processes and EP size.
The exchange has host syncs (the split sizes) and data-dependent shapes, so under torch.compile
it is a graph break: it runs eager between the compiled graphs, whose shapes stay fixed (no
recompiles, tested). No FP8 seam and no capacity factor here (refused with a clear line by
base_train).
"""

import warnings

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

# torch 2.13 calls the differentiable all_to_all_single deprecated in favour of a private module
# (torch.distributed._functional_collectives); the public one works, so say it once, not per call
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_to_all_single is deprecated")

from nanochat.moe import moe_layers, expert_mlp, group_sizes, inverse_permutation, sort_keys


def ep_groups(world_size, ep_size, rank):
    """(EP group, replica group) of this rank. new_group is collective: every rank creates
    every group, in the same order."""
    ep_group = replica_group = None
    for first in range(0, world_size, ep_size):
        group = dist.new_group(list(range(first, first + ep_size)))
        if first <= rank < first + ep_size:
            ep_group = group
    for position in range(ep_size):
        ranks = list(range(position, world_size, ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            replica_group = group
    return ep_group, replica_group


@torch.compiler.disable  # host syncs and data-dependent shapes: a graph break under torch.compile, run eager
def exchange_experts(x_sorted, w_fc, w_proj, offsets, group, ep_size):
    """The expert seam under EP: x_sorted (M, d) this rank's assignments sorted by global
    expert, offsets (E,) their end offsets; w_fc/w_proj this rank's E/N experts. Returns the
    expert outputs for x_sorted's rows, in x_sorted's order."""
    n_local, d = w_fc.size(0), x_sorted.size(1)
    counts = group_sizes(offsets)                                # (E,) rows per global expert
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)    # equal splits: E/N counts per rank
    recv_counts = recv_counts.view(ep_size, n_local)             # [source rank, local expert]
    # one host sync per layer: the split sizes are data (rows go out and come back in x_sorted's
    # dtype, bf16 under autocast: the MoE gathers in the experts' dtype)
    send_splits, recv_splits = torch.stack([counts.view(ep_size, n_local).sum(dim=1), recv_counts.sum(dim=1)]).tolist()
    n_recv = sum(recv_splits)
    x_recv = all_to_all_single(x_sorted.new_empty(n_recv, d), x_sorted, recv_splits, send_splits, group=group)
    # rows arrive by source, then expert: a stable sort by local expert groups them
    local_expert = torch.repeat_interleave(torch.arange(n_local, device=x_sorted.device).repeat(ep_size),
                                           recv_counts.flatten(), output_size=n_recv)  # known: no second sync
    order = torch.argsort(sort_keys(local_expert, n_local), stable=True)
    local_offsets = torch.cumsum(recv_counts.sum(dim=0), dim=0).to(torch.int32)
    y_local = expert_mlp(x_recv.index_select(0, order), w_fc, w_proj, local_offsets)
    y_recv = y_local.index_select(0, inverse_permutation(order))
    return all_to_all_single(y_recv.new_empty(x_sorted.size(0), d), y_recv, send_splits, recv_splits, group=group)


def enable_expert_parallel(model, ep_size, ep_group):
    """Route the expert computation of every MoE layer through the exchange. The model was
    built with only this rank's experts (gpt.build_model(expert_shard=...)); call before the
    optimizers are built. Returns the local expert parameters."""
    local = []
    for m in moe_layers(model):
        assert m.local_experts is not None and m.w_fc.size(0) * ep_size == m.n_experts, \
            "build the model with build_model(config, device, expert_shard=(ep_rank, ep_size))"
        m.expert_path, m.ep_group, m.ep_size = "expert_parallel", ep_group, ep_size
        local += [m.w_fc, m.w_proj]
    return local


def sync_expert_grads(local_params, replica_group, world_size):
    """Expert gradients: summed over the ranks holding the same experts, divided by the world
    size (their tokens came from every rank of the EP group already, through the exchange)."""
    for p in local_params:
        if p.grad is None:
            continue
        if dist.get_world_size(replica_group) > 1:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=replica_group)
        p.grad.div_(world_size)


def full_state_dict(model, ep_size, ep_group, rank):
    """The model's state dict with every MoE layer's experts gathered (the layout-free
    checkpoint), for rank 0, which writes it; None on the other ranks. Every rank calls it;
    only the EP group of rank 0 (ranks 0..N-1) takes part, the other groups hold replicas.
    One tensor at a time, straight to host memory: no device ever holds every expert."""
    if rank >= ep_size:
        return None
    state = {k: v.detach() for k, v in model.state_dict().items()} if rank == 0 else None
    for name, m in model.named_modules():
        if getattr(m, "local_experts", None) is None:
            continue
        for pname in ("w_fc", "w_proj"):
            local = getattr(m, pname).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(ep_size)] if rank == 0 else None
            dist.gather(local, parts, dst=0, group=ep_group)
            if rank == 0:
                state[f"{name}.{pname}"] = torch.cat([p.cpu() for p in parts], dim=0)
    return state


def local_expert_slices(model):
    """{checkpoint name: this rank's block} for every sliced expert tensor (load_checkpoint's
    slices: a rank reads only its experts from a full checkpoint)."""
    return {f"{name}.{p}": m.local_experts for name, m in model.named_modules()
            if getattr(m, "local_experts", None) is not None for p in ("w_fc", "w_proj")}
