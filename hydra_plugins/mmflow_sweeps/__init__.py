"""Hydra search-path plugin: mmflow's named sweeps (`sweeps/`) next to its config groups (`conf/`).

A named sweep is a primary config (`defaults: [config, _self_]` plus its grid), so
`mmflow run -cn smoke` finds `sweeps/smoke.yaml` from any folder; a folder of one's own sweeps
goes in front with Hydra's `--config-dir DIR` (`mmflow run -cd DIR -cn mine`). Only searches that
already hold mmflow's `conf/` are extended. Also registers `${mmflow.unique_dir:...}`, which
`conf/config.yaml` uses, before any config is composed. Stays light: Hydra imports it on every scan.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from mmflow.config.dirs import CONF_DIR, SWEEPS_DIR
from mmflow.storage.locks import register_resolvers

register_resolvers()


class MmflowSweepsSearchPath(SearchPathPlugin):
    """Appends `sweeps/` to a search path that holds mmflow's `conf/`."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        conf = CONF_DIR.resolve()
        paths = [e.path for e in search_path.get_path() if e.path]
        if any(_same(p, conf) for p in paths):
            search_path.append(provider="mmflow-sweeps", path=f"file://{SWEEPS_DIR}")


def _same(entry: str, conf: Path) -> bool:
    """Whether a search-path entry (`file://DIR` or a bare folder) is `conf`."""
    return (
        "://" not in entry.removeprefix("file://") and Path(entry.removeprefix("file://")).resolve() == conf
    )
