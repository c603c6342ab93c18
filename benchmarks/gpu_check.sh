#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA device: the tests marked `gpu` (CUDA workers, pinned host
# buffers, autocast, a two-worker job on the GPU), then the per-step host<->device cost of a worker.
#   bash benchmarks/gpu_check.sh            (PYTHON=... to pick the interpreter; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: no CUDA device visible to torch")'
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
"$PY" benchmarks/gpu_transfer.py
