"""Config of the mmflow launcher (`hydra/launcher=mmflow`): how cells are placed on Ray actors.

Where Ray runs (`ray.address`, local CPUs) is the cell config's `ray:` block; this is how the sweep
uses it. Every wait has a timeout, so a sweep ends with a summary instead of hanging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class MmflowLauncherConf:
    _target_: str = "hydra_plugins.mmflow_launcher.MmflowLauncher"
    # Actors per model; each loads its model once and runs whole cell groups from the queue.
    replicas: int = 1
    # Per-model overrides by model name: {replicas, gpus, cpus, memory_gb} (default: model.resources).
    models: dict[str, Any] = field(default_factory=dict)
    # false: one cell per group and a fresh actor (weight load) per cell; for comparisons only.
    reuse_models: bool = True
    # Ray scheduling strategy for the actors: SPREAD (one per node first) or DEFAULT.
    scheduling: str = "SPREAD"
    # Times a cell group is requeued after its actor died, hung or timed out (then its cells fail).
    group_retries: int = 2
    timeout_s: float = 72 * 3600  # whole sweep; unfinished cells are then marked failed
    group_timeout_s: float = 12 * 3600  # one group on one actor, from its start
    stall_timeout_s: float = 1800  # a busy actor that finishes no sample for this long is replaced
    start_timeout_s: float = 900  # an actor waiting for resources while no other actor is busy
    poll_s: float = 0.5  # how often the driver checks actors (every ray.wait uses it as timeout)
    progress: str = "auto"  # auto (live display on a terminal, log lines otherwise) | rich | log | none
    log_every_s: float = 30.0  # interval of the log-line progress


ConfigStore.instance().store(
    group="hydra/launcher", name="mmflow", node=MmflowLauncherConf, provider="mmflow"
)
