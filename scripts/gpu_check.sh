#!/usr/bin/env bash
# One command on a GPU machine: full-size random-weight LLaVA-1.5-7B and LLaMA-3-LLaVA-NeXT-8B,
# engine + pipeline benchmarks, fast-vs-reference difference and peak memory on CUDA; one JSON line
# per check (mmflow/bench/gpu_check.py). Needs no network: when the python here lacks what mmflow needs
# (transformers >= 5, ...), it installs the wheels carried in .gpu-wheels/ (scripts/fetch_gpu_wheels.sh)
# into .gpu-site/ and puts that first on PYTHONPATH. Cells run in process (no Ray).
#   scripts/gpu_check.sh             # on the GPU machine, < 8 minutes on one large GPU
#   scripts/gpu_check.sh --dry-run   # tiny widths on any machine (CI): says what it could not do
# Extra arguments go to `python -m mmflow.bench.gpu_check` (--models, --dtypes, --samples, --checks).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
needs_wheels() {
  "$PY" - <<'PYEOF'
import sys
try:
    import transformers, yaml, safetensors, tokenizers  # noqa: F401
    from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
except Exception as exc:
    print(f"[gpu_check] missing or too old here: {exc}", file=sys.stderr)
    sys.exit(0)
sys.exit(0 if int(transformers.__version__.split(".")[0]) < 5 else 1)
PYEOF
}
if needs_wheels; then
  if ! ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    echo '{"check": "install", "ok": false, "error": "no .gpu-wheels/: run scripts/fetch_gpu_wheels.sh where there is network and carry .gpu-wheels"}'
    exit 2
  fi
  SITE="$ROOT/.gpu-site"
  if [[ ! -f "$SITE/.complete" ]]; then
    rm -rf "$SITE" && mkdir -p "$SITE"
    if "$PY" -m pip --version >/dev/null 2>&1; then
      "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" .gpu-wheels/*.whl
    else  # no pip: a wheel is a zip laid out for site-packages
      for wheel in .gpu-wheels/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE"; done
    fi
    touch "$SITE/.complete"
  fi
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  echo "{\"check\": \"install\", \"ok\": true, \"from\": \".gpu-wheels\", \"wheels\": $(ls .gpu-wheels/*.whl | wc -l)}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export MMFLOW_CACHE=${MMFLOW_CACHE:-$ROOT/.cache/mmflow} WANDB_MODE=${WANDB_MODE:-disabled}
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
exec "$PY" -m mmflow.bench.gpu_check "$@"
