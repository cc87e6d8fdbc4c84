"""The plan of a sweep before launch (`mmflow plan`, `mmflow run --plan`, `hydra.launcher.plan=true`).

Without loading a model or starting Ray: the cells (new, cached, partial, failed before), the cell
batches and actors per model, the samples, the compute in clean-pass units from the exact cost model
(`mmflow.knockout.cost`, per model geometry) and the estimated GPU-hours from each model's clean-pass
time. Geometries and clean-pass times not known here are estimates, and the plan says so.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmflow.storage.store import CellStore
from mmflow.sweep.plan import plan_models

if TYPE_CHECKING:
    from mmflow.sweep.core import Sweep

# Decoder geometry (layers, hidden, heads, kv_heads, head_dim, intermediate) and a typical sequence
# length of one GQA sample (image tokens + prompt), from the checkpoints' config.json files.
GEOMETRY: dict[str, tuple[tuple[int, int, int, int, int, int], int]] = {
    "llava-1.5-7b": ((32, 4096, 32, 32, 128, 11008), 620),
    "llava-1.5-13b": ((40, 5120, 40, 40, 128, 13824), 620),
    "llava-1.6-vicuna-7b": ((32, 4096, 32, 32, 128, 11008), 2200),
    "llava-1.6-mistral-7b": ((32, 4096, 32, 8, 128, 14336), 2200),
    "llama3-llava-next-8b": ((32, 4096, 32, 8, 128, 14336), 2200),
    "llava-1.6-34b": ((60, 7168, 56, 8, 128, 20480), 2200),
}
DEFAULT_GEOMETRY = GEOMETRY["llava-1.5-7b"]  # any other model: this shape at its own n_layers
QUESTION_TOKENS = 20  # question + answer prompt: the first target of a knockout into the question
EFFECTIVE_FLOPS = 100e12  # default clean-pass time: 2 x MACs at this rate (~1/3 of an H100's fp16 peak)
INVALID_SHOWN = 10  # invalid jobs listed one line each; plan.json lists them all


def plural(n: int, one: str, many: str | None = None) -> str:
    """ "1 batch", "2 batches", "1,024 samples"."""
    return f"{n:,d} {one if n == 1 else (many or one + 's')}"


def sig(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant digits (small GPU-hours of toy models stay non-zero)."""
    return float(f"{value:.{digits}g}")


def cell_state(cell: dict[str, Any], store: CellStore | None = None) -> tuple[str, int]:
    """(new | cached | partial | failed, samples already done) of a cell, from its folder alone
    (`store`: the cell's folder when the caller has it)."""
    store = store or CellStore(cell["results_dir"], cell)
    meta = store.read_meta()
    if meta.get("status") == "done" and store.check_files(meta) is None:
        return "cached", int(cell.get("n_samples", 0))
    done = len(list(store.parts.glob("samples-*.parquet"))) if store.parts.is_dir() else 0
    if done:
        return "partial", done
    return ("failed" if meta.get("status") == "failed" else "new"), 0


def shape_of(model: dict[str, Any]) -> tuple[Any, int, bool]:
    """(DecoderShape, sequence length, known) of a model config."""
    from mmflow.knockout.cost import DecoderShape

    (layers, *rest), length = GEOMETRY.get(str(model.get("name")), DEFAULT_GEOMETRY)
    known = str(model.get("name")) in GEOMETRY
    return DecoderShape(int(model.get("n_layers") or layers), *rest), length, known


