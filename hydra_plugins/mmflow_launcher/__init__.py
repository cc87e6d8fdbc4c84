"""Hydra launcher plugin: a multirun's jobs become cells for mmflow's sweep core (`mmflow.sweep`).

Select it with `hydra/launcher=mmflow` (the default of `conf/config.yaml`). The launcher only
composes each job's config, resolves it into a cell, hands the cells to `mmflow.sweep.core.Sweep`
(Ray actors by default) and turns the outcome into one `JobReturn` per job with Hydra's job folder.
This module stays light: Hydra imports it whenever it scans plugins.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.mmflow_launcher._config import MmflowLauncherConf  # registers hydra/launcher=mmflow

if TYPE_CHECKING:
    from mmflow.sweep.core import CellJob, Sweep

__all__ = ["MmflowLauncher", "MmflowLauncherConf"]


class CellFailed(RuntimeError):
    """A job's cell ended failed (its `JobReturn` carries this, so the multirun exits non-zero)."""


class MmflowLauncher(Launcher):
    """Turns Hydra's job overrides into cells and runs them as one mmflow sweep."""

    def __init__(self, **params: Any) -> None:
        from mmflow.sweep.settings import SweepSettings

        plain = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in params.items()}
        self.settings = SweepSettings.from_dict(plain)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra.core.utils import configure_log, setup_globals

        from mmflow.known_keys import refuse_unknown_keys
        from mmflow.secrets import redact_hydra_files
        from mmflow.sweep.core import Sweep

        assert self.config is not None and self.hydra_context is not None, "setup() was not called"
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        composed = [self.compose(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        jobs = [job for job, _ in composed]
        refuse_unknown_keys(jobs)  # a key no config defines: one line before anything runs
        logger = self.config.get("logger")
        sweep = Sweep(
            str(self.config.get("sweep_name") or self.config.hydra.job.config_name),
            str(self.config.hydra.sweep.dir),
            jobs,
            self.settings,
            logger_cfg=OmegaConf.to_container(logger, resolve=True) if logger is not None else None,
        )
        sweep.run()
        returns = [self.job_return(sweep, job, config) for job, config in composed]
        redact_hydra_files(sweep.sweep_dir)  # the jobs' .hydra folders Hydra just wrote
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns

    def compose(self, idx: int, overrides: list[str]) -> tuple[CellJob, DictConfig]:
        """Hydra's config of job `idx` and the cell it names (resolved with that job's HydraConfig)."""
        from hydra.core.hydra_config import HydraConfig

        from mmflow.cli import cell_config
        from mmflow.sweep.core import CellJob

        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        task_cfg = copy.deepcopy(config)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)
        try:
            return CellJob.resolve(idx, overrides, lambda: cell_config(task_cfg)), config
        finally:
            HydraConfig.instance().cfg = previous

    def job_return(self, sweep: Sweep, job: CellJob, config: DictConfig) -> JobReturn:
        """A `JobReturn` with Hydra's per-job folder; a failed cell makes a failed return."""
        from hydra.core.utils import run_job

        assert self.hydra_context is not None
        return run_job(
            hydra_context=self.hydra_context,
            task_function=functools.partial(job_result, sweep, job),
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )


def job_result(sweep: Sweep, job: CellJob, _cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.utils import filter_overrides

    from mmflow.secrets import redact

    error = sweep.job_error(job)
    if error is not None:
        raise CellFailed(f"{error} ({' '.join(redact(filter_overrides(job.overrides)))})")
    assert job.cell is not None
    status = sweep.status[job.cell_id]
    return {
        "cell_id": job.cell_id,
        "status": status,
        "path": str(Path(job.cell["results_dir"]) / job.cell_id),
    }
