#!/usr/bin/env bash
# Regenerate requirements.lock (`make lock`): every dependency of mmflow and its test extra, the
# transitive ones included, pinned for every Python mmflow supports (a universal lock from uv).
#
# torch is left out on purpose: the machine brings its own (a CPU build here, a user's CUDA build on a
# GPU node), so the lock is resolved against a torch without dependencies (scripts/lock-uv.toml) and
# none of torch's CUDA packages are pinned. To upgrade one dependency: `UPGRADE=transformers make lock`
# (or edit its range in pyproject.toml, then `make lock`), then `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
[[ -x .venv/bin/python ]] || python3 -m venv .venv
if [[ "$(.venv/bin/uv --version 2>/dev/null)" != "uv $UV_VERSION"* ]]; then
  .venv/bin/python -m pip install --quiet "uv==$UV_VERSION"
fi
upgrade=()
for name in ${UPGRADE:-}; do upgrade+=(--upgrade-package "$name"); done
.venv/bin/uv pip compile pyproject.toml --extra test --universal --python-version 3.10 \
  --config-file scripts/lock-uv.toml --constraints scripts/lock-torch.txt --no-emit-package torch \
  --custom-compile-command "make lock" --quiet "${upgrade[@]}" -o requirements.lock
echo "[lock] requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
