#!/usr/bin/env bash
# The GPU run in one command, for a machine lent for minutes without network access (torch,
# triton, timm and pytest preinstalled). Every step runs under `timeout`, so that a slow or hung
# step cannot eat the time of the later ones, which still run; the whole run ends within
# BUDGET_S seconds (default 450: under 8 minutes on a bare machine). It leaves two files:
#   OUTDIR/summary.md   a status line per step (ok / failed (rc N) / timed out, seconds) and the
#                       markdown tables for benchmarks/RESULTS.md
#   OUTDIR/lease.tgz    lease/: every log and JSON, the plots, env.txt, nvidia-smi.txt and the
#                       dispatch cache that `incubation tune` wrote (lease/cache)
# Both are rewritten after every step, so a run cut short still leaves what it measured.
#
#   benchmarks/gpu.sh OUTDIR [lease | STEP ...]
#
# lease (the default) is, in this order:
#   build          pip install --no-build-isolation --no-deps -e . with INCUBATION_REQUIRE_EXTENSION=1,
#                  TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=nproc; then `incubation backends`
#   tests          the CUDA tests, `pytest -m gpu` of tests/test_kernels.py (every backend), the compiled
#                  ViT with each GPU backend forced (tests/test_compile.py), opcheck of the Triton ops,
#                  the sm_90 TMA linear's epilogue, fallback and in-place tests, and tests/test_extension.py:
#                  every kernel against float64 in fp32/fp16/bf16, in SHARDS
#                  processes at once. The Triton half (-k triton) needs no extension and runs while it
#                  builds (compiling kernels is most of its time); the extension half (-k "not triton")
#                  runs after the build.
#   ops            op benchmark: ViT-B, B=256, N=197, bf16, every op and provider; the SDPA backend
#                  torch picks is recorded and pinned for the timing
#   ops-attention  attention at N=257: ViT-B (head dim 64) and ViT-H (head dim 80), B=256, bf16
#   tune           incubation tune --preset vit-b --batch-size 256 --dtype bf16 --device cuda (the cache
#                  goes to INCUBATION_CACHE_DIR=lease/cache), then `incubation backends --device cuda`
#   train          ViT-B train step, bf16 autocast, batch TRAIN_BATCH: ours-auto, ours-triton, ours-compile
#                  (our ViT under torch.compile with the decisions `tune` cached), timm, timm-compile
# Not in the lease, for a longer loan (up to 300 and 400 s: raise BUDGET_S): ops-dtypes (the op
# benchmark at ViT-B in fp16 and fp32) and train-large (ViT-L and ViT-H train steps).
#
# Environment:
#   PYTHON       the interpreter (default: python3, else python)
#   BUDGET_S     seconds for the whole run (default 450; 240 with DRY=1)
#   SHARDS       pytest processes for the tests (default: cores - 4; 2 with DRY=1)
#   TRAIN_BATCH  train-step batch (default 128)
#   WHEELS       wheels for what the machine lacks (default .whl, git-ignored: carry it along; fill it
#                elsewhere with e.g. `pip download ninja safetensors hypothesis -d .whl`)
#   DEVICE=cpu DRY=1   the same plumbing on a CPU in about a minute, to try this script: no build,
#                tiny shapes, the tests selected as on the GPU (on a CPU: none)
set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
OUT_ARG=$1
shift
ALL=(build tests ops ops-attention tune train ops-dtypes train-large)
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 || "${STEPS[*]}" == lease ]] && STEPS=(build tests ops ops-attention tune train)
for s in "${STEPS[@]}"; do
    [[ " ${ALL[*]} " == *" $s "* ]] || { echo "gpu.sh: unknown step '$s' (lease, or: ${ALL[*]})" >&2; exit 2; }
done
want() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

