"""Restore the clean residual stream of some positions in a corrupted run: the patching engines.

A `RestoreJob` sets, at the input of every layer j in its window, the hidden state of its positions
to the clean run's input of layer j (the residual stream before the layer), in the corrupted run.

- `ReferencePatcher`: the plain way, one full forward of the corrupted run per job (vision tower
  included) with the states substituted by forward pre-hooks on the decoder layers.
- `FastPatcher`: a restore at positions G from layer l changes nothing before min(G) nor below l
  (causal attention), so one corrupted forward keeps its keys/values and layer inputs (the fast
  knockout engine's clean pass, run under the corruption), and every job of a sample restarts only
  its rows min(G)..T-1 from its window's first layer, all jobs in one batched pass over the layers
  (the fast knockout engine's sweep, with the restore applied before each layer instead of a mask).
  A probe row per corrupted pass (nothing restored, from layer 0) must reproduce the corrupted
  log-probs, else the sample falls back to the reference patcher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mmflow.inputs.encode import ModelInputs
from mmflow.inputs.hooks import record_layer_inputs
from mmflow.knockout.attention import blocking, prepare_model
from mmflow.knockout.clean_pass import CleanPass, FastCleanPass
from mmflow.knockout.fast import FastEngine, unsupported_reason
from mmflow.knockout.noise import dithered_logprobs
from mmflow.knockout.rows import SuffixGroup, plan_sweeps
from mmflow.knockout.spec import BlockEdges, KnockoutJob
from mmflow.models.registry import LoadedModel
from mmflow.patching.corrupt import Corruption, corrupting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreJob:
    """Restore the clean states of `positions` [n] (sorted, long) at the input of each layer in `layers`."""

    positions: torch.Tensor
    layers: range


@dataclass
class CleanStates:
    """The clean run's layer inputs `hidden` [L, T - t, D] from position t = `first_target` on (the
    first restored position), and (fast patcher) its cache: keys/values of every position, for
    restores that cover the corruption."""

    hidden: torch.Tensor
    first_target: int
    cache: FastCleanPass | None = None


@dataclass
class CorruptedPass:
    """The corrupted run of one sample: last-position log-probs [V] (float32) and, for the fast
    patcher, its caches from position `first_target` on."""

    corruption: Corruption
    logprobs: torch.Tensor
    first_target: int
    cache: FastCleanPass | None = None


@contextlib.contextmanager
def restoring(
    layers: Sequence[torch.nn.Module], job: RestoreJob | None, states: torch.Tensor, first_target: int
) -> Iterator[None]:
    """Inside the block, layer j in `job.layers` gets `states[j, p - first_target]` at positions p of the job.

    `states` [L, T - first_target, D]: clean layer inputs from position `first_target` on.
    """
    if job is None or job.positions.numel() == 0:
        yield
        return

    def make_hook(index: int):
        def pre_hook(module, args, kwargs):
            from_args = bool(args)
            hidden = (args[0] if from_args else kwargs["hidden_states"]).clone()
            positions = job.positions.to(hidden.device)
            hidden[0, positions] = states[index, positions - first_target].to(hidden.device, hidden.dtype)
            if from_args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return pre_hook

    handles = [
        layers[j].register_forward_pre_hook(make_hook(j), with_kwargs=True)
        for j in job.layers
        if 0 <= j < len(layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ReferencePatcher:
    """One full forward of the corrupted run per restore job, states substituted by hooks."""

    name = "reference"

    def __init__(self, loaded: LoadedModel, attention: str):
        self.loaded = loaded
        self.layers = loaded.anatomy.layers
        prepare_model(loaded.model, attention)  # the same attention code as the engines

    @torch.no_grad()
    def states(
        self, inputs: ModelInputs, first_target: int, corruption: Corruption | None = None
    ) -> torch.Tensor:
        """Layer inputs [L, T - t, D] of the clean (or corrupted) run from position t = `first_target` on."""
        with (
            corrupting(self.loaded, corruption),
            record_layer_inputs(self.layers, first_target) as record,
            blocking(None),
        ):
            self.loaded.model(**inputs.tensors, use_cache=False, logits_to_keep=1)
        return torch.stack(record["inputs"])

    def clean_states(self, clean: CleanPass, first_target: int) -> CleanStates:
        """Clean layer inputs from `first_target` on: the clean pass's cache if it has them, else a
        forward."""
        if _cached_from(clean, first_target):
            return CleanStates(clean.hidden[:, first_target - clean.first_target :], first_target, clean)
        return CleanStates(self.states(clean.inputs, first_target), first_target)

    @torch.no_grad()
    def last_logprobs(
        self,
        corruption: Corruption,
        job: RestoreJob | None = None,
        states: torch.Tensor | None = None,
        first_target: int = 0,
    ) -> torch.Tensor:
        """Last-position log-softmax [V] (float32) of the corrupted run with `job` restored."""
        with (
            corrupting(self.loaded, corruption),
            restoring(self.layers, job, states, first_target),
            blocking(None),
        ):
            out = self.loaded.model(**corruption.inputs.tensors, use_cache=False, logits_to_keep=1)
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1)

    def corrupted(self, corruption: Corruption, first_target: int) -> CorruptedPass:
        return CorruptedPass(corruption, self.last_logprobs(corruption), first_target)

    def restore(
        self, corrupted: CorruptedPass, states: CleanStates, jobs: Sequence[RestoreJob]
    ) -> torch.Tensor:
        """Last-position log-probs [J, V] of the corrupted run with each job's positions restored
        from the clean layer inputs `states`."""
        _check_jobs(jobs, states.first_target)
        out = corrupted.logprobs.expand(len(jobs), -1).clone()
        for index, job in enumerate(jobs):
            if _changes_something(job, len(self.layers)):
                out[index] = self.last_logprobs(corrupted.corruption, job, states.hidden, states.first_target)
        return out


def _cached_from(clean: CleanPass, first_target: int) -> bool:
    return (
        isinstance(clean, FastCleanPass)
        and clean.first_target is not None
        and clean.first_target <= first_target
    )


def covers_corruption(positions: torch.Tensor, changed: torch.Tensor | None) -> bool:
    """Whether restoring `positions` makes every state at or before max(positions) clean: they are
    one contiguous run holding every corrupted position (`changed`), e.g. the image group."""
    if changed is None or changed.numel() == 0 or positions.numel() == 0:
        return False
    contiguous = int(positions.max()) - int(positions.min()) + 1 == positions.numel()
    return contiguous and bool(torch.isin(changed.to(positions.device), positions).all())


def _changes_something(job: RestoreJob, n_layers: int) -> bool:
    return job.positions.numel() > 0 and any(0 <= j < n_layers for j in job.layers)


def _check_jobs(jobs: Sequence[RestoreJob], first_target: int) -> None:
    for job in jobs:
        if job.positions.numel() and int(job.positions.min()) < first_target:
            raise ValueError(
                f"restore at position {int(job.positions.min())} before the cached first target "
                f"{first_target}"
            )


class FastPatcher(FastEngine):
    """Every restore job of a sample from the cached corrupted run, rows batched over one layer pass."""

    def __init__(self, loaded: LoadedModel, attention: str):
        super().__init__(loaded, attention)
        self.reference = ReferencePatcher(loaded, attention)
        self._states: torch.Tensor | None = None  # clean layer inputs during a sweep
        self._states_first_target = 0

    def clean_states(self, clean: CleanPass, first_target: int) -> CleanStates:
        """Clean layer inputs from `first_target` on with the clean keys/values (the clean pass's cache if it
        has them, else the knockout engine's clean pass)."""
        if not _cached_from(clean, first_target):
            clean = self.clean(clean.inputs, first_target=first_target)
        return CleanStates(clean.hidden[:, first_target - clean.first_target :], first_target, clean)

    def corrupted(self, corruption: Corruption, first_target: int) -> CorruptedPass:
        """The corrupted forward (the knockout engine's clean pass, corrupted), cached from `first_target`."""
        with corrupting(self.loaded, corruption):
            cache = self.clean(corruption.inputs, first_target=first_target)
            cache.dithered = dithered_logprobs(self.loaded, corruption.inputs)  # the probe's noise scale
        return CorruptedPass(corruption, cache.logprobs, first_target, cache)

    def restore(
        self, corrupted: CorruptedPass, states: CleanStates, jobs: Sequence[RestoreJob]
    ) -> torch.Tensor:
        """Last-position log-probs [J, V], as `ReferencePatcher.restore`.

        A job whose positions cover the corruption (`covers_corruption`, e.g. the image group) leaves
        every state up to its last position clean from its window's first layer on (those positions
        see only the unchanged prefix and themselves), so only the positions after it are recomputed,
        over the clean run's keys/values; the others restart at their first position over the
        corrupted run's.
        """
        _check_jobs(jobs, max(corrupted.first_target, states.first_target))
        n_layers, length = len(self.layers), corrupted.cache.inputs.length
        reason = self._sample_fallback_reason(corrupted.cache)  # e.g. a sliding window in use
        if reason is not None:
            self.fallbacks[reason] += 1
            return self.reference.restore(corrupted, states, jobs)
        out = corrupted.logprobs.expand(len(jobs), -1).clone()  # jobs that restore nothing: p_corrupt exactly
        empty = torch.empty(0, dtype=torch.long)
        as_knockouts = [KnockoutJob(BlockEdges(empty, job.positions), job.layers) for job in jobs]
        by_first_target: dict[int, list[int]] = {}
        covering: dict[int, list[int]] = {}
        changed = corrupted.corruption.positions
        for index, job in enumerate(jobs):
            if not _changes_something(job, n_layers):
                continue
            if states.cache is not None and covers_corruption(job.positions, changed):
                after = int(job.positions.max()) + 1
                if after >= length:  # every position up to the last one restored: the clean run
                    out[index] = states.cache.logprobs
                else:
                    covering.setdefault(after, []).append(index)
            else:
                by_first_target.setdefault(int(job.positions.min()), []).append(index)
        self._states, self._states_first_target = states.hidden, states.first_target
        try:
            self._run(corrupted.cache, by_first_target, jobs, as_knockouts, out, (corrupted, states))
            if covering:  # clean keys/values for the prefix, corrupted layer inputs for the rows; the
                # probe row (from layer 0) then restores everything before the rows: the clean run
                hybrid = dataclasses.replace(
                    states.cache,
                    first_target=corrupted.cache.first_target,
                    hidden=corrupted.cache.hidden,
                    cos=corrupted.cache.cos,
                    sin=corrupted.cache.sin,
                    probed=False,
                )
                self._run(hybrid, covering, jobs, as_knockouts, out, (corrupted, states))
        finally:
            self._states = None
        return out

    def _run(
        self, cache: FastCleanPass, by_first_target: dict, jobs, as_knockouts, out, fallback: tuple
    ) -> None:
        """Sweep the jobs in `by_first_target` ({first target: job indices}) over `cache` into `out`; if
        the probe fails, the reference patcher on (corrupted pass, clean states) = `fallback` instead."""
        for batch in plan_sweeps(by_first_target, cache.inputs.length):
            rows = self._sweep(cache, batch, as_knockouts)
            if rows is None:  # the probe failed: the shortcut is not exact for this sample
                todo = [i for indices in by_first_target.values() for i in indices]
                out[todo] = self.reference.restore(*fallback, [jobs[i] for i in todo])
                return
            out[list(rows)] = torch.stack(list(rows.values()))

    def _forward(self, clean: FastCleanPass, suffix_groups: list[SuffixGroup]) -> None:
        """The knockout engine's layer pass, with each row's restore applied before each layer."""
        for index in range(
            min(suffix_group.rows.starts[0] for suffix_group in suffix_groups), len(self.layers)
        ):
            for suffix_group in suffix_groups:
                suffix_group.join(index, clean)
                self._restore(index, suffix_group)
            self._layer(index, [g for g in suffix_groups if g.hidden.shape[0]], clean)

    def _restore(self, index: int, suffix_group: SuffixGroup) -> None:
        """Set the restored positions of active rows whose window holds layer `index` to the clean states."""
        rows, n_rows = suffix_group.rows, suffix_group.hidden.shape[0]
        if not n_rows or not rows.blocking_layers[index]:
            return
        chosen = rows.targets[rows.pattern[:n_rows]] & rows.window[:n_rows, index, None]  # [R, S]
        if not chosen.any():
            return
        states = self._states[index, suffix_group.first_target - self._states_first_target :].to(
            suffix_group.hidden.dtype
        )  # [S, D]
        suffix_group.hidden = torch.where(chosen[..., None], states, suffix_group.hidden)


def make_patcher(name: str, loaded: LoadedModel, attention: str) -> ReferencePatcher | FastPatcher:
    """The patcher for `engine.name`: fast (falls back to the reference where the shortcut is not exact).

    Like the engines, it routes the model's language attention through mmflow's `attention` backend.
    """
    prepare_model(loaded.model, attention)
    if name == "reference":
        return ReferencePatcher(loaded, attention)
    if name != "fast":
        raise ValueError(f"unknown engine {name!r}; patching knows: reference, fast")
    reason = unsupported_reason(loaded)
    if reason is None:
        return FastPatcher(loaded, attention)
    log.warning("patching with engine=fast falls back to the reference patcher: %s", reason)
    patcher = ReferencePatcher(loaded, attention)
    patcher.name = f"reference (fallback: {reason})"
    return patcher
