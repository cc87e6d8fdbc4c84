"""mmflow's Hydra entry point: `python launch.py [overrides]` computes one cell, `-m` a sweep."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mmflow.cli import run_from_hydra


@hydra.main(version_base="1.3", config_path="mmflow/conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    return run_from_hydra(cfg)


if __name__ == "__main__":
    main()
