"""Unknown keys are errors: every key of a composed cell config is one its YAML files define.

Hydra refuses `n_sampels=3` but accepts `+n_sampels=3`, which would change the cell id, recompute the
cell and show up in report legends. `check_known_keys` refuses such a key with one line naming the
closest real key ("did you mean n_samples?"). What a key may be is read from `conf/`: the top level
of `config.yaml` and the groups its defaults list names, the cell's analysis (its keys are global),
and for `model`, `data`, `engine` and `logger` the option the cell uses (a model whose YAML is not in
`conf/model/` may use any key some shipped model defines); `knockout` may use any key a shipped
knockout defines. Mappings in a YAML (e.g. `model.resources`, `patching`) are checked inside too.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from mmflow.config.dirs import CONF_DIR
from mmflow.errors import CellConfigError

GLOBAL_PACKAGE = "# @package _global_"
# Keys a cell may add (`+model.device_map=auto`) that the shipped YAML files leave out, so that the ids
# of cells without them stay what they were: docs/configuration.md describes each.
OPTIONAL_KEYS: dict[tuple[str, str], dict[str, Any]] = {  # (group, option or "*"): keys
    ("model", "*"): {"device_map": None, "max_tokens": None},  # placement over GPUs; a shorter context
    ("data", "table"): {"allow_images_outside": None},  # table images outside data.image_dir
}
UNKNOWN = "unknown key, no config of this cell defines it"


@cache
def _load(path: Path) -> tuple[dict[str, Any], dict[str, str], bool]:
    """A config file's keys (defaults list dropped), its group defaults {group: option}, and
    whether it is global (`# @package _global_`)."""
    from omegaconf import OmegaConf

    text = path.read_text()
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    groups: dict[str, str] = {}
    for entry in data.pop("defaults", []) or []:
        if isinstance(entry, Mapping):
            for group, option in entry.items():
                group = str(group).removeprefix("override ").strip().lstrip("/")
                if not group.startswith("hydra") and option is not None:
                    groups[group] = str(option)
    return data, groups, text.lstrip().startswith(GLOBAL_PACKAGE)


def _merged(*trees: Mapping[str, Any]) -> dict[str, Any]:
    """The union of config trees: a key is defined when any tree defines it (mappings merged)."""
    out: dict[str, Any] = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = _merged(out[key], value)
            else:
                out[key] = value
    return out


def _group(group: str, option: Any = None) -> dict[str, Any]:
    """The keys of `conf/<group>/<option>.yaml`, or of every option of the group when that file
    is not there (an option from a folder of one's own, or no option named)."""
    path = CONF_DIR / group / f"{option}.yaml"
    if option is not None and path.is_file():
        return _load(path)[0]
    return _merged(*(_load(p)[0] for p in sorted((CONF_DIR / group).glob("*.yaml"))))


def schema(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys the cell `config` may have, as a tree of its YAML defaults (values unused except
    mappings, whose keys are checked in turn)."""
    top, groups, _ = _load(CONF_DIR / "config.yaml")
    out = dict(top)
    for group in groups:
        out[group] = {}
    analysis = config.get("analysis")
    analysis_file = CONF_DIR / "analysis" / f"{analysis}.yaml"
    if analysis_file.is_file():
        keys, analysis_groups, _ = _load(analysis_file)
        out.update(keys)
        out.update({group: _group(group) for group in analysis_groups})
    else:  # an analysis registered outside mmflow: the keys its class declares
        from mmflow.analyses.base import analysis_class

        try:
            out.update({key: None for key in analysis_class(str(analysis)).config_keys})
        except ValueError:  # unknown analysis: `validate_cell` names the choices
            pass
    out["analysis"] = None
    for group in ("model", "data", "engine", "logger"):
        chosen = config.get(group)
        if group in out and isinstance(chosen, Mapping):
            optional = {
                **OPTIONAL_KEYS.get((group, "*"), {}),
                **OPTIONAL_KEYS.get((group, chosen.get("name")), {}),
            }
            out[group] = {**_group(group, chosen.get("name")), **optional}
    return out


def unknown_keys(config: Mapping[str, Any], allowed: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the keys in `config` that `allowed` does not define (checked inside mappings)."""
    found = []
    for key, value in config.items():
        if key not in allowed:
            found.append(f"{prefix}{key}")
        elif isinstance(value, Mapping) and isinstance(allowed[key], Mapping) and allowed[key]:
            found += unknown_keys(value, allowed[key], f"{prefix}{key}.")
    return found


def _level(allowed: Mapping[str, Any], parents: list[str]) -> Mapping[str, Any]:
    """The keys defined under the dotted path `parents`."""
    for part in parents:
        allowed = allowed[part]
    return allowed


def _value(config: Mapping[str, Any], path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = value[part]
    return value


def check_known_keys(config: Mapping[str, Any]) -> None:
    """Raise `CellConfigError` for the first key of `config` that no YAML of its cell defines,
    naming the closest real key ("did you mean n_samples?") or the keys defined there."""
    allowed = schema(config)
    unknown = unknown_keys(config, allowed)
    if not unknown:
        return
    key = unknown[0]
    *parents, name = key.split(".")
    siblings = sorted(k for k in _level(allowed, parents) if k != "hydra")
    prefix = "".join(f"{p}." for p in parents)
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    hint = (
        f"did you mean {prefix}{close[0]}?"
        if close
        else f"{prefix or 'top-level '}keys: {', '.join(siblings)}"
    )
    raise CellConfigError(key, _value(config, key), f"{UNKNOWN}; {hint}")


def refuse_unknown_keys(jobs: Sequence[Any]) -> None:
    """A key no config defines, in every job (`CellJob.error`; from the command line or the sweep's
    YAML): one line and exit 2 before anything runs (`ConfigError`), not one invalid job each."""
    from mmflow.errors import ConfigError

    if jobs and all(job.error and UNKNOWN in job.error for job in jobs):
        raise ConfigError(str(jobs[0].error).removeprefix("CellConfigError: "))
