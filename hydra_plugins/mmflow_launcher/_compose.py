"""Compose a multirun's jobs in linear time: Hydra composes each distinct group selection once.

Hydra's `load_sweep_config` composes a job from scratch (defaults list, every config file, the merge):
~0.1-1.3 s per job. Jobs of a grid differ mostly in plain values (`window=3`, `task=ChooseCat`) and
share few group selections (`model=…`, `knockout=…`). So a job's group overrides pick a *base*
config, composed once per distinct selection and cached; then:

- `plain_config`: the base resolved once to plain data, the job's values set on a copy: for value
  overrides of existing keys that no interpolation reads (the common case, ~ms per job);
- `job_config`, otherwise: the values applied to the base with Hydra's own
  `_apply_overrides_to_config` (same parser, same `+`/`++`/`~` rules), in place and undone after
  (a copy for overrides that add or delete keys).

Parsed overrides are cached by their text, so a grid's repeated `window=3` is parsed once.
"""

from __future__ import annotations

import copy
import logging
import pickle
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

log = logging.getLogger("mmflow.sweep")


class JobComposer:
    """Configs of a multirun's jobs: `task_config(overrides)` -> (job config without `hydra`, its base)."""

    def __init__(self, config_loader: Any, master: DictConfig) -> None:
        self.loader = config_loader
        self.master = master
        self.parser = OverridesParser.create()
        self.parsed: dict[str, Override] = {}
        self.is_group: dict[str, bool] = {}
        self.bases: dict[tuple[str, ...], tuple[DictConfig, DictConfig]] = {}
        self.current: DictConfig | None = None  # the base whose config HydraConfig holds
        self.resolved: dict[tuple[str, ...], tuple[dict[str, Any], set[str]] | None] = {}
        self.hydra_nodes: dict[int, Any] = {}  # id(base) -> its HydraConfig (the `hydra` node alone)

    def parse(self, line: str) -> Override:
        if line not in self.parsed:
            self.parsed[line] = self.parser.parse_overrides([line])[0]
        return self.parsed[line]

    def selects_config(self, override: Override) -> bool:
        """Whether the override picks configs (a group, a package, a `hydra.` key): part of the base."""
        key = override.key_or_group
        if key not in self.is_group:
            repository = getattr(self.loader, "repository", None)
            group = repository.group_exists(key) if repository is not None else True
            self.is_group[key] = bool(group) or override.is_hydra_override()
        return self.is_group[key] or override.package is not None

    def base(self, selection: tuple[str, ...]) -> tuple[DictConfig, DictConfig]:
        """(full config with `hydra`, task config without it) for this group selection, composed once."""
        if selection not in self.bases:
            full = self.loader.load_sweep_config(self.master, list(selection))
            task = copy.deepcopy(full)
            with open_dict(task):
                del task["hydra"]
            self.bases[selection] = (full, task)
        return self.bases[selection]

    def resolved_base(self, selection: tuple[str, ...]) -> tuple[dict[str, Any], set[str]] | None:
        """(the base's task config resolved to plain data, the keys its interpolations read), once per
        base; None when it cannot be resolved alone or has relative interpolations."""
        if selection not in self.resolved:
            from hydra.core.hydra_config import HydraConfig

            full, task = self.base(selection)
            refs = references(OmegaConf.to_container(task, resolve=False))
            previous = HydraConfig.instance().cfg
            try:
                HydraConfig.instance().set_config(full)
                plain = OmegaConf.to_container(task, resolve=True, throw_on_missing=True)
            except Exception:  # noqa: BLE001 - e.g. a ??? a job sets: each job resolves its own
                plain = None
            finally:
                HydraConfig.instance().cfg = previous
                self.current = None
            self.resolved[selection] = (plain, refs) if plain is not None and refs is not None else None
        return self.resolved[selection]

    def plain_config(self, overrides: Sequence[str]) -> dict[str, Any] | None:
        """The job's resolved task config from its base's resolved one, when every value override
        sets an existing key that no interpolation reads (else None: use `job_config`)."""
        parsed = [self.parse(line) for line in overrides]
        selection = tuple(o.input_line or "" for o in parsed if self.selects_config(o))
        values = [o for o in parsed if not self.selects_config(o)]
        base = self.resolved_base(selection)
        if base is None:
            return None
        plain, refs = base
        updates = []
        for override in values:
            if override.is_add() or override.is_force_add() or override.is_delete():
                return None
            value = override.value()
            if related(override.key_or_group, refs) or (isinstance(value, str) and "${" in value):
                return None
            if isinstance(value, dict | list):
                return None
            updates.append((override.key_or_group.split("."), value))
        config = pickle.loads(pickle.dumps(plain))  # a deep copy of plain data, ~10x copy.deepcopy
        for path, value in updates:
            node = config
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict) or path[-1] not in node or isinstance(node[path[-1]], dict | list):
                return None
            node[path[-1]] = value
        return config

    @contextmanager
    def job_config(self, overrides: Sequence[str]) -> Iterator[DictConfig]:
        """The job's task config while the context lasts, with HydraConfig set to its base's config.

        Plain value overrides (`key=value` on an existing value) are applied to the shared base in
        place and undone on exit (no copy); any other (`+`, `++`, `~`, a new key) to a copy.
        """
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.hydra_config import HydraConfig

        parsed = [self.parse(line) for line in overrides]
        selection = tuple(o.input_line or "" for o in parsed if self.selects_config(o))
        values = [o for o in parsed if not self.selects_config(o)]
        full, task = self.base(selection)
        if self.current is not full:  # HydraConfig.set_config copies the whole config: once per base
            if id(full) not in self.hydra_nodes:
                HydraConfig.instance().set_config(full)
                self.hydra_nodes[id(full)] = HydraConfig.instance().cfg
            HydraConfig.instance().cfg = self.hydra_nodes[id(full)]
            self.current = full
        saved = [raw_value(task, o) for o in values]
        if any(value is MISSING_RAW for value in saved):
            task, saved, values = copy.deepcopy(task), [], values
            ConfigLoaderImpl._apply_overrides_to_config(values, task)
            yield task
            return
        try:
            ConfigLoaderImpl._apply_overrides_to_config(values, task)
            yield task
        finally:
            for override, value in zip(values, saved, strict=True):
                OmegaConf.update(task, override.key_or_group, value, merge=False)


