"""The original LLaVA preprocessing as a test oracle: `llava/mm_utils.py` of PyPI's `llava-torch`.

`llava-torch` is installed without its dependencies (scripts/setup.sh, test extra), so its package
`__init__` (which imports the whole model and old transformers) is never run: only `constants.py`,
`mm_utils.py` and the `unpad_image` function of `model/llava_arch.py` are loaded from its files.
`oracle()` returns None when the package is not installed; tests then skip with that reason.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path


def _package_dir() -> Path | None:
    loaded = sys.modules.get("llava")
    if loaded is not None and getattr(loaded, "__oracle__", False):  # our stub, from an earlier call
        return Path(loaded.__path__[0])
    spec = importlib.util.find_spec("llava")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def oracle() -> types.SimpleNamespace | None:
    """mm_utils (select_best_resolution, process_images, tokenizer_image_token, ...) and unpad_image."""
    root = _package_dir()
    if root is None or not (root / "mm_utils.py").is_file():
        return None
    if "llava" not in sys.modules or not hasattr(sys.modules["llava"], "__oracle__"):
        package = types.ModuleType("llava")
        package.__path__ = [str(root)]
        package.__oracle__ = True
        sys.modules["llava"] = package
        _load("llava.constants", root / "constants.py")
        _load("llava.mm_utils", root / "mm_utils.py")
    source = (root / "model" / "llava_arch.py").read_text()
    tree = ast.parse(source)
    unpad = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "unpad_image")
    namespace: dict = {}
    exec(compile(ast.Module([unpad], []), "llava_arch.py", "exec"), namespace)  # noqa: S102
    return types.SimpleNamespace(mm=sys.modules["llava.mm_utils"], unpad_image=namespace["unpad_image"])


def original_image_token_count(mm, unpad_image, size: tuple[int, int], pinpoints, patch=14, side=336) -> int:
    """Image tokens of the original anyres `spatial_unpad` packing (llava_arch.py) for a (w, h) image."""
    import torch

    per_side = side // patch
    grid_w, grid_h = mm.get_anyres_image_grid_shape(size, pinpoints, side)
    features = torch.zeros(1, grid_h * per_side, grid_w * per_side)
    unpadded = unpad_image(features, size)
    return per_side * per_side + unpadded.shape[1] * (unpadded.shape[2] + 1)
