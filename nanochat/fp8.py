"""
FP8 training for linear layers via torchao's float8 conversion.

Dense linears are converted through `fp8_module_filter` (torchao Float8Linear). Not converted:
- expert weights: stacked (E, out, in) parameters, not nn.Linear modules, so the filter never
  sees them. convert_to_fp8 sets each MoE's expert seam to "fp8" (MoE.run_experts calls
  `expert_mlp_fp8`): torchao's
  FP8 rowwise *grouped* GEMM, which needs every expert's group of rows to be a multiple of 16:
  `pad_token_groups` places each group at a 16-aligned start in a buffer of fixed size
  N*k + 16*E (static shape for torch.compile). An expert with no tokens
  gets 16 zero rows rather than an empty group, so its scales and weight gradient (zeros) are
  computed like any other's: the failure of earlier FP8 MoE code on idle experts cannot occur;
- the routers (MoE gates, MoD routers: the model's "router" role, GPT.param_roles): tiny
  (n_experts x d), and routing decisions are precision-sensitive;
- any linear (or expert) whose dimensions are not divisible by 16 (FP8 tensor-core GEMMs).
torchao is imported only when --fp8 is asked for: on CPU its import prints CUDA warnings.
"""

import inspect
import re

import torch
import torch.nn as nn

from nanochat.common import UserError
from nanochat.moe import moe_layers, group_sizes, relu2


def fp8_module_filter(module, fqn, precise=()):
    """True when the module at dotted name `fqn` should be converted to float8 training: an
    nn.Linear with dimensions divisible by 16 whose weight is not in `precise` (the parameters
    that stay in high precision: the model's routers, see convert_to_fp8). torchao calls it as
    module_filter_fn(module, fqn)."""
    if not isinstance(module, nn.Linear) or any(module.weight is p for p in precise):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


# The torchao the FP8 code was written against (pyproject.toml's `fp8` extra pins the series):
# expert_mlp_fp8 calls a prototype function of it, whose keywords change between releases.
TORCHAO_SERIES = "0.18"
TORCHAO_MIN_TORCH = (2, 11)  # torchao 0.18's prebuilt kernels load only on torch >= 2.11
TORCHAO_GROUPED_MM = "_to_fp8_rowwise_then_scaled_grouped_mm"
TORCHAO_KEYWORD = "pad_token_groups_for_grouped_mm"


