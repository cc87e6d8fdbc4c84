"""Path keys as the user wrote them -> the path meant: `~` and environment variables expanded.

`results_dir`, `data.path`, `data.image_dir`, `data.cache_dir`, a local `model.checkpoint` and
`logger.dir` go through `expand_path`: `~`, `~user`, `$VAR` and `${VAR}` are expanded (Hydra passes
a quoted `'$HOME/x'` on literally), and a variable that is not set is refused with one line naming the
key, never turned into a folder called `$VAR`. `inside` keeps a table's image paths inside
`data.image_dir` (docs/faults.md, "Paths").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mmflow.errors import PathConfigError

_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(value: str | os.PathLike[str], key: str) -> str:
    """`value` with `~` and environment variables expanded; PathConfigError names `key` and the variable
    when one is not set."""
    text = str(value)
    expanded = os.path.expanduser(os.path.expandvars(text))
    left = _VARIABLE.search(expanded)
    if left is not None:
        name = left.group(1).strip("{}")
        raise PathConfigError(
            f"{key}={text!r}: environment variable {name} is not set (export it, or write the path out)"
        )
    return expanded


def inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether `path` lies in `folder`, judged on the written names (`..` and absolute paths leave it;
    a symbolic link inside the folder stays inside)."""
    return Path(os.path.normpath(path)).is_relative_to(os.path.normpath(folder))
