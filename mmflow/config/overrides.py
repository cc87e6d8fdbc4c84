"""Command-line overrides checked before Hydra composes anything: one line for a misspelt key, a
config-group option that does not exist, or a task that is not one of the six.

Hydra's own answers are longer and point elsewhere: `n_sampels=3` gets "To append to your config
use +n_sampels=3" (which `mmflow.config.known_keys` then refuses), `model=tiny-lava` a list of every
model, and `task=ChoseAttr` composes and fails only when its cell starts. Keys are checked against
every key some YAML in `conf/` defines (any model, data source, analysis, ...): the cell's own
composition is checked after that by `known_keys`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmflow.config.dirs import CONF_DIR
from mmflow.config.known_keys import OPTIONAL_KEYS, _load, _merged

# `key=value` (no +, ~ or ++: adding and deleting keys are known_keys' business), value not a sweep
# function such as choice(...), range(...), glob(...).
OVERRIDE = re.compile(r"^(?P<key>[A-Za-z_][\w.\-]*)=(?P<value>.*)$", re.S)
FUNCTION = re.compile(r"^\s*\w+\(")
# Hydra's flags whose next argument is their value, not an override.
FLAGS_WITH_VALUES = frozenset(
    {"-cd", "--config-dir", "-cn", "--config-name", "-cp", "--config-path", "-c", "--cfg", "-p", "--package"}
)


def groups(extra_dirs: Iterable[Path] = ()) -> dict[str, list[str]]:
    """The config groups of `conf/` and their options, e.g. {"model": ["llava-1.5-7b", ...]}, with the
    options a user's own config folders add (`-cd DIR`: DIR/model/*.yaml, ...)."""
    out: dict[str, set[str]] = {}
    for root in (CONF_DIR, *extra_dirs):
        for folder in (p for p in sorted(root.iterdir()) if p.is_dir()) if root.is_dir() else ():
            found = {f.stem for f in folder.glob("*.yaml")}
            if folder.name in out or root == CONF_DIR:
                out.setdefault(folder.name, set()).update(found)
    return {group: sorted(options) for group, options in out.items()}


def config_dirs(args: Sequence[str]) -> list[Path]:
    """The folders `-cd DIR` / `--config-dir DIR` / `--config-dir=DIR` add to the search path."""
    out = []
    for index, arg in enumerate(args):
        if arg.startswith("--config-dir="):
            out.append(Path(arg.split("=", 1)[1]))
        elif arg in ("-cd", "--config-dir") and index + 1 < len(args):
            out.append(Path(args[index + 1]))
    return out


def all_keys() -> dict[str, Any]:
    """Every key some YAML of `conf/` defines, as one tree (groups: the union of their options)."""
    top, _, _ = _load(CONF_DIR / "config.yaml")
    tree: dict[str, Any] = dict(top)
    for group in groups():
        options = [_load(p) for p in sorted((CONF_DIR / group).glob("*.yaml"))]
        if group == "analysis":  # global packages: their keys are top-level
            tree = _merged(tree, *(keys for keys, _, _ in options))
            tree = _merged(tree, *({g: {} for g in sub} for _, sub, _ in options))
        else:
            optional = _merged(*(keys for (g, _), keys in OPTIONAL_KEYS.items() if g == group))
            tree[group] = _merged(*(keys for keys, _, _ in options), optional)
    return tree


def check_overrides(args: Sequence[str]) -> str | None:
    """One line for the first override that names no key, or only group options or tasks that do not
    exist; else None. An override that also names valid values (`task=ChooseAttr,ChoseAttr`) is not
    refused: its bad values make jobs that fail alone, as any invalid cell of a sweep does
    (`partly_bad`). A value with an interpolation or a sweep function is left to Hydra; keys under
    `hydra.` are Hydra's own."""
    return _sweep_name_error(args) or next((line for line, every in _findings(args) if every), None)


def _sweep_name_error(args: Sequence[str]) -> str | None:
    """`-cn NAME` / `--config-name NAME` must name a config of conf/, sweeps/ or a `-cd` folder."""
    from mmflow.config.dirs import SWEEPS_DIR

    for index, arg in enumerate(args[:-1]):
        if arg in ("-cn", "--config-name"):
            name = args[index + 1]
            folders = (CONF_DIR, SWEEPS_DIR, *config_dirs(args))
            known = sorted({p.stem for folder in folders for p in Path(folder).glob("*.yaml")})
            if name.removesuffix(".yaml") not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f"did you mean -cn {close[0]}?" if close else f"named sweeps: {', '.join(known)}"
                return f"-cn {name}: no such sweep in sweeps/ (or conf/, or a -cd folder); {hint}"
    return None


def partly_bad(args: Sequence[str]) -> list[str]:
    """One warning line per sweep override some of whose values name no group option or task."""
    return [f"{line} (those jobs fail alone)" for line, every in _findings(args) if not every]


def _findings(args: Sequence[str]) -> Iterator[tuple[str, bool]]:
    """(line, whether every value of the override is bad) for each override with a bad key or value."""
    options, tree = groups(config_dirs(args)), all_keys()
    values_of_flags = {args[i + 1] for i, a in enumerate(args[:-1]) if a in FLAGS_WITH_VALUES}
    for arg in args:
        found = OVERRIDE.match(arg)
        if found is None or arg.startswith("-") or arg in values_of_flags:
            continue
        key, value = found["key"], found["value"]
        if key.split(".")[0] == "hydra" or "${" in value or FUNCTION.match(value):
            continue
        values = [v.strip() for v in value.split(",") if v.strip()]
        if key in options:
            bad = [m for v in values if (m := _option_error(key, v, options[key]))]
        elif key == "task":
            bad = [m for v in values if (m := _task_error(v))]
        else:
            bad = [m] if (m := key_error(key, tree)) else []
            values = bad
        if bad:
            yield f"{arg}: {'; '.join(bad)}", len(bad) == len(values)


def _option_error(group: str, option: str, choices: list[str]) -> str | None:
    if option in choices or option.startswith(("/", ".")):
        return None
    close = difflib.get_close_matches(option, choices, n=1, cutoff=0.6)
    hint = f"did you mean {group}={close[0]}?" if close else f"options: {', '.join(choices[:8])}, ..."
    return f"no {group} option {option!r} in conf/{group}/; {hint}"


def _task_error(task: str) -> str | None:
    from mmflow.data.sample import TASKS

    if task in TASKS:
        return None
    close = difflib.get_close_matches(task, TASKS, n=1, cutoff=0.5)
    hint = f"did you mean task={close[0]}?" if close else f"tasks: {', '.join(TASKS)}"
    return f"unknown task {task!r}; {hint}"


def key_error(
    key: str, tree: Mapping[str, Any], nothing_close: str = "no YAML in conf/ defines it"
) -> str | None:
    """ "unknown key; did you mean …?" for a dotted `key` that `tree` does not define (keys under a
    leaf or an empty mapping are open), else None; `nothing_close`: the hint when no key is close."""
    level: Any = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(level, Mapping) or not level:
            return None  # below a leaf or an open mapping: any key (e.g. model.resources.*)
        if part not in level:
            prefix = "".join(f"{p}." for p in parts[:depth])
            close = difflib.get_close_matches(part, [str(k) for k in level], n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}?" if close else nothing_close
            return f"unknown key; {hint}"
        level = level[part]
    return None
