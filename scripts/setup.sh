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
if [[ ",$extras," == *",test,"* ]]; then
  # The original LLaVA code as a test oracle (tests/llava_oracle.py loads only mm_utils.py and one
  # function from it): without its dependencies, which pin old torch/transformers.
  .venv/bin/python -m pip install --quiet --no-deps "llava-torch==1.2.2.post1"
fi
.venv/bin/python -c "import torch, transformers; print(f'[setup] torch {torch.__version__}, transformers {transformers.__version__}, cuda={torch.cuda.is_available()}')"