OUT=$(mkdir -p "$OUT_ARG" && cd "$OUT_ARG" && pwd) || { echo "gpu.sh: cannot create $OUT_ARG" >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
export STAGE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-sh.XXXXXX") || exit 2
export WORK=$STAGE/lease
mkdir -p "$WORK"

export PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export DEVICE=${DEVICE:-cuda}
DRY=${DRY:-0}
[[ "$DRY" == 1 ]] && BUDGET_S=${BUDGET_S:-240}
BUDGET_S=${BUDGET_S:-450}
NPROC=$(nproc)
SHARDS=${SHARDS:-$((NPROC > 5 && DRY != 1 ? NPROC - 4 : 2))}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this tree, built or not
export INCUBATION_CACHE_DIR=$WORK/cache
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$NPROC}
[[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]] && export CUDA_HOME=/usr/local/cuda
unset TRITON_INTERPRET  # the compiled kernels, never the interpreter

# The steps as the summary lists them; a step may run for min(CAP, what is left of the budget
# after FLOOR seconds for each later step). The floors keep at least about the time each step
# needs on an H100 (train: torch.compile of timm's ViT-B); tests-triton runs beside the build.
ORDER=(env build tests-triton backends tests-extension ops ops-attention tune backends-tuned train ops-dtypes
       train-large)
# (train: five providers, two of them compiled by Inductor: timm's ViT-B and ours with tuned decisions)
# (first lease, H200, budget 450: build 62 s, train 101 s; ops-attention's 25 s and tune's 30 s were
# spent compiling kernels before anything was measured, so those floors are higher now, and the
# Triton tests, the least new information, give way: with a longer call, raise BUDGET_S)
declare -A CAP=([env]=60 [build]=200 [tests-triton]=100 [backends]=30 [tests-extension]=90 [ops]=120
                [ops-attention]=60 [tune]=150 [backends-tuned]=30 [train]=300 [ops-dtypes]=300 [train-large]=400)
declare -A FLOOR=([tests-triton]=0 [backends]=10 [tests-extension]=20 [ops]=60 [ops-attention]=40 [tune]=75
                  [backends-tuned]=10 [train]=130 [ops-dtypes]=60 [train-large]=120)
declare -A PART_OF=([env]=env [build]=build [backends]=build [tests-triton]=tests [tests-extension]=tests [ops]=ops
                    [ops-attention]=ops-attention [tune]=tune [backends-tuned]=tune [train]=train
                    [ops-dtypes]=ops-dtypes [train-large]=train-large)
[[ "$DRY" == 1 ]] && for s in "${!FLOOR[@]}"; do FLOOR[$s]=5; done
PLAN=()
for s in "${ORDER[@]}"; do
    [[ $s == env ]] || want "${PART_OF[$s]}" && PLAN+=("$s")
done
SUMMARY_STEPS=("${PLAN[@]}")

log() { echo "[gpu.sh $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$WORK/gpu.log"; }

budget() {  # NAME: T = the seconds NAME may run; NAME leaves the plan
    local rest=() reserve=0 s
    for s in "${PLAN[@]}"; do
        [[ $s == "$1" ]] && continue
        rest+=("$s")
        reserve=$((reserve + ${FLOOR[$s]:-0}))
    done
    PLAN=("${rest[@]}")
    T=$((BUDGET_S - SECONDS - reserve))
    ((T > CAP[$1])) && T=${CAP[$1]}
    return 0
}

run_step() {  # NAME SECONDS COMMAND...: run it under timeout into NAME.log and record its status
    local name=$1 limit=$2 start=$SECONDS rc status
    shift 2
    if ((limit < 5)); then
        printf '%s\t%s\t0\n' "$name" "skipped (no time left)" >>"$WORK/steps.tsv"
        log "step $name: skipped, no time left"
        return 0
    fi
    log "step $name (at most ${limit}s): $*"
    if declare -F "$1" >/dev/null; then
        timeout -k 5 "$limit" bash -c '"$@"' _ "$@"
    else
        timeout -k 5 "$limit" "$@"
    fi >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        *) status="failed (rc $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$WORK/steps.tsv"
    tail -n 15 "$WORK/$name.log"
    log "step $name: $status after $((SECONDS - start))s (log: lease/$name.log)"
}

