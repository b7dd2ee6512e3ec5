#!/usr/bin/env bash
# The prepared GPU device check, from a fresh clone: a CUDA build of torch first (unless one is installed),
# then specbench, then scripts/gpu_check.py (the verifier, losslessness and method checks on cuda, the GPU
# forward-cost curve; one summary table; results and a log under one folder, default gpu-check/).
#   bash scripts/gpu_check.sh [OUT_DIR]        (TORCH_INDEX_URL picks the CUDA wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "GPU"); then
  echo "gpu_check: no CUDA device: nvidia-smi finds no NVIDIA GPU on this machine; run this check on a GPU" \
       "machine (the CPU test suite is \`pytest\`)" >&2
  exit 2
fi
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
  python -m pip install -q torch --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
fi
python -m pip install -q -e '.[dev]'
exec python scripts/gpu_check.py --out "$out"
