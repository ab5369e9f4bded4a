#!/usr/bin/env bash
# Grow instead of starting over, in three phases on one data stream (no token seen twice):
#   1. a dense GPT                                   (depth 2, width 64)
#   2. the same model upcycled into an MoE           (top-2 of 8 experts, each a copy of the MLP)
#   3. that MoE grown x2 in width and +2 layers      (depth 4, width 128)
# Each transform is verified function-preserving (scripts/grow.py, < 1e-4 max abs logit
# difference); each phase starts from the last one's weights and data position with a fresh
# optimizer and a short LR warm-up (base_train --init-from); phases 1-2 keep a constant LR (the
# next phase continues), phase 3 warms down. Then the no-growth control: the phase-2 MoE (what
# phase 3 grew from) trained on with phase 3's FLOPs, data stream and schedule, so the grown
# model is compared with what the same compute buys without growing. At the end: BOUNDARY
# SUMMARY, growth table, grown vs control, and training_history.jsonl with a `phase` on every
# record. ~4 minutes on 2 CPU cores with CONTROL=0; the control adds about 1.5x phase 3's time
# (~5x its steps on the smaller model).
#
#   bash runs/grow.sh                           # built-in synthetic corpus
#   DATA=path/to/texts bash runs/grow.sh        # your own .txt/.jsonl/.parquet files or shard folder
#   NPROC=8 bash runs/grow.sh                   # training phases under torchrun (GPUs; set DEVICE=cuda)
#   P1="--target-flops 5e12" P3="--target-flops 3e13" bash runs/grow.sh   # horizons per phase
#   CONTROL=0 bash runs/grow.sh                 # skip the no-growth control
#   DRY_RUN=1 bash runs/grow.sh                 # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${DATA:-synthetic}"
TAG="${TAG:-grow}"                    # runs: <TAG>_dense, <TAG>_moe, <TAG>_grown, <TAG>_control
CONTROL="${CONTROL:-1}"
DEVICE="${DEVICE:-cpu}"
NPROC="${NPROC:-1}"
SEQ_LEN="${SEQ_LEN:-256}"
BATCH_ROWS="${BATCH_ROWS:-8}"
read -ra P1_H <<< "${P1:---num-iterations 500}"
read -ra P2_H <<< "${P2:---num-iterations 250}"
read -ra P3_H <<< "${P3:---num-iterations 250}"
read -ra UPCYCLE <<< "${UPCYCLE:---n-experts 8 --expert-topk 2}"
read -ra GROW <<< "${GROW:---width-mult 2 --add-layers 2}"
read -ra EXTRA_ARGS <<< "${EXTRA:-}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

run() {
    echo "+ $*"
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}
banner() {
    echo
    echo "================================================================================"
    echo "  $1"
    echo "================================================================================"
}

if [ -z "${DRY_RUN:-}" ]; then
    # shellcheck source=runs/setup_env.sh
    source runs/setup_env.sh
fi
PY="${PYTHON:-python}"
BASE="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
RUNS=("${TAG}_dense" "${TAG}_moe" "${TAG}_grown")
if [ "$CONTROL" != 0 ]; then RUNS+=("${TAG}_control"); fi
for t in "${RUNS[@]}"; do
    if [ -e "$BASE/runs/$t" ] && [ -z "${DRY_RUN:-}" ]; then
        echo "runs/grow.sh: error: $BASE/runs/$t exists (a grown run is never overwritten): use another TAG= or delete the ${TAG}_* runs" >&2
        exit 2
    fi
done
if [ "$NPROC" -gt 1 ]; then
    TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m scripts.base_train --)
else
    TRAIN=("$PY" -m scripts.base_train)
fi

# The same batch, evaluation and data in every phase: the jump at a boundary is measured on
# the same validation batches. --data/--vocab-size only matter in phase 1 (later phases take
# the checkpoint's data, tokenizer and position).
COMMON=(--device-type "$DEVICE" --device-batch-size "$BATCH_ROWS" --total-batch-size $((BATCH_ROWS * SEQ_LEN * NPROC * 2))
        --eval-every 50 --eval-tokens 65536 --sample-every 1000000 --log-every 25 --moe-stats-every 50
        ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
# without value embeddings and short windows: phase 3 adds layers, and which layers carry those
# depends on the depth (a grown model would not compute its source's function)
PHASE1=(--data "$DATA" --vocab-size 2048 --depth 2 --n-embd 64 --head-dim 32 --max-seq-len "$SEQ_LEN"
        --no-value-embeds --window-pattern L)
if [ "$DATA" = "synthetic" ]; then
    # ~110 tokens a document: the three phases (4.1M tokens) and the control (5.2M more after
    # phase 2, which ended at 3.1M) stay under one epoch
    if [ "$CONTROL" != 0 ]; then DOCS=80000; else DOCS=40000; fi
    PHASE1+=(--synthetic-train-docs "${SYNTHETIC_DOCS:-$DOCS}")
fi

banner "PHASE 1/3: dense"
run "${TRAIN[@]}" "${COMMON[@]}" "${PHASE1[@]}" "${P1_H[@]}" --warmdown-ratio 0 --model-tag "${TAG}_dense"

banner "PHASE 2/3: upcycled MoE"
run "$PY" -m scripts.grow --from "${TAG}_dense" --to "${TAG}_moe" --upcycle "${UPCYCLE[@]}" --device-type "$DEVICE"
run "${TRAIN[@]}" "${COMMON[@]}" --init-from "${TAG}_moe:0" "${P2_H[@]}" --warmdown-ratio 0 --model-tag "${TAG}_moe"

banner "PHASE 3/3: grown MoE"
run "$PY" -m scripts.grow --from "${TAG}_moe" --to "${TAG}_grown" "${GROW[@]}" --device-type "$DEVICE"
run "${TRAIN[@]}" "${COMMON[@]}" --init-from "${TAG}_grown:0" "${P3_H[@]}" --warmdown-ratio 0.2 --model-tag "${TAG}_grown"

SUMMARY_CONTROL=()
if [ "$CONTROL" != 0 ]; then
    # Equal compute, not equal steps: the smaller model takes ~5x the steps (and tokens) for
    # phase 3's FLOPs. Same source checkpoint and data position, same warm-up and warm-down.
    banner "NO-GROWTH CONTROL: the phase-2 MoE trained on for phase 3's FLOPs"
    if [ -z "${DRY_RUN:-}" ]; then
        P3_FLOPS=$("$PY" -m scripts.grow_summary --flops-of "${TAG}_grown")
    else
        P3_FLOPS="\$($PY -m scripts.grow_summary --flops-of ${TAG}_grown)"
    fi
    run "${TRAIN[@]}" "${COMMON[@]}" --init-from "${TAG}_moe" --target-flops "$P3_FLOPS" --warmdown-ratio 0.2 --model-tag "${TAG}_control"
    SUMMARY_CONTROL=(--control "${TAG}_control")
fi

run "$PY" -m scripts.grow_summary "${TAG}_dense" "${TAG}_moe" "${TAG}_grown" --names dense,moe,grown \
    --history "$BASE/runs/${TAG}_grown/training_history.jsonl" ${SUMMARY_CONTROL[@]+"${SUMMARY_CONTROL[@]}"}
