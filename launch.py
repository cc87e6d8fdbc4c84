"""mmflow's Hydra entry point, kept for the README: `python launch.py [overrides]` is `mmflow run`."""

from __future__ import annotations

from mmflow.cli import run_hydra

if __name__ == "__main__":
    raise SystemExit(run_hydra())
