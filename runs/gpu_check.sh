#!/usr/bin/env bash
# One-GPU check, one prepared script (at most TOTAL_LIMIT = 480 s by default, no network): named stages,
# each under `timeout`, each writing $OUT/<stage>.json (name, command, exit code, seconds, the
# bench's final JSON line) the moment it ends, so a run cut short still leaves what it measured.
# A failed or timed-out stage is recorded and the next one runs; $OUT/summary.json lists them all
# and the exit status is non-zero if any failed. Stages (STAGES picks them, in this order):
#   tests     CUDA tests (tests/test_cuda.py; skipped when pytest is not installed)
#   step_before  (with BEFORE=DIR) the step stage on an older tree exported into DIR, so a change
#             is timed before and after on the same card in the same call
#   step      whole-model training steps, dense vs the default MoE (top-2 of 8, iso-FLOPs) at
#             depth 8, width 768, 32k tokens per micro-batch, bf16, compiled: tok/s, MFU,
#             MoE/dense step (target <= 1.3, stretch <= 1.15), recompiles, memory, and each
#             one's costliest GPU kernels (torch.profiler)
#   moe_parts where the MoE's extra step time comes from (depth 4, compiled, profiled): dense, the
#             default MoE, one 4d expert (all the routing and dispatch, a single group) and
#             top-1 of 8 4d experts (half the assignments, larger groups)
#   step_fp8  the same as step with --fp8 (skipped when this machine cannot: no torchao or no FP8 GPU)
#   tmp_moe   a one-GPU smoke of runs/tmp_moe.sh (NPROC=1, tiny shape and budget, the built-in
#             corpus, no set-up, no network; skipped without rustbpe, which trains its tokenizer)
#   bench_moe bench_moe's whole-model step, compiled
#   variants  (not by default: measured on an H200, dev/LOG.md) MoD and MTP variants beside dense
#             and MoE (depth 8), compiled
#   train     (not by default: needs a tokenizer, i.e. rustbpe or one prepared before) dense and
#             MoE base_train runs on the built-in corpus
# Only torch, numpy (and pytest for `tests`) are needed: nothing here downloads anything.
#
#   bash runs/gpu_check.sh                      # on a machine with a CUDA GPU
#   OUT=dir STAGES="step bench_moe" bash runs/gpu_check.sh
#   STEP_LIMIT=300 TOTAL_LIMIT=600 bash ...     # <STAGE>_LIMIT: one stage's seconds; TOTAL_LIMIT: all
#   DRY_RUN=1 bash runs/gpu_check.sh            # print the commands only
#   mkdir gpu_before && git archive COMMIT | tar -x -C gpu_before && BEFORE=gpu_before bash runs/gpu_check.sh
#                                               # before/after (the device copy has no git history:
#                                               # export the old tree into an untracked folder first)
#   DEVICE=cpu STEP_ARGS="--depth 1 ..." ...    # the stage machinery on CPU (fp32, eager; tests)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/gpu_check}"
PY="${PYTHON:-python}"
BEFORE="${BEFORE:-}"
STAGES="${STAGES:-tests${BEFORE:+ step_before} step moe_parts step_fp8 tmp_moe bench_moe}"
STEPS="${STEPS:-60}"  # train stage: optimizer steps per run
# The whole run stops starting stages after TOTAL_LIMIT seconds (each stage's limit is clipped to
# what is left), so it fits the device time however the stages go; a stage that would get less
# than MIN_STAGE_S (importing torch and starting CUDA alone take seconds) is recorded, not run.
TOTAL_LIMIT="${TOTAL_LIMIT:-480}"
MIN_STAGE_S="${MIN_STAGE_S:-20}"
DEVICE="${DEVICE:-cuda}"
DTYPE=bf16 COMPILE=on  # as nanochat trains on a GPU
if [ "$DEVICE" != cuda ]; then
    DTYPE=fp32 COMPILE=off  # bf16 autocast is CUDA-only here; compiling on CPU is slow
fi
PREC=(--dtype "$DTYPE" --device-type "$DEVICE" --compile "$COMPILE")
START=$(date +%s.%N)
has() { [[ " $STAGES " == *" $1 "* ]]; }

