#!/usr/bin/env bash
# Compile-check the kernels against the Triton of the GPU machines (triton 3.6.0, torch 2.11):
# a throwaway venv under DIR (default /tmp) gets those two packages by name, then
# benchmarks/compile_check.py runs there (no GPU needed). Extra arguments go to compile_check.py.
#
#   bash benchmarks/compile_check_triton36.sh [DIR] [--quick] [--kernels ...]
#
# Writes DIR/compile_check_triton36.json and prints the table. The venv is kept (DIR/venv-triton36)
# so a second run skips the install; delete it when done (torch with its CUDA libraries is ~5 GB).
set -euo pipefail
DIR=/tmp
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then DIR="$1"; shift; fi  # a first argument that is not an option
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$DIR/venv-triton36"
PY="${PYTHON:-python3}"

mkdir -p "$DIR"
if ! "$VENV/bin/python" -c "import torch, triton; assert torch.__version__.startswith('2.11.0') and triton.__version__ == '3.6.0'" 2>/dev/null; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.11.0 triton==3.6.0
fi
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
cd "$REPO"
"$VENV/bin/python" benchmarks/compile_check.py --json "$DIR/compile_check_triton36.json" "$@"
