"""The `mmflow` command and the Hydra entry point (`python launch.py` is the same program).

mmflow run [overrides]           one cell (a sweep of one cell, computed in this process)
mmflow run -m [overrides]        a sweep: every combination of comma-separated values
mmflow run -cn smoke             a named sweep (sweeps/*.yaml; -cd DIR adds a folder of your own)
mmflow report DIR [--out OUT]    the HTML report of every done cell below DIR
mmflow bench [--geometry ...]    the fast-engine benchmark (mmflow.bench)
mmflow toy train|eval [...]      train or evaluate the toy-llava model (mmflow.models.toy_training)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mmflow.locks import register_resolvers
from mmflow.paths import CONF_DIR

register_resolvers()  # `${mmflow.unique_dir:...}` of conf/config.yaml, before Hydra resolves it

CONFIG_PATH = str(CONF_DIR)  # conf/ of the checkout, or mmflow/conf/ of an installed wheel
RETIRED_EXPERIMENT = re.compile(r"^[+~]{0,2}experiment=(.*)$")


def cell_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved cell config as plain data, with an absolute results folder (and for `data=table`
    absolute data paths and the file's digest, `mmflow.data.resolve_data`).

    Its analysis's config (`conf/analysis/<name>.yaml`) brings only the keys that analysis reads, so
    nothing it ignores can change its cell id. Raises ValueError for the retired top-level `ray:` block and
    `CellConfigError` for a key no config of the cell defines (`mmflow.known_keys`).
    """
    from hydra.utils import to_absolute_path

    from mmflow.analyses import canonical_config
    from mmflow.data import resolve_data
    from mmflow.known_keys import check_known_keys

    if "ray" in cfg:
        raise ValueError(
            "the `ray:` settings moved to `hydra.launcher.ray` (e.g. hydra.launcher.ray.init.address=auto, "
            "hydra.launcher.ray.init.num_cpus=2); see docs/running.md"
        )
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    config.pop("hydra", None)
    check_known_keys(config)  # `+n_sampels=3`: refused, naming n_samples
    config = canonical_config(config)
    config["results_dir"] = str(Path(to_absolute_path(config["results_dir"])).resolve())
    config["data"] = resolve_data(config["data"], to_absolute_path("."))  # a table: absolute, digest
    return config


def run_from_hydra(cfg: DictConfig) -> dict[str, Any]:
    """A single run: one cell through the sweep core, in this process (`sweep.json`, summary, curve)."""
    from hydra.core.hydra_config import HydraConfig

    from mmflow.sweep.core import CellJob, Sweep
    from mmflow.sweep.curve import print_cell_curve, print_unscored
    from mmflow.sweep.settings import SweepSettings
    from mmflow.wandb_logger import sync_hint

    redact_hydra_output()
    hydra_cfg = HydraConfig.get()
    launcher = OmegaConf.to_container(hydra_cfg.launcher, resolve=True) if "launcher" in hydra_cfg else {}
    settings = SweepSettings.from_dict({**launcher, "executor": "local"})
    overrides = list(hydra_cfg.overrides.task)
    job = CellJob.resolve(0, overrides, lambda: cell_config(cfg))
    if job.cell is None:
        from mmflow.known_keys import refuse_unknown_keys

        refuse_unknown_keys([job])  # one line, exit 2, as for a sweep
        raise SystemExit(f"invalid cell config: {job.error}")
    name = str(cfg.get("sweep_name") or "single")
    sweep = Sweep(name, hydra_cfg.runtime.output_dir, [job], settings, single=True)
    sweep.run()
    status = sweep.status[job.cell_id]
    path = Path(job.cell["results_dir"]) / job.cell_id
    print(f"[mmflow] cell {job.cell_id}: {status} -> {path}")
    if status in ("done", "cached"):
        print_unscored(path)
        try:
            print_cell_curve(path, sweep.sweep_dir / "figures")
        except Exception as exc:  # a view of results already on disk: never fails the run
            print(f"[mmflow] no curve table for {path}: {type(exc).__name__}: {exc}")
    if status == "done" and (hint := sync_hint(job.cell)):
        print(hint)
    if status == "failed":
        raise SystemExit(f"cell failed: {sweep.errors.get(job.cell_id)}")
    return {"cell_id": job.cell_id, "status": status, "path": str(path)}


def redact_hydra_output() -> None:
    """Redact secrets in the config files Hydra saved for this run (`.hydra/*.yaml`)."""
    from hydra.core.hydra_config import HydraConfig

    from mmflow.secrets import redact_hydra_files

    if HydraConfig.initialized() and HydraConfig.get().runtime.output_dir:
        redact_hydra_files(Path(HydraConfig.get().runtime.output_dir))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    return run_from_hydra(cfg)


def run_hydra() -> int:
    """`hydra_main` as a command: Ctrl-C / SIGTERM end with one line and 130 / 143, a config it
    cannot start with (`ConfigError`) with one line and 2; no traceback."""
    import signal

    from mmflow.locks import ConfigError

    if retired := retired_spelling(sys.argv[1:]):
        print(f"[mmflow] error: {retired}", file=sys.stderr)
        return 2
    try:
        hydra_main()
    except ConfigError as exc:
        print(f"[mmflow] error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if not getattr(exc, "mmflow_reported", False):
            print("[mmflow] interrupted", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    return 0


def retired_spelling(args: Sequence[str]) -> str | None:
    """One line for the retired `experiment=NAME` override: named sweeps are `-cn NAME` now."""
    for arg in args:
        if found := RETIRED_EXPERIMENT.match(arg):
            name = found.group(1) or "NAME"
            return f"`experiment={name}` is now `mmflow run -cn {name}` (named sweeps live in sweeps/)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The `mmflow` console script (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command == "run":
        sys.argv = ["mmflow run", *rest]
        return run_hydra()
    if command == "report":
        from mmflow.report.__main__ import main as report_main

        return report_main(rest)
    if command == "bench":
        from mmflow.bench import main as bench_main

        bench_main(rest)
        return 0
    if command == "toy":
        from mmflow.models.toy_training.train import main as toy_main

        toy_main(rest)
        return 0
    print(__doc__.strip())
    return 0 if command in ("-h", "--help", "help") else 2


if __name__ == "__main__":
    raise SystemExit(main())
