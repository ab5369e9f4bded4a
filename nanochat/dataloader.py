"""
Tokenizing, BOS-aligned, packed, rank-sharded data loader with a resumable state.

Documents are tokenized one parquet row group at a time, each prefixed with BOS, and
concatenated into one stream that is cut into rows of T+1 tokens (no padding; a document may
continue into the next row). Rows are grouped into global batches of B rows, and global batch
j belongs to rank j % world_size. So a 2-rank run sees, at each optimizer step, exactly the
batches a 1-rank run with twice the gradient accumulation sees, which makes the two runs
comparable step for step. The price: every rank tokenizes the whole stream and skips the
batches of other ranks; tiktoken is fast enough that this is not the bottleneck.

State (a small JSON-able dict, yielded with every batch, meaning "everything up to and
including this batch has been consumed"):
    epoch, shard, row_group, offset  position in the stream where the next row starts
                                     (offset counts tokens into that row group)
    batch                            index of the next global batch
    epochs                           passes over the data so far, fractional (1.5 = a pass and
                                     a half): row groups weighted by their uncompressed bytes,
                                     the current one by its consumed fraction of tokens;
                                     informational (a restored loader recomputes it)
"""

import numpy as np
import pyarrow.parquet as pq
import torch


def _row_group_tokens(tokenizer, path, row_group):
    docs = pq.ParquetFile(path).read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    ids = tokenizer.encode(docs, prepend_bos=True)
    return np.fromiter((t for doc in ids for t in doc), dtype=np.int64) if ids else np.zeros(0, dtype=np.int64)


def _segments(tokenizer, shard_paths, state, loop):
    """Yield (position, tokens) for each row group from `state` on: position is
    (epoch, shard, row_group), tokens the flat BOS-prefixed token ids of that row group,
    with the first `state['offset']` tokens of the starting row group already dropped."""
    epoch, shard, row_group, offset = state["epoch"], state["shard"], state["row_group"], state["offset"]
    while True:
        while shard < len(shard_paths):
            n_groups = pq.ParquetFile(shard_paths[shard]).num_row_groups
            while row_group < n_groups:
                tokens = _row_group_tokens(tokenizer, shard_paths[shard], row_group)
                yield (epoch, shard, row_group), offset, tokens[offset:], len(tokens)
                offset = 0
                row_group += 1
            shard, row_group = shard + 1, 0
        if not loop:
            return
        epoch, shard = epoch + 1, 0


def _row_group_bytes(shard_paths):
    """{(shard, row_group): uncompressed bytes before it in the pass}, and the pass's total."""
    before, total = {}, 0
    for i, path in enumerate(shard_paths):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            before[i, g] = total
            total += meta.row_group(g).total_byte_size
    return before, max(total, 1)


def data_loader(tokenizer, shard_paths, B, T, *, rank=0, world_size=1, device="cpu", state=None, loop=True):
    """Yield (x, y, state) forever (loop=True, for training: epochs over the shards) or until
    the shards run out (loop=False, for evaluation). x, y: (B, T) int64 on `device`."""
    assert shard_paths, "no shards to read"
    state = dict(state) if state else dict(epoch=0, shard=0, row_group=0, offset=0, batch=0)
    row_len = T + 1
    segments = _segments(tokenizer, shard_paths, state, loop)
    # The buffer holds not-yet-consumed tokens; `spans` remembers which row group each piece
    # came from and at which offset it starts, so the state can name where the next row starts.
    buffer = np.zeros(0, dtype=np.int64)
    spans = []  # [position, start_offset_in_row_group, length, row group's total tokens]
    bytes_before, bytes_total = _row_group_bytes(shard_paths)

    def epochs_at(epoch, shard, row_group, offset, n_tokens):
        # past a shard's last row group: the next shard's first; past the last shard: a full pass
        done = bytes_before.get((shard, row_group), bytes_before.get((shard + 1, 0), bytes_total))
        if n_tokens:
            nxt = bytes_before.get((shard, row_group + 1), bytes_before.get((shard + 1, 0), bytes_total))
            done += (nxt - done) * offset / n_tokens
        return epoch + done / bytes_total

    batch_index = state["batch"]
    use_pin = torch.device(device).type == "cuda"
    while True:
        need = B * row_len
        while len(buffer) < need:
            try:
                position, offset, tokens, n_tokens = next(segments)
            except StopIteration:
                return
            if len(tokens):
                spans.append([position, offset, len(tokens), n_tokens])
                buffer = np.concatenate([buffer, tokens])
        rows, buffer = buffer[:need], buffer[need:]
        # Advance the span bookkeeping by `need` tokens.
        left = need
        while left:
            take = min(left, spans[0][2])
            spans[0][1] += take
            spans[0][2] -= take
            left -= take
            if spans[0][2] == 0:
                spans.pop(0)
        if spans:
            (epoch, shard, row_group), offset, _, n_tokens = spans[0]
            next_state = dict(epoch=epoch, shard=shard, row_group=row_group, offset=offset)
        else:  # buffer empty: the next row starts at the row group after the last one read
            next_state = dict(epoch=position[0], shard=position[1], row_group=position[2] + 1, offset=0)
            n_tokens = 0
        next_state["batch"] = batch_index + 1
        next_state["epochs"] = epochs_at(*(next_state[k] for k in ("epoch", "shard", "row_group", "offset")), n_tokens)
        mine = batch_index % world_size == rank
        batch_index += 1
        if not mine:
            continue
        rows = torch.from_numpy(rows.reshape(B, row_len))
        if use_pin:
            rows = rows.pin_memory()
        rows = rows.to(device, non_blocking=use_pin)
        yield rows[:, :-1], rows[:, 1:], next_state
