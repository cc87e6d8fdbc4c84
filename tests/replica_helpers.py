"""Shared helpers of the replica and parity tests: real-model configs pointed at cached replicas."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
REAL_MODELS = ("llava-1.5-7b", "llava-1.5-13b", "llava-1.6-vicuna-7b", "llama3-llava-next-8b")
NEXT_MODELS = ("llava-1.6-vicuna-7b", "llama3-llava-next-8b")


def model_yaml(name: str) -> Path:
    """conf/model/<name>.yaml."""
    path = ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def real_model_config(name: str, parity: str, checkpoint: str | None = None, legacy: bool | None = None):
    """A real model's resolved config (its `parity: ${parity}` bound), on CPU in float32, on a replica."""
    from mmflow.models.synthetic.replica import ensure_replica

    tree = OmegaConf.create({"parity": parity, "model": OmegaConf.load(model_yaml(name))})
    config = OmegaConf.to_container(tree, resolve=True)["model"]
    config.update(
        checkpoint=checkpoint or str(ensure_replica(name, legacy=legacy)), dtype="float32", device="cpu"
    )
    return config


@cache
def loaded_replica(name: str, parity: str, legacy: bool | None = None):
    """The CPU replica of `name` loaded through the registry in `parity` mode (cached per test session).

    The paper-mode model is the corrected one's copy with `apply_parity` applied (what `load_model`
    does last), so each replica's tokenizer is parsed once; `test_cli_builds_a_loadable_folder` and
    `test_paper_cell_on_a_replica` load through `load_model` itself.
    """
    import copy
    import dataclasses

    from mmflow.config.spec import ModelSpec
    from mmflow.models.registry import apply_parity, load_model

    if parity == "corrected":
        return load_model(ModelSpec.from_mapping(real_model_config(name, parity, legacy=legacy)))
    base = loaded_replica(name, "corrected", legacy)
    model, processor = copy.deepcopy(base.model), copy.copy(base.processor)
    processor.image_processor = copy.deepcopy(base.processor.image_processor)
    apply_parity(model, processor, parity)
    return dataclasses.replace(base, model=model, processor=processor, parity=parity)
