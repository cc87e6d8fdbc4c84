"""Benchmarks and the GPU check: the engines (`python -m mmflow.bench`), the data pipeline, the sweep
driver, patching and the attribution screen, and `python -m mmflow.bench.gpu_check`. Nothing below
imports them."""