# All JSON is written by python (no jq on a bare machine): gpu.json, <stage>.json, summary.json.
# Files are written to a temporary name and renamed, so a reader never sees half a file.
pyjson() {
    "$PY" - "$OUT" "$@" <<'PYEOF'
import json, os, subprocess, sys, time

out, mode, *args = sys.argv[1:]

def write(name, obj):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, os.path.join(out, name))

if mode == "gpu":  # what ran: torch, the GPU (nvidia-smi's line where there is one)
    import torch
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        info["nvidia_smi"] = None
    print(f"torch {info['torch']} (CUDA {info['cuda']}), device: {info['device']}"
          + (f"; nvidia-smi: {info['nvidia_smi']}" if info["nvidia_smi"] else ""))
    write("gpu.json", info)

elif mode == "stage":  # name, limit, exit code ('' = not run), start, end, status, reason, command...
    name, limit, rc, t0, t1, status, reason, *cmd = args
    result, log = None, os.path.join(out, name + ".log")
    if os.path.exists(log):  # the benches print one JSON object as their last line
        for line in reversed(open(log, errors="replace").read().splitlines()):
            if line.startswith("{"):
                try:
                    result = json.loads(line)
                except ValueError:
                    continue
                break
    write(name + ".json", dict(stage=name, command=" ".join(cmd), limit_s=int(limit), status=status,
                               exit_code=int(rc) if rc else None, seconds=round(float(t1) - float(t0), 2),
                               reason=reason or None, log=log if os.path.exists(log) else None, result=result))

elif mode == "summary":  # stage names in run order, then TOTAL start time
    *names, t0 = args
    stages = [json.load(open(os.path.join(out, n + ".json"))) for n in names]
    gpu = json.load(open(os.path.join(out, "gpu.json"))) if os.path.exists(os.path.join(out, "gpu.json")) else None
    print(f"\n{'stage':<12}{'status':<9}{'exit':>5}{'seconds':>9}{'limit':>7}  note")
    for s in stages:
        print(f"{s['stage']:<12}{s['status']:<9}{str(s['exit_code']):>5}{s['seconds']:>9.1f}{s['limit_s']:>7}  {s['reason'] or ''}")
    # the targets, read from the step benches: measured vs target
    targets = []
    for s in stages:
        r = s["result"] or {}
        if s["stage"] not in ("step_before", "step", "step_fp8") or not r.get("variants"):
            continue
        v = r["variants"]
        moe_over_dense = (v.get("moe") or {}).get("time_ratio")
        checks = [("MoE/dense step", moe_over_dense, "<=", 1.3),
                  ("MoE/dense step (stretch)", moe_over_dense, "<=", 1.15),
                  ("dense MFU %", (v.get("dense") or {}).get("mfu"), ">=", 40.0),
                  ("recompiles after warm-up", r.get("recompiles_after_warmup"), "==", 0)]
        for what, got, op, want in checks:
            ok = None if got is None else {"<=": got <= want, ">=": got >= want, "==": got == want}[op]
            targets.append(dict(stage=s["stage"], target=what, measured=got, op=op, goal=want,
                                verdict="n/a" if ok is None else "PASS" if ok else "MISS"))
    if targets:
        print("\ntargets")
        for t in targets:
            got = t["measured"]
            got = "n/a" if got is None else f"{got:.3f}" if isinstance(got, float) else str(got)
            print(f"  {t['stage']:<12}{t['target']:<26}{got:>8}  {t['op']} {t['goal']:<5} {t['verdict']}")
    else:
        print("\ntargets: n/a (no step bench result)")
    failed = [s["stage"] for s in stages if s["status"] in ("failed", "timeout")]
    write("summary.json", dict(gpu=gpu, stages=stages, targets=targets, failed=failed,
                               total_s=round(time.time() - float(t0), 1)))
    print(f"\n{len(stages)} stage(s), failed or timed out: {', '.join(failed) or 'none'}; JSON in {out}")
    sys.exit(1 if failed else 0)
PYEOF
}

