#!/usr/bin/env bash
# GPU recipe: a dense baseline and an iso-FLOPs MoE (top-2 of 8, experts 2x wide) trained on
# FineWeb-Edu for the same FLOPs with torchrun, then compared.
#
#   bash runs/tmp_moe.sh                    # 8 GPUs
#   NPROC=1 bash runs/tmp_moe.sh            # one GPU
#   WANDB_RUN=myrun bash runs/tmp_moe.sh    # log to wandb
#   DRY_RUN=1 bash runs/tmp_moe.sh          # print the commands only
# Install the CUDA build of torch (and torchao for FP8) first.
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC="${NPROC:-8}"
DEPTH="${DEPTH:-12}"
TARGET_FLOPS="${TARGET_FLOPS:-2e18}"
NUM_SHARDS="${NUM_SHARDS:-64}"
FP8="${FP8:-1}"
WANDB_RUN="${WANDB_RUN:-dummy}"

run() {
    echo "+ $*"
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

if [ -z "${DRY_RUN:-}" ]; then
    EXTRAS="[fp8]" source runs/setup_env.sh
fi

# Download and tokenizer training happen once, in a single process, before torchrun starts.
run python -m scripts.base_train --data fineweb --num-shards "$NUM_SHARDS" --vocab-size 65536 \
    --depth 1 --num-iterations 1 --device-batch-size 1 --max-seq-len 64 --total-batch-size 64 \
    --eval-every -1 --eval-tokens 64 --sample-every -1 --model-tag prepare_fineweb

FP8_FLAG=()
if [ "$FP8" = "1" ]; then FP8_FLAG=(--fp8); fi
COMMON=(--data fineweb --num-shards "$NUM_SHARDS" --depth "$DEPTH" --head-dim 64 --max-seq-len 1024
        --device-batch-size 16 --total-batch-size 524288 --target-flops "$TARGET_FLOPS"
        --eval-every 250 "${FP8_FLAG[@]}")
run torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train -- "${COMMON[@]}" \
    --run "$WANDB_RUN" --model-tag "tmp_dense_d${DEPTH}"
MOE_RUN="dummy"; if [ "$WANDB_RUN" != "dummy" ]; then MOE_RUN="${WANDB_RUN}_moe"; fi
run torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train -- "${COMMON[@]}" \
    --use-moe --n-experts 8 --expert-topk 2 --expert-hidden-mult 2 --router sigmoid --aux-free-bias 0.01 \
    --run "$MOE_RUN" --model-tag "tmp_moe_d${DEPTH}"
run python -m scripts.compare --runs "tmp_dense_d${DEPTH}" "tmp_moe_d${DEPTH}"