def _version_tuple(version):
    """(major, minor) of a version string such as '2.13.0+cu128'; None when it has none."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m[1]), int(m[2])) if m else None


def check_torchao():
    """The torchao that --fp8 needs is there and fits: the pinned series, on a torch it supports,
    with the grouped GEMM and the keyword expert_mlp_fp8 passes. Raises UserError naming what is
    missing or mismatched."""
    install = f"pip install 'torchao=={TORCHAO_SERIES}.*' (or pip install -e '.[fp8]')"
    try:
        import torchao
    except ImportError:
        raise UserError(f"--fp8 needs torchao {TORCHAO_SERIES}.x, which is not installed: {install}")
    version = str(getattr(torchao, "__version__", "unknown"))
    if _version_tuple(version) != _version_tuple(TORCHAO_SERIES):
        raise UserError(f"--fp8 needs torchao {TORCHAO_SERIES}.x (its FP8 grouped GEMM is called with "
                        f"{TORCHAO_KEYWORD}=), found torchao {version}: {install}")
    torch_version = _version_tuple(torch.__version__)
    if torch_version is None or torch_version < TORCHAO_MIN_TORCH:
        raise UserError(f"--fp8: torchao {version} needs torch >= {'.'.join(map(str, TORCHAO_MIN_TORCH))}, "
                        f"found torch {torch.__version__}")
    try:
        from torchao.float8 import convert_to_float8_training  # noqa: F401  (convert_to_fp8 uses it)
        from torchao.prototype import moe_training
    except ImportError as e:
        raise UserError(f"--fp8: torchao {version} does not import on torch {torch.__version__} ({e})")
    grouped_mm = getattr(moe_training, TORCHAO_GROUPED_MM, None)
    if grouped_mm is None:
        raise UserError(f"--fp8: torchao {version} has no torchao.prototype.moe_training.{TORCHAO_GROUPED_MM}: {install}")
    if TORCHAO_KEYWORD not in inspect.signature(grouped_mm).parameters:
        raise UserError(f"--fp8: torchao {version}'s {TORCHAO_GROUPED_MM} takes no {TORCHAO_KEYWORD}= "
                        f"(expert_mlp_fp8 passes it): {install}")


def check_fp8_supported(device_type):
    """Fail fast, before any model is built, when this machine cannot train in FP8: the device
    first (so a CPU machine without torchao hears about the GPU), then torchao."""
    if device_type != "cuda" or not torch.cuda.is_available():
        raise UserError(f"--fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100); "
                        f"this run is on {device_type}")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise UserError(f"--fp8 needs compute capability 8.9+ (e.g. H100, L40S); this GPU is {major}.{minor}")
    check_torchao()


def convert_to_fp8(model):
    """Swap the filtered nn.Linear modules for torchao Float8Linear (tensorwise scaling) and switch
    the MoE experts whose widths divide by 16 to the FP8 grouped GEMM. Returns (linear names,
    expert layer names), for the startup log."""
    from torchao.float8 import convert_to_float8_training
    routers = model.param_roles()["router"]
    keep = lambda mod, fqn: fp8_module_filter(mod, fqn, precise=routers)
    candidates = [name for name, mod in model.named_modules() if keep(mod, name)]
    convert_to_float8_training(model, module_filter_fn=keep)
    names = {mod: name for name, mod in model.named_modules()}
    experts = []
    for mod in moe_layers(model):
        # the dropless path only: with a capacity factor, training runs its experts as a padded
        # bmm (bf16), and evaluation's dropless path then stays bf16 as well
        if mod.capacity_factor == 0 and mod.w_fc.size(1) % 16 == 0 and mod.w_fc.size(2) % 16 == 0:
            mod.expert_path = "fp8"
            experts.append(names[mod])
    return candidates, experts


# ---------------------------------------------------------------------------------------------
# FP8 experts: per-expert row groups padded to multiples of 16 for the FP8 grouped GEMM

ALIGN = 16  # FP8 grouped GEMMs (torch._scaled_grouped_mm) want every group size divisible by 16


def pad_token_groups(offsets, n_rows, align=ALIGN):
    """Where each of the n_rows expert-sorted rows goes in a padded buffer whose groups all start
    at multiples of `align` and have a size that is a non-zero multiple of `align`.
    offsets: (E,) int32 end offsets (grouped_mm convention). Returns
    dest (n_rows,) int64:    destination row of each sorted row,
    padded_offsets (E,) int32: end offsets of the padded groups,
    n_padded (int):          buffer rows, n_rows + align*E rounded up to align (a static bound:
                             shapes never depend on the routing, so torch.compile keeps one graph).
    Empty groups get `align` zero rows (never size 0)."""
    n_experts = offsets.numel()
    ends = offsets.long()
    counts = group_sizes(offsets)
    padded_counts = torch.clamp((counts + align - 1) // align, min=1) * align
    padded_ends = torch.cumsum(padded_counts, dim=0)
    shift = (padded_ends - padded_counts) - (ends - counts)  # padded start - original start
    row = torch.arange(n_rows, device=offsets.device)
    expert_of_row = torch.searchsorted(ends, row, right=True)  # rows sorted by expert
    dest = row + shift[expert_of_row]
    n_padded = -(-(n_rows + align * n_experts) // align) * align
    return dest, padded_ends.to(torch.int32), n_padded


def expert_mlp_fp8(x_sorted, w_fc, w_proj, offsets, grouped_mm=None):
    """The experts' relu^2 MLP with both matmuls as FP8 rowwise grouped GEMMs (torchao), over
    padded groups: pad once, two grouped GEMMs, unpad once. Padding rows are zeros and stay
    zeros through relu^2, so they add nothing to any weight gradient. `grouped_mm(A, B_t, offs)`
    defaults to torchao's; tests pass a reference to check the padding on CPU."""
    if grouped_mm is None:
        from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

        def grouped_mm(a, b_t, offs):
            return _to_fp8_rowwise_then_scaled_grouped_mm(a, b_t, offs, out_dtype=torch.bfloat16,
                                                          pad_token_groups_for_grouped_mm=False)
    n_rows, d = x_sorted.shape
    dest, padded_offsets, n_padded = pad_token_groups(offsets, n_rows)
    x_pad = x_sorted.new_zeros(n_padded, d).index_copy(0, dest, x_sorted)
    # (E, out, in).transpose -> (E, in, out) with column-major groups: the layout torchao wants
    h = grouped_mm(x_pad, w_fc.transpose(-2, -1), padded_offsets)
    h = relu2(h)
    y_pad = grouped_mm(h, w_proj.transpose(-2, -1), padded_offsets)
    return y_pad.index_select(0, dest)
