"""Cell identity: the one module that says which config values make a cell id, and which keep old ids.

A cell id hashes the resolved cell config (`semantic_config`) with the schema version. The rules that
keep ids computed earlier valid live here, each with the reason it exists:

- `NON_SEMANTIC_KEYS`, `NON_SEMANTIC_MODEL_KEYS`: where or how results are shown, requests and legend
  labels; never part of an id.
- `IMPLIED_KEYS`: keys dropped from some cells with the value every earlier id had.
- `parity`: the top-level mode is not hashed; it reaches the id through `model.parity`, which only the
  models the paper ran carry (`mmflow.inputs.parity.effective_parity`).
- data sources: each source's `identity` (`mmflow.data.sources`): a table is its bytes (`sha256`),
  not its `path`; where shapes are cached (`cache_dir`) is not part of which shapes.
- analyses: each analysis's `canonical` migration (`canonical`), e.g. `knockout.heads: null` left out.
- `OPTIONAL_KEYS` (`mmflow.config.known_keys`): keys a cell may add that the YAMLs leave out.

`tests/test_identity.py` fails when a YAML under `conf/` or `sweeps/` gains a key that is neither a
field of a spec type (`mmflow.config.spec`) nor covered by a rule here, so a new key forces a decision.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mmflow.config.parts import thaw
from mmflow.inputs.parity import effective_parity  # noqa: F401 (the mode a cell is computed in, cell.json)

SCHEMA_VERSION = 1
# Config keys that say where or how results are shown, not what is computed: not part of a cell id.
NON_SEMANTIC_KEYS = frozenset(
    {"results_dir", "results_uri", "logger", "ray", "launcher", "progress", "hydra", "sweep_name"}
)
NON_SEMANTIC_MODEL_KEYS = frozenset({"resources", "family", "size"})  # requests and legend labels
# Keys dropped from some cells with the value every earlier id had: knockout and answer-tracking cells
# read no `seed` (patching's noise seed), so it left their configs; their ids still include `seed: 0`.
IMPLIED_KEYS: dict[str, Any] = {"seed": 0}
# Not hashed itself: the mode reaches the id through `model.parity` (see `semantic_config`).
UNHASHED_KEYS = frozenset({"parity"})

# Dotted keys (below their config group; the analysis files are global) that a rule covers: not hashed,
# or hashed as earlier ids had them. A mapping key covers everything under it.
RULE_KEYS = frozenset(
    {
        *NON_SEMANTIC_KEYS,
        *UNHASHED_KEYS,
        *IMPLIED_KEYS,
        *(f"model.{key}" for key in NON_SEMANTIC_MODEL_KEYS),
        "model.parity",  # only the models the paper ran carry it (`parity: ${parity}`)
        "data.cache_dir",  # shapes: where they are cached, not which (`ShapesSource.identity`)
        "data.path",  # table: its bytes (`data.sha256`), not where they lie (`TableSource.identity`)
        "knockout.heads",  # null (every head) left out: the knockout as before heads existed (`canonical`)
    }
)
# Dotted keys of the data sources' and analyses' own settings (what no spec field names), hashed as
# they are. `tests/test_identity.py` fails for a YAML key that is in none of: a spec type's fields,
# `RULE_KEYS`, this table. Adding a key here changes the id of every cell that has it.
SETTINGS_KEYS = frozenset(
    {
        "data.name",
        "data.seed",
        "data.image_dir",
        "data.format",
        "data.columns",
        "knockout.name",
        "knockout.source",
        "knockout.target",
        "window",
        "lens",
        "corruption",
        "attribution.sources",
        "attribution.top_k",
        "attribution.controls",
        "attribution.seed",
        "patching.groups",
        "patching.noise_scale",
        "patching.noise_sd",
        "patching.calibration_per_task",
        "patching.margin",
    }
)

# Keys whose values must agree for cells to share samples and clean passes (one cell batch).
SHARED_KEYS = ("model", "data", "task", "n_samples", "seed", "require_correct", "engine", "max_new_tokens")


def batch_key(config: Mapping[str, Any]) -> str:
    """What the cells of one cell batch share: the values of `SHARED_KEYS`, as a string."""
    return json.dumps({k: thaw(config.get(k)) for k in SHARED_KEYS}, sort_keys=True, default=str)


def canonical(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` as its analysis ids it (`Analysis.canonical`: a key whose default means "as before"
    left out). ValueError for an analysis that is neither shipped nor registered."""
    from mmflow.analyses.base import canonical_config

    return canonical_config(dict(config))


def data_identity(data: Any) -> Any:
    """The data config as the cell id sees it: its source's `identity` rule (`mmflow.data.sources`);
    a source that is not known is kept as it is (`validate_cell` refuses it by name)."""
    if not isinstance(data, Mapping):
        return data
    from mmflow.data.sources import data_source

    try:
        source = data_source(str(data.get("name")))
    except ValueError:
        return dict(data)
    return source.identity(data)


def semantic_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a cell computes: the config without where/how-shown keys, as its cell id hashes it.

    The top-level `parity` key is not hashed itself: it reaches the id through `model.parity`, which
    only the models the paper ran carry (`parity: ${parity}`). For every other model the two modes
    compute the same thing, so their cells keep the ids they had before the key existed.

    Keys removed from the config keep the default they had in every id computed before (see
    `IMPLIED_KEYS`), so results folders computed earlier are still found. The data config is its
    source's identity (`data_identity`).
    """
    config = thaw(config)  # plain dicts: a spec's read-only mappings hash as their contents
    kept = {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS and k not in UNHASHED_KEYS}
    semantic = {**IMPLIED_KEYS, **kept}
    if isinstance(semantic.get("model"), Mapping):
        semantic["model"] = {k: v for k, v in semantic["model"].items() if k not in NON_SEMANTIC_MODEL_KEYS}
    if "data" in semantic:
        semantic["data"] = data_identity(semantic["data"])
    return semantic


def cell_id(config: Mapping[str, Any]) -> str:
    """A stable id of a resolved cell config (`semantic_config`, plus the schema version), never
    Hydra's job number. ValueError for a config its data source cannot identify (e.g. `data=table`
    without its file's digest)."""
    data = config.get("data")
    if isinstance(data, Mapping):
        from mmflow.data.sources import data_source

        try:
            source = data_source(str(data.get("name")))
        except ValueError:
            source = None
        if source is not None:
            source.check_identifiable(data)
    blob = json.dumps(
        {"schema": SCHEMA_VERSION, "config": semantic_config(config)}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def covered(dotted: str) -> bool:
    """Whether a rule (`RULE_KEYS`) or the settings table (`SETTINGS_KEYS`) decides how the dotted
    key enters cell ids (a key under a covered mapping is covered)."""
    parts = dotted.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return bool(prefixes & RULE_KEYS) or dotted in SETTINGS_KEYS
