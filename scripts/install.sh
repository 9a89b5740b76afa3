#!/usr/bin/env bash
# Install nikl-ray and its dependencies into the active Python (use a venv if you like).
#
#   bash scripts/install.sh            # CPU machine: a CPU build of torch, then the package + dev tools + trackers
#
# GPU machines: install the torch build for your CUDA first (see pytorch.org); this script
# leaves an existing torch alone. Override the CPU torch with NIKL_RAY_TORCH="torch==X.Y.Z"
# or add an index with NIKL_RAY_TORCH_INDEX=<url of a CPU wheel index>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  # An unpinned `torch` from PyPI is a multi-GB CUDA build on Linux; 2.13.0 is the CPU build
  # this project is tested with (and lies on disk on our CI machines).
  spec=${NIKL_RAY_TORCH:-torch==2.13.0}
  if [ -n "${NIKL_RAY_TORCH_INDEX:-}" ]; then
    "$PY" -m pip install "$spec" --index-url "$NIKL_RAY_TORCH_INDEX"
  else
    "$PY" -m pip install "$spec"
  fi
fi
"$PY" -m pip install -e ".[dev,tracking]"
# the installed versions, read from the packages' metadata (importing torch and transformers just to
# print them took 13 s of CI on 2 cores; the tests import them next)
"$PY" -c "from importlib.metadata import version as v; print('nikl-ray installed: ' + ', '.join(f'{p} {v(p)}' for p in ('torch', 'ray', 'transformers', 'peft')))"
