#!/usr/bin/env bash
# One-GPU check, one short script (~5 minutes on an H100/H200): the CUDA tests, then a dense
# and an MoE training run on the built-in corpus with torch.compile and bf16 autocast (step
# lines, MFU, graphs compiled after step 1), the whole-model step benchmark in bf16, and the
# architecture variants (MoD, MTP) side by side, compiled. STAGES picks stages (default: all).
#
#   bash runs/gpu_check.sh            # on a machine with a CUDA GPU and the project installed
#   OUT=dir bash runs/gpu_check.sh    # also keep the logs in dir
#   DRY_RUN=1 bash runs/gpu_check.sh  # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/gpu_check}"
STEPS="${STEPS:-60}"
PY="${PYTHON:-python}"

run() {
    echo "+ $*"
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

if [ -z "${DRY_RUN:-}" ]; then
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
fi
STAGES="${STAGES:-tests train bench variants}"  # e.g. STAGES=variants: only that stage
has() { [[ " $STAGES " == *" $1 "* ]]; }
if has tests; then
    run "$PY" -m pytest -q tests/test_cuda.py
fi
# depth 4, width 512, seq 1024, 32 rows x 1024 = 32k tokens per micro-batch, 2 micro-batches
T=(--depth 4 --n-embd 512 --head-dim 64 --max-seq-len 1024 --vocab-size 4096 --device-batch-size 32
   --total-batch-size 65536 --num-iterations "$STEPS" --eval-every 30 --eval-tokens 262144 --sample-every -1
   --synthetic-train-docs 40000 --device-type cuda --compile on)
if has train; then
    run "$PY" -m scripts.base_train "${T[@]}" --model-tag gpu_dense
    run "$PY" -m scripts.base_train "${T[@]}" --use-moe --n-experts 8 --expert-topk 2 --model-tag gpu_moe
fi
if has bench; then
    run "$PY" -m scripts.bench_moe --step-only --dtype bf16 --device-type cuda --repeats 10
fi
# Architecture variants' whole training steps side by side (compiled, bf16): does MoD's saving
# of FLOPs reach the wall clock, what does an MTP head cost? (no data or tokenizer needed)
V=(--depth 8 --n-embd 768 --head-dim 128 --max-seq-len 1024 --vocab-size 32768 --rows 32 --repeats 10
   --dtype bf16 --device-type cuda --compile on)
if has variants; then
    run "$PY" -m scripts.bench_step "${V[@]}" --variant dense: --variant "mod:--mod-capacity 0.125" \
        --variant "moe:--use-moe" --variant "moe_mod:--use-moe --mod-capacity 0.125" --variant "mtp:--mtp-heads 1"
fi