MISSING_RAW = object()


def raw_value(cfg: DictConfig, override: Override) -> Any:
    """The raw (unresolved) value an override of an existing scalar key replaces, else `MISSING_RAW`."""
    if override.is_add() or override.is_force_add() or override.is_delete():
        return MISSING_RAW
    key = override.key_or_group
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig):
        return MISSING_RAW
    node = parent._get_node(leaf, throw_on_missing_key=False)  # `in` would resolve it
    if node is None or isinstance(node, DictConfig | ListConfig) or isinstance(override.value(), dict | list):
        return MISSING_RAW
    return node._value()


INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
REFERENCE = re.compile(r"\.*[A-Za-z_][\w.]*")


def references(container: Any) -> set[str] | None:
    """Every key path named inside an interpolation of an unresolved container; None when one is
    relative (`${..x}`), where a value override cannot be told apart from what it feeds."""
    found: set[str] = set()
    stack = [container]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and "${" in item:
            for body in INTERPOLATION.findall(item):
                for ref in REFERENCE.findall(body):
                    if ref.startswith("."):
                        return None
                    found.add(ref)
    return found


def related(key: str, refs: set[str]) -> bool:
    return any(r == key or r.startswith(key + ".") or key.startswith(r + ".") for r in refs)


class Progress:
    """'composed i/N jobs' while planning: a live bar on a terminal, a log line every `every_s` else."""

    def __init__(self, total: int, every_s: float = 5.0, enabled: bool = True) -> None:
        self.total = total
        self.every_s = every_s
        self.enabled = enabled and total >= 50
        self.bar: Any = None
        self.last = self.started = time.monotonic()
        if self.enabled and sys.stdout.isatty():
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(transient=True)
            self.task = self.bar.add_task("planning: composing jobs", total=total)
            self.bar.start()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            log.info("planning: composed %d/%d jobs (%.1f s)", done, self.total, self.last - self.started)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def compose_all(
    overrides: Sequence[Sequence[str]], compose_one: Callable[[int, list[str]], Any], progress: bool = True
) -> list[Any]:
    """`compose_one(i, overrides[i])` for every job, with planning progress."""
    bar = Progress(len(overrides), enabled=progress)
    out = []
    try:
        for i, job in enumerate(overrides):
            out.append(compose_one(i, list(job)))
            if i % 25 == 0:
                bar.update(i + 1)
    finally:
        bar.stop()
    return out
