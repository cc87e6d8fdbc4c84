"""One cell's lifecycle while it is computed: its store and analysis, its `cell.json` record from start
to ending (running, done, failed, interrupted), its `samples.parquet` rows and its summary.

`mmflow.execution.runtime` drives the cells of a cell batch through the samples; everything that concerns one
cell alone lives here. A cell is computed by one process at a time (`mmflow.storage.locks.CellLock`).
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmflow.analyses import make_analysis
from mmflow.data.sample import ERRORED, Sample, Skip
from mmflow.models.registry import LoadedModel
from mmflow.storage.locks import CellLock, describe, this_process
from mmflow.storage.schema import SAMPLE_TYPES, arrow_schema
from mmflow.storage.store import CellStore

if TYPE_CHECKING:
    from mmflow.config.spec import CellSpec

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = [
    "order",
    "question_id",
    "task",
    "question",
    "image_path",
    "prompt",
    "answer",
    "answer_token_id",
    "predicted",
    "correct",
    "p_base",
    "groups",
    "status",
    "skip_reason",
    "skip_detail",
    "noise_floor_pct",
]


@dataclass
class CellOutcome:
    """What happened to one cell in this run (the launcher's per-cell summary)."""

    cell_id: str
    status: str  # done | failed | cached
    path: str
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


class Cell:
    """One cell while it runs: its store, its analysis, the samples it already has."""

    def __init__(self, spec: CellSpec | Mapping[str, Any], loaded: LoadedModel):
        """`spec`: the cell (a plain resolved config is made one, `CellSpec.from_config`, unvalidated)."""
        from mmflow.config.spec import CellSpec

        self.spec = spec = CellSpec.from_config(spec, check=False)
        self.config = spec.config  # plain: what the analysis reads
        self.store = CellStore.of(spec)
        self.done_ids: set[str] = set()
        self.error: str | None = None
        self.errored: dict[str, str] = {}  # question id -> its error ("TypeError: ..."), this run
        self.analysis = make_analysis(self.config, loaded)
        self.logger = None  # a cell logger (mmflow.wandb_logger) while the cell is computed here
        self.lock = CellLock(self.store.dir)

    def write(self, question_id: str, row: dict, result_rows: list[dict]) -> None:
        """Record one sample in the store, then stream it to the cell's logger."""
        self.store.write_sample(question_id, row, result_rows)
        if self.logger is not None:
            self.logger.sample(row, result_rows)

    def skip(
        self, order: int, sample: Sample | Skip, reason: str, detail: str, error: bool = False, **fields: Any
    ) -> None:
        """Record `sample` as skipped for this cell (no result rows); `error=True`: as `errored`, an
        exception from code, config or environment, which keeps the cell from being done."""
        if error:
            fields["status"] = ERRORED
            self.errored[sample.question_id] = detail or reason
        self.write(
            sample.question_id,
            sample_row(order, sample, skip_reason=reason, skip_detail=detail, **fields),
            [],
        )


def sample_row(order: int, sample: Sample | Skip, **fields: Any) -> dict:
    """The `samples.parquet` row of one sample (`SAMPLE_COLUMNS`), skipped unless `fields` say otherwise."""
    row = {column: None for column in SAMPLE_COLUMNS}
    row.update(order=order, question_id=sample.question_id, status="skipped", correct=False)
    if isinstance(sample, Sample):
        row.update(
            task=sample.task,
            question=sample.question,
            image_path=str(sample.image_path),
            answer=sample.answer,
        )
    row.update(fields)
    return row


def start(cell: Cell, loaded: LoadedModel, context: dict) -> None:
    """Report a stale `running` record, find the resume point, record this run as running.

    Parts recorded from a data file with another digest than this cell's (`data.sha256`) are moved to
    `damaged/`, never resumed: one cell's rows all come from one file's contents.
    """
    meta = cell.store.read_meta()
    recorded = ((meta.get("config") or {}).get("data") or {}).get("sha256")
    current = (cell.config.get("data") or {}).get("sha256")
    if recorded and recorded != current and cell.store.parts.exists():
        why = f"recorded from data sha256 {recorded[:12]}…, this cell reads {str(current)[:12]}…"
        print(f"[mmflow] cell {cell.store.id}: parts {why}; computing every sample again", flush=True)
        cell.store.quarantine(sorted(cell.store.parts.glob("*.parquet")), why)
    cell.done_ids = cell.store.done_question_ids()
    if meta.get("status") == "running":  # we hold the lock, so its writer is gone
        last = (meta.get("runs") or [{}])[-1]
        print(
            f"[mmflow] cell {cell.store.id}: stale 'running' record left by {describe(last)}, which ended "
            f"without recording it (killed?); resuming from {len(cell.done_ids)} recorded sample(s)",
            flush=True,
        )
        for run in (meta.get("runs") or [])[-1:]:
            run.setdefault("ended", "unrecorded (process gone; stale 'running' record)")
    runs = [*(meta.get("runs") or []), {**this_process(), **context}]
    cell.store.write_meta(
        status="running",
        error=None,
        model_path=loaded.path,
        model_info=loaded.info,  # the real depth; replica and random weights marked (issue 23)
        window_used=getattr(cell.analysis, "width", None),  # checked against the loaded depth on bind
        remote_code=getattr(loaded, "remote_code", None),  # the checkpoint's Python that ran
        runs=runs,
        **context,
    )


def record_ending(cells: list[Cell], outcomes: dict, exc: BaseException, context: dict) -> None:
    """Record an interruption (Ctrl-C, SIGTERM) or an unexpected error in every unfinished cell."""
    interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
    status = "interrupted" if interrupted else "failed"
    error = f"{type(exc).__name__}: {exc}".strip()
    if not interrupted:
        error += "\n" + traceback.format_exc(limit=5)
    for cell in (c for c in cells if c.store.id not in outcomes):
        try:
            end_run(cell, status)
            cell.store.write_meta(status=status, error=error, **context)
        except Exception as write_exc:  # noqa: BLE001 - the original exception matters more
            log.warning("could not record %s for cell %s: %s", status, cell.store.id, write_exc)


def end_run(cell: Cell, status: str) -> None:
    """Mark this process's entry in the cell's `runs` list as ended with `status`."""
    meta = cell.store.read_meta()
    runs = meta.get("runs") or [{}]
    runs[-1]["ended"] = status
    cell.store.write_meta(runs=runs)


def finish(
    cell: Cell,
    elapsed: float,
    clean_passes: Counter,
    context: dict,
    engine_name: str,
    expected: set[str],
    dtype: str | None = None,
) -> CellOutcome:
    """Write the cell's parquet files and its final `cell.json` (done or failed); close its logger's run.

    `elapsed`: seconds the cell batch took; `expected`: the question ids the cell must have; `dtype`:
    the model's dtype (recorded with the noise floor).
    """
    store = cell.store
    if cell.error is None and cell.errored:
        cell.error = errored_error(cell.errored, len(expected))
    if cell.error is not None:
        end_run(cell, "failed")
        store.write_meta(status="failed", error=cell.error, **context)
        return CellOutcome(store.id, "failed", str(store.dir), error=cell.error)
    try:
        schemas = arrow_schema(SAMPLE_COLUMNS, SAMPLE_TYPES), cell.analysis.result_schema
        samples, results = store.finish(*schemas, cell.analysis.sort_by)
        missing = expected - set(samples["question_id"].astype(str))
        if missing:  # never mark done what lacks samples
            raise RuntimeError(f"{len(missing)} of {len(expected)} samples missing: {sorted(missing)[:5]}")
        summary = summarise(samples, results, cell.analysis)
        noise = noise_floor(samples, engine_name, dtype)
        summary.update(engine=engine_name, noise_floor=noise)  # for W&B; cell.json has them below
        announce(cell, engine_name, noise, context)
        end_run(cell, "done")
        store.write_meta(
            status="done",
            error=None,
            rows={"samples.parquet": len(samples), "results.parquet": len(results)},
            counts=summary["counts"],
            headline=summary["headline"],
            timings={"batch_seconds": round(elapsed, 3)},
            engine=engine_name,
            noise_floor=noise,
            **(cell.analysis.record() if hasattr(cell.analysis, "record") else {}),
            clean_passes_per_sample=max(clean_passes.values(), default=0),
            **context,
        )
        if cell.logger is not None:
            cell.logger.finish(samples, results, summary)
        store.clear_parts()
        return CellOutcome(store.id, "done", str(store.dir), summary=summary["headline"])
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        end_run(cell, "failed")
        store.write_meta(status="failed", error=error, **context)
        return CellOutcome(store.id, "failed", str(store.dir), error=error)


def errored_error(errored: dict[str, str], total: int) -> str:
    """The error of a cell whose samples were stopped by exceptions (not skipped for their content):
    the exception itself when every sample failed the same way, else how many failed with what."""
    kinds = Counter(errored.values())
    if len(errored) == total and len(kinds) == 1:
        return f"every sample ({total}) failed with {next(iter(kinds))}"
    listed = "; ".join(f"{error} (x{n})" for error, n in kinds.most_common(3))
    more = f"; and {len(kinds) - 3} other errors" if len(kinds) > 3 else ""
    return (
        f"{len(errored)} of {total} samples failed with an error ({listed}{more}); the cell is not done, "
        "and the next run computes them again (the other samples are kept)"
    )


def noise_floor(samples, engine_name: str, dtype: str | None) -> dict[str, Any]:
    """The cell's numerical noise floor (`mmflow.knockout.noise`): the mean and max over its scored
    samples of each one's `noise_floor_pct`, in % of p(answer); None when no sample measured one."""
    if "noise_floor_pct" not in samples:  # parts recorded before the floor was measured
        samples = samples.assign(noise_floor_pct=None)
    values = samples.loc[samples["status"] == "scored", "noise_floor_pct"].dropna().astype(float)
    return {
        "rel_change_pct": float(values.mean()) if len(values) else None,
        "max_rel_change_pct": float(values.max()) if len(values) else None,
        "n": int(len(values)),
        "dtype": dtype,
        "engine": engine_name,
        "method": "per sample: max |p/p_clean - 1| of the clean forward with one rounding of the dtype "
        "per layer output, and of the fast engine's empty knockout (probe); mean over samples",
    }


def announce(cell: Cell, engine_name: str, noise: dict[str, Any], context: dict[str, Any]) -> None:
    """Print the cell's terminal line (`noise_line`) where it ran, unless that is a Ray actor: Ray may
    drop an actor's last lines when the sweep ends, so the driver prints those from `cell.json`."""
    if context.get("actor_id"):
        return
    wanted = str((cell.config.get("engine") or {}).get("name", ""))
    print(noise_line(cell.store.id, wanted, engine_name, noise), file=sys.stderr, flush=True)


def noise_line(cell_id: str, wanted: str, engine_name: str, noise: dict[str, Any]) -> str:
    """The cell's terminal line: which engine ran (and why, when it is not the configured one `wanted`)
    and its noise floor, so that no fallback is silent. On stderr: stdout stays the tools' own."""
    floor = noise.get("rel_change_pct")
    text = f"±{floor:.2g}% of p(answer)" if floor is not None else "not measured (no scored sample)"
    fallback = "" if engine_name == wanted else f" (configured: {wanted})"
    where = f"{engine_name}{fallback}, {noise.get('dtype')} (cell {cell_id})"
    return f"[mmflow] engine {where}: numerical noise floor {text}"


def summarise(samples, results, analysis) -> dict:
    """Counts (samples, correct, scored, skipped by reason) and the analysis's headline numbers."""
    skipped = samples[samples["status"] == "skipped"]["skip_reason"].value_counts().to_dict()
    counts = {
        "samples": int(len(samples)),
        "correct": int(samples["correct"].fillna(False).astype(bool).sum()),
        "scored": int((samples["status"] == "scored").sum()),
        "incorrect": int((samples["status"] == "incorrect").sum()),
        "skipped": {str(k): int(v) for k, v in skipped.items()},
    }
    return {"counts": counts, "headline": {"scored": counts["scored"], **analysis.headline(results)}}
