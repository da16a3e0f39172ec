#!/usr/bin/env bash
# The GPU check, for a fresh copy of the repo on a GPU machine with its own CUDA torch and no network:
# installs the wheels carried in .whl/ (made by `make gpu-wheels`) into a private folder, then runs
# bench/gpu_check.py (CIFAR-10 preset: full stack vs bare loop, MFU, memory; quickstart end to end).
# Results: bench/results/gpu.{json,md}, also copied to $OUT when set. Arguments go to gpu_check.py.
#
#   bash bench/gpu_check.sh          # PYTHON=python3, GPU_CHECK_SITE=/tmp/site, GPU_CHECK_WHEELS=.whl by default
#   bash bench/gpu_check.sh --dry-run --out /tmp/r   # no GPU needed: the same steps on a tiny CPU model
set -euo pipefail

PY="${PYTHON:-python3}"
if [[ "$PY" == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi   # before the cd below
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SITE="${GPU_CHECK_SITE:-/tmp/site}"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"   # cp312 wheels: only installable by the node's Python 3.12

# First, before anything is installed or written: is there a GPU at all? (One torch import: ~2 s.)
probe=0
"$PY" -c 'import sys
try:
    import torch
except Exception:
    sys.exit(3)
sys.exit(0 if torch.cuda.is_available() else 4)' >/dev/null 2>&1 || probe=$?
dry_run=0
for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then dry_run=1; fi
done
if ((probe == 3)); then
    echo "gpu_check: $PY cannot import torch (this check uses the machine's own CUDA torch)" >&2
    exit 2
elif ((probe != 0 && dry_run == 0)); then
    echo "gpu_check: no CUDA device visible (this check needs a GPU)" >&2
    exit 2
fi

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
    # --no-deps: the set in .whl/ is complete by construction; the machine's torch, numpy etc. stay.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: installed ${#wheels[@]} carried wheels into $SITE"
else
    echo "gpu_check: no wheels in $WHEELS/: using the packages $PY already has"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the repo is not pip-installed there
# DeepSpeed may JIT-build ops into this folder; keep it out of the (possibly read-only) home.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"
export PYTHONUNBUFFERED=1

exec "$PY" bench/gpu_check.py "$@"
