#!/usr/bin/env bash
# The GPU check, one command on any machine with CUDA, in at most 8 minutes on one H200: the CUDA-only tests, then
# the GPU figures. Each part runs under its own time limit (killed, not signalled: the job's SIGTERM handler would
# save and go on), so one that hangs costs its limit, not the whole check.
#   bash bench/gpu_check.sh [LOG_DIR]    (MNIST from MNIST_ADD_DATA_ROOT; each part's output also in LOG_DIR/PART.log)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export MNIST_ADD_DATA_ROOT=${MNIST_ADD_DATA_ROOT:-data} PYTHONUNBUFFERED=1
LOG_DIR=${1:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
failed=0

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    timeout -s KILL "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    local status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || { echo "== $name FAILED (exit $status)"; failed=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
part cuda-tests 150 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py
part step-time 90 "$PY" bench/step_time.py --steps 200
part default-captured 60 "$PY" bench/time_to_accuracy.py --configs default trainer.cuda_graph=true
part default-eager 90 "$PY" bench/time_to_accuracy.py --configs default trainer.cuda_graph=false
part speedrun 60 "$PY" bench/speedrun.py --seeds 10 trainer.cuda_graph=true
echo "== logs in $LOG_DIR"
exit $failed
