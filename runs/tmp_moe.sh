#!/usr/bin/env bash
# GPU recipe: a dense GPT and an iso-FLOPs MoE (top-2 of 8, experts 2x wide) trained with torchrun
# on the same data for the same FLOPs, plus the dense model at 2x that budget (the frontier the
# multipliers are read from), then compared in FLOPs and in training seconds.
#
#   bash runs/tmp_moe.sh                           # 8 GPUs, FineWeb-Edu
#   NPROC=1 bash runs/tmp_moe.sh                   # one GPU
#   DATA=path/to/texts bash runs/tmp_moe.sh        # your .txt/.jsonl/.parquet files or shard folder; or synthetic
#   DEPTH=20 TARGET_FLOPS=1e19 bash runs/tmp_moe.sh
#   MOE_FLAGS="--router softmax --aux-free-bias 0 --balance-loss-coeff 0.01" bash runs/tmp_moe.sh
#                                                  # extra base_train flags for the MoE run only
#   FRONTIER=0 bash runs/tmp_moe.sh                # skip the 2x dense run (the multiplier is then read
#                                                  # on one dense curve, which flatters the MoE)
#   FRONTIER_MULTS="0.5 2" bash runs/tmp_moe.sh    # dense frontier budgets, in multiples of TARGET_FLOPS
#   FP8=1 bash runs/tmp_moe.sh                     # FP8 linears and experts (torchao 0.18, compute capability 8.9+)
#   CORE_MAX_PER_TASK=-1 bash runs/tmp_moe.sh      # CORE of every run at its end on all examples (default 500 per task)
#   CORE_EVAL_DIR=path/to/eval bash runs/tmp_moe.sh  # CORE task files already here (default: the bundle, downloaded once)
#   CORE=0 bash runs/tmp_moe.sh                    # no CORE evaluation
#   WANDB_RUN=myrun bash runs/tmp_moe.sh           # log to wandb
#   DRY_RUN=1 bash runs/tmp_moe.sh                 # print the commands only
#   SETUP=0 PYTHON=/path/to/python bash runs/tmp_moe.sh   # use that interpreter as it is (no pip install)
#
# The same script runs on CPU (gloo) for a smoke test, e.g. DEVICE=cpu NPROC=2 SETUP=0 DATA=synthetic
# DEPTH=2 WIDTH=64 HEAD_DIM=32 SEQ_LEN=64 BATCH=4 TOTAL_BATCH=512 VOCAB=512 TARGET_FLOPS=5e9 (tests/test_recipes.py).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${DEVICE:-cuda}"
NPROC="${NPROC:-8}"
DATA="${DATA:-fineweb}"             # fineweb | synthetic | PATH, as in runs/runcpu.sh
NUM_SHARDS="${NUM_SHARDS:-64}"      # DATA=fineweb: shards to download (the last is validation)
SYNTHETIC_DOCS="${SYNTHETIC_DOCS:-20000}"  # DATA=synthetic: train documents
VOCAB="${VOCAB:-65536}"             # when a tokenizer is trained for DATA (one tokenizer per corpus)
DEPTH="${DEPTH:-12}"
WIDTH="${WIDTH:-}"                  # empty: base_train's depth x aspect ratio
HEAD_DIM="${HEAD_DIM:-64}"
SEQ_LEN="${SEQ_LEN:-1024}"
BATCH="${BATCH:-16}"                # rows per micro-batch per process
TOTAL_BATCH="${TOTAL_BATCH:-524288}"  # tokens per optimizer step (gradient accumulation makes up the rest)
TARGET_FLOPS="${TARGET_FLOPS:-2e18}"
EVAL_EVERY="${EVAL_EVERY:-250}"
EVAL_TOKENS="${EVAL_TOKENS:-}"      # empty: base_train's default
N_EXPERTS="${N_EXPERTS:-8}"
TOPK="${TOPK:-2}"
EXPERT_MULT="${EXPERT_MULT:-2}"     # TOPK x EXPERT_MULT = 4: iso-FLOPs with the dense 4x MLP
read -ra MOE_EXTRA <<< "${MOE_FLAGS:-}"
read -ra TRAIN_EXTRA <<< "${TRAIN_FLAGS:-}"   # extra base_train flags for every run
FRONTIER="${FRONTIER:-1}"
read -ra FRONTIER_MULTS <<< "${FRONTIER_MULTS:-2}"
FP8="${FP8:-0}"
CORE="${CORE:-1}"
CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:-500}"
CORE_EVAL_DIR="${CORE_EVAL_DIR:-}"
WANDB_RUN="${WANDB_RUN:-dummy}"
TAG="${TAG:-tmp}"                   # runs are <TAG>_dense_d<DEPTH>, <TAG>_moe_d<DEPTH>, <TAG>_dense_d<DEPTH>_<M>x

