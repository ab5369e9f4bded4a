#!/usr/bin/env bash
# CPU quickstart (no GPU, no internet): train a dense GPT and an iso-FLOPs MoE on the same
# data with the same FLOPs budget, plus the dense model at 1.5x that budget (the frontier the
# compute multiplier is read from), then print them side by side. Its time on our 2-core box: README, "The quickstart".
#
#   bash runs/runcpu.sh                         # built-in synthetic corpus (exact entropy floor)
#   DATA=path/to/texts bash runs/runcpu.sh      # your own .txt/.jsonl/.parquet files or shard folder
#   TARGET_FLOPS=5e13 DEPTH=6 bash runs/runcpu.sh   # bigger / longer
#   MOE_FLAGS="--router softmax --aux-free-bias 0 --balance-loss-coeff 0.01" bash runs/runcpu.sh
#                                               # extra base_train flags for the MoE run only
#                                               # (this one: Switch balancing instead of the default aux-free bias)
#   FRONTIER=0 bash runs/runcpu.sh              # skip the 1.5x dense run (faster; the multiplier
#                                               # is then read on one dense curve, which flatters the MoE)
#   DRY_RUN=1 bash runs/runcpu.sh               # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${DATA:-synthetic}"
DEPTH="${DEPTH:-4}"
WIDTH="${WIDTH:-128}"
SEQ_LEN="${SEQ_LEN:-256}"
VOCAB="${VOCAB:-2048}"
TARGET_FLOPS="${TARGET_FLOPS:-1.2e13}"
N_EXPERTS="${N_EXPERTS:-8}"
TOPK="${TOPK:-2}"
EXPERT_MULT="${EXPERT_MULT:-2}"   # TOPK x EXPERT_MULT = 4: iso-FLOPs with the dense 4x MLP
read -ra MOE_EXTRA <<< "${MOE_FLAGS:-}"
TAG="${TAG:-cpu}"          # runs are <TAG>_dense and <TAG>_moe; OUT= sets where the comparison goes
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

run() {
    echo "+ $*"
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

if [ -z "${DRY_RUN:-}" ]; then
    # shellcheck source=runs/setup_env.sh
    source runs/setup_env.sh
fi
PY="${PYTHON:-python}"

COMMON=(--data "$DATA" --vocab-size "$VOCAB" --depth "$DEPTH" --n-embd "$WIDTH" --head-dim 64
        --max-seq-len "$SEQ_LEN" --device-batch-size 16 --total-batch-size $((16 * SEQ_LEN * 2))
        --eval-every 50 --eval-tokens 131072 --sample-every 1000000
        --device-type cpu)
if [ "$DATA" = "synthetic" ]; then
    # 30k documents (~3.3M tokens): even the 1.5x dense run stays under one epoch
    COMMON+=(--synthetic-train-docs "${SYNTHETIC_DOCS:-30000}")
fi
run "$PY" -m scripts.base_train "${COMMON[@]}" --target-flops "$TARGET_FLOPS" --model-tag "${TAG}_dense"
run "$PY" -m scripts.base_train "${COMMON[@]}" --target-flops "$TARGET_FLOPS" --use-moe --n-experts "$N_EXPERTS" \
    --expert-topk "$TOPK" --expert-hidden-mult "$EXPERT_MULT" ${MOE_EXTRA[@]+"${MOE_EXTRA[@]}"} --model-tag "${TAG}_moe"
RUNS=("${TAG}_dense" "${TAG}_moe")
if [ "${FRONTIER:-1}" != "0" ]; then
    # A second dense run trained (and annealed) to 1.5x the budget: the multiplier is read
    # between the two dense runs' final points, not on one curve's pre-warmdown evals.
    FRONTIER_FLOPS=$(awk -v f="$TARGET_FLOPS" 'BEGIN { printf "%.4g", 1.5 * f }')
    run "$PY" -m scripts.base_train "${COMMON[@]}" --target-flops "$FRONTIER_FLOPS" --model-tag "${TAG}_dense_1.5x"
    RUNS+=("${TAG}_dense_1.5x" --frontier "${TAG}_dense" "${TAG}_dense_1.5x")
fi
OUT="${OUT:-${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/comparisons/${TAG}}"
run "$PY" -m scripts.compare --runs "${RUNS[@]}" --out "$OUT"
if [ -z "${DRY_RUN:-}" ] && [ -f "$OUT/comparison.png" ]; then
    echo "plot: $OUT/comparison.png"
fi
