"""
What a training run writes and prints about itself: metrics.jsonl (MetricsLog), the ETA of a
step line, peak memory, and the summary table at the end.
"""

import json
import math
import os
import resource

import torch

from nanochat.common import atomic_write_text, read_metrics


class MetricsLog:
    """metrics.jsonl on rank 0: one JSON object per line, flushed as written. On resume from
    step s, records the resumed run will write again are cut first (evals and the summary
    at or after s, train and moe records after s), so every step appears once."""

    def __init__(self, path, enabled, resume_step=0):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if resume_step and os.path.exists(path):
            keep = [r for r in read_metrics(path) if r.get("type") == "header" or r.get("step", 0) < resume_step
                    or (r.get("type") in ("train", "moe") and r.get("step") == resume_step)]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        self.f = open(path, "a" if resume_step else "w")

    def write(self, record):
        if self.enabled:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self):
        if self.enabled:
            self.f.close()


def init_source(header):
    """The checkpoint a run's weights came from (base_train --init-from; through scripts.grow,
    the checkpoint that was grown), or None for a run from a random init."""
    init = header.get("init_from") or {}
    return (init.get("grown_from") or {}).get("checkpoint") or init.get("checkpoint")


def peak_memory_mb(device_type):
    """Peak CUDA allocator memory, or the process's peak resident set on CPU."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def finite_or_none(x):
    return x if x is not None and math.isfinite(x) else None


def format_eta(seconds):
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def summary_table(rows, title="Summary"):
    """Two aligned columns under a title: [(label, value), ...] -> text."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", title, "-" * (width + 30)] + [f"{k:<{width}}  {v}" for k, v in rows])
