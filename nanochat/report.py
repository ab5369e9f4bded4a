"""
What a training run writes and prints about itself: metrics.jsonl (MetricsLog), the step line
with its ETA, peak memory, and the summary table at the end.
"""

import json
import math
import os
import resource

import torch

from nanochat.common import atomic_write_text, read_metrics
from nanochat.mod import mod_tokens


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


def hardware_info(device_type, world_size):
    """What a run's step times depend on, for comparing wall clock across runs (scripts/compare):
    the device's name (the GPU's, or the CPU model), the number of processes and torch's threads."""
    if device_type == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = cpu_model()
        if device_type == "mps":
            device = f"mps ({device})"
    return dict(device=device, world_size=world_size, threads=torch.get_num_threads())


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what platform knows)."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


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


def format_step_line(record, num_iterations, smooth_loss, eta_seconds):
    """The training step line, from the step's train record (base_train's metrics.jsonl)."""
    step, mfu = record["step"], record["mfu"]
    extra = (f" | bal {record['balance_loss']:.4f}" if "balance_loss" in record else "") + \
        (" | mtp " + "/".join(f"{v:.3f}" for v in record["mtp_losses"]) if "mtp_losses" in record else "") + \
        (" | mod agree " + "/".join(f"{v:.3f}" for v in record["mod_agree"]) if "mod_agree" in record else "")
    mfu_s = f"{mfu:.1f}%" if mfu is not None else "n/a"
    return (f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {smooth_loss:.4f}{extra} "
            f"| lrm {record['lr_mult']:.2f} | dt {record['dt'] * 1000:.0f}ms | tok/s {record['tok_per_sec']:,.0f} "
            f"| mfu {mfu_s} | epoch {record['epochs']:.2f} | eta {format_eta(eta_seconds)}")


def training_summary_rows(summary, model_tag, run_dir, init_flops, n_mod, recompiles=None):
    """The end-of-run table, a view of the summary record; recompiles: graphs compiled after
    step 1 under torch.compile (None: not compiled)."""
    s = summary
    rows = [("model", model_tag), ("params total / active", f"{s['total']:,} / {s['active_total']:,}"),
            ("FLOPs/token", f"{s['flops_per_token']:.4e}"), ("tokens", f"{s['tokens']:,}"),
            ("FLOPs", f"{s['flops']:.4e}" + (f" (incl. {init_flops:.4e} before --init-from)" if init_flops else "")),
            ("epochs (passes over the train data)", f"{s['epochs']:.2f}"),
            ("final val bpb", f"{s['final_val_bpb']:.4f}" + (" (MoD: causal threshold)" if n_mod else "")),
            *([("val bpb, top-k MoD routing (not causal)", f"{s['final_val_bpb_topk']:.4f}")] if n_mod else []),
            ("entropy floor", f"{s['entropy_floor']:.4f}" if s["entropy_floor"] is not None else "n/a"),
            *([("CORE (last evaluation)", f"{s['core']:.4f}")] if s.get("core") is not None else []),
            ("tok/s (mean step)", f"{s['tok_per_sec']:,.0f}"), ("wall time", f"{s['wall_time']:.1f}s"),
            ("peak memory", f"{s['peak_memory_mb']:.0f} MiB"),
            ("optimizer state per rank" + (" (sharded)" if s["sharded_optimizer"] else ""),
             " / ".join(f"{m:.2f}" for m in s["optimizer_state_mib_per_rank"]) + " MiB")]
    if recompiles is not None:
        rows.append(("graphs compiled after step 1", f"{recompiles}"))
    return rows + [("run folder", run_dir)]


def format_count(n):
    """2887680 -> '2,887,680 (2.89M)': exact, and readable at a glance."""
    return f"{n:,} ({n / 1e6:.2f}M)" if n >= 1e6 else f"{n:,} ({n / 1e3:.1f}K)"


def describe_params(model):
    """The start-up parameter report (every script that reports a model prints this): total,
    active per token, inactive, sparsity and efficiency, the MoE/dense layers and FLOPs."""
    cfg = model.config
    c = model.num_scaling_params()
    n_moe = model.num_moe_layers()
    lines = [f"Total Parameters: {format_count(c['total'])}"]
    if n_moe:
        idle = (cfg.n_experts - cfg.expert_topk) * n_moe
        lines += [
            f"Active Params/tok: {format_count(c['active_total'])}, top-{cfg.expert_topk} of {cfg.n_experts} experts"
            + (f" + {cfg.n_shared_experts} shared" if cfg.n_shared_experts else ""),
            f"Inactive Params: {format_count(c['moe_inactive'])}, {idle} experts idle per token",
            f"Sparsity: {100 * c['moe_inactive'] / c['total']:.1f}% (inactive per forward pass)",
            f"Efficiency: {100 * c['active_total'] / c['total']:.1f}% active per forward pass",
        ]
    else:
        lines.append(f"Active Params/tok: {format_count(c['active_total'])} (dense model: every parameter)")
    n_mamba = len(model.mamba_layers())
    lines.append(f"Layers: {n_moe} MoE + {cfg.n_layer - n_moe} dense (of {cfg.n_layer})"
                 + (f"; mixers: {cfg.n_layer - n_mamba} attention + Mamba layers: {n_mamba} (pattern "
                    f"{cfg.layer_pattern!r}, {format_count(c['mamba'])} Mamba params)" if n_mamba else "")
                 + (f"; MTP heads: {cfg.mtp_heads} (training only, {format_count(c['mtp'])} params, "
                    f"predicting tokens t+2..t+{cfg.mtp_heads + 1})" if cfg.mtp_heads else ""))
    mod = model.mod_layers()
    if mod:
        k = mod_tokens(cfg.sequence_len, cfg.mod_capacity)
        lines.append(f"MoD blocks: {len(mod)} of {cfg.n_layer} (layers {','.join(map(str, mod))}), capacity "
                     f"{cfg.mod_capacity:g}: top-{k} of {cfg.sequence_len} tokens per sequence in training, a calibrated "
                     f"causal threshold in eval/generation ({format_count(c['mod'])} router params; all params active)")
    lines.append(f"FLOPs/token (train, active): {model.estimate_flops():.4e}")
    return "\n".join(lines)