skip_step() {  # NAME REASON
    printf '%s\t%s\t0\n' "$1" "skipped ($2)" >>"$WORK/steps.tsv"
    log "step $1: skipped ($2)"
}

# --------------------------------------------------------------------------------------
# what the steps run (exported: run_step calls functions through `timeout bash -c`)
# --------------------------------------------------------------------------------------
probe_env() {  # versions, GPU, missing packages (from WHEELS if carried along); fails without CUDA
    "$PYTHON" - "$DEVICE" <<'EOF' | tee "$WORK/env.txt"
import importlib, importlib.metadata as meta, os, platform, shutil, sys
print("python", platform.python_version(), sys.executable, "|", os.cpu_count(), "CPU cores")
failed = False
for name in ("torch", "triton", "timm", "pytest"):  # needed: imported
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, exc)
        failed = True
for name in ("numpy", "safetensors", "tqdm", "matplotlib", "hypothesis", "ninja", "setuptools", "wheel"):
    try:
        print(name, meta.version(name))
    except meta.PackageNotFoundError:
        print(name, "MISSING")
print("ninja binary", shutil.which("ninja"), "| nvcc", shutil.which("nvcc"), os.environ.get("CUDA_HOME"))
with open(os.path.join(os.environ["WORK"], "packages.txt"), "w") as f:
    f.writelines(sorted(f"{d.metadata['Name']}=={d.version}\n" for d in meta.distributions()))
import torch
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (torch sees no CUDA device)",
      "| CUDA", torch.version.cuda)
sys.exit(failed or (sys.argv[1] == "cuda" and not torch.cuda.is_available()))
EOF
    local rc=$?
    command -v nvidia-smi >/dev/null && nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1
    local missing
    missing=$(awk '$2 == "MISSING" && $1 != "wheel" && $1 != "setuptools" { printf "%s ", $1 }' "$WORK/env.txt")
    if [[ -n "$missing" && -d "${WHEELS:-.whl}" ]]; then
        echo "installing from ${WHEELS:-.whl}: $missing"
        "$PYTHON" -m pip install --no-index --find-links "${WHEELS:-.whl}" $missing
    elif [[ -n "$missing" ]]; then
        echo "missing: $missing(incubation.cli needs safetensors, a parallel build ninja; no plots without matplotlib)"
    fi
    return $rc
}

build_extension() {
    INCUBATION_REQUIRE_EXTENSION=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
}

pytest_shards() {  # NAME PYTEST-ARGS...: SHARDS pytest processes at once (tests/conftest.py splits the
    local name=$1 i r rc=0 pids=()  # tests), each into NAME-i.log; the exit status is the worst
    shift
    for ((i = 0; i < SHARDS; i++)); do  # each with its own dispatch cache, outside the bundle's
        INCUBATION_TEST_SHARD=$i/$SHARDS INCUBATION_CACHE_DIR=$STAGE/test-cache/$name-$i \
            "$PYTHON" -m pytest -p no:cacheprovider "$@" >"$WORK/$name-$i.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        r=$?
        echo "shard $i/$SHARDS: exit $r: $(tail -n 1 "$WORK/$name-$i.log")"
        ((r == 5)) && r=0  # pytest: no test in this shard
        ((r > rc)) && rc=$r
    done
    return $rc
}

show_backends() {
    "$PYTHON" -m incubation.cli backends --device "$DEVICE"
}
export -f probe_env build_extension pytest_shards show_backends
export SHARDS

# --------------------------------------------------------------------------------------
# summary.md and lease.tgz, rewritten after every step
# --------------------------------------------------------------------------------------
section() {  # FILE: its content, if any, then a blank line
    [[ -s "$1" ]] && { cat "$1"; echo; }
}

