"""How a sweep runs: placement, retries, timeouts, progress, and where Ray is.

`hydra_plugins.mmflow_launcher` registers these fields as `hydra.launcher` (Hydra's own Ray launcher
keeps its `ray.init` arguments under `hydra.launcher.ray` too). None of them is part of a cell id.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mmflow.errors import ConfigError

FORWARD_ENV = ["MMFLOW_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]


# The ray.init arguments declared in the launcher config (so `hydra.launcher.ray.init.<key>=…` works
# without `+`), with their defaults; null ones are left to Ray.
RAY_INIT_KEYS: dict[str, Any] = {
    "address": None,
    "num_cpus": None,
    "num_gpus": None,
    "resources": None,
    "object_store_memory": None,
    "runtime_env": None,
    "namespace": None,
    "include_dashboard": None,
    "log_to_driver": True,
}


@dataclass
class RaySettings:
    """Where Ray runs. `init` goes to `ray.init` (address, num_cpus, num_gpus, runtime_env, …)."""

    # address: null or "" = start a local Ray for this sweep; "auto", "host:port" or "ray://host:10001"
    # = join a cluster. Local Ray only: num_cpus / num_gpus to offer (null = all). Every key listed in
    # RAY_INIT_KEYS can be set without `+`; a null one is not passed; other ray.init arguments need `+`.
    init: dict[str, Any] = field(default_factory=lambda: dict(RAY_INIT_KEYS))
    forward_env: list[str] = field(default_factory=lambda: list(FORWARD_ENV))  # copied to actors when set
    connect_timeout_s: float = 60.0  # give up joining an address that does not answer after this long


# The allowed values of each choice setting (checked, with a did-you-mean, when settings are built).
CHOICES: dict[str, tuple[str, ...]] = {
    "executor": ("ray", "local"),
    "write_results": ("auto", "driver", "workers"),
    "scheduling": ("SPREAD", "DEFAULT"),
    "progress": ("auto", "rich", "log", "none"),
}
# Numeric settings: (kind, lowest allowed, whether the lowest is excluded). Sources: the field comments.
NUMBERS: dict[str, tuple[type, float, bool]] = {
    "replicas": (int, 1, False),
    "relay_buffer": (int, 1, False),
    "batch_retries": (int, 0, False),
    "timeout_s": (float, 0, True),
    "batch_timeout_s": (float, 0, True),
    "stall_timeout_s": (float, 0, True),
    "start_timeout_s": (float, 0, True),
    "poll_s": (float, 0, True),
    "log_every_s": (float, 0, True),
    "record_every_s": (float, 0, False),
}
FLAGS = ("reuse_models", "plan", "preflight", "prefetch")
# Per-model settings (`hydra.launcher.models.<name>.<key>`), same (kind, lowest, excluded) rules.
MODEL_KEYS: dict[str, tuple[type, float, bool]] = {
    "replicas": (int, 1, False),
    "gpus": (float, 0, False),
    "cpus": (float, 0, False),
    "memory_gb": (float, 0, False),
    "clean_pass_s": (float, 0, True),
}


def did_you_mean(value: Any, allowed: Iterable[str]) -> str:
    """ "; did you mean 'x'?" for the closest allowed spelling (case-blind), or ""."""
    allowed = list(allowed)
    lowered = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(str(value).lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """ConfigError unless `value` is one of `allowed` (names the choices and the closest one)."""
    if value not in allowed:
        raise ConfigError(
            f"hydra.launcher.{key}={value!r}: must be one of {', '.join(allowed)}"
            + did_you_mean(value, allowed)
        )


def check_number(key: str, value: Any, rule: tuple[type, float, bool]) -> None:
    """ConfigError unless `value` is a number of the rule's kind (an int for int settings; never a
    bool) at or above its lowest value (above it when excluded)."""
    kind, low, excluded = rule
    kinds = (int,) if kind is int else (int, float)
    noun = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(f"hydra.launcher.{key}={value!r}: must be {noun}")
    if value < low or (excluded and value == low):
        bound = f"> {low:g}" if excluded else f">= {low:g}"
        raise ConfigError(f"hydra.launcher.{key}={value!r}: must be {noun} {bound}")


# Old launcher keys still accepted, with a warning: deprecated name -> its name now.
DEPRECATED_KEYS = {"group_retries": "batch_retries", "group_timeout_s": "batch_timeout_s"}


@dataclass
class SweepSettings:
    """Every knob of a sweep (see docs/running.md); defaults suit one machine."""

    executor: str = "ray"  # ray (actors, one model each) | local (this process, one batch at a time)
    # Workers per model; each loads its model once and runs whole cell batches from the queue.
    replicas: int = 1
    # Per-model overrides by model name: {replicas, gpus, cpus, memory_gb} (default: model.resources).
    models: dict[str, Any] = field(default_factory=dict)
    # false: one cell per batch and a fresh worker (weight load) per cell; for comparisons only.
    reuse_models: bool = True
    # Who writes the cell files (Ray only): driver (actors send every finished sample to the driver,
    # which writes results_dir: no shared disk needed) | workers (actors write results_dir themselves:
    # every node must see it) | auto (driver when joining a cluster, workers for a local Ray).
    write_results: str = "auto"
    relay_buffer: int = 64  # write_results=driver: files an actor hands over before it waits for the driver
    # Ray scheduling strategy for the actors: SPREAD (one per node first) or DEFAULT.
    scheduling: str = "SPREAD"
    # Times a cell batch is requeued after its worker died, hung or timed out (then its cells fail).
    batch_retries: int = 2
    timeout_s: float = 72 * 3600  # whole sweep; unfinished cells are then marked failed
    batch_timeout_s: float = 12 * 3600  # one cell batch on one worker, from its start
    stall_timeout_s: float = 1800  # a busy worker that finishes no sample for this long is replaced
    start_timeout_s: float = 900  # a worker waiting for resources while no other worker is busy
    poll_s: float = 0.5  # how often the driver checks workers (every wait uses it as its timeout)
    progress: str = "auto"  # auto (live display on a terminal, log lines otherwise) | rich | log | none
    log_every_s: float = 30.0  # interval of the log-line progress
    report: bool | None = None  # the HTML report at the end (null: for sweeps, not for single runs)
    # sweep.json is rewritten at most this often while running (events.jsonl has every change at once)
    record_every_s: float = 30.0
    plan: bool = False  # print the plan (cells, batches, actors, compute, GPU-hours) and run nothing
    preflight: bool = True  # check each model and data source once before any cell starts
    # put every model of the sweep on every node (`mmflow prefetch`, mmflow.sweep.prefetch) and run nothing
    prefetch: bool = False
    # Clean-pass seconds per sample on one GPU, by model name, for the plan's GPU-hours (overrides
    # mmflow.sweep.planview.CLEAN_PASS_S; hydra.launcher.models.<name>.clean_pass_s works too).
    clean_pass_s: dict[str, float] = field(default_factory=dict)
    ray: RaySettings = field(default_factory=RaySettings)
    # Deprecated spellings of batch_retries / batch_timeout_s (null: unset); a set one is moved there.
    group_retries: int | None = None
    group_timeout_s: float | None = None

    def __post_init__(self) -> None:
        for old, new in DEPRECATED_KEYS.items():
            value = getattr(self, old)
            if value is None:
                continue
            default = next(f.default for f in fields(self) if f.name == new)
            if getattr(self, new) not in (default, value):
                raise ConfigError(
                    f"hydra.launcher.{old}={value!r} and hydra.launcher.{new}={getattr(self, new)!r} "
                    f"disagree; {old} is the deprecated name of {new}: set only {new}"
                )
            warnings.warn(
                f"hydra.launcher.{old} is deprecated (a cell batch is not a group): "
                f"use hydra.launcher.{new}={value!r}",
                FutureWarning,
                stacklevel=3,
            )
            setattr(self, new, value)
            setattr(self, old, None)
        self.check()

    def check(self) -> None:
        """Validate every setting once (choices, ranges, types): `ConfigError` naming the key, what
        it allows and, for a choice, the closest allowed spelling. Model names are checked against a
        sweep's cells by `check_model_names`."""
        for key, allowed in CHOICES.items():
            check_choice(key, getattr(self, key), allowed)
        for key, rule in NUMBERS.items():
            check_number(key, getattr(self, key), rule)
        for key in FLAGS:
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"hydra.launcher.{key}={getattr(self, key)!r}: must be true or false")
        if self.report is not None and not isinstance(self.report, bool):
            raise ConfigError(f"hydra.launcher.report={self.report!r}: must be true, false or null")
        for name, per_model in self.models.items():
            if not isinstance(per_model, Mapping):
                raise ConfigError(
                    f"hydra.launcher.models.{name}={per_model!r}: must be a mapping of "
                    f"{', '.join(MODEL_KEYS)}"
                )
            for key, value in per_model.items():
                if key not in MODEL_KEYS:
                    raise ConfigError(
                        f"hydra.launcher.models.{name}.{key}: unknown per-model setting; one of "
                        f"{', '.join(MODEL_KEYS)}{did_you_mean(key, MODEL_KEYS)}"
                    )
                check_number(f"models.{name}.{key}", value, MODEL_KEYS[key])
        for name, value in self.clean_pass_s.items():
            check_number(f"clean_pass_s.{name}", value, MODEL_KEYS["clean_pass_s"])
        check_number("ray.connect_timeout_s", self.ray.connect_timeout_s, (float, 0, True))

    def check_model_names(self, names: Iterable[str]) -> None:
        """ConfigError when `models` or `clean_pass_s` name a model that no cell of the sweep uses
        (`names`: the sweep's model names): a misspelt name would otherwise be ignored."""
        used = sorted(set(names))
        for key in ("models", "clean_pass_s"):
            unknown = [name for name in getattr(self, key) if name not in used]
            if unknown:
                hint = did_you_mean(unknown[0], used) if len(unknown) == 1 else ""
                raise ConfigError(
                    f"hydra.launcher.{key} names {', '.join(map(repr, unknown))}, which no cell of this "
                    f"sweep uses (its models: {', '.join(used) or 'none'}){hint}"
                )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SweepSettings:
        """Settings from plain data (e.g. the resolved `hydra.launcher` node); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        ray = kept.pop("ray", None) or {}
        ray_known = {f.name for f in fields(RaySettings)}
        return cls(**kept, ray=RaySettings(**{k: v for k, v in ray.items() if k in ray_known}))
