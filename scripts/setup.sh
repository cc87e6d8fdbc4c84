#!/usr/bin/env bash
# Create the virtual environment (if missing) and install mmflow into it with exactly the versions of
# requirements.lock, the transitive ones included (`make lock` regenerates it).
#   scripts/setup.sh [test]     .venv from the lock (the extra is accepted for the Makefile's targets)
#   LATEST=1 VENV=.venv-latest scripts/setup.sh test
#                               the newest versions pyproject.toml's ranges allow (`make test-latest`)
# torch is not in the lock: a torch already installed is kept (a GPU user installs their CUDA build
# first); otherwise torch==2.13.0 is installed, which on this project's CPU machines is a CPU build on
# the local disk. Setup is skipped when nothing it depends on changed since the last one (a stamp).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LATEST=${LATEST:-}
extras=${1:-}
# One stamp per set-up kind: a test set-up also serves `make run`, not the other way round.
stamp_file="$VENV/.mmflow-setup${extras:+-$extras}"
stamp=$( { cat requirements.lock pyproject.toml scripts/setup.sh; echo "latest=$LATEST"; \
  "$PYTHON" --version; } | sha256sum | cut -d' ' -f1)
for done_file in "$stamp_file" "$VENV/.mmflow-setup-test"; do
  if [[ -x "$VENV/bin/python" && -f "$done_file" && "$(cat "$done_file")" == "$stamp" ]]; then
    exit 0
  fi
done
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"
fi
if [[ -n "$LATEST" ]]; then
  "${pip[@]}" --upgrade --upgrade-strategy eager -e ".[test]"
else
  "${pip[@]}" --no-deps -r requirements.lock
  "${pip[@]}" --no-deps -e .
  # Everything each installed package needs is installed (the lock is complete); llava-torch is the
  # test oracle below, installed on purpose without the old torch/transformers it pins.
  if problems=$("$VENV/bin/python" -m pip check 2>&1 | grep -v '^llava-torch ' | grep -v '^No broken'); then
    echo "[setup] the environment does not satisfy the lock:"$'\n'"$problems" >&2
    exit 1
  fi
fi
if [[ ",$extras," == *",test,"* || -n "$LATEST" ]]; then
  # The original LLaVA code as a test oracle (tests/llava_oracle.py loads only mm_utils.py and one
  # function from it): without its dependencies, which pin old torch/transformers.
  "${pip[@]}" --no-deps "llava-torch==1.2.2.post1"
fi
"$VENV/bin/python" -c "import torch, transformers; print(f'[setup] torch {torch.__version__}, transformers {transformers.__version__}, cuda={torch.cuda.is_available()}')"
echo "$stamp" > "$stamp_file"
