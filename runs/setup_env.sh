#!/usr/bin/env bash
# Install what the project needs, sourced by runs/runcpu.sh and runs/test.sh (EXTRAS="[dev]"
# adds the test dependencies).
#
# Which Python: $PYTHON if set; else an active virtual environment or conda env; else a
# project-local .venv (created with `python3 -m venv` on first use, then activated), so a stock
# machine with only a system python3 (no `python`, pip refusing system-wide installs under
# PEP 668) works.
#
# Which torch: an installed torch is never replaced. Otherwise TORCH_SPEC (default the release
# we test with) from the default index on a machine with an NVIDIA GPU (the CUDA build), and
# from PyTorch's CPU wheel index elsewhere (the default index would pull a multi-GB CUDA build
# onto a CPU machine), falling back to the default index when the CPU index is unreachable.
# An explicit TORCH_SPEC is installed as given, from the default index.
set -euo pipefail
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

if [ -n "${PYTHON:-}" ]; then
    echo "[setup] using PYTHON=$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
    PYTHON=python
    echo "[setup] using the active environment ${VIRTUAL_ENV:-${CONDA_PREFIX:-}}"
else
    if [ ! -x .venv/bin/python ]; then
        if ! command -v python3 >/dev/null 2>&1; then
            echo "[setup] error: no python3 on PATH; install Python >= 3.10 (Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
            exit 1
        fi
        echo "[setup] no virtual environment active: creating .venv with $(command -v python3)"
        if ! python3 -m venv .venv >.venv-error.log 2>&1; then
            rm -rf .venv
            echo "[setup] error: 'python3 -m venv' failed (no venv/ensurepip module; see .venv-error.log): install it (Debian/Ubuntu: apt-get install python3-venv) or activate a virtual environment first" >&2
            exit 1
        fi
        rm -f .venv-error.log
    fi
    # shellcheck source=/dev/null
    source .venv/bin/activate
    PYTHON=python
    echo "[setup] using .venv ($(command -v python))"
fi
export PYTHON

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    if [ -n "${TORCH_SPEC:-}" ]; then
        echo "[setup] installing $TORCH_SPEC (TORCH_SPEC)"
        "$PYTHON" -m pip install -q "$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] NVIDIA GPU found: installing torch==2.13.0 from the default index (CUDA build)"
        "$PYTHON" -m pip install -q torch==2.13.0
    else
        echo "[setup] no NVIDIA GPU: installing the CPU build of torch==2.13.0 ($TORCH_CPU_INDEX)"
        if ! "$PYTHON" -m pip install -qq --retries 1 --timeout 15 --index-url "$TORCH_CPU_INDEX" torch==2.13.0; then
            echo "[setup] the CPU index is unreachable: installing torch==2.13.0 from the default index"
            "$PYTHON" -m pip install -q torch==2.13.0
        fi
    fi
fi
echo "[setup] installing nanochat-moe and its dependencies (pip install -e .${EXTRAS:-})"
"$PYTHON" -m pip install -q -e ".${EXTRAS:-}"
