"""W&B settings: the logger config, the run mode, `wandb.init` of one run, `wandb sync` hints.

Config (`conf/logger/wandb.yaml`): `project`, `entity`, `mode` (auto | online | offline | disabled),
`dir` (default: `$WANDB_DIR` when set, else the results folder), `curve_every`. `mode: auto` is
online when `WANDB_API_KEY` is set and offline otherwise; `WANDB_MODE=offline` (or `disabled`) in
the environment always wins. The API key is read by wandb from the environment only: nothing here
reads, stores or prints it.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mmflow.config.paths import expand_path
from mmflow.storage.secrets import redacted_argv

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "name": "wandb",
    "project": "mmflow",
    "entity": None,
    "mode": "auto",
    "dir": None,
    "curve_every": 10,
}
MODES = ("auto", "online", "offline", "disabled")
# Metric namespaces and the x-axis each is charted against.
STEP_METRICS = {
    "progress/*": "samples_done",
    "running_curve/*": "samples_done",
    "curve/*": "layer",
    "depth/*": "rel_depth",
    "flow/*": "rel_depth",  # the facet keys the built workspace and report draw (wandb_logger.keys)
}


# ---------------------------------------------------------------- configuration


def logger_config(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The logger section merged with the defaults; None when W&B logging is off."""
    if raw is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    cfg = {**DEFAULTS, **{k: v for k, v in dict(raw).items() if v is not None}}
    if cfg["name"] != "wandb":
        return None
    if cfg["mode"] not in MODES:
        raise ValueError(f"logger.mode must be one of {MODES}, got {cfg['mode']!r}")
    return None if resolve_mode(cfg["mode"]) == "disabled" else cfg


def resolve_mode(mode: str = "auto", environ: Mapping[str, str] | None = None) -> str:
    """online | offline | disabled from the configured mode, `WANDB_MODE` and whether a key is set."""
    env = os.environ if environ is None else environ
    forced = env.get("WANDB_MODE", "").strip().lower()
    if mode == "disabled" or forced == "disabled":
        return "disabled"
    if mode == "offline" or forced in {"offline", "dryrun"}:
        return "offline"
    if env.get("WANDB_API_KEY"):
        return "online"
    if mode == "online":
        log.warning("logger.mode=online but WANDB_API_KEY is not set: writing W&B runs offline")
    return "offline"


def sweep_name(config: Mapping[str, Any]) -> str:
    """The W&B group: `sweep_name` if the config has one, else the results folder's name."""
    return str(config.get("sweep_name") or Path(config.get("results_dir", "results")).name)


def run_root(cfg: Mapping[str, Any], default: str | Path) -> Path:
    """The folder wandb writes into (`<it>/wandb/...`): `logger.dir`, else `$WANDB_DIR`, else `default`."""
    return Path(expand_path(cfg.get("dir") or os.environ.get("WANDB_DIR") or default, "logger.dir")).resolve()


SUPERSEDED = "wandb-superseded"


def supersede_offline_runs(root: Path, run_id: str) -> list[Path]:
    """Move earlier offline runs of `run_id` out of `<root>/wandb` into `<root>/wandb-superseded`.

    An interrupted cell resumes in a new offline run (W&B cannot append to an offline run), so the
    earlier, partial one is set aside: `wandb sync <root>/wandb` then uploads each cell once.
    """
    moved = []
    for old in sorted((root / "wandb").glob(f"offline-run-*-{run_id}")):
        target = root / SUPERSEDED / old.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(old, target)
        log.info("W&B: superseded offline run %s moved to %s", old, target)
        moved.append(target)
    return moved


def sync_command(root: str | Path) -> str:
    return f"wandb sync {Path(root) / 'wandb'}"


def sync_hint(config: Mapping[str, Any]) -> str | None:
    """The `wandb sync` line to print after a single run whose W&B runs were written offline."""
    cfg = logger_config(config.get("logger"))
    if cfg is None or resolve_mode(cfg["mode"]) != "offline":
        return None
    root = run_root(cfg, config["results_dir"])
    return f"[mmflow] W&B runs were written offline; upload them with: {sync_command(root)}"


def import_wandb() -> Any:
    """Import wandb with its console output turned down."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    import wandb

    return wandb


def _settings(wandb: Any) -> Any:
    return wandb.Settings(
        silent=True,
        quiet=True,
        show_info=False,
        console="off",
        x_disable_stats=True,
        disable_git=True,
        save_code=False,
        x_save_requirements=False,
        disable_job_creation=True,
    )


def init_run(cfg: Mapping[str, Any], root: Path, **kwargs: Any) -> Any:
    """`wandb.init` of a new, independent run (never reusing another) that resumes its id if it exists."""
    wandb = import_wandb()
    root.mkdir(parents=True, exist_ok=True)
    with redacted_argv():  # wandb saves sys.argv in the run's files: `+logger.api_key=…` stays out
        run = wandb.init(
            project=cfg["project"],
            entity=cfg.get("entity"),
            dir=str(root),
            mode=resolve_mode(cfg["mode"]),
            resume="allow",
            reinit="create_new",
            settings=_settings(wandb),
            **kwargs,
        )
    for step in sorted(set(STEP_METRICS.values())):
        run.define_metric(step, hidden=True, summary="none")
    for pattern, step in STEP_METRICS.items():
        # Curves are per layer: their "last value" would be the last layer's, so no summary for them.
        run.define_metric(pattern, step_metric=step, summary=None if pattern == "progress/*" else "none")
    return run


def image(wandb: Any, figure: Any, caption: str) -> Any:
    from PIL import Image

    from mmflow.report.figures import png_bytes

    return wandb.Image(Image.open(io.BytesIO(png_bytes(figure))), caption=caption)


def print_sync_hints(cfg: Mapping[str, Any], roots: Iterable[Path]) -> None:
    """Print the `wandb sync` line of every folder in `roots` that holds offline runs."""
    if resolve_mode(cfg["mode"]) != "offline":
        return
    for root in sorted({r for r in roots if (r / "wandb").exists()}):
        print(f"[mmflow] W&B runs were written offline; upload them with: {sync_command(root)}")
