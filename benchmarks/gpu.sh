#!/usr/bin/env bash
# One command for a GPU machine without network access (torch, triton, timm preinstalled):
# install the package from this working tree, run the tests and both benchmarks, and write
# everything into OUTDIR.
#
#   benchmarks/gpu.sh OUTDIR [STAGE ...]
#
# Stages (default: all of them, in this order):
#   install      pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=9.0)
#   tests        the whole test suite (GPU tests run; CPU twins too)      -> tests.log
#   ops          op benchmark, bf16, ViT-Ti..H, N 197 and 257, batch 256  -> ops/
#   ops-dtypes   op benchmark, fp16 and fp32, ViT-B, N 197                -> ops-dtypes/
#   train        train step, ViT-S and ViT-B, bf16 autocast               -> train/
#   train-large  train step, ViT-L and ViT-H                               -> train-large/
# Each stage takes a few minutes (torch.compile dominates); where one command may run at most
# 10 minutes, run them one or two at a time: `gpu.sh OUT install tests`, `gpu.sh OUT ops`, ...
# Stages that fail are reported and the others still run; the exit status is 1 if any failed.
#
# Environment:
#   PYTHON        the interpreter (default: python3, else python)
#   WHEELS        a folder of wheels for what the machine lacks (default: .whl beside setup.py);
#                 fill it elsewhere with `pip download safetensors tqdm matplotlib pytest
#                 hypothesis -d .whl` for the machine's Python and carry it along
#   PYTEST_ARGS   arguments for pytest (default: "tests -q -rs")
#   OPS_ARGS, TRAIN_ARGS   extra arguments for benchmarks/ops.py / benchmarks/train_step.py
#   DEVICE        cuda (default); cpu only to try this script itself on a machine without a GPU
set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
OUT_ARG=$1
shift
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(install tests ops ops-dtypes train train-large)
for s in "${STAGES[@]}"; do
    case "$s" in install|tests|ops|ops-dtypes|train|train-large) ;;
        *) echo "gpu.sh: unknown stage '$s' (install tests ops ops-dtypes train train-large)" >&2; exit 2 ;;
    esac
done
OUT=$(mkdir -p "$OUT_ARG" && cd "$OUT_ARG" && pwd) || { echo "gpu.sh: cannot create $OUT_ARG" >&2; exit 2; }

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
WHEELS=${WHEELS:-.whl}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
[[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]] && export CUDA_HOME=/usr/local/cuda
unset TRITON_INTERPRET  # the real kernels, never the interpreter
FAILED=()

log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu.log"; }

# 1. what the machine has
"$PYTHON" - >"$OUT/env.txt" 2>&1 <<'EOF'
import importlib, platform, subprocess, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "timm", "numpy", "safetensors", "tqdm", "matplotlib", "pytest", "hypothesis", "ninja"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, exc)
import torch
print("cuda available", torch.cuda.is_available(), "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
cat "$OUT/env.txt"
DEVICE=${DEVICE:-cuda}
if ! "$PYTHON" -c "import sys, torch, triton, timm
assert sys.argv[1] == 'cpu' or torch.cuda.is_available(), 'torch sees no CUDA device'" "$DEVICE" 2>>"$OUT/gpu.log"; then
    log "torch/triton/timm must be importable and a CUDA device visible (see $OUT/env.txt, $OUT/gpu.log)"
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1

# 2. Python packages the tests / benchmarks need that the machine may lack: from $WHEELS if there
MISSING=$("$PYTHON" -c "
import importlib.util as u
print(' '.join(n for n in ('safetensors', 'tqdm', 'matplotlib', 'pytest', 'hypothesis') if u.find_spec(n) is None))")
if [[ -n "$MISSING" ]]; then
    if [[ -d "$WHEELS" ]]; then
        log "installing from $WHEELS: $MISSING"
        "$PYTHON" -m pip install --no-index --find-links "$WHEELS" $MISSING >>"$OUT/gpu.log" 2>&1 \
            || log "WARNING: could not install all of: $MISSING (see gpu.log)"
    else
        log "WARNING: missing $MISSING and no wheel folder $WHEELS: without pytest/hypothesis the tests" \
            "cannot run, without safetensors/tqdm the training tests fail, without matplotlib no plots"
    fi
fi

run_stage() {  # name, command...
    local name=$1; shift
    log "stage $name: $*"
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$OUT/$name.rc"
    tail -n 25 "$OUT/$name.log"
    log "stage $name: exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)"
    [[ $rc -ne 0 ]] && FAILED+=("$name")
    return 0
}

for stage in "${STAGES[@]}"; do
    case "$stage" in
    install)
        run_stage install "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
        "$PYTHON" -c "import incubation.ops as o; print(o.format_backends('cuda')); print(); print(o.format_backends('cpu'))" \
            >"$OUT/backends.txt" 2>&1
        cat "$OUT/backends.txt" ;;
    tests)
        # shellcheck disable=SC2086
        run_stage tests "$PYTHON" -m pytest ${PYTEST_ARGS:-tests -q -rs} ;;
    ops)
        # shellcheck disable=SC2086
        run_stage ops "$PYTHON" benchmarks/ops.py --device $DEVICE --dtypes bf16 --out "$OUT/ops" ${OPS_ARGS:-} ;;
    ops-dtypes)
        # shellcheck disable=SC2086
        run_stage ops-dtypes "$PYTHON" benchmarks/ops.py --device $DEVICE --dtypes fp16,fp32 --models B --seq 197 \
            --out "$OUT/ops-dtypes" ${OPS_ARGS:-} ;;
    train)
        # shellcheck disable=SC2086
        run_stage train "$PYTHON" benchmarks/train_step.py --device $DEVICE --models S,B --out "$OUT/train" ${TRAIN_ARGS:-} ;;
    train-large)
        # shellcheck disable=SC2086
        run_stage train-large "$PYTHON" benchmarks/train_step.py --device $DEVICE --models L,H --out "$OUT/train-large" \
            ${TRAIN_ARGS:-} ;;
    esac
done

# the markdown sections, ready for benchmarks/RESULTS.md
for f in "$OUT"/ops/ops.md "$OUT"/ops-dtypes/ops.md "$OUT"/train/train_step.md "$OUT"/train-large/train_step.md; do
    [[ -f "$f" ]] && { cat "$f"; echo; }
done >"$OUT/summary.md"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    log "FAILED stages: ${FAILED[*]}"
    exit 1
fi
log "done: $OUT (summary.md has the markdown for benchmarks/RESULTS.md)"
