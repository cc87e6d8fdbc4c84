"""The engine capabilities the runtime owns for one cell batch and hands to each analysis's `rows`.

An analysis declares what it asks for (`Analysis.uses`, values in `mmflow.analyses.base.CAPABILITIES`);
the runtime builds the knockout engine (always: it runs the clean pass), the patcher only when a cell
restores, and gives each cell a view (`Engines.only`) that refuses a capability the cell did not
declare. Analyses never construct engines or patchers themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmflow.knockout import make_engine

if TYPE_CHECKING:
    import torch

    from mmflow.config.parts import EngineSpec
    from mmflow.inputs.encode import ModelInputs
    from mmflow.knockout.attribution import Gradients
    from mmflow.knockout.clean_pass import CleanPass
    from mmflow.knockout.spec import KnockoutJob
    from mmflow.models.registry import LoadedModel
    from mmflow.patching.corrupt import Corruption
    from mmflow.patching.restore import RestoreJob


@dataclass(frozen=True)
class Engines:
    """The knockout engine, the patcher (None unless a cell restores) and the capabilities granted.

    `engine`: the cell batch's knockout engine (`mmflow.knockout`), which also runs the clean pass;
    `patcher`: `mmflow.patching.restore.make_patcher`'s; `granted`: the capabilities this view allows.
    """

    loaded: LoadedModel
    engine: Any
    patcher: Any = None
    granted: frozenset[str] = frozenset()

    @classmethod
    def build(cls, loaded: LoadedModel, engine: EngineSpec, uses: Iterable[str]) -> Engines:
        """The engines of a cell batch from its engine spec (name, attention), for the union of its
        cells' `uses`: the patcher is built only when one of them restores."""
        uses = frozenset(uses)
        knockouts = make_engine(engine.name, loaded, engine.attention)
        patcher = None
        if "restores" in uses:
            from mmflow.patching.restore import make_patcher  # only for cells that restore

            patcher = make_patcher(engine.name, loaded, engine.attention)
        return cls(loaded, knockouts, patcher, uses)

    def only(self, uses: Iterable[str]) -> Engines:
        """A view granting `uses` (which this one must grant); ValueError otherwise."""
        uses = frozenset(uses)
        if not uses <= self.granted:
            raise ValueError(f"capabilities {sorted(uses - self.granted)} were not built for this cell batch")
        return dataclasses.replace(self, granted=uses)

    def _need(self, capability: str) -> None:
        if capability not in self.granted:
            raise PermissionError(
                f"the analysis asks for {capability!r} but does not declare it in `uses` "
                f"(granted: {sorted(self.granted)})"
            )

    # ------------------------------------------------------------ knockouts

    def knockouts(self, clean: CleanPass, jobs: list[KnockoutJob]) -> torch.Tensor:
        """Last-position log-probs [J, V] (float32) of `jobs` on `clean` (the engine's `run`)."""
        self._need("knockouts")
        return self.engine.run(clean, jobs)

    # ------------------------------------------------------------ restores (the patcher)

    def corrupted(self, corruption: Corruption, first_target: int) -> Any:
        """The corrupted run of `corruption`, keeping what restores from `first_target` need."""
        self._need("restores")
        return self.patcher.corrupted(corruption, first_target)

    def clean_states(self, clean: CleanPass, first_target: int) -> Any:
        """The clean pass's layer inputs from `first_target` on, to restore."""
        self._need("restores")
        return self.patcher.clean_states(clean, first_target)

    def restore(self, corrupted: Any, states: Any, jobs: list[RestoreJob]) -> torch.Tensor:
        """Last-position log-probs [J, V] of the corrupted run with each job's clean states restored."""
        self._need("restores")
        return self.patcher.restore(corrupted, states, jobs)

    # ------------------------------------------------------------ gradients

    def gradients(self, inputs: ModelInputs, token_id: int, clean: CleanPass | None = None) -> Gradients:
        """One forward and backward of log p(`token_id`) (`mmflow.knockout.attribution.answer_gradients`)."""
        self._need("gradients")
        from mmflow.knockout.attribution import answer_gradients

        return answer_gradients(self.loaded, inputs, token_id, clean)