# A stage's limit: <NAME>_LIMIT from the environment (e.g. STEP_LIMIT), else the default given.
limit_of() {
    local var
    var="$(tr '[:lower:]' '[:upper:]' <<< "$1")_LIMIT"
    echo "${!var:-$2}"
}

# skip_reason PYTHON_CODE: empty when the code runs, else its error's last line (why the stage
# cannot run here). A DRY_RUN runs nothing, so nothing is skipped there.
skip_reason() {
    [ -n "${DRY_RUN:-}" ] && return 0
    local err
    if ! err=$("$PY" -c "$1" 2>&1 >/dev/null); then
        echo "${err##*$'\n'}" | cut -c1-200
        [ -n "$err" ] || echo "check failed: $1"
    fi
}

RAN=()  # stages run, in order, for the summary
# stage NAME DEFAULT_LIMIT_S COMMAND...: run COMMAND under timeout, its output to the terminal and
# $OUT/NAME.log, then write $OUT/NAME.json. SKIP (env, set by the caller) names why not to run it.
stage() {
    local name=$1 limit rc="" status t0 t1 reason=${SKIP:-} left
    limit=$(limit_of "$1" "$2")
    shift 2
    # -k 10: a process that ignores TERM (stuck in a CUDA call) is killed 10 s later (exit 137)
    echo "+ timeout -k 10 $limit $*"
    [ -n "${DRY_RUN:-}" ] && return 0
    RAN+=("$name")
    rm -f "$OUT/$name.log" "$OUT/$name.json"
    t0=$(date +%s.%N)
    left=$(( TOTAL_LIMIT - (${t0%.*} - ${START%.*}) ))
    if [ -n "$reason" ]; then
        status=skipped
    elif [ "$left" -lt "$MIN_STAGE_S" ]; then
        status=timeout reason="not started: ${left}s left of TOTAL_LIMIT=${TOTAL_LIMIT}s"
    else
        if [ "$left" -lt "$limit" ]; then limit=$left reason="limit clipped to TOTAL_LIMIT"; fi
        # set +e: a failing stage is a result to record, not a reason to stop the script;
        # PIPESTATUS[0] is the command's (timeout's) status, not tee's
        set +e
        timeout -k 10 "$limit" "$@" < /dev/null 2>&1 | tee "$OUT/$name.log"
        rc=${PIPESTATUS[0]}
        set -e
        case $rc in
            0) status=ok ;;
            124 | 137) status=timeout ;;
            *) status=failed ;;
        esac
    fi
    t1=$(date +%s.%N)
    echo "-- $name: $status${rc:+ (exit $rc)}${reason:+: $reason}"
    pyjson stage "$name" "$limit" "$rc" "$t0" "$t1" "$status" "$reason" "$@" || echo "could not write $OUT/$name.json"
}

if [ -z "${DRY_RUN:-}" ]; then
    mkdir -p "$OUT"
    pyjson gpu || echo "could not query torch/GPU with $PY"
fi

if has tests; then
    SKIP=$(skip_reason "import pytest") stage tests 60 "$PY" -m pytest -q tests/test_cuda.py
fi

# Whole-model steps at the shape of the first GPU measurement (dev/LOG.md, H200: MoE/dense 2.13):
# depth 8, width 768 (6 heads of 128), seq 1024, vocab 32768; 32 rows = 32k tokens per
# micro-batch, the optimizer spread over 524k-token batches. Dense vs the default MoE (top-2 of 8
# at iso-FLOPs): the MoE/dense step ratio (<= 1.3, stretch <= 1.15), MFU and recompiles after
# warm-up are the targets. Compiling each takes 30-90 s on an H200.
read -r -a STEP_SHAPE <<< "${STEP_ARGS:---depth 8 --n-embd 768 --head-dim 128 --max-seq-len 1024 --vocab-size 32768 --rows 32 --repeats 10}"
# --profile 25: then one profiled fwd+bwd each, its 25 costliest kernels in the JSON (where the
# MoE's extra time goes: grouped GEMMs, gathers, sort, routing?)
S=("$PY" -m scripts.bench_step "${STEP_SHAPE[@]}" "${PREC[@]}" --profile 25 --variant dense: --variant moe:--use-moe)
if has step_before; then
    # the same bench in the older tree (its own scripts and nanochat), on this card, before `step`
    SKIP=$([ -d "$BEFORE/scripts" ] || echo "BEFORE=$BEFORE is not an exported tree (no scripts/ in it)") \
        stage step_before 150 env -C "$BEFORE" PYTHONPATH=. "${S[@]}"
