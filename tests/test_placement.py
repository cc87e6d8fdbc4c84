"""Models over several GPUs: the placement computed for N GPUs (without GPUs), and a device-map load that
computes exactly what a plain load computes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import cell_config, model_config

from mmflow.models.placement import GIB, device_of, load_kwargs, max_memory, plan_placement, wants_split


def _replica_config(name: str):
    from mmflow.models.synthetic import replica

    spec = replica.REPLICA_SPECS[name]
    return replica.replica_config(spec, replica.build_tokenizer(spec), full_size=True)


@pytest.mark.parametrize(("name", "gpus", "gib"), [("llava-1.5-13b", 2, 24), ("llava-1.5-13b", 4, 12)])
def test_full_size_model_spreads_every_layer_over_the_gpus(name: str, gpus: int, gib: int) -> None:
    config = _replica_config(name)
    placement, input_device = plan_placement(config, [gib * GIB] * gpus, torch.float16)
    depth = config.text_config.num_hidden_layers
    layers = [device_of(placement, f"model.language_model.layers.{i}") for i in range(depth)]
    assert set(layers) == set(range(gpus))  # every GPU holds layers, nothing on the CPU or disk
    assert layers == sorted(layers)  # consecutive layers: one hop per GPU boundary
    assert input_device == device_of(placement, "model.language_model.embed_tokens") == 0
    assert {device_of(placement, m) for m in ("model.vision_tower", "lm_head")} <= set(range(gpus))


def test_a_model_too_large_for_the_gpus_is_refused() -> None:
    with pytest.raises(ValueError, match="do not fit 2 GPU"):
        plan_placement(_replica_config("llava-1.5-13b"), [8 * GIB] * 2, torch.float16)


def test_when_a_model_is_split() -> None:
    assert not wants_split(None, 1) and not wants_split(None, None)
    assert wants_split(None, 2) and wants_split("auto", 1)
    assert load_kwargs(None, 1) == {}
    assert load_kwargs("auto", 0) == {"device_map": "auto"}  # no GPU visible here: no memory limits
    assert max_memory([80 * GIB, 80 * GIB]) == {0: int(0.85 * 80 * GIB), 1: int(0.85 * 80 * GIB), "cpu": 0}
    with pytest.raises(ValueError, match="no.*visible"):
        max_memory([])


EXPLICIT = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.language_model": "cpu",
    "lm_head": "cpu",
}


@pytest.mark.parametrize("device_map", ["auto", EXPLICIT])
def test_a_cell_loaded_with_a_device_map_equals_a_plain_load(tmp_path, device_map) -> None:
    from mmflow.config.spec import ModelSpec
    from mmflow.execution.runtime import run_cells
    from mmflow.models.registry import load_model
    from mmflow.storage.store import CellStore

    plain_cfg = model_config("tiny-llava")
    mapped_cfg = {**plain_cfg, "device_map": device_map}
    plain = load_model(ModelSpec.from_mapping(plain_cfg))
    mapped = load_model(ModelSpec.from_mapping(mapped_cfg))
    assert load_kwargs(device_map, None) == {"device_map": device_map}  # from_pretrained gets the map
    results = {}
    for loaded, cfg, folder in (
        (plain, plain_cfg, tmp_path / "plain"),
        (mapped, mapped_cfg, tmp_path / "map"),
    ):
        config = cell_config(
            folder, model=cfg["name"], n_samples=2, engine={"name": "fast", "attention": "sdpa"}
        )
        config["model"] = cfg
        (outcome,) = run_cells(loaded, [config])
        assert outcome.status == "done", outcome.error
        cell_dir = folder / CellStore(folder, config).id
        assert json.loads((cell_dir / "cell.json").read_text())["engine"] == "fast"  # one device: no fallback
        results[cfg.get("device_map") is None] = pd.read_parquet(cell_dir / "results.parquet")
    assert len(results[True]) > 0
    pd.testing.assert_frame_equal(results[True], results[False])
