#!/usr/bin/env bash
# Create ./.venv and install splade-obs into it.
#   bash scripts/setup.sh          # the trainer
#   bash scripts/setup.sh test     # the trainer + test extras
#   bash scripts/setup.sh bench    # the trainer + benchmark extras (bm25s, sentence-transformers)
# torch 2.13.0 is installed first when no torch is present (this machine's pip finds a CPU wheel on local disk;
# elsewhere set TORCH_INDEX_URL for the CPU build); pyproject.toml only asks for torch>=2.4, so an existing
# torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! "$VPY" -c "import torch" 2>/dev/null; then
  # TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks the CPU build where PyPI would serve CUDA.
  "$VPY" -m pip install -q --disable-pip-version-check ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# the build backend's notices (setuptools' editable-install and data-folder warnings) go to a log that is shown
# only when the install fails; the import check below says whether it worked
log=$(mktemp)
if ! "$VPY" -m pip install -q --disable-pip-version-check -e "$spec" >"$log" 2>&1; then
  grep -v "is ignored" "$log" || true
fi
rm -f "$log"
"$VPY" -c "import torch, splade_obs, splade_obs_cli.main; print('splade-obs', splade_obs.__version__, 'with torch', torch.__version__)"
