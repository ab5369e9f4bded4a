#!/usr/bin/env bash
# Issue 13's question on real text: does growing (dense -> upcycled MoE -> wider/deeper MoE)
# save compute over training the final architecture from scratch? (dev/LOG.md 2026-11-26)
#
#   NANOCHAT_BASE_DIR=/path/with/techmix/shards bash dev/grow_techmix.sh
#
# Lineage (runs/grow.sh): dense d2 w64 5e12 FLOPs -> upcycle top-2 of 8 -> 5e12 -> width x2,
# +2 layers (d4 w128, experts 4d wide) -> 3e13: 4e13 FLOPs in all, one data stream (< 1 epoch).
# Scratch: the final architecture (d4 w128, top-2 of 8 experts 4d wide, same routing) from a
# random init at 2e13, 4e13 and 8e13 FLOPs (annealed each): the frontier the lineage's final
# point is read against. Two queues of single-threaded runs share the 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
BASE="${NANOCHAT_BASE_DIR:?set NANOCHAT_BASE_DIR}"
DATA="${DATA:-$(pwd)/../shared/data/text/techmix.jsonl}"
SEEDS="${SEEDS:-42}"
COMMON=(--data "$DATA" --vocab-size 1024 --max-seq-len 256 --head-dim 32 --device-batch-size 32 --total-batch-size 16384
        --eval-tokens 524288 --eval-every 100 --sample-every -1 --log-every 50 --moe-stats-every 50 --device-type cpu)
FINAL=(--depth 4 --n-embd 128 --use-moe --n-experts 8 --expert-topk 2 --expert-hidden-mult 4
       --router sigmoid --aux-free-bias 0.01 --balance-loss-coeff 0)
mkdir -p "$BASE/grow_study"

lineage() {  # seed
    DATA="$DATA" TAG="gt_s$1" SEQ_LEN=256 BATCH_ROWS=32 OMP_NUM_THREADS=1 \
        P1="--target-flops 5e12" P2="--target-flops 5e12" P3="--target-flops 3e13" \
        EXTRA="--vocab-size 1024 --eval-tokens 524288 --eval-every 100 --log-every 50 --seed $1" \
        bash runs/grow.sh > "$BASE/grow_study/lineage_s$1.log" 2>&1
}
scratch() {  # flops seed
    [ -f "$BASE/runs/gs_$1_s$2/metrics.jsonl" ] && grep -q '"summary"' "$BASE/runs/gs_$1_s$2/metrics.jsonl" && return 0
    python -m scripts.base_train "${COMMON[@]}" "${FINAL[@]}" --target-flops "$1" --seed "$2" --model-tag "gs_$1_s$2" \
        > "$BASE/grow_study/scratch_$1_s$2.log" 2>&1
}

( for s in $SEEDS; do lineage "$s"; done; scratch 2e13 42 ) &
( scratch 4e13 42; scratch 8e13 42 ) &
wait
for s in $SEEDS; do
    python -m scripts.compare --runs "gt_s${s}_grown" gs_4e13_s42 gs_2e13_s42 gs_8e13_s42 \
        --frontier gs_2e13_s42 gs_4e13_s42 gs_8e13_s42 --out "$BASE/grow_study/compare_s$s" || true
done
