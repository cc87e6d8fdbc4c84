"""Root causes of failures: many cells failing for one reason read as one line with its fix.

`cause_of(error)` turns one cell's error into (cause, fix): the error's first line with what differs
between cells (cell ids, paths of cell folders, attempt numbers) taken out, and, for causes that
have a known remedy, the remedy. Preflight (`mmflow.sweep.preflight`) and the end-of-sweep summary
group by the cause.
"""

from __future__ import annotations

import re

# (pattern of the error, the fix a person applies); the first that matches is used.
KNOWN_FIXES: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"No module named '([\w.]+)'|requires? `?(\w+)`?.*(?:install|not installed)", re.I),
        "pip install {0}",
    ),
    (
        re.compile(r"table image folder|data=table", re.I),
        "set data.image_dir to the folder the table's image column is relative to",
    ),
    (
        re.compile(r"lacks column\(s\)|missing column", re.I),
        "map the file's column names to mmflow's with data.columns (docs/configuration.md)",
    ),
    (
        re.compile(r"GQA_IMAGE_DIR|GQA image folder|image folder|image_dir", re.I),
        "set data.image_dir=/path/to/gqa/images (or GQA_IMAGE_DIR) to the folder of GQA's images",
    ),
    (
        re.compile(r"could be placed|no GPUs?|CUDA is not available|asks for \d+ GPU", re.I),
        "start the cluster with the GPUs the model asks for, or lower hydra.launcher.models.<name>.gpus",
    ),
    (
        re.compile(r"(?:checkpoint|repository|repo id).*(?:not found|cannot be found|unreachable)", re.I),
        "download the checkpoint (huggingface-cli download <id>) or set model.checkpoint to a local folder",
    ),
    (re.compile(r"CellConfigError"), "fix the named key on the command line or in the sweep's YAML"),
]

_VARYING = [
    (re.compile(r"\b[0-9a-f]{16}\b"), "<cell>"),  # cell ids
    (re.compile(r"(attempt|#)\s*\d+"), r"\1 N"),
    (re.compile(r"\s+\(.*=.*\)$"), ""),  # a job's overrides appended to its error
]


def cause_of(error: str) -> tuple[str, str]:
    """(the cause: the error's first line without what differs per cell, the fix or "")."""
    line = (error.strip().splitlines() or ["?"])[0]
    for pattern, replacement in _VARYING:
        line = pattern.sub(replacement, line)
    for pattern, fix in KNOWN_FIXES:
        match = pattern.search(error)
        if match:
            names = [g for g in match.groups() if g] if match.groups() else []
            return line, fix.format(names[0].split(".")[0] if names else "")
    return line, ""


def config_error(exc: BaseException) -> str:
    """One line for an error composing a config: OmegaConf's multi-line messages ("Missing mandatory
    value: source / full_key: knockout.source / object_type=dict") become their first line and key."""
    first = (str(exc).strip() or type(exc).__name__).splitlines()[0][:600]
    key = getattr(exc, "full_key", None)
    return f"{first} ({key}: set it, e.g. {key}=...)" if key and "Missing mandatory" in first else first
