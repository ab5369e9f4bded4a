#!/usr/bin/env bash
# Issue 13's question on real text: does growing (dense -> upcycled MoE -> wider/deeper MoE)
# save compute over training the final architecture from scratch? (dev/LOG.md 2026-11-26)
#
#   NANOCHAT_BASE_DIR=/path/with/techmix/shards bash dev/grow_techmix.sh
#
# All runs: techmix at a 1,024 BPE, seq 256, 16,384 tokens/step, the same 524k validation
# tokens; every chain under one epoch. Finished runs are skipped, so it can be re-run.
#   early lineage (runs/grow.sh): dense d2 w64 5e12 FLOPs -> upcycle top-2 of 8 -> 5e12 ->
#       width x2, +2 layers (d4 w128, experts 4d wide) -> 3e13: 4e13 in all        (seed 42)
#   late lineage: 2e13 dense, 5e12 upcycled, 1.5e13 grown: 4e13                       (42, 43)
#   upcycle-only / dense-continued: the late lineage's dense phase (2e13) continued for 2e13
#       as the upcycled MoE, or as the same dense model (fresh optimizer and warm-up in both;
#       Komatsuzaki et al.'s comparison)                                              (42, 43)
#   scratch: the final architecture from a random init at 2e13, 4e13, 8e13 (the frontier
#       the lineages are read against)                                                (42)
# Two queues of single-threaded runs share the 2 cores (~1 h 15 min here).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
BASE="${NANOCHAT_BASE_DIR:?set NANOCHAT_BASE_DIR}"
DATA="${DATA:-$(pwd)/../shared/data/text/techmix.jsonl}"
COMMON=(--vocab-size 1024 --max-seq-len 256 --head-dim 32 --device-batch-size 32 --total-batch-size 16384
        --eval-tokens 524288 --eval-every 100 --sample-every -1 --log-every 50 --moe-stats-every 50 --device-type cpu)
FINAL=(--depth 4 --n-embd 128 --use-moe --n-experts 8 --expert-topk 2 --expert-hidden-mult 4
       --router sigmoid --aux-free-bias 0.01 --balance-loss-coeff 0)
LOGS="$BASE/grow_study"
mkdir -p "$LOGS"

finished() { [ -f "$BASE/runs/$1/metrics.jsonl" ] && grep -q '"summary"' "$BASE/runs/$1/metrics.jsonl"; }

lineage() {  # tag seed phase1-flops phase2-flops phase3-flops
    finished "$1_grown" && return 0
    DATA="$DATA" TAG="$1" SEQ_LEN=256 BATCH_ROWS=32 OMP_NUM_THREADS=1 \
        P1="--target-flops $3" P2="--target-flops $4" P3="--target-flops $5" \
        EXTRA="--vocab-size 1024 --eval-tokens 524288 --eval-every 100 --log-every 50 --seed $2" \
        bash runs/grow.sh > "$LOGS/lineage_$1.log" 2>&1
}
continued() {  # seed: the late lineage's dense phase, continued as upcycled MoE and as dense
    [ -d "$BASE/runs/gtu_s$1_moe" ] ||
        python -m scripts.grow --from "gtl_s$1_dense" --to "gtu_s$1_moe" --upcycle --n-experts 8 --expert-topk 2 --seed "$1"
    finished "gtu_s$1_moe" || python -m scripts.base_train "${COMMON[@]}" --init-from "gtu_s$1_moe" --target-flops 2e13 \
        --seed "$1" --model-tag "gtu_s$1_moe" > "$LOGS/upcycle_only_s$1.log" 2>&1
    finished "gtd_s$1_dense" || python -m scripts.base_train "${COMMON[@]}" --init-from "gtl_s$1_dense" --target-flops 2e13 \
        --seed "$1" --model-tag "gtd_s$1_dense" > "$LOGS/dense_continued_s$1.log" 2>&1
}
scratch() {  # flops
    finished "gs_$1_s42" || python -m scripts.base_train --data "$DATA" "${COMMON[@]}" "${FINAL[@]}" --target-flops "$1" \
        --seed 42 --model-tag "gs_$1_s42" > "$LOGS/scratch_$1_s42.log" 2>&1
}

( lineage gt_s42 42 5e12 5e12 3e13; scratch 2e13; lineage gtl_s42 42 2e13 5e12 1.5e13; continued 42 ) &
( scratch 4e13; scratch 8e13; lineage gtl_s43 43 2e13 5e12 1.5e13; continued 43 ) &
wait
# s_dense_4e13: the small dense model alone for the same 4e13 FLOPs (dev/techmix_study.py, same data and batches)
python -m scripts.compare --runs gt_s42_grown gtl_s42_grown gtu_s42_moe gtd_s42_dense \
    $([ -d "$BASE/runs/s_dense_4e13" ] && echo s_dense_4e13) gs_2e13_s42 gs_4e13_s42 gs_8e13_s42 \
    --frontier gs_2e13_s42 gs_4e13_s42 gs_8e13_s42 --out "$LOGS/compare"
python -m scripts.compare --runs gtl_s43_grown gtu_s43_moe gtd_s43_dense gs_2e13_s42 gs_4e13_s42 gs_8e13_s42 \
    --frontier gs_2e13_s42 gs_4e13_s42 gs_8e13_s42 --out "$LOGS/compare_s43"