run() {  # prints the command shell-quoted (DRY_RUN=1 prints only): it can be pasted back
    local line
    line=$(printf '%q ' "$@")
    echo "+ ${line% }"
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

if [ -z "${DRY_RUN:-}" ] && [ "${SETUP:-1}" != "0" ]; then
    EXTRAS=""
    if [ "$FP8" = "1" ]; then EXTRAS="[fp8]"; fi  # torchao, pinned to the series the FP8 code was written for
    # shellcheck source=runs/setup_env.sh
    source runs/setup_env.sh
fi
PY="${PYTHON:-python}"
# torchrun through the same interpreter: a `torchrun` found first on PATH may belong to another Python
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")

DATA_FLAGS=(--data "$DATA" --vocab-size "$VOCAB")
if [ "$DATA" = "fineweb" ]; then DATA_FLAGS+=(--num-shards "$NUM_SHARDS"); fi
if [ "$DATA" = "synthetic" ]; then DATA_FLAGS+=(--synthetic-train-docs "$SYNTHETIC_DOCS"); fi
# Download, shard building and tokenizer training happen once, in one process, before torchrun
# starts (inside rank 0 they could outlast the other ranks' wait at the process group's barrier).
run "$PY" -m scripts.prepare_data "${DATA_FLAGS[@]}"

COMMON=("${DATA_FLAGS[@]}" --depth "$DEPTH" --head-dim "$HEAD_DIM" --max-seq-len "$SEQ_LEN"
        --device-batch-size "$BATCH" --total-batch-size "$TOTAL_BATCH" --eval-every "$EVAL_EVERY" --device-type "$DEVICE")
if [ -n "$WIDTH" ]; then COMMON+=(--n-embd "$WIDTH"); fi
if [ -n "$EVAL_TOKENS" ]; then COMMON+=(--eval-tokens "$EVAL_TOKENS"); fi
if [ "$FP8" = "1" ]; then COMMON+=(--fp8); fi
if [ "$CORE" = "1" ]; then
    # CORE at the end of every run: the task files are fetched and checked here, in one process;
    # without them (offline, no CORE_EVAL_DIR) the runs go on without CORE
    EVAL_DIR_FLAG=(); if [ -n "$CORE_EVAL_DIR" ]; then EVAL_DIR_FLAG=(--eval-dir "$CORE_EVAL_DIR"); fi
    if run "$PY" -m scripts.base_eval --prepare --max-per-task "$CORE_MAX_PER_TASK" ${EVAL_DIR_FLAG[@]+"${EVAL_DIR_FLAG[@]}"}; then
        COMMON+=(--core-every -1 --core-max-per-task "$CORE_MAX_PER_TASK")
        if [ -n "$CORE_EVAL_DIR" ]; then COMMON+=(--core-eval-dir "$CORE_EVAL_DIR"); fi
    else
        echo "tmp_moe: CORE skipped: no task files (the line above says why); set CORE_EVAL_DIR, or CORE=0 to silence this"
    fi
fi
COMMON+=(${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"})
wandb_name() { if [ "$WANDB_RUN" = "dummy" ]; then echo dummy; else echo "${WANDB_RUN}$1"; fi; }

DENSE="${TAG}_dense_d${DEPTH}"
MOE="${TAG}_moe_d${DEPTH}"
run "${TORCHRUN[@]}" -m scripts.base_train -- "${COMMON[@]}" --target-flops "$TARGET_FLOPS" \
    --run "$(wandb_name "")" --model-tag "$DENSE"
run "${TORCHRUN[@]}" -m scripts.base_train -- "${COMMON[@]}" --target-flops "$TARGET_FLOPS" \
    --use-moe --n-experts "$N_EXPERTS" --expert-topk "$TOPK" --expert-hidden-mult "$EXPERT_MULT" \
    ${MOE_EXTRA[@]+"${MOE_EXTRA[@]}"} --run "$(wandb_name _moe)" --model-tag "$MOE"
RUNS=("$DENSE" "$MOE")
if [ "$FRONTIER" != "0" ]; then
    # The dense model trained (and annealed) to other budgets: the multipliers are read between
    # the dense runs' final points, not on one curve's pre-warmdown evals.
    FRONTIER_RUNS=("$DENSE")
    for MULT in "${FRONTIER_MULTS[@]}"; do
        FLOPS=$(awk -v f="$TARGET_FLOPS" -v m="$MULT" 'BEGIN { printf "%.4g", m * f }')
        run "${TORCHRUN[@]}" -m scripts.base_train -- "${COMMON[@]}" --target-flops "$FLOPS" \
            --run "$(wandb_name "_dense_${MULT}x")" --model-tag "${DENSE}_${MULT}x"
        FRONTIER_RUNS+=("${DENSE}_${MULT}x")
    done
    RUNS+=("${FRONTIER_RUNS[@]:1}" --frontier "${FRONTIER_RUNS[@]}")
fi
OUT="${OUT:-${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/comparisons/${TAG}_d${DEPTH}}"
run "$PY" -m scripts.compare --runs "${RUNS[@]}" --out "$OUT"