def cell_units(cell: Mapping[str, Any], shape: Any, length: int) -> float:
    """A cell's knockouts on one sample, in clean passes (`cost.job_macs` over `cost.clean_macs`)."""
    from mmflow.knockout.cost import clean_macs, job_macs

    knockout = cell.get("knockout") or {}
    target = str(knockout.get("target", knockout.get("name", "last")))
    first_target = length - 1 if "last" in target else length - QUESTION_TOKENS
    window = int(cell.get("window") or 1)
    layers = shape.layers
    needed = sum(job_macs(shape, length, first_target, max(0, c - window // 2)) for c in range(layers))
    return needed / clean_macs(shape, length)


def invalid_jobs(sweep: Sweep) -> list[dict[str, Any]]:
    """The jobs `mmflow run` would not compute, as run judges them: a config that does not resolve
    (`job.error`) or a cell its spec check refuses (`job.invalid`, `CellSpec.check`); each with its
    job number, redacted overrides and one-line error."""
    from mmflow.storage.secrets import redact

    return [
        {
            "job": job.idx,
            "overrides": list(redact(job.overrides)),
            "error": str(job.error or job.invalid).strip().splitlines()[0],
        }
        for job in sweep.jobs
        if job.error or job.invalid
    ]


def build_plan(sweep: Sweep, clean_pass_s: dict[str, float] | None = None) -> dict[str, Any]:
    """The plan as plain data (what `print_plan` prints). Cells their spec check refuses are not
    planned: their jobs are listed under `invalid` (run fails them without computing)."""
    from mmflow.knockout.cost import clean_macs
    from mmflow.storage.objectstore import pull_cells

    settings = sweep.settings
    refused = {job.cell_id for job in sweep.jobs if job.invalid and job.cell is not None}
    cells = {cid: cell for cid, cell in sweep.cells.items() if cid not in refused}
    pull_cells(cells)  # a results_dir URI: the plan reads what the store holds
    states = {cid: cell_state(cell, sweep.store(cid)) for cid, cell in cells.items()}
    counts = Counter(state for state, _ in states.values())
    todo = {cid: cell for cid, cell in cells.items() if states[cid][0] != "cached"}
    models = []
    for plan in plan_models({cid: sweep.specs.get(cid, cell) for cid, cell in todo.items()}, settings):
        shape, length, known = shape_of(plan.model)
        samples = units = 0.0
        for batch in plan.queue:
            left = max(batch.n_samples - min(states[c][1] for c in batch.cell_ids), 0)
            samples += left
            units += left * (1 + sum(cell_units(spec.plain, shape, length) for spec in batch.specs))
        per_model = {**(clean_pass_s or {}), **settings.clean_pass_s}
        configured = per_model.get(plan.name, settings.models.get(plan.name, {}).get("clean_pass_s"))
        seconds = float(configured) if configured else 2 * clean_macs(shape, length) / EFFECTIVE_FLOPS
        models.append(
            {
                "model": plan.name,
                "cells": sum(len(b.cell_ids) for b in plan.queue),
                "batches": len(plan.queue),
                "actors": min(plan.replicas, len(plan.queue)),
                "samples": int(samples),
                "clean_pass_units": round(units, 1),
                "clean_pass_s": sig(seconds),
                "clean_pass_s_is": "configured" if configured else "estimated",
                "geometry_is": "known" if known else "assumed (LLaVA-1.5-7B shape at its n_layers)",
                "gpu_hours": sig(units * seconds / 3600),
            }
        )
    invalid = invalid_jobs(sweep)
    return {
        "sweep": sweep.name,
        "jobs": len(sweep.jobs),
        "cells": len(cells),
        **{state: counts.get(state, 0) for state in ("new", "cached", "partial", "failed")},
        "invalid_jobs": len(invalid),
        "invalid": invalid,
        "batches": sum(m["batches"] for m in models),
        "samples": sum(m["samples"] for m in models),
        "clean_pass_units": round(sum(m["clean_pass_units"] for m in models), 1),
        "gpu_hours": sig(sum(m["gpu_hours"] for m in models)),
        "models": models,
    }


def print_plan(sweep: Sweep, compose_s: float = 0.0) -> dict[str, Any]:
    """Print the plan (a table per model and the totals) and write it to `<sweep_dir>/plan.json`."""
    from rich.console import Console
    from rich.table import Table

    plan = build_plan(sweep)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    console.print(
        f"mmflow plan '{plan['sweep']}': {plan['jobs']} jobs -> {plan['cells']} cells: {plan['new']} new, "
        f"{plan['cached']} cached, {plan['partial']} partial, {plan['failed']} failed before"
        + (f", {plan['invalid_jobs']} invalid jobs" if plan["invalid_jobs"] else "")
        + f" (planned in {compose_s:.1f} s)"
    )
    for job in plan["invalid"][:INVALID_SHOWN]:  # why run would refuse each, one line each
        console.print(
            f"  invalid job #{job['job']} {' '.join(job['overrides'])}: {job['error']}",
            markup=False,
            soft_wrap=True,
        )
    if len(plan["invalid"]) > INVALID_SHOWN:
        more = len(plan["invalid"]) - INVALID_SHOWN
        console.print(f"  and {more} more invalid jobs (all in {Path(sweep.sweep_dir) / 'plan.json'})")
    table = Table(show_lines=False)
    columns = ("model", "cells", "batches", "actors", "samples", "clean passes", "s/clean pass", "GPU-h")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in plan["models"]:
        mark = "" if m["clean_pass_s_is"] == "configured" else " (est.)"
        table.add_row(
            m["model"],
            f"{m['cells']:d}",
            f"{m['batches']:d}",
            f"{m['actors']:d}",
            f"{m['samples']:,d}",
            f"{m['clean_pass_units']:,.1f}",  # the total is the sum of these
            f"{m['clean_pass_s']:.3f}{mark}",
            f"{m['gpu_hours']:,.3g}",
        )
    console.print(table)
    console.print(
        f"to compute: {plural(plan['batches'], 'batch', 'batches')}, {plural(plan['samples'], 'sample')}, "
        f"{plan['clean_pass_units']:,.1f} clean passes, ~{plan['gpu_hours']:,.3g} GPU-hours"
    )
    out = Path(sweep.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
    return plan
