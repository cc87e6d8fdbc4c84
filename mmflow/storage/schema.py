"""Column types of a cell's files: every `samples.parquet` and `results.parquet` has its analysis's
schema, whether it holds rows or not, so a folder of cells reads as one dataset.

Types are written as short names (`string`, `int64`, `float64`, `bool`, `list<int64>`, ...) so that the
analyses can declare them without importing pyarrow; `arrow_schema` turns them into a
`pyarrow.Schema` where a file is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

# The columns of `samples.parquet` (mmflow.execution.cell.SAMPLE_COLUMNS) and their types.
SAMPLE_TYPES: dict[str, str] = {
    "order": "int64",
    "question_id": "string",
    "task": "string",
    "question": "string",
    "image_path": "string",
    "prompt": "string",
    "answer": "string",
    "answer_token_id": "int64",
    "predicted": "string",
    "correct": "bool",
    "p_base": "float64",
    "groups": "string",
    "status": "string",
    "skip_reason": "string",
    "skip_detail": "string",
    "noise_floor_pct": "float64",  # mmflow.knockout.noise: this sample's numerical noise floor (% of p)
}


def arrow_type(name: str) -> pa.DataType:
    """`int64`, `float64`, `bool`, `string` or `list<...>` of one of them, as a pyarrow type."""
    import pyarrow as pa

    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(arrow_type(name[5:-1]))
    simple = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string()}
    if name not in simple:
        raise ValueError(f"unknown column type {name!r}; known: {', '.join(simple)}, list<...>")
    return simple[name]


def arrow_schema(columns: Sequence[str], types: Mapping[str, str]) -> pa.Schema:
    """The schema of `columns` in this order; KeyError names a column without a declared type."""
    import pyarrow as pa

    missing = [c for c in columns if c not in types]
    if missing:
        raise KeyError(f"no declared type for columns {missing}")
    return pa.schema([(c, arrow_type(types[c])) for c in columns])


def to_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """`frame` as an arrow table of exactly `schema` (columns in its order, missing ones null)."""
    import pyarrow as pa

    frame = frame.reindex(columns=schema.names)
    if not len(frame):
        return schema.empty_table()
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
