#!/usr/bin/env bash
# Install what the project needs into the current Python, without ever pulling a multi-GB
# CUDA build of torch onto a CPU machine: torch is installed only when missing, pinned to the
# CPU release we test with (TORCH_SPEC overrides). A GPU user installs their own torch first
# and this leaves it alone. Sourced by runs/runcpu.sh and runs/test.sh.
set -euo pipefail
PYTHON="${PYTHON:-python}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_SPEC"
    "$PYTHON" -m pip install -q "$TORCH_SPEC"
fi
echo "[setup] installing nanochat-moe and its dependencies (pip install -e .${EXTRAS:-})"
"$PYTHON" -m pip install -q -e ".${EXTRAS:-}"
