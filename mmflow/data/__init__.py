"""Data sources: GQA task files and the synthetic shapes set, both producing `Sample` / `Skip`."""

from mmflow.data.gqa import DataError, load_gqa
from mmflow.data.sample import CHOOSE_TASKS, TASKS, Box, Sample, Skip
from mmflow.data.shapes import load_shapes

__all__ = ["CHOOSE_TASKS", "TASKS", "Box", "DataError", "Sample", "Skip", "load_gqa", "load_shapes"]
