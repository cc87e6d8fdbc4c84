"""The `mmflow` command and the Hydra entry point (`python launch.py` is the same program).

mmflow run [overrides]           one cell (a sweep of one cell, computed in this process)
mmflow run -m [overrides]        a sweep: every combination of comma-separated values
mmflow run -cn smoke             a named sweep (sweeps/*.yaml; -cd DIR adds a folder of your own)
mmflow plan [overrides]          the sweep's plan (cells new/cached/partial/failed, batches, actors,
                                 samples, clean passes, GPU-hours); runs nothing (= mmflow run --plan)
mmflow prefetch [overrides]      put every model of the sweep on every node (hub ids: HF cache; local
                                 folders: checked); runs nothing else
mmflow run -m --no-preflight     skip the checks of each model and data source before a sweep starts
mmflow report DIR [--out OUT]    the HTML report of every done cell below DIR
mmflow wandb publish SWEEP_DIR   create/update the sweep's W&B workspace and report (after `wandb sync`)
mmflow bench [--geometry ...]    the fast-engine benchmark (mmflow.bench.engine)
mmflow bench --driver --cells N  the sweep driver's benchmark on a synthetic grid (mmflow.bench.driver)
mmflow toy train|eval [...]      train or evaluate the toy-llava model (mmflow.models.synthetic.toy_training)
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError

from mmflow.config.dirs import CONF_DIR
from mmflow.storage.locks import register_resolvers
from mmflow.sweep.config import cell_config, cell_from_container, cell_spec

register_resolvers()  # `${mmflow.unique_dir:...}` of conf/config.yaml, before Hydra resolves it

CONFIG_PATH = str(CONF_DIR)  # conf/ of the checkout, or mmflow/conf/ of an installed wheel
COMMANDS = ("run", "plan", "prefetch", "report", "wandb", "bench", "toy")
RETIRED_EXPERIMENT = re.compile(r"^[+~]{0,2}experiment=(.*)$")

__all__ = ["cell_config", "cell_from_container", "cell_spec", "main", "run_hydra"]


def run_from_hydra(cfg: DictConfig) -> dict[str, Any]:
    """A single run: one cell through the sweep core, in this process (`sweep.json`, summary, curve)."""
    from hydra.core.hydra_config import HydraConfig

    from mmflow.storage.secrets import redact_argv
    from mmflow.sweep.core import CellJob, Sweep, SweepFailed
    from mmflow.sweep.curve import nothing_scored, print_cell_curve, print_unscored, read_meta, status_line
    from mmflow.sweep.display import own_log_lines
    from mmflow.sweep.settings import SweepSettings
    from mmflow.wandb_logger import sync_hint

    redact_hydra_output()
    redact_argv()  # Hydra has parsed it; W&B and Ray record the command line
    hydra_cfg = HydraConfig.get()
    own_log_lines(verbose=bool(hydra_cfg.verbose))
    launcher = OmegaConf.to_container(hydra_cfg.launcher, resolve=True) if "launcher" in hydra_cfg else {}
    settings = SweepSettings.from_dict({**launcher, "executor": "local"})
    overrides = list(hydra_cfg.overrides.task)
    job = CellJob.resolve(0, overrides, lambda: cell_spec(cfg))
    if job.cell is None:
        from mmflow.config.known_keys import refuse_unknown_keys

        refuse_unknown_keys([job])  # one line, exit 2, as for a sweep
        raise SystemExit(f"invalid cell config: {job.error}")
    name = str(cfg.get("sweep_name") or "single")
    sweep = Sweep(name, hydra_cfg.runtime.output_dir, [job], settings, single=True)
    sweep.run()
    status = sweep.status[job.cell_id]
    path = Path(job.cell["results_dir"]) / job.cell_id
    if status == "failed":  # its one line is printed; exit 1 with nothing after it
        raise SweepFailed(sweep)
    print(status_line(job.cell_id, status, path))  # with why, when no sample was scored
    if status in ("done", "cached"):
        if not nothing_scored(read_meta(path)):
            print_unscored(path)
        try:
            print_cell_curve(path, sweep.sweep_dir / "figures")
        except Exception as exc:  # a view of results already on disk: never fails the run
            print(f"[mmflow] no curve table for {path}: {type(exc).__name__}: {exc}")
    if status == "done" and (hint := sync_hint(job.cell)):
        print(hint)
    return {"cell_id": job.cell_id, "status": status, "path": str(path)}


def redact_hydra_output() -> None:
    """Redact secrets in the config files Hydra saved for this run (`.hydra/*.yaml`)."""
    from hydra.core.hydra_config import HydraConfig

    from mmflow.storage.secrets import redact_hydra_files

    if HydraConfig.initialized() and HydraConfig.get().runtime.output_dir:
        redact_hydra_files(Path(HydraConfig.get().runtime.output_dir))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    return run_from_hydra(cfg)


def interpolation_hint(exc: Exception) -> str:
    """One line for `${NAME}` that names no config key; the environment-variable spelling when it is one."""
    import os
    import re

    where = getattr(exc, "full_key", None) or "config"
    match = re.search(r"Interpolation key '([^']+)' not found", str(exc))
    name = match.group(1) if match else "?"
    line = f"{where}: ${{{name}}} names no config key"
    if re.fullmatch(r"[A-Za-z_]\w*", name) and (name in os.environ or name.isupper()):
        line += f"; for the environment variable write ${name} or ${{oc.env:{name}}}"
    return line


def refuse_env_interpolation(override: str) -> None:
    """ConfigError for `key=${NAME}/...` with an all-caps NAME: Hydra would look for a config key NAME
    (mmflow's keys are lower case) and fail with a traceback; the shell's `$NAME` was meant."""
    import re

    from mmflow.errors import ConfigError

    key, sep, value = override.partition("=")
    match = re.search(r"\$\{([A-Z_][A-Z0-9_]*)\}", value) if sep else None
    if match:
        name = match.group(1)
        raise ConfigError(
            f"{key.lstrip('+~')}: ${{{name}}} is Hydra's interpolation of a config key, and there is no "
            f"key {name}; for the environment variable write ${name} or ${{oc.env:{name}}}"
        )


def run_hydra() -> int:
    """`hydra_main` as a command: Ctrl-C / SIGTERM end with one line and 130 / 143, a config it
    cannot start with (`ConfigError`) with one line and 2; no traceback."""
    import signal

    from mmflow.config.overrides import check_overrides, partly_bad
    from mmflow.errors import ConfigError
    from mmflow.sweep.core import SweepFailed

    program = sys.argv[0] if sys.argv[0].startswith("mmflow ") else "mmflow run"  # else launch.py
    args = sys.argv[1:]
    if refused := retired_spelling(args, program) or check_overrides(args) or launcher_key_error(args):
        print(f"[mmflow] error: {refused}", file=sys.stderr)
        return 2
    for warning in partly_bad(args):
        print(f"[mmflow] warning: {warning}", file=sys.stderr)
    try:
        for override in sys.argv[1:]:
            refuse_env_interpolation(override)
        hydra_main()
    except ConfigError as exc:
        print(f"[mmflow] error: {exc.message}", file=sys.stderr)
        return 2
    except InterpolationKeyError as exc:  # e.g. results_dir='${HOME}/x': Hydra's syntax, not the shell's
        print(f"[mmflow] error: {interpolation_hint(exc)}", file=sys.stderr)
        return 2
    except SweepFailed:  # its grouped failure summary was the last thing printed
        return 1
    except KeyboardInterrupt as exc:
        if not getattr(exc, "mmflow_reported", False):
            print("[mmflow] interrupted", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    return 0


def run_arguments(command: str, args: list[str]) -> list[str]:
    """Hydra's arguments for `mmflow run|plan`: `--plan` (and `plan`) plans a multirun without
    running it, `--no-preflight` skips the preflight checks."""
    plan = command == "plan" or "--plan" in args
    out = [a for a in args if a not in ("--plan", "--no-preflight")]
    if "--no-preflight" in args:
        out.append("hydra.launcher.preflight=false")
    if command == "prefetch":
        if not any(a in ("-m", "--multirun") for a in out):
            out.insert(0, "-m")
        out.append("hydra.launcher.prefetch=true")
    elif plan:
        if not any(a in ("-m", "--multirun") for a in out):
            out.insert(0, "-m")
        out.append("hydra.launcher.plan=true")
    return out


def launcher_keys() -> dict[str, Any]:
    """The keys `hydra.launcher.*` may set without `+`: the launcher's settings (`SweepSettings`),
    `ray.*` (`RaySettings`) and `ray.init.*` (`RAY_INIT_KEYS`); `models` and `clean_pass_s` are open."""
    import dataclasses

    from mmflow.sweep.settings import RAY_INIT_KEYS, RaySettings, SweepSettings

    tree: dict[str, Any] = {f.name: None for f in dataclasses.fields(SweepSettings)}
    tree["ray"] = {f.name: None for f in dataclasses.fields(RaySettings)}
    tree["ray"]["init"] = dict.fromkeys(RAY_INIT_KEYS)
    return tree


def launcher_key_error(args: Sequence[str]) -> str | None:
    """One line for a `hydra.launcher.<key>=…` override naming no launcher setting (Hydra's own answer
    is six lines about structs), with the closest real key (`mmflow.config.overrides.key_error`)."""
    from mmflow.config.overrides import key_error

    tree = None
    for arg in args:
        key, given, _ = arg.partition("=")
        if not given or not key.startswith("hydra.launcher."):
            continue
        tree = tree or {"hydra": {"launcher": launcher_keys()}}
        if message := key_error(key, tree, "docs/running.md lists the launcher settings"):
            plus = (
                " (another ray.init argument goes in with +)"
                if key.startswith("hydra.launcher.ray.init.")
                else ""
            )
            return f"{arg}: {message}{plus}"
    return None


def retired_spelling(args: Sequence[str], program: str = "mmflow run") -> str | None:
    """One line for the retired `experiment=NAME` override: named sweeps are `-cn NAME` now
    (`program`: the command the user typed, e.g. `mmflow plan`)."""
    for arg in args:
        if found := RETIRED_EXPERIMENT.match(arg):
            name = found.group(1) or "NAME"
            return f"`experiment={name}` is now `{program} -cn {name}` (named sweeps live in sweeps/)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The `mmflow` console script (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command in ("run", "plan", "prefetch"):
        sys.argv = [f"mmflow {command}", *run_arguments(command, rest)]  # named in one-line errors
        return run_hydra()
    if command == "report":
        from mmflow.report.__main__ import main as report_main

        return report_main(rest)
    if command == "wandb":
        from mmflow.wandb_logger.publish import main as wandb_main

        return wandb_main(rest)
    if command == "bench" and "--driver" in rest:
        from mmflow.bench.driver import main as driver_main

        driver_main([a for a in rest if a != "--driver"])
        return 0
    if command == "bench":
        from mmflow.bench.engine import main as bench_main

        bench_main(rest)
        return 0
    if command == "toy":
        from mmflow.models.synthetic.toy_training.train import main as toy_main

        toy_main(rest)
        return 0
    if command in ("-h", "--help", "help", ""):
        print(__doc__.strip())
        return 0 if command else 2
    close = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.5)
    hint = f"did you mean `mmflow {close[0]}`?" if close else f"commands: {', '.join(COMMANDS)}"
    print(f"[mmflow] error: unknown command {command!r}; {hint} (see `mmflow --help`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
