#!/usr/bin/env bash
# CPU quickstart (no GPU, no internet): train a dense GPT and an iso-FLOPs MoE on the same
# data with the same FLOPs budget, then print them side by side. ~10 minutes on 2 cores.
#
#   bash runs/runcpu.sh                         # built-in synthetic corpus (exact entropy floor)
#   DATA=path/to/texts bash runs/runcpu.sh      # your own .txt/.jsonl/.parquet files or shard folder
#   TARGET_FLOPS=5e13 DEPTH=6 bash runs/runcpu.sh   # bigger / longer
#   MOE_FLAGS="--router sigmoid --aux-free-bias 0.01 --balance-loss-coeff 0" bash runs/runcpu.sh
#                                               # extra base_train flags for the MoE run only
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

COMMON=(--data "$DATA" --vocab-size "$VOCAB" --depth "$DEPTH" --n-embd "$WIDTH" --head-dim 64
        --max-seq-len "$SEQ_LEN" --device-batch-size 16 --total-batch-size $((16 * SEQ_LEN * 2))
        --target-flops "$TARGET_FLOPS" --eval-every 50 --eval-tokens 131072 --sample-every 1000000
        --device-type cpu)
run python -m scripts.base_train "${COMMON[@]}" --model-tag "${TAG}_dense"
run python -m scripts.base_train "${COMMON[@]}" --use-moe --n-experts "$N_EXPERTS" --expert-topk "$TOPK" \
    --expert-hidden-mult "$EXPERT_MULT" ${MOE_EXTRA[@]+"${MOE_EXTRA[@]}"} --model-tag "${TAG}_moe"
OUT="${OUT:-${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/comparisons/${TAG}}"
run python -m scripts.compare --runs "${TAG}_dense" "${TAG}_moe" --out "$OUT"
echo "plot: $OUT/comparison.png"
