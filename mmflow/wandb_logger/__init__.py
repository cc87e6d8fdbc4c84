"""Weights & Biases logging: one run per cell, opened and closed where the cell is computed, one per sweep.

`settings` (logger config, run mode, `wandb.init`, sync hints), `cell_run` (the run of one cell and
the runtime's `cell_logger` factory), `sweep_run` (`log_sweep`, the run of one sweep).
"""

from mmflow.wandb_logger.cell_run import WandbCellLogger, cell_logger, curve_payload, per_layer_table
from mmflow.wandb_logger.settings import init_run, logger_config, resolve_mode, sweep_name, sync_hint
from mmflow.wandb_logger.sweep_run import log_sweep

__all__ = [
    "WandbCellLogger",
    "cell_logger",
    "curve_payload",
    "init_run",
    "log_sweep",
    "logger_config",
    "per_layer_table",
    "resolve_mode",
    "sweep_name",
    "sync_hint",
]
