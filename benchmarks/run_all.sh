#!/usr/bin/env bash
# Regenerate docs/benchmarks.md: every speed benchmark, CPU first, then CUDA when present.
# Usage: bash benchmarks/run_all.sh [--full] [shared knobs, e.g. --threads 1 --clock cpu]
# (PYTHON=... picks the interpreter; OUT=dir also copies the page there after each script)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ARGS=("$@")
run() {  # run <seconds> <script> [args...]: one script, bounded, never stops the rest
    local limit=$1; shift
    echo "=== $* (limit ${limit}s)"
    timeout "$limit" "$PY" "benchmarks/$@" || echo "=== $1 exited with $?"
    if [ -n "${OUT:-}" ]; then cp docs/benchmarks.md "$OUT/"; fi
}
GEN_ARGS=()  # generation has a single backbone: drop --full
for a in "${ARGS[@]}"; do [ "$a" = "--full" ] || GEN_ARGS+=("$a"); done
run 900 bench_step.py "${ARGS[@]}"
run 600 bench_floor.py "${ARGS[@]}"
run 300 bench_merged.py "${ARGS[@]}"
run 300 bench_generate.py "${GEN_ARGS[@]}"
run 1200 bench_growth.py "${GEN_ARGS[@]}"
run 600 bench_pack.py "${GEN_ARGS[@]}"
run 900 bench_release.py "${GEN_ARGS[@]}"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    run 300 bench_step.py --device cuda "${ARGS[@]}"
    run 120 bench_floor.py --device cuda "${ARGS[@]}"
    run 60 bench_merged.py --device cuda "${ARGS[@]}"
    run 60 bench_generate.py --device cuda "${GEN_ARGS[@]}"
fi
