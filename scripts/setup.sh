#!/usr/bin/env bash
# Create .venv (if missing) and install mmflow into it. Keeps a torch that is already installed
# (a GPU user installs their CUDA build first); otherwise installs torch==2.13.0, which on this
# project's CPU machines is a CPU build that lies on the local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=${1:-}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
.venv/bin/python -c "import torch, transformers; print(f'[setup] torch {torch.__version__}, transformers {transformers.__version__}, cuda={torch.cuda.is_available()}')"
