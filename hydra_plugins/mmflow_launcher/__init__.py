"""Hydra launcher plugin that runs an mmflow sweep on Ray actors, one loaded model per actor.

Select it with `hydra/launcher=mmflow` (the default of `conf/config.yaml`). This module stays light:
Hydra imports it whenever it scans plugins; Ray and the scheduler live in `_core` and are imported
only when a sweep is launched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.mmflow_launcher._config import MmflowLauncherConf  # registers hydra/launcher=mmflow

__all__ = ["MmflowLauncher", "MmflowLauncherConf"]


class MmflowLauncher(Launcher):
    """Groups the grid's cells by model and runs each group on a Ray actor holding that model."""

    def __init__(self, **params: Any) -> None:
        plain = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in params.items()}
        self.conf = MmflowLauncherConf(**plain)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.mmflow_launcher._core import launch

        assert self.config is not None and self.hydra_context is not None, "setup() was not called"
        return launch(self, job_overrides, initial_job_idx)
