"""Hydra launcher plugin: a multirun's jobs become cells for mmflow's sweep core (`mmflow.sweep`).

Select it with `hydra/launcher=mmflow` (the default of `conf/config.yaml`). The launcher only
composes each job's config (`_compose`: each distinct group selection once, then values on plain
data), resolves it into a cell, hands the cells to `mmflow.sweep.core.Sweep` (Ray actors by default)
or prints their plan (`hydra.launcher.plan=true`), writes each job's `<n>/.hydra/overrides.yaml` and
returns one `JobReturn` per job. This module stays light: Hydra imports it whenever it scans plugins.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.mmflow_launcher._compose import JobComposer, compose_all
from hydra_plugins.mmflow_launcher._config import MmflowLauncherConf  # registers hydra/launcher=mmflow
from hydra_plugins.mmflow_launcher._sweeper import MmflowSweeper  # registers hydra/sweeper=mmflow

if TYPE_CHECKING:
    from mmflow.sweep.core import CellJob, Sweep

__all__ = ["MmflowLauncher", "MmflowLauncherConf", "MmflowSweeper"]


class MmflowLauncher(Launcher):
    """Turns Hydra's job overrides into cells and runs them as one mmflow sweep."""

    def __init__(self, **params: Any) -> None:
        from mmflow.sweep.settings import SweepSettings

        plain = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in params.items()}
        self.settings = SweepSettings.from_dict(plain)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.compose_s = 0.0  # seconds the last launch spent composing its jobs into cells
        self.plan: dict[str, Any] | None = None  # the last plan printed (hydra.launcher.plan=true)
        self.last_jobs: list[CellJob] = []
        self.last_sweep: Sweep | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Compose the jobs, then plan (`hydra.launcher.plan=true`) or run them as one sweep.

        A sweep with a failed cell or an invalid job ends with `SweepFailed` (exit code 1) after its
        grouped failure summary, so that nothing (no Hydra traceback) is printed after it.
        """
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import configure_log, setup_globals

        from mmflow.config.known_keys import refuse_unknown_keys
        from mmflow.storage.secrets import redact_argv, redact_hydra_files
        from mmflow.sweep.core import Sweep, SweepFailed
        from mmflow.sweep.display import own_log_lines

        assert self.config is not None and self.hydra_context is not None, "setup() was not called"
        redact_argv()  # Hydra has parsed it; W&B and Ray record the driver's command line
        redact_hydra_files(Path(str(self.config.hydra.sweep.dir)))  # multirun.yaml, before any refusal
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        own_log_lines(verbose=bool(self.config.hydra.verbose))
        started = time.perf_counter()
        composer = JobComposer(self.hydra_context.config_loader, self.config)
        jobs = compose_all(
            job_overrides,
            lambda i, o: self.compose(composer, initial_job_idx + i, o),
            progress=self.settings.progress != "none",
        )
        refuse_unknown_keys(jobs)  # a key no config defines: one line before anything runs
        logger = self.config.get("logger")
        HydraConfig.instance().set_config(self.config)  # the composer set its bases' configs
        sweep = Sweep(
            str(self.config.get("sweep_name") or "sweep"),
            str(self.config.hydra.sweep.dir),
            jobs,
            self.settings,
            logger_cfg=OmegaConf.to_container(logger, resolve=True) if logger is not None else None,
        )
        self.compose_s = time.perf_counter() - started
        self.last_jobs, self.last_sweep = jobs, sweep
        if self.settings.plan:
            from mmflow.sweep.planview import print_plan

            self.plan = print_plan(sweep, compose_s=self.compose_s)
            return [self.job_return(sweep, job) for job in jobs]
        if self.settings.prefetch:
            from mmflow.sweep.prefetch import prefetch

            if prefetch(sweep.cells, self.settings.ray if self.settings.executor == "ray" else None):
                raise SweepFailed(sweep)  # one line per root cause was printed
            return [self.job_return(sweep, job) for job in jobs]
        sweep.run()
        write_job_overrides(sweep.sweep_dir, jobs)  # written redacted: no second pass over them
        if sweep.failed_ids() or sweep.invalid_jobs():
            raise SweepFailed(sweep)
        return [self.job_return(sweep, job) for job in jobs]

    def compose(self, composer: JobComposer, idx: int, overrides: list[str]) -> CellJob:
        """The cell job `idx` names (its config composed by `composer`, resolved with its base's
        HydraConfig); a config that cannot be composed fails this job alone."""
        from mmflow.sweep.config import cell_spec, spec_from_container
        from mmflow.sweep.core import CellJob
        from mmflow.sweep.executor import short_error

        try:
            plain = composer.plain_config(overrides)
            if plain is not None:  # the common case: values set on a resolved base
                return CellJob.resolve(idx, overrides, lambda: spec_from_container(plain))
            with composer.job_config(overrides) as task_cfg:
                return CellJob.resolve(idx, overrides, lambda: cell_spec(task_cfg))
        except Exception as exc:  # e.g. an unknown group option: this job only
            return CellJob(idx, list(overrides), error=f"{type(exc).__name__}: {short_error(exc)}")

    def job_return(self, sweep: Sweep, job: CellJob) -> JobReturn:
        """A completed `JobReturn` naming the job's cell (Hydra's sweeper only collects them)."""
        assert self.config is not None
        value: dict[str, Any] = {"cell_id": job.cell_id, "status": sweep.status.get(job.cell_id, "planned")}
        if job.cell is not None:
            value["path"] = str(Path(job.cell["results_dir"]) / job.cell_id)
        ret = JobReturn(overrides=job.overrides, task_name=str(self.config.hydra.job.name))
        ret.working_dir = str(Path(str(self.config.hydra.sweep.dir)) / str(job.idx))
        ret.status, ret.return_value = JobStatus.COMPLETED, value
        return ret


def write_job_overrides(sweep_dir: Path, jobs: Sequence[CellJob]) -> None:
    """Each job's `<n>/.hydra/overrides.yaml` (what Hydra users read), one small file per job."""
    from mmflow.storage.secrets import redact

    for job in jobs:
        folder = sweep_dir / str(job.idx) / ".hydra"
        folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(f"- {json.dumps(o)}\n" for o in redact(job.overrides)) or "[]\n"
        (folder / "overrides.yaml").write_text(lines, encoding="utf-8")
