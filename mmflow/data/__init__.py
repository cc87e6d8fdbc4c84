"""Data sources: GQA task files, your own tables and the synthetic shapes set, all producing
`Sample` / `Skip`."""

from mmflow.data.gqa import check_unique_ids, load_gqa
from mmflow.data.sample import CHOOSE_TASKS, TASKS, Box, Sample, Skip
from mmflow.data.shapes import load_shapes
from mmflow.data.table import load_table, read_table, resolve_data
from mmflow.errors import DataError

__all__ = [
    "CHOOSE_TASKS",
    "TASKS",
    "Box",
    "DataError",
    "Sample",
    "Skip",
    "check_unique_ids",
    "load_gqa",
    "load_shapes",
    "load_table",
    "read_table",
    "resolve_data",
]
