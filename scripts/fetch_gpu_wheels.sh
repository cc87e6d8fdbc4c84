#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on a GPU machine that has no network.
#
# The GPU machine has Python 3.12, torch, numpy, pandas, pyarrow, pillow, torchvision and an older
# transformers. mmflow needs the transformers it is tested with (the versions in this checkout's
# .venv) and its dependencies, plus hydra-core/omegaconf for the launcher. This fetches them, pinned
# to the .venv's versions, for CPython 3.12 on manylinux x86_64, into .gpu-wheels/ (git-ignored),
# which the device call carries with the working tree (64 MiB in all, the tree included; numpy,
# torch and ray are not carried). Usage: scripts/fetch_gpu_wheels.sh [python] (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=.gpu-wheels
# transformers + its dependency closure, and Hydra's; numpy is already on the GPU machine.
NAMES="transformers tokenizers safetensors huggingface-hub hf-xet httpx2 httpcore2 h11 anyio idna
truststore click filelock fsspec packaging pyyaml regex tqdm typer annotated-doc rich pygments
markdown-it-py mdurl shellingham pydantic pydantic-core typing-inspection typing-extensions
annotated-types hydra-core omegaconf"
PINS=$("$PY" - $NAMES <<'PYEOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PYEOF
)
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT.tmp" $PINS
# antlr4 4.9.3 (what omegaconf 2.3 pins) is published as an sdist only: build its pure-Python wheel here.
"$PY" -m pip wheel --quiet --no-deps -w "$OUT.tmp" "antlr4-python3-runtime==$("$PY" -c \
  'from importlib.metadata import version; print(version("antlr4-python3-runtime"))')"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "$(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT; tree without ignored files: $(git ls-files -z | du -ch --files0-from=- | tail -1 | cut -f1)"
