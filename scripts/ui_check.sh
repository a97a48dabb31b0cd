#!/usr/bin/env bash
# Browser check of the MLflow UI: two real short runs, a real `mlflow server`, headless Chromium through the
# DevTools protocol; screenshots and report.json under outputs/ui-check/. All the work is in scripts/ui_check.py
# (its --help lists the options: --workdir DIR, --out DIR, --steps N, --strict, --serve, --train-arg ARG).
# Needs: the project's .venv with the test extra (playwright) and a Chromium (Debian: apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/ui_check.py "$@"
