"""mmflow's sweeper (`hydra/sweeper=mmflow`): Hydra's basic sweeper without composing every job twice.

Hydra's `BasicSweeper` composes every job of a batch once, in full, to check it before the launcher
sees it (`Sweeper.validate_batch_is_legal`). That doubles the planning time of a large grid, and one
value that does not compose (`model=tiny-lava`) stops the whole sweep before any cell runs. mmflow's
launcher composes each job itself (each distinct group selection once, `_compose.py`) and fails a job
that does not compose on its own, with its reason, while the other jobs run: so this sweeper leaves
the check to it. Grids, `hydra.sweeper.params` and batching are the basic sweeper's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore


@dataclass
class MmflowSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.mmflow_launcher._sweeper.MmflowSweeper"


class MmflowSweeper(BasicSweeper):
    """`BasicSweeper` whose batches are checked job by job by the mmflow launcher, not up front."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        return None  # the launcher composes every job and fails the ones that do not compose, alone


ConfigStore.instance().store(group="hydra/sweeper", name="mmflow", node=MmflowSweeperConf, provider="mmflow")
