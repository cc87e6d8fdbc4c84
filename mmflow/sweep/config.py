"""A Hydra job's config as a cell spec (`mmflow.config.spec.CellSpec`): plain data, absolute paths, only
its analysis's keys."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from mmflow.config.spec import CellSpec


def cell_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved cell config as plain data (`cell_spec(cfg).config`)."""
    return cell_spec(cfg).config


def cell_spec(cfg: DictConfig) -> CellSpec:
    """The cell spec of a Hydra job's config, not yet validated (`CellSpec.check`): plain data, an
    absolute results folder (and for `data=table` absolute data paths and the file's digest).

    Its analysis's config (`conf/analysis/<name>.yaml`) brings only the keys that analysis reads, so
    nothing it ignores can change its cell id. Raises ValueError for the retired top-level `ray:` block.
    """
    if "ray" in cfg:
        raise ValueError(RAY_MOVED)
    return spec_from_container(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))


RAY_MOVED = (
    "the `ray:` settings moved to `hydra.launcher.ray` (e.g. hydra.launcher.ray.init.address=auto, "
    "hydra.launcher.ray.init.num_cpus=2); see docs/running.md"
)


def cell_from_container(container: dict[str, Any]) -> dict[str, Any]:
    """`cell_config` of a task config already resolved to plain data (the launcher's fast path)."""
    return spec_from_container(container).config


def spec_from_container(container: dict[str, Any]) -> CellSpec:
    """`cell_spec` of a task config already resolved to plain data; the spec is built (canonical
    config, data resolved, id) once here and not validated yet. Unknown keys are refused
    (`CellConfigError`, naming the closest real key)."""
    from hydra.utils import to_absolute_path

    from mmflow.config.known_keys import check_known_keys
    from mmflow.config.paths import expand_path
    from mmflow.config.spec import CellSpec
    from mmflow.storage.objectstore import is_uri, mirror_dir

    if "ray" in container:
        raise ValueError(RAY_MOVED)
    config = dict(container)
    config.pop("hydra", None)
    check_known_keys(config)  # `+n_sampels=3`: refused, naming n_samples
    if is_uri(config["results_dir"]):  # an object store: the driver writes a local mirror of it
        config["results_uri"] = str(config["results_dir"]).rstrip("/")
        config["results_dir"] = str(mirror_dir(config["results_uri"]))
    else:
        results = expand_path(config["results_dir"], "results_dir")  # `~/x`, `$HOME/x`; unset: refused
        config["results_dir"] = str(Path(to_absolute_path(results)).resolve())
    # canonical (the analysis's migrations), a table made absolute with its digest, the id: once
    return CellSpec.from_config(config, base=to_absolute_path("."), check=False)
