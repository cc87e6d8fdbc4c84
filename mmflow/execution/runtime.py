"""Run a cell batch on one loaded model: the same code for `launch.py` and for Ray actors.

The cells of a cell batch (`mmflow.config.spec.CellSpec`s) share model, data, task, samples and
engine (`mmflow.config.identity.SHARED_KEYS`) and are computed sample by sample: each sample is
encoded and split into token groups, every cell plans it (`Analysis.plan`), it is run clean once,
then every cell's knockout jobs of that sample go to the engine in one batch, and each cell turns its
slice into rows with the engine capabilities it declared (`mmflow.execution.engines`). Each cell
keeps its own folder, resumes at sample granularity, and fails alone. A cell is computed by one
process at a time (`mmflow.storage.locks.CellLock`); a cell another process holds is waited for,
then found cached. One cell's
record from start to ending (`cell.json`, its `runs` list) is `mmflow.execution.cell`'s.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from mmflow.config.spec import CellSpec
from mmflow.data.sample import Sample, Skip
from mmflow.errors import SampleSkip
from mmflow.execution.answer import answer_from_clean, generate_answer
from mmflow.execution.cell import Cell, CellOutcome, finish, record_ending, sample_row, start
from mmflow.execution.context import RunContext
from mmflow.execution.engines import Engines
from mmflow.execution.pipeline import Stages, prefetch
from mmflow.execution.prepare import prepare_or_skip, sample_error
from mmflow.inputs.encode import ModelInputs
from mmflow.inputs.groups import TokenGroups
from mmflow.models.registry import LoadedModel
from mmflow.storage.locks import CellLock, describe, lock_wait_s
from mmflow.storage.store import CellStore, batch_key


def load_samples(config: Mapping[str, Any] | CellSpec) -> list[Sample | Skip]:
    """The cell's samples from its data source (`mmflow.data.sources`), first `n_samples` in order."""
    from mmflow.data.sources import load_data

    if isinstance(config, CellSpec):
        return load_data(config.data.settings, config.task, config.n_samples)
    return load_data(config["data"], config["task"], config["n_samples"])


__all__ = ["generate_answer", "normalise_answer", "run_cells"]  # generate_answer: the reference answer
PREFETCH_DEPTH = 2  # samples prepared ahead of the model (mmflow.execution.pipeline)
OOM = "out_of_memory"  # a sample the accelerator had no memory for: an error (retried), not a skip


def normalise_answer(text: str) -> str:
    """Stripped, lower-cased, trailing full stop removed (docs/method.md, "Metric")."""
    return text.strip().lower().rstrip(".").strip()


def run_cells(
    loaded: LoadedModel,
    specs: Sequence[CellSpec | Mapping[str, Any]],
    on_sample: Callable[[int], None] | None = None,
    context: RunContext | None = None,
    progress: bool = False,
    logger_factory: Callable[[CellSpec, int], Any] | None = None,
    prefetch_depth: int = PREFETCH_DEPTH,
    stages: Stages | None = None,
) -> list[CellOutcome]:
    """Compute `specs` (which must share `SHARED_KEYS`) on `loaded`; return one outcome per cell.

    A plain config is made a spec here (`CellSpec.from_config`); a spec not yet validated is validated
    here, and an invalid cell fails alone. `logger_factory(spec, n_layers)` (e.g.
    `mmflow.wandb_logger.cell_logger`) opens a logger for each cell computed here (never for cached
    ones); it gets every sample, the final results, and is closed.
    `prefetch_depth`: samples read, encoded and split into token groups ahead in a background thread
    (0: none).
    `stages`: if given, gets the seconds spent per stage (`mmflow.execution.pipeline.Stages`).
    """
    context = (context or RunContext()).meta()  # the cell.json fields of this run
    outcomes: dict[str, CellOutcome] = {}
    ids, cells = _as_specs(specs, outcomes, context)
    if len({batch_key(c.plain) for c in cells}) > 1:
        raise ValueError("cells run together must share model, data, task, samples and engine")
    pipeline = (prefetch_depth, stages if stages is not None else Stages())
    args = (loaded, outcomes, on_sample, context, progress, logger_factory, pipeline)
    busy = _run_round(cells, 0.0, *args)
    if busy:  # computed by another process right now: wait for it, then they are cached
        wait = lock_wait_s()
        for spec in busy:
            store = CellStore.of(spec)
            owner = describe(CellLock(store.dir).owner())
            print(
                f"[mmflow] cell {store.id} is being computed by {owner}; waiting up to {wait:g} s", flush=True
            )
        for spec in _run_round(busy, wait, *args):
            store = CellStore.of(spec)
            owner = describe(CellLock(store.dir).owner())
            error = f"not computed here: {owner} still holds {store.dir / '.lock'} after {wait:g} s"
            outcomes[store.id] = CellOutcome(store.id, "failed", str(store.dir), error=error)
    return [outcomes[i] for i in ids]


