"""The reference engine: the paper's algorithm, one full forward of the whole model per knockout.

It is the truth other engines are checked against: vision tower, every position and every layer
are recomputed, and the clean pass goes through the very same code with no knockout active.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmflow.inputs.encode import ModelInputs
from mmflow.inputs.hooks import record_layer_inputs
from mmflow.knockout.attention import blocking, prepare_model
from mmflow.knockout.clean_pass import CleanPass
from mmflow.knockout.noise import change_pct, dithered_logprobs, resolution_pct
from mmflow.knockout.spec import KnockoutJob
from mmflow.models.kv_cache import output_cache
from mmflow.models.registry import LoadedModel


def check_no_empty_rows(job: KnockoutJob, length: int) -> None:
    """Refuse a knockout that would leave a target with nothing to attend to (softmax of all -inf)."""
    for target in job.edges.targets.tolist():
        allowed = torch.ones(target + 1, dtype=torch.bool)
        allowed[job.edges.sources[job.edges.sources <= target]] = False
        if not allowed.any():
            raise ValueError(f"knockout blocks every key of target position {target}")
    if job.edges.targets.max() >= length:
        raise ValueError("knockout target outside the sequence")


class ReferenceEngine:
    """Full recompute per job, batch size one.

    Making an engine routes the model's language attention through mmflow's `attention` backend
    (`prepare_model`); a model has one backend at a time, the last engine made on it sets it.
    """

    name = "reference"

    def __init__(self, loaded: LoadedModel, attention: str):
        self.loaded = loaded
        prepare_model(loaded.model, attention)

    @torch.no_grad()
    def last_logprobs(self, inputs: ModelInputs, job: KnockoutJob | None) -> torch.Tensor:
        """Log-softmax of the last position's logits, float32, under `job` (None: clean)."""
        with blocking(job):
            out = self.loaded.model(**inputs.tensors, use_cache=False, logits_to_keep=1)
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1)

    @torch.no_grad()
    def clean(self, inputs: ModelInputs, first_target: int | None = None) -> CleanPass:
        """The clean forward through the same code as every knockout (`first_target` is unused here),
        keeping its key/value cache for the answer (a cache changes no number of the forward).
        """
        layers = self.loaded.anatomy.layers
        with record_layer_inputs(layers, None, last=True) as record, blocking(None):
            out = self.loaded.model(**inputs.tensors, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return CleanPass(inputs, logprobs, torch.stack(record["last"]), output_cache(out), logits)

    def dithered(self, clean: CleanPass) -> torch.Tensor:
        """The clean forward under one rounding of the dtype per layer (`noise.dithered_logprobs`), once."""
        if clean.dithered is None:
            clean.dithered = dithered_logprobs(self.loaded, clean.inputs)
        return clean.dithered

    def noise_floor_pct(self, clean: CleanPass, token_id: int) -> float:
        """The sample's numerical noise floor in % of p(answer): how far one rounding per layer (and,
        for the fast engine, its empty knockout) moves p from the clean pass, and never below the
        resolution of the answer's logit in the model's dtype."""
        changes = [
            change_pct(self.dithered(clean), clean.logprobs, token_id),
            resolution_pct(clean, token_id),
        ]
        if clean.probe is not None:
            changes.append(change_pct(clean.probe, clean.logprobs, token_id))
        return max(changes)

    def run(self, clean: CleanPass, jobs: Sequence[KnockoutJob]) -> torch.Tensor:
        """Last-position log-probs [J, V] for each job."""
        for job in jobs:
            check_no_empty_rows(job, clean.inputs.length)
        rows = [self.last_logprobs(clean.inputs, job) for job in jobs]
        return torch.stack(rows) if rows else torch.empty(0, clean.logprobs.shape[0])
