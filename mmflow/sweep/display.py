"""Progress while a sweep runs: a live display on a terminal, log lines elsewhere, or nothing.

One line for the whole sweep (cells finished of the total, failed and cached counts, time left) and,
live, one row per worker (`model#n @node`, samples done in its batch, samples per second, cells).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mmflow.sweep")


def fmt_eta(eta: float | None) -> str:
    if eta is None:
        return "ETA -"
    minutes, seconds = divmod(int(eta), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}:{minutes:02d}:{seconds:02d}"


class Display:
    """Progress as log lines (for logs, CI and non-terminals); `RichDisplay` draws it live."""

    def __init__(self, counts: Callable[[], dict[str, int]], total: int, every_s: float) -> None:
        self.counts = counts
        self.total = total
        self.every_s = every_s
        self.last = 0.0

    def start(self) -> None:
        self.last = time.monotonic()

    def line(self, workers: list[dict[str, Any]], eta: float | None) -> str:
        c = self.counts()
        finished = c["done"] + c["cached"] + c["failed"]
        busy = ", ".join(
            f"{w['name']}@{w['node']} {w['rate']:.2f}/s" for w in workers if w["state"] == "busy"
        )
        return (
            f"cells {finished}/{self.total} (done {c['done']}, cached {c['cached']}, failed {c['failed']}) "
            f"| {fmt_eta(eta)} | actors: {busy or 'starting/idle'}"
        )

    def update(self, workers: list[dict[str, Any]], eta: float | None) -> None:
        if self.every_s > 0 and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            log.info(self.line(workers, eta))

    def stop(self) -> None:
        pass


class RichDisplay(Display):
    """A live display: overall cells done/total with failures and ETA, one row per worker."""

    def start(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            refresh_per_second=4,
        )
        self.overall = self.progress.add_task("cells", total=self.total, info="")
        self.rows: dict[str, Any] = {}
        self.progress.start()

    def update(self, workers: list[dict[str, Any]], eta: float | None) -> None:
        c = self.counts()
        info = f"[red]{c['failed']} failed[/] · {c['cached']} cached · {fmt_eta(eta)}"
        self.progress.update(self.overall, completed=c["done"] + c["cached"] + c["failed"], info=info)
        names = {w["name"] for w in workers}
        for name in [n for n in self.rows if n not in names]:
            self.progress.remove_task(self.rows.pop(name))
        for w in workers:
            if w["name"] not in self.rows:
                self.rows[w["name"]] = self.progress.add_task("", total=None, info="")
            info = f"{w['rate']:.2f} samples/s · {w['cells']} cells" if w["state"] == "busy" else w["state"]
            self.progress.update(
                self.rows[w["name"]],
                description=f"  {w['name']} @{w['node']}",
                completed=w["samples"],
                total=w["of"] or None,
                info=info,
            )

    def stop(self) -> None:
        self.progress.stop()


class NullDisplay(Display):
    def update(self, workers: list[dict[str, Any]], eta: float | None) -> None:
        pass


def make_display(kind: str, counts: Callable[[], dict[str, int]], total: int, every_s: float) -> Display:
    """`kind`: auto (rich on a terminal, log otherwise) | rich | log | none."""
    if kind == "auto":
        kind = "rich" if sys.stdout.isatty() else "log"
    classes = {"rich": RichDisplay, "log": Display, "none": NullDisplay}
    if kind not in classes:
        raise ValueError(f"hydra.launcher.progress must be auto, rich, log or none, got {kind!r}")
    return classes[kind](counts, total, every_s)


QUIET_LOGGERS = ("ray", "filelock", "urllib3", "httpx", "huggingface_hub", "transformers", "accelerate")


def own_log_lines(verbose: bool = False) -> None:
    """mmflow's log lines as `[mmflow] message` on stdout (not Hydra's `[time][HYDRA]` prefix), and
    library loggers and progress bars down to warnings unless `verbose` (hydra.verbose=true)."""
    logger = logging.getLogger("mmflow")
    logger.handlers = [h for h in logger.handlers if not getattr(h, "mmflow_own", False)]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[mmflow] %(message)s"))
    handler.mmflow_own = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if verbose:
        return
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.ERROR)  # e.g. its token-auth warning on every start


def restore_log_lines() -> None:
    """Undo `own_log_lines` on the mmflow logger (for in-process callers such as tests)."""
    logger = logging.getLogger("mmflow")
    logger.handlers = [h for h in logger.handlers if not getattr(h, "mmflow_own", False)]
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
