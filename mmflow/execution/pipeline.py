"""The data side of a cell batch, overlapped with the model: prefetching and per-stage timings.

While the model computes sample i, a background thread reads, preprocesses, encodes and groups
samples i+1..i+depth (a bounded queue: at most `depth` prepared samples wait in memory). A thread,
not worker processes: image decoding, the processor's numpy/torch work and the tokenizer release the
GIL, and the prepared tensors need no pickling. An exception while preparing a sample is kept in
that sample's future and raised where the sample is consumed, so it becomes that sample's recorded
skip exactly as without prefetching.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Stages(Counter):
    """Seconds per pipeline stage, summed over samples (stage name -> seconds)."""

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] += time.perf_counter() - start

    def rounded(self, digits: int = 4) -> dict[str, float]:
        return {name: round(seconds, digits) for name, seconds in sorted(self.items())}


def prefetch(
    items: Iterable[Item], prepare: Callable[[Item], Result], depth: int
) -> Iterator[tuple[Item, Future[Result]]]:
    """Yield (item, future of prepare(item)) in order, with up to `depth` items prepared ahead.

    depth 0 prepares each item in the caller's thread when it is reached (no overlap). `future.result()`
    returns prepare's value or raises its exception. Leaving the loop early cancels what has not started
    and waits for the one running (no thread outlives the loop).
    """
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    if depth == 0:
        for item in items:
            yield item, _run_now(prepare, item)
        return
    pending: list[tuple[Item, Future[Result]]] = []
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmflow-prefetch") as pool:
        try:
            for item in iterator:
                pending.append((item, pool.submit(prepare, item)))
                if len(pending) > depth:
                    yield pending.pop(0)
            while pending:
                yield pending.pop(0)
        finally:
            for _, future in pending:
                future.cancel()


def _run_now(prepare: Callable[[Item], Result], item: Item) -> Future[Result]:
    future: Future[Result] = Future()
    try:
        future.set_result(prepare(item))
    except Exception as exc:  # handed to the consumer, like a prefetched failure
        future.set_exception(exc)
    return future
