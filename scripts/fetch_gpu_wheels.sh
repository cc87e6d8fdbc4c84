#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on a GPU machine that has no network.
#
# The GPU machine has Python 3.12, torch, numpy, pandas, pyarrow, pillow, torchvision and an older
# transformers. mmflow needs the transformers it is tested with and its dependencies, plus
# hydra-core/omegaconf for the launcher. This fetches them at the versions requirements.lock pins for
# CPython 3.12 on Linux x86_64 (the lock is universal), into .gpu-wheels/ (git-ignored),
# which the device call carries with the working tree (64 MiB in all, the tree included; numpy,
# torch and ray are not carried). Usage: scripts/fetch_gpu_wheels.sh [python] (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=.gpu-wheels
# transformers + its dependency closure, Hydra's, and accelerate (models over several GPUs); numpy is
# already on the GPU machine.
NAMES="transformers tokenizers safetensors huggingface-hub hf-xet httpx2 httpcore2 h11 anyio idna
truststore click filelock fsspec packaging pyyaml regex tqdm typer annotated-doc rich pygments
markdown-it-py mdurl shellingham pydantic pydantic-core typing-inspection typing-extensions
annotated-types hydra-core omegaconf accelerate psutil"
PINS=$("$PY" - $NAMES <<'PYEOF'
import sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

target = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
pins = {}
for line in open("requirements.lock"):
    if line[:1].isalnum():
        req = Requirement(line.strip())
        if req.marker is None or req.marker.evaluate(target):
            pins[canonicalize_name(req.name)] = str(req.specifier)
missing = [n for n in sys.argv[1:] if canonicalize_name(n) not in pins]
if missing:
    sys.exit(f"not in requirements.lock for Python 3.12: {missing}")
print(" ".join(f"{n}{pins[canonicalize_name(n)]}" for n in sys.argv[1:]))
PYEOF
)
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT.tmp" $PINS
# antlr4 4.9.3 (what omegaconf 2.3 pins) is published as an sdist only: build its pure-Python wheel here.
"$PY" -m pip wheel --quiet --no-deps -w "$OUT.tmp" \
  "$(grep -E '^antlr4-python3-runtime==' requirements.lock | cut -d' ' -f1)"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "$(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT; tree without ignored files: $(git ls-files -z | du -ch --files0-from=- | tail -1 | cut -f1)"