def _as_specs(
    configs: Sequence[CellSpec | Mapping[str, Any]], outcomes: dict[str, CellOutcome], context: dict
) -> tuple[list[str], list[CellSpec]]:
    """(the cell id of each entry, the specs); a plain config that cannot be made a spec (an unknown
    analysis, a misspelt model key) fails alone here, its cell.json saying why."""
    ids, specs = [], []
    for config in configs:
        try:
            spec = CellSpec.from_config(config, check=False)
        except ValueError as exc:  # this cell only
            store = CellStore(config["results_dir"], config)
            error = f"{type(exc).__name__}: {exc}"
            store.write_meta(status="failed", error=error, **context)
            outcomes[store.id] = CellOutcome(store.id, "failed", str(store.dir), error=error)
            ids.append(store.id)
            continue
        ids.append(spec.id)
        specs.append(spec)
    return ids, specs


def _run_round(specs, wait_s, loaded, outcomes, on_sample, context, progress, logger_factory, pipeline):
    """Compute the cells of `specs` whose lock this process gets within `wait_s`; return the others
    (a list of specs)."""
    busy: list[CellSpec] = []
    cells: list[Cell] = []
    try:
        for spec in specs:
            store = CellStore.of(spec)
            try:
                spec.check()  # once: a spec built by the sweep was validated there
            except ValueError as exc:  # this cell only
                error = f"{type(exc).__name__}: {exc}"
                store.write_meta(status="failed", error=error, **context)
                outcomes[store.id] = CellOutcome(store.id, "failed", str(store.dir), error=error)
                continue
            try:
                cell = Cell(spec, loaded)  # its analysis checks its keys against the loaded model
            except ValueError as exc:  # e.g. a window deeper than the loaded model: this cell only
                error = f"{type(exc).__name__}: {exc}"
                store.write_meta(status="failed", error=error, model_info=loaded.info, **context)
                outcomes[store.id] = CellOutcome(store.id, "failed", str(store.dir), error=error)
                continue
            if not cell.lock.acquire(wait_s):
                busy.append(spec)
                continue
            if cell.store.is_done():
                cell.lock.release()
                outcomes[cell.store.id] = CellOutcome(cell.store.id, "cached", str(cell.store.dir))
                continue
            cells.append(cell)
            start(cell, loaded, context)
        if cells:
            for cell in cells:
                cell.logger = logger_factory(cell.spec, loaded.n_layers) if logger_factory else None
            _compute(loaded, cells, outcomes, on_sample, context, progress, pipeline)
    except BaseException as exc:
        record_ending(cells, outcomes, exc, context)
        raise
    finally:
        for cell in (c for c in cells if c.logger is not None):
            cell.logger.close()  # a no-op after a successful finish
        for cell in cells:
            cell.lock.release()
    return busy


def _compute(loaded, cells, outcomes, on_sample, context, progress, pipeline) -> None:
    """Run every sample of `cells` and finish each cell into `outcomes`.

    Samples every cell already has (a resumed cell) are neither prepared nor run.
    """
    depth, stages = pipeline
    started = time.time()
    first = cells[0].config
    engines = Engines.build(
        loaded, cells[0].spec.engine, frozenset().union(*(c.analysis.uses for c in cells))
    )
    engine = engines.engine
    clean_passes: Counter[str] = Counter()
    try:
        with stages.timed("load_samples"):
            samples = load_samples(cells[0].spec)
    except Exception as exc:  # a data source that cannot be read fails these cells, not the sweep
        for cell in cells:
            cell.error = f"{type(exc).__name__}: {exc}"
        samples = []
    expected = {s.question_id for s in samples}
    for cell in cells:  # analyses that need the whole sample list first (patching's pairs, noise scale)
        if cell.error is None:
            try:
                cell.analysis.prepare(samples)
            except Exception as exc:
                cell.error = f"{type(exc).__name__}: {exc}"
    bar = tqdm(
        total=len(samples),
        desc=f"{first['model']['name']}/{first['task']}",
        unit="sample",
        disable=not progress,
    )
    wanted = [(order, sample) for order, sample in enumerate(samples) if _todo(cells, sample)]
    if len(wanted) < len(samples):
        bar.update(len(samples) - len(wanted))
        if on_sample is not None:
            on_sample(len(samples) - len(wanted))
    limits = {
        "max_tokens": first["model"].get("max_tokens"),
        "new_tokens": int(first.get("max_new_tokens") or 0),
    }
    ahead = prefetch(wanted, lambda pair: prepare_sample(loaded, pair[1], stages, **limits), depth)
    try:  # closed before an interrupt's message, so that message is the last line
        for (order, sample), prepared in ahead:
            todo = _todo(cells, sample)
            _run_sample(loaded, engines, first, order, sample, prepared, todo, clean_passes, stages)
            bar.update(1)
            if on_sample is not None:
                on_sample(1)
    finally:
        bar.close()
    elapsed = time.time() - started
    for cell in cells:
        outcomes[cell.store.id] = finish(
            cell,
            elapsed,
            clean_passes,
            context,
            engine.name,
            expected,
            dtype=str(loaded.model.dtype).removeprefix("torch."),
        )


