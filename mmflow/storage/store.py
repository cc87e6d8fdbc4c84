"""Cell folders and atomic, resumable result files (cell ids: `mmflow.config.identity`).

A cell folder holds `cell.json`, `samples.parquet` and `results.parquet`. While a cell runs, each
finished sample is written atomically as its own part file under `parts/`, so an interrupted cell
resumes from the samples it had and never counts one twice; `finish` merges the parts.

Damaged state never counts: `is_done` opens both parquet files and compares their rows with the
counts recorded in `cell.json`; an unreadable `cell.json` makes the cell not done (with a warning
naming the file); an unreadable part is moved to `<cell>/damaged/` and its sample computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from mmflow.config.identity import (  # noqa: F401 (the id rules, re-exported where they were)
    IMPLIED_KEYS,
    NON_SEMANTIC_KEYS,
    NON_SEMANTIC_MODEL_KEYS,
    SCHEMA_VERSION,
    SHARED_KEYS,
    batch_key,
    cell_id,
    effective_parity,
    semantic_config,
)
from mmflow.storage.files import (  # noqa: F401 (atomic_write_* re-exported)
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    json_bytes,
    parquet_bytes,
)
from mmflow.storage.objectstore import sync
from mmflow.storage.relay import current_relay

if TYPE_CHECKING:
    from mmflow.config.spec import CellSpec

log = logging.getLogger(__name__)

FILES = ("samples.parquet", "results.parquet")


class CellStore:
    """The folder of one cell: its status, per-sample parts while running, final parquet files.

    Inside a relayed batch (`mmflow.storage.relay`) the folder is the actor's scratch copy and every write is
    also sent to the driver, which writes it into `results_dir`.
    """

    def __init__(self, results_dir: str | Path, config: Mapping[str, Any], ident: str | None = None):
        """`ident`: the cell id when the caller has it (`CellSpec.id`); else hashed from `config`."""
        self.config = dict(config)
        self.id = ident if ident is not None else cell_id(self.config)
        self.relay = current_relay()
        self.dir = (self.relay.root if self.relay else Path(results_dir)) / self.id
        self.parts = self.dir / "parts"

    @classmethod
    def of(cls, cell: CellSpec | Mapping[str, Any]) -> CellStore:
        """The store of a cell spec (its id as computed when the spec was built), or of a plain
        resolved config (its id hashed here)."""
        if isinstance(cell, Mapping):
            return cls(cell["results_dir"], cell)
        return cls(cell.results_dir, cell.config, cell.id)

    def _write(self, path: Path, data: bytes) -> None:
        """Write one file of this cell atomically (and relay it to the driver)."""
        atomic_write_bytes(path, data)
        if self.relay is not None:
            self.relay.send(("write", self.id, path.relative_to(self.dir).as_posix(), data))

    @property
    def meta_path(self) -> Path:
        return self.dir / "cell.json"

    def read_meta(self) -> dict[str, Any]:
        """`cell.json`, or {} when it is missing or unreadable (a warning names the file)."""
        if not self.meta_path.exists():
            return {}
        try:
            meta = json.loads(self.meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
            return meta
        except (OSError, ValueError) as exc:
            log.warning("unreadable %s (%s): the cell counts as not done", self.meta_path, exc)
            return {}

    def is_done(self) -> bool:
        """Finished only when `cell.json` says done and both files open with the recorded row counts."""
        meta = self.read_meta()
        if meta.get("status") != "done":
            return False
        problem = self.check_files(meta)
        if problem:
            log.warning("cell %s: cell.json says done but %s; computing it again", self.id, problem)
            print(f"[mmflow] cell {self.id}: damaged ({problem}); computing it again", flush=True)
            self.quarantine([self.dir / name for name in FILES], problem)
            return False
        return True

    def check_files(self, meta: Mapping[str, Any]) -> str | None:
        """What is wrong with the final files of a done cell, or None."""
        import pyarrow.parquet as pq

        expected = dict(meta.get("rows") or {})
        counts = meta.get("counts") or {}
        expected.setdefault("samples.parquet", counts.get("samples"))
        for name in FILES:
            path = self.dir / name
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except Exception as exc:  # noqa: BLE001 - missing, truncated or not parquet
                return f"{path} cannot be read ({type(exc).__name__}: {exc})"
            if expected.get(name) is not None and rows != expected[name]:
                return f"{path} has {rows} rows, cell.json records {expected[name]}"
        return None

    def quarantine(self, paths: list[Path], why: str) -> None:
        """Move damaged files to `<cell>/damaged/` (kept for inspection, never read again)."""
        target = self.dir / "damaged"
        for path in (p for p in paths if p.exists()):
            target.mkdir(parents=True, exist_ok=True)
            dest = target / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
            os.replace(path, dest)
            sync(dest, path)
            if self.relay is not None:
                rel = (path.relative_to(self.dir).as_posix(), dest.relative_to(self.dir).as_posix())
                self.relay.send(("move", self.id, *rel))
            log.warning("moved %s to %s: %s", path, dest, why)

    def write_meta(self, **fields: Any) -> dict[str, Any]:
        """Update `cell.json` (secrets in the config redacted, see `mmflow.storage.secrets`)."""
        from mmflow.storage.secrets import redact

        meta = {**self.read_meta(), **fields, "cell_id": self.id, "schema_version": SCHEMA_VERSION}
        meta["parity"] = effective_parity(self.config)  # null: a model without paper-code differences
        meta["config"] = redact(self.config)
        self._write(self.meta_path, json_bytes(meta))
        return meta

    def done_question_ids(self) -> set[str]:
        """Samples already recorded in part files (the resume point); `errored` samples (stopped by an
        exception, `mmflow.data.sample.Skip.error`) are not, so they are computed again.

        A sample whose part (or results part) cannot be read is moved to `damaged/` with a warning
        and is not counted, so it is computed again.
        """
        done: set[str] = set()
        for part in sorted(self.parts.glob("samples-*.parquet")):
            results = part.with_name(part.name.replace("samples-", "results-", 1))
            try:
                rows = pd.read_parquet(part)
                if "status" in rows:
                    rows = rows[rows["status"] != "errored"]
                ids = rows["question_id"].astype(str)
                if results.exists():
                    pd.read_parquet(results, columns=["question_id"])
            except Exception as exc:  # noqa: BLE001 - truncated or garbage part
                why = f"unreadable part ({type(exc).__name__}: {exc}); its sample is computed again"
                print(f"[mmflow] cell {self.id}: {part.name} {why}", flush=True)
                self.quarantine([part, results], why)
                continue
            done.update(ids)
        return done

    def write_sample(self, question_id: str, sample_row: dict, result_rows: list[dict]) -> None:
        """Record one sample atomically: results first, then the sample row that marks it done."""
        key = hashlib.sha1(question_id.encode()).hexdigest()[:12]
        if result_rows:
            self._write(self.parts / f"results-{key}.parquet", parquet_bytes(pd.DataFrame(result_rows)))
        self._write(self.parts / f"samples-{key}.parquet", parquet_bytes(pd.DataFrame([sample_row])))

    def _merge(self, kind: str, columns: list[str]) -> pd.DataFrame:
        frames = []
        for path in sorted(self.parts.glob(f"{kind}-*.parquet")):
            try:
                frames.append(pd.read_parquet(path))
            except Exception as exc:  # noqa: BLE001 - a results part whose sample never finished
                self.quarantine([path], f"unreadable part ({type(exc).__name__}: {exc})")
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    def finish(self, sample_schema: Any, result_schema: Any, sort_by: list[str]) -> tuple:
        """Merge parts into the two parquet files, dropping results of unfinished samples.

        `sample_schema`, `result_schema`: the files' `pyarrow.Schema`s, written whether rows exist or
        not (`mmflow.storage.schema`), so a cell without scored samples reads like any other; a plain list
        of column names writes the types pandas infers.
        """
        sample_schema, sample_columns = _schema_and_columns(sample_schema)
        result_schema, result_columns = _schema_and_columns(result_schema)
        samples = self._merge("samples", sample_columns)
        results = self._merge("results", result_columns)
        results = (
            results[results["question_id"].isin(set(samples["question_id"]))] if len(results) else results
        )
        samples = samples.sort_values("order", kind="stable").reset_index(drop=True)
        results = (
            results.sort_values(sort_by, kind="stable").reset_index(drop=True) if len(results) else results
        )
        self._write(self.dir / "samples.parquet", parquet_bytes(samples, sample_schema))
        self._write(self.dir / "results.parquet", parquet_bytes(results, result_schema))
        return samples, results

    def clear_parts(self) -> None:
        removed = list(self.parts.glob("*"))  # parts, and temp files of a writer killed mid-write
        for part in removed:
            part.unlink()
        if self.parts.exists():
            self.parts.rmdir()
        sync(*removed)
        if self.relay is not None:
            self.relay.send(("clear_parts", self.id, "parts", None))


def _schema_and_columns(spec: Any) -> tuple[Any, list[str]]:
    """(schema or None, column names) of a `pyarrow.Schema` or a list of column names."""
    if isinstance(spec, list | tuple):
        return None, list(spec)
    return spec, list(spec.names)