write_summary() {
    local s status seconds line
    {
        echo "# GPU run: benchmarks/gpu.sh ${STEPS[*]}$([[ $DRY == 1 ]] && echo ' (DRY, DEVICE='"$DEVICE"')')"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short=12 HEAD 2>/dev/null)$(
            [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] && echo ' (+ uncommitted changes)');" \
            "$(grep -h '^device ' "$WORK/env.txt" 2>/dev/null); ${SECONDS}s of a ${BUDGET_S}s budget."
        echo "Logs, JSON, plots and the dispatch cache: lease.tgz (lease/)."
        echo
        echo "| step | status | seconds | log |"
        echo "|---|---|---|---|"
        for s in "${SUMMARY_STEPS[@]}"; do
            line=$(awk -F'\t' -v s="$s" '$1 == s' "$WORK/steps.tsv" 2>/dev/null | tail -n 1)
            if [[ -n "$line" ]]; then
                IFS=$'\t' read -r _ status seconds <<<"$line"
            else
                status="not run (cut short)" seconds=-
            fi
            echo "| $s | $status | $seconds | $([[ -e "$WORK/$s.log" ]] && echo "lease/$s.log" || echo -) |"
        done
        echo
        for s in tests-triton tests-extension; do
            compgen -G "$WORK/$s-*.log" >/dev/null || continue
            echo "$s: $(cat "$WORK/$s"-*.log | grep -oE ' (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ' | sort | uniq -c |
                awk '{ printf "%s%s %s", (NR > 1 ? ", " : ""), $1, tolower($2) }') (pytest -m gpu -v, all shards)"
            echo '```'
            for f in "$WORK/$s"-*.log; do echo "$(basename "$f" .log): $(tail -n 1 "$f")"; done
            grep -hE '^(FAILED|ERROR) ' "$WORK/$s"-*.log | head -n 40
            echo '```'
            echo
        done
        section "$WORK/ops/ops.md"
        section "$WORK/ops-attention/ops.md"
        section "$WORK/train/train_step.md"
        section "$WORK/ops-dtypes/ops.md"
        section "$WORK/train-large/train_step.md"
        if [[ -s "$WORK/backends-tuned.log" ]]; then
            echo "Dispatch after \`incubation tune\` (last lines of lease/tune.log, then \`incubation backends\`):"
            echo '```'
            tail -n 20 "$WORK/tune.log" 2>/dev/null
            echo
            cat "$WORK/backends-tuned.log"
            echo '```'
        fi
    } >"$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
    cp "$OUT/summary.md" "$WORK/summary.md"
    tar -czf "$OUT/lease.tgz.tmp" -C "$STAGE" lease && mv "$OUT/lease.tgz.tmp" "$OUT/lease.tgz"
}

finish() {  # exit status 1 if a step failed, timed out or did not run
    local rc=0
    write_summary
    cat "$OUT/summary.md"
    awk -F'\t' '$2 ~ /^(failed|timed out|skipped \(no time)/ { bad = 1 } END { exit !bad }' "$WORK/steps.tsv" && rc=1
    [[ -n "${PLAN[*]}" ]] && rc=1
    rm -rf "$STAGE"
    exit $rc
}
trap 'log "interrupted"; exit 1' INT TERM
trap finish EXIT

# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
log "gpu.sh ${STEPS[*]}: $OUT (DEVICE=$DEVICE DRY=$DRY BUDGET_S=$BUDGET_S SHARDS=$SHARDS, work in $WORK)"
if [[ "$DRY" == 1 ]]; then
    ONE=(--quick --threads 1 --no-plot)
    SIZE_OPS=("${ONE[@]}" --models Ti --seq 5 --batch 1 --dtypes fp32 --providers eager,sdpa,triton,cuda,cpp)
    SIZE_ATTN=("${ONE[@]}" --models Ti --seq 7 --batch 1 --dtypes fp32 --providers eager,sdpa)
    SIZE_DTYPES=("${ONE[@]}" --models Ti --seq 5 --batch 1 --dtypes bf16 --providers eager,sdpa)
    SIZE_TUNE=(--preset tiny --batch-size 2 --dtype fp32)
    SIZE_TRAIN=("${ONE[@]}" --models Ti --img-size 32 --batch 1 --amp fp32 --warmup 1
                --providers ours-auto,ours-triton,timm)
    SIZE_LARGE=("${SIZE_TRAIN[@]}")
