"""Config of the mmflow launcher (`hydra/launcher=mmflow`): the sweep core's `SweepSettings`.

Every field is documented in `mmflow.sweep.settings`; Ray's own settings sit under
`hydra.launcher.ray` as in Hydra's Ray launcher (`ray.init.address`, `ray.init.num_cpus`, …).
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from mmflow.sweep.settings import SweepSettings


@dataclass
class MmflowLauncherConf(SweepSettings):
    _target_: str = "hydra_plugins.mmflow_launcher.MmflowLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="mmflow", node=MmflowLauncherConf, provider="mmflow"
)
