#!/usr/bin/env bash
# Regenerate docs/benchmarks.md: every speed benchmark, CPU first, then CUDA when present.
# Usage: bash benchmarks/run_all.sh [--full]   (PYTHON=... to pick the interpreter;
# BENCH_THREADS=N to pin threads; OUT=dir to also copy the page there after each script)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
FULL=${1:-}
run() {  # run <seconds> <script> [args...]: one script, bounded, never stops the rest
    local limit=$1; shift
    echo "=== $* (limit ${limit}s)"
    timeout "$limit" "$PY" "benchmarks/$@" || echo "=== $1 exited with $?"
    if [ -n "${OUT:-}" ]; then cp docs/benchmarks.md "$OUT/"; fi
}
run 300 bench_step.py $FULL
run 120 bench_floor.py $FULL
run 60 bench_merged.py $FULL
run 90 bench_generate.py
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    run 90 bench_step.py --device cuda $FULL
    run 45 bench_floor.py --device cuda $FULL
    run 30 bench_merged.py --device cuda $FULL
    run 45 bench_generate.py --device cuda
fi
