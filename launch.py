"""mmflow's Hydra entry point, kept for the README: `python launch.py [overrides]` is `mmflow run`."""

from __future__ import annotations

from mmflow.cli import hydra_main

if __name__ == "__main__":
    hydra_main()
