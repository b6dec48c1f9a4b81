#!/usr/bin/env bash
# The GPU check, one command on any machine with CUDA: the CUDA-only tests, then the GPU benchmarks.
# Prints tables ready for docs/results.md and docs/benchmarks.md.
#   bash bench/gpu_check.sh              (MNIST from MNIST_ADD_DATA_ROOT, else ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export MNIST_ADD_DATA_ROOT=${MNIST_ADD_DATA_ROOT:-$(cd .. && pwd)/shared/data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== CUDA tests"
"$PY" -m pytest -m cuda -q -rs tests/test_cuda.py
echo "== samples/s by model, precision and compile"
"$PY" bench/compile_and_precision.py
echo "== time to accuracy (default config, bf16)"
"$PY" bench/time_to_accuracy.py --data-root "$MNIST_ADD_DATA_ROOT"
