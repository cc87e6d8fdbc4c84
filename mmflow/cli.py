"""Turn a composed Hydra config into a computed cell (single runs and the basic launcher)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from mmflow.locks import register_resolvers

register_resolvers()  # `${mmflow.unique_dir:...}` of conf/config.yaml, before Hydra resolves it


def cell_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved cell config as plain data, with an absolute results folder.

    Its analysis's config (`mmflow/conf/analysis/<name>.yaml`) brings only the keys that analysis reads, so
    nothing it ignores can change its cell id.
    """
    from mmflow.analyses import canonical_config

    config = canonical_config(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    config.pop("hydra", None)
    config["results_dir"] = str(Path(to_absolute_path(config["results_dir"])).resolve())
    return config


def run_from_hydra(cfg: DictConfig) -> dict[str, Any]:
    from mmflow.locks import sigterm_as_interrupt
    from mmflow.models.registry import get_model
    from mmflow.runtime import run_cells
    from mmflow.validate import validate_cell
    from mmflow.wandb_logger import cell_logger, sync_hint

    redact_hydra_output()
    config = cell_config(cfg)
    validate_cell(config)  # before the model loads (minutes for a 7B model)
    loaded = get_model(config["model"])
    with sigterm_as_interrupt():
        outcome = run_cells(loaded, [config], progress=True, logger_factory=cell_logger)[0]
    print(f"[mmflow] cell {outcome.cell_id}: {outcome.status} -> {outcome.path}")
    if outcome.status != "cached" and (hint := sync_hint(config)):
        print(hint)
    if outcome.status == "failed":
        raise SystemExit(f"cell failed: {outcome.error}")
    return {"cell_id": outcome.cell_id, "status": outcome.status, "path": outcome.path}


def redact_hydra_output() -> None:
    """Redact secrets in the config files Hydra saved for this run (`.hydra/*.yaml`)."""
    from hydra.core.hydra_config import HydraConfig

    from mmflow.secrets import redact_hydra_files

    if HydraConfig.initialized() and HydraConfig.get().runtime.output_dir:
        redact_hydra_files(Path(HydraConfig.get().runtime.output_dir))