else
    SIZE_OPS=(--models B --seq 197 --batch 256 --dtypes bf16)
    SIZE_ATTN=(--models B,H --seq 257 --batch 256 --dtypes bf16)
    SIZE_DTYPES=(--models B --seq 197 --batch 256 --dtypes fp16,fp32)
    SIZE_TUNE=(--preset vit-b --batch-size 256 --dtype bf16)
    SIZE_TRAIN=(--models B --batch "${TRAIN_BATCH:-128}" --amp bf16
                --providers ours-auto,ours-triton,ours-compile,timm,timm-compile)
    SIZE_LARGE=(--models L,H --amp bf16)
fi
TESTS=(-m gpu -v -rfEs --durations=15)

budget env
run_step env "$T" probe_env
write_summary

if want build; then
    budget build
    if [[ "$DRY" == 1 ]]; then
        skip_step build "dry run: nothing is installed"
    else
        run_step build "$T" build_extension &
        BUILD_PID=$!
    fi
fi
if want tests; then  # the Triton half while the extension builds
    budget tests-triton
    run_step tests-triton "$T" pytest_shards tests-triton "${TESTS[@]}" -k triton tests/test_kernels.py \
        tests/test_compile.py tests/test_triton.py::test_opcheck_every_triton_op \
        tests/test_triton_linear.py::test_linear_tma_every_epilogue \
        tests/test_triton_linear.py::test_linear_inputs_tma_cannot_take_go_to_the_pointer_kernel \
        tests/test_triton_linear.py::test_output_changed_in_place_then_backward_as_eager
    write_summary
fi
if want build; then
    [[ -n "${BUILD_PID:-}" ]] && wait "$BUILD_PID"
    budget backends
    run_step backends "$T" "$PYTHON" -m incubation.cli backends
    write_summary
fi
if want tests; then
    budget tests-extension
    run_step tests-extension "$T" pytest_shards tests-extension "${TESTS[@]}" -k "not triton" tests/test_extension.py \
        tests/test_kernels.py
    write_summary
fi
if want ops; then
    budget ops
    run_step ops "$T" "$PYTHON" -m incubation.bench.ops --device "$DEVICE" "${SIZE_OPS[@]}" --out "$WORK/ops"
    write_summary
fi
if want ops-attention; then
    budget ops-attention
    run_step ops-attention "$T" "$PYTHON" -m incubation.bench.ops --device "$DEVICE" --ops attention "${SIZE_ATTN[@]}" \
        --out "$WORK/ops-attention"
    write_summary
fi
if want tune; then
    budget tune
    run_step tune "$T" "$PYTHON" -m incubation.cli tune "${SIZE_TUNE[@]}" --device "$DEVICE"
    budget backends-tuned
    run_step backends-tuned "$T" show_backends
    write_summary
fi
if want train; then
    budget train
    run_step train "$T" "$PYTHON" -m incubation.bench.train_step --device "$DEVICE" "${SIZE_TRAIN[@]}" --out "$WORK/train"
    write_summary
fi
if want ops-dtypes; then
    budget ops-dtypes
    run_step ops-dtypes "$T" "$PYTHON" -m incubation.bench.ops --device "$DEVICE" "${SIZE_DTYPES[@]}" --out "$WORK/ops-dtypes"
    write_summary
fi
if want train-large; then
    budget train-large
    run_step train-large "$T" "$PYTHON" -m incubation.bench.train_step --device "$DEVICE" "${SIZE_LARGE[@]}" \
        --out "$WORK/train-large"
fi
log "done"