fi
if has step; then
    stage step 150 "${S[@]}"
fi
# The MoE/dense step ratio, taken apart: if moe_e1 (the MoE machinery around one plain GEMM) is
# as slow as moe, routing/dispatch/combine cost the time; if it is near dense, the grouped GEMM
# over 8 groups does; moe_top1 halves the gathered rows at the same FLOPs.
P=(--depth 4 --n-embd 768 --head-dim 128 --max-seq-len 1024 --vocab-size 32768 --rows 32 --repeats 10 "${PREC[@]}")
if has moe_parts; then
    stage moe_parts 150 "$PY" -m scripts.bench_step "${P[@]}" --profile 15 --variant dense: --variant moe:--use-moe \
        --variant "moe_e1:--use-moe --n-experts 1 --expert-topk 1 --expert-hidden-mult 4" \
        --variant "moe_top1:--use-moe --expert-topk 1 --expert-hidden-mult 4"
fi
if has step_fp8; then
    SKIP=$(skip_reason "from nanochat.fp8 import check_fp8_supported as c; c('$DEVICE')") stage step_fp8 120 "${S[@]}" --fp8
fi

# Architecture variants' whole training steps side by side (compiled, bf16): does MoD's saving
# of FLOPs reach the wall clock, what does an MTP head cost? (no data or tokenizer needed)
V=(--depth 8 --n-embd 768 --head-dim 128 --max-seq-len 1024 --vocab-size 32768 --rows 32 --repeats 10 "${PREC[@]}")
if has variants; then
    stage variants 120 "$PY" -m scripts.bench_step "${V[@]}" --variant dense: --variant "mod:--mod-capacity 0.125" \
        --variant "moe:--use-moe" --variant "moe_mod:--use-moe --mod-capacity 0.125" --variant "mtp:--mtp-heads 1"
fi

if has tmp_moe; then
    # the 8-GPU recipe end to end on one GPU: data and tokenizer prepared, dense, MoE, the 2x dense
    # frontier, the comparison with FLOPs and time multipliers (its own run folders under OUT)
    SKIP=$(skip_reason "import rustbpe") stage tmp_moe 120 env SETUP=0 PYTHON="$PY" NANOCHAT_BASE_DIR="$OUT/tmp_moe_base" \
        DEVICE="$DEVICE" NPROC=1 DATA=synthetic SYNTHETIC_DOCS=4000 DEPTH=2 WIDTH=128 SEQ_LEN=256 BATCH=16 \
        TOTAL_BATCH=8192 VOCAB=2048 TARGET_FLOPS=2e12 EVAL_EVERY=20 EVAL_TOKENS=65536 TRAIN_FLAGS="--compile off" \
        bash runs/tmp_moe.sh
fi
if has bench_moe; then
    stage bench_moe 90 "$PY" -m scripts.bench_moe --step-only "${PREC[@]}" --repeats 10
fi

# depth 4, width 512, seq 1024, 32 rows x 1024 = 32k tokens per micro-batch, 2 micro-batches
T=(--depth 4 --n-embd 512 --head-dim 64 --max-seq-len 1024 --vocab-size 4096 --device-batch-size 32
   --total-batch-size 65536 --num-iterations "$STEPS" --eval-every 30 --eval-tokens 262144 --sample-every -1
   --synthetic-train-docs 40000 --device-type "$DEVICE" --compile "$COMPILE")
if has train; then
    stage train_dense 120 "$PY" -m scripts.base_train "${T[@]}" --model-tag gpu_dense
    stage train_moe 120 "$PY" -m scripts.base_train "${T[@]}" --use-moe --n-experts 8 --expert-topk 2 --model-tag gpu_moe
fi

if [ -z "${DRY_RUN:-}" ]; then
    pyjson summary "${RAN[@]}" "$START"  # its exit status: 1 when a stage failed or timed out
fi