def _todo(cells: list[Cell], sample: Sample | Skip) -> list[Cell]:
    """The cells that still need `sample`."""
    return [c for c in cells if c.error is None and sample.question_id not in c.done_ids]


def prepare_sample(
    loaded: LoadedModel,
    sample: Sample | Skip,
    stages: Stages,
    max_tokens: int | None = None,
    new_tokens: int = 0,
) -> tuple[ModelInputs, TokenGroups] | Skip | None:
    """Read, preprocess and encode one sample and find its token groups (None for a sample the data
    already skipped).

    Runs in the prefetch thread; any failure of this one sample is its `Skip` (`mmflow.execution.prepare`).
    """
    if isinstance(sample, Skip):
        return None
    with stages.timed("prepare"):
        return prepare_or_skip(loaded, sample, max_tokens, new_tokens)


def _run_sample(loaded, engines, config, order, sample, prepared, cells, clean_passes, stages) -> None:
    """Plan the sample for every cell, run the clean pass once, then all cells' knockouts of this
    sample in one engine batch; each cell gets its slice, its plan and its engine capabilities.

    `prepared`: the future of `prepare_sample(sample)`.
    """
    if not cells:
        return None
    if isinstance(sample, Skip):
        return _skip_all(cells, order, sample, sample.reason, sample.detail, sample.error)
    try:
        with stages.timed("wait_for_prepare"):
            ready = prepared.result()
    except Exception as exc:  # the prefetch itself failed: this sample's error
        ready = sample_error(sample.question_id, exc)
    if isinstance(ready, Skip):
        return _skip_all(cells, order, sample, ready.reason, ready.detail, ready.error)
    inputs, groups = ready
    engine = engines.engine
    planned, skipped = [], []
    for cell in cells:
        try:
            plan = cell.analysis.plan(groups, sample)
            if plan.knockouts and "knockouts" not in cell.analysis.uses:
                raise ValueError(f"analysis {cell.analysis.name!r} plans knockouts but does not use them")
            planned.append((cell, plan))
        except SampleSkip as exc:
            skipped.append((cell, exc))
        except Exception as exc:  # a cell whose own settings cannot apply: that cell fails, not its batch
            cell.error = f"{type(exc).__name__}: {exc}"
    if not planned and not skipped:
        return None
    firsts = [plan.first_target for _, plan in planned if plan.first_target is not None]
    try:
        with stages.timed("clean_pass"):
            clean = engine.clean(inputs, first_target=min(firsts, default=None))
        clean_passes[sample.question_id] += 1
        with stages.timed("answer"):
            predicted = answer_from_clean(loaded, clean, int(config["max_new_tokens"]))
    except torch.cuda.OutOfMemoryError as exc:  # the environment, not the row: retried next run
        return _skip_all(cells, order, sample, OOM, str(exc).splitlines()[0], error=True)
    correct = normalise_answer(predicted) == normalise_answer(sample.answer)
    token_id = clean.top1
    base = dict(
        prompt=inputs.prompt.text,
        answer_token_id=token_id,
        predicted=predicted,
        correct=correct,
        p_base=float(clean.logprobs[token_id].exp()),
        groups=groups.to_json(),
    )
    for cell, exc in skipped:
        cell.skip(order, sample, exc.reason, exc.detail, **base)
    if config["require_correct"] and not correct:
        for cell, _ in planned:
            cell.write(sample.question_id, sample_row(order, sample, status="incorrect", **base), [])
        return
    try:
        with stages.timed("knockouts"):
            logprobs = engine.run(clean, [job for _, plan in planned for job in plan.knockouts])
        with stages.timed("noise_floor"):  # after the knockouts: the fast engine's probe counts too
            base["noise_floor_pct"] = engine.noise_floor_pct(clean, token_id)
    except torch.cuda.OutOfMemoryError as exc:
        return _skip_all([c for c, _ in planned], order, sample, OOM, str(exc).splitlines()[0], error=True)
    start = 0
    for cell, plan in planned:
        outputs = logprobs[start : start + len(plan.knockouts)]
        start += len(plan.knockouts)
        with stages.timed("rows_and_writes"):
            try:
                mine = engines.only(cell.analysis.uses)
                rows = cell.analysis.rows(sample, clean, token_id, plan, outputs, mine)
            except SampleSkip as exc:  # e.g. patching: a too weak corruption
                cell.skip(order, sample, exc.reason, exc.detail, **base)
                continue
            except torch.cuda.OutOfMemoryError as exc:
                cell.skip(order, sample, OOM, str(exc).splitlines()[0], error=True, **base)
                continue
            cell.write(sample.question_id, sample_row(order, sample, status="scored", **base), rows)


def _skip_all(
    cells: list[Cell], order: int, sample: Sample | Skip, reason: str, detail: str, error: bool = False
) -> None:
    for cell in cells:
        cell.skip(order, sample, reason, detail, error=error)
