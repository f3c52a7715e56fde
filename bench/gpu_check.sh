#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): on one bare GPU machine whose Python has its own CUDA torch,
# install the carried wheels (bench/gpu_check/wheels, torch untouched, DS_BUILD_OPS=0) into a venv
# that sees that torch, then pretrain / kill / resume / export / sample / eval / bench-step through
# the real make targets, within a time budget (default 330 s). Writes bench/results/gpu_check.json;
# logs under runs/gpu-check/logs. Exit status 0 only when every stage passed.
#
#   bash bench/gpu_check.sh [--budget-s 330] [--bench-presets 125m,1b] [--stages pretrain,resume] ...
#   PYTHON=/opt/conda/bin/python bash bench/gpu_check.sh      # the interpreter that has torch
#
# Prepare the carried files first, on a machine with the package registries (see README):
#   .venv/bin/python -m bench.gpu_check prepare     # -> bench/gpu_check/{wheels/,corpus.jsonl.gz}
# Where $OUT is set (the device runner's output folder) the JSON and the logs are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m bench.gpu_check run --python "$PY" "$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  cp bench/results/gpu_check.json "$OUT/" 2>/dev/null || true
  cp -r runs/gpu-check/logs "$OUT/gpu_check_logs" 2>/dev/null || true
fi
exit $rc
