"""Cell ids, cell folders and atomic, resumable result files.

A cell folder holds `cell.json`, `samples.parquet` and `results.parquet`. While a cell runs, each
finished sample is written atomically as its own part file under `parts/`, so an interrupted cell
resumes from the samples it had and never counts one twice; `finish` merges the parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.parity import effective_parity

SCHEMA_VERSION = 1
# Config keys that say where or how results are shown, not what is computed: not part of a cell id.
NON_SEMANTIC_KEYS = frozenset({"results_dir", "logger", "ray", "launcher", "progress", "hydra", "sweep_name"})
NON_SEMANTIC_MODEL_KEYS = frozenset({"resources", "family", "size"})  # requests and legend labels


def cell_id(config: Mapping[str, Any]) -> str:
    """A stable id of a resolved cell config (plus the schema version), never Hydra's job number.

    The top-level `parity` key is not hashed itself: it reaches the id through `model.parity`, which
    only the models the paper ran carry (`parity: ${parity}`). For every other model the two modes
    compute the same thing, so their cells keep the ids they had before the key existed.
    """
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS and k != "parity"}
    if isinstance(semantic.get("model"), Mapping):
        semantic["model"] = {k: v for k, v in semantic["model"].items() if k not in NON_SEMANTIC_MODEL_KEYS}
    blob = json.dumps({"schema": SCHEMA_VERSION, "config": semantic}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    import io

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


class CellStore:
    """The folder of one cell: its status, per-sample parts while running, final parquet files."""

    def __init__(self, results_dir: str | Path, config: Mapping[str, Any]):
        self.config = dict(config)
        self.id = cell_id(self.config)
        self.dir = Path(results_dir) / self.id
        self.parts = self.dir / "parts"

    @property
    def meta_path(self) -> Path:
        return self.dir / "cell.json"

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta_path.read_text()) if self.meta_path.exists() else {}

    def is_done(self) -> bool:
        """Finished only when the status says so and both result files are there."""
        return (
            self.read_meta().get("status") == "done"
            and (self.dir / "samples.parquet").exists()
            and (self.dir / "results.parquet").exists()
        )

    def write_meta(self, **fields: Any) -> dict[str, Any]:
        meta = {**self.read_meta(), **fields, "cell_id": self.id, "schema_version": SCHEMA_VERSION}
        meta["parity"] = effective_parity(self.config)  # null: a model without paper-code differences
        meta["config"] = self.config
        atomic_write_json(self.meta_path, meta)
        return meta

    def done_question_ids(self) -> set[str]:
        """Samples already recorded in part files (the resume point)."""
        done: set[str] = set()
        for part in sorted(self.parts.glob("samples-*.parquet")):
            done.update(pd.read_parquet(part, columns=["question_id"])["question_id"].astype(str))
        return done

    def write_sample(self, question_id: str, sample_row: dict, result_rows: list[dict]) -> None:
        """Record one sample atomically: results first, then the sample row that marks it done."""
        key = hashlib.sha1(question_id.encode()).hexdigest()[:12]
        if result_rows:
            atomic_write_parquet(self.parts / f"results-{key}.parquet", pd.DataFrame(result_rows))
        atomic_write_parquet(self.parts / f"samples-{key}.parquet", pd.DataFrame([sample_row]))

    def _merge(self, kind: str, columns: list[str]) -> pd.DataFrame:
        frames = [pd.read_parquet(p) for p in sorted(self.parts.glob(f"{kind}-*.parquet"))]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    def finish(self, sample_columns: list[str], result_columns: list[str], sort_by: list[str]) -> tuple:
        """Merge parts into the two parquet files, dropping results of unfinished samples."""
        samples = self._merge("samples", sample_columns)
        results = self._merge("results", result_columns)
        results = (
            results[results["question_id"].isin(set(samples["question_id"]))] if len(results) else results
        )
        samples = samples.sort_values("order", kind="stable").reset_index(drop=True)
        results = (
            results.sort_values(sort_by, kind="stable").reset_index(drop=True) if len(results) else results
        )
        atomic_write_parquet(self.dir / "samples.parquet", samples)
        atomic_write_parquet(self.dir / "results.parquet", results)
        return samples, results

    def clear_parts(self) -> None:
        for part in self.parts.glob("*"):  # parts, and temp files of a writer that was killed mid-write
            part.unlink()
        if self.parts.exists():
            self.parts.rmdir()
