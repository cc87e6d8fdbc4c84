"""A Hydra job's config as a cell config: plain data, absolute paths, only its analysis's keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def cell_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved cell config as plain data, with an absolute results folder (and for `data=table`
    absolute data paths and the file's digest, `mmflow.data.resolve_data`).

    Its analysis's config (`conf/analysis/<name>.yaml`) brings only the keys that analysis reads, so
    nothing it ignores can change its cell id. Raises ValueError for the retired top-level `ray:` block.
    """
    if "ray" in cfg:
        raise ValueError(RAY_MOVED)
    return cell_from_container(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))


RAY_MOVED = (
    "the `ray:` settings moved to `hydra.launcher.ray` (e.g. hydra.launcher.ray.init.address=auto, "
    "hydra.launcher.ray.init.num_cpus=2); see docs/running.md"
)


def cell_from_container(container: dict[str, Any]) -> dict[str, Any]:
    """`cell_config` of a task config already resolved to plain data (the launcher's fast path)."""
    from hydra.utils import to_absolute_path

    from mmflow.analyses import canonical_config
    from mmflow.config.known_keys import check_known_keys
    from mmflow.config.paths import expand_path
    from mmflow.data import resolve_data
    from mmflow.storage.objectstore import is_uri, mirror_dir

    if "ray" in container:
        raise ValueError(RAY_MOVED)
    container = dict(container)
    container.pop("hydra", None)
    check_known_keys(container)  # `+n_sampels=3`: refused, naming n_samples
    config = canonical_config(container)
    if is_uri(config["results_dir"]):  # an object store: the driver writes a local mirror of it
        config["results_uri"] = str(config["results_dir"]).rstrip("/")
        config["results_dir"] = str(mirror_dir(config["results_uri"]))
    else:
        results = expand_path(config["results_dir"], "results_dir")  # `~/x`, `$HOME/x`; unset: refused
        config["results_dir"] = str(Path(to_absolute_path(results)).resolve())
    config["data"] = resolve_data(config["data"], to_absolute_path("."))  # a table: absolute, digest
    return config
