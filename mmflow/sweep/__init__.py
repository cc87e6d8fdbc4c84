"""The sweep core, free of Hydra: cells -> model plans -> cell batches -> workers -> records.

- `settings`: how a sweep runs (`SweepSettings`; Hydra's `hydra.launcher` node has the same fields).
- `plan`: cells per model, then in cell batches that share samples and clean passes.
- `executor`: the protocol a scheduler drives (start a worker for a model, submit a batch, poll,
  cancel) and the in-process executor; `ray_executor`: Ray actors that hold one model each;
  `ray_session`: where Ray runs (a cluster, or a local Ray on loopback).
- `scheduler`: hands batches to workers, requeues what a lost worker held, enforces every timeout.
- `display`, `record`: progress while it runs; `sweep.json` and the terminal summary after.
- `core`: one sweep from start to end (`Sweep`), including the end-of-sweep W&B run and report.
- `curve`: the per-layer table a single run prints.

This package imports nothing heavy at import time (Hydra's plugin scan imports `settings`).
"""
