#!/usr/bin/env bash
# Issue 13's question on real text: does growing (dense -> upcycled MoE -> wider/deeper MoE)
# save compute over training the final architecture from scratch? (dev/LOG.md 2026-11-26)
#
#   NANOCHAT_BASE_DIR=/path/with/techmix/shards bash dev/grow_techmix.sh
#
# Lineage (runs/grow.sh): dense d2 w64 5e12 FLOPs -> upcycle top-2 of 8 -> 5e12 -> width x2,
# +2 layers (d4 w128, experts 4d wide) -> 3e13: 4e13 FLOPs in all, one data stream (< 1 epoch).
# A late-growth lineage spends 2e13 dense, 5e12 upcycled, 1.5e13 grown (also 4e13).
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

lineage() {  # tag seed phase1-flops phase2-flops phase3-flops
    [ -f "$BASE/runs/$1_grown/metrics.jsonl" ] && grep -q '"summary"' "$BASE/runs/$1_grown/metrics.jsonl" && return 0
    DATA="$DATA" TAG="$1" SEQ_LEN=256 BATCH_ROWS=32 OMP_NUM_THREADS=1 \
        P1="--target-flops $3" P2="--target-flops $4" P3="--target-flops $5" \
        EXTRA="--vocab-size 1024 --eval-tokens 524288 --eval-every 100 --log-every 50 --seed $2" \
        bash runs/grow.sh > "$BASE/grow_study/lineage_$1.log" 2>&1
}
scratch() {  # flops seed
    [ -f "$BASE/runs/gs_$1_s$2/metrics.jsonl" ] && grep -q '"summary"' "$BASE/runs/gs_$1_s$2/metrics.jsonl" && return 0
    python -m scripts.base_train "${COMMON[@]}" "${FINAL[@]}" --target-flops "$1" --seed "$2" --model-tag "gs_$1_s$2" \
        > "$BASE/grow_study/scratch_$1_s$2.log" 2>&1
}

# early growth: 1/8 of the FLOPs dense, 1/8 upcycled, 3/4 grown; late growth: 1/2, 1/8, 3/8
( for s in $SEEDS; do lineage "gt_s$s" "$s" 5e12 5e12 3e13; done; scratch 2e13 42; lineage gtl_s42 42 2e13 5e12 1.5e13 ) &
( scratch 4e13 42; scratch 8e13 42 ) &
wait
# Upcycling alone (Komatsuzaki et al.'s question): the late lineage's dense phase (2e13, constant LR)
# continued for 2e13 more as the upcycled MoE, or as the same dense model (fresh optimizer and
# warm-up in both, annealed): 4e13 each.
if [ ! -d "$BASE/runs/gtu_s42_moe" ]; then
    python -m scripts.grow --from gtl_s42_dense --to gtu_s42_moe --upcycle --n-experts 8 --expert-topk 2
fi
RESTART=("${COMMON[@]:2}")  # no --data: a run started --init-from continues its source's data
( [ -f "$BASE/runs/gtu_s42_moe/metrics.jsonl" ] && grep -q '"summary"' "$BASE/runs/gtu_s42_moe/metrics.jsonl" ||
  python -m scripts.base_train "${RESTART[@]}" --init-from gtu_s42_moe --target-flops 2e13 --model-tag gtu_s42_moe \
      > "$BASE/grow_study/upcycle_only_s42.log" 2>&1 ) &
( [ -f "$BASE/runs/gtd_s42_dense/metrics.jsonl" ] && grep -q '"summary"' "$BASE/runs/gtd_s42_dense/metrics.jsonl" ||
  python -m scripts.base_train "${RESTART[@]}" --init-from gtl_s42_dense --target-flops 2e13 --model-tag gtd_s42_dense \
      > "$BASE/grow_study/dense_continued_s42.log" 2>&1 ) &
wait
# s_dense_4e13: the small dense model alone for the same 4e13 FLOPs (dev/techmix_study.py, same data and batches)
python -m scripts.compare --runs gt_s42_grown gtl_s42_grown gtu_s42_moe gtd_s42_dense gs_2e13_s42 gs_4e13_s42 gs_8e13_s42 \
    $([ -d "$BASE/runs/s_dense_4e13" ] && echo s_dense_4e13) \
    --frontier gs_2e13_s42 gs_4e13_s42 gs_8e13_s42 --out "$BASE/grow_study/compare"
