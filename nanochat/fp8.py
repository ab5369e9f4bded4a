"""
FP8 training for linear layers via torchao's float8 conversion.

Only the dense linears are converted, through `fp8_module_filter`. Skipped:
- expert weights: stacked (E, out, in) parameters, not nn.Linear; they need a grouped FP8
  GEMM with per-expert groups padded to 16 (later work), and an expert with no tokens must
  not break scaling;
- the router: tiny (n_experts x d), and routing decisions are precision-sensitive;
- any linear whose in/out features are not divisible by 16 (FP8 tensor-core GEMMs need it).
torchao is imported only when --fp8 is asked for: on CPU its import prints CUDA warnings.
"""

import torch
import torch.nn as nn

from nanochat.common import UserError


def fp8_module_filter(module, fqn):
    """True when the module at dotted name `fqn` should be converted to float8 training."""
    if not isinstance(module, nn.Linear):
        return False
    parts = fqn.split(".")
    if "router" in parts or "experts" in parts or any(p.startswith("w_fc") or p.startswith("w_proj") for p in parts):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def check_fp8_supported(device_type):
    """Fail fast, before any model is built, when this machine cannot train in FP8."""
    if device_type != "cuda" or not torch.cuda.is_available():
        raise UserError(f"--fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100); "
                        f"this run is on {device_type}")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise UserError(f"--fp8 needs compute capability 8.9+ (e.g. H100, L40S); this GPU is {major}.{minor}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise UserError("--fp8 needs torchao: pip install torchao")


def convert_to_fp8(model):
    """Swap the filtered nn.Linear modules for torchao Float8Linear (tensorwise scaling).
    Returns the names of the converted layers, for the startup log."""
    from torchao.float8 import convert_to_float8_training
    candidates = [name for name, mod in model.named_modules() if fp8_module_filter(mod, name)]
    convert_to_float8_training(model, module_filter_fn=fp8_module_filter)
    return candidates
