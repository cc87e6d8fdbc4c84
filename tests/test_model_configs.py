"""Every model mmflow builds keeps its config and seeded weights: tiny, series, toy, GPU check, replicas.

The fixture `fixtures/model_configs.json` was first written from the builders as they were before the
LLaVA-family configs were built in one place (`mmflow.models.synthetic.builder`). It holds, for each model
(the
replicas at CPU and at full size, the GPU check's models at dry-run and, on the meta device, at full size),
the config fields that decide what the model computes (`semantic_fields`: architecture, widths and depths,
heads, token ids, rope, norms, vision geometry, dtype) and, for the models with weights, a per-tensor
fingerprint (sum and sum of absolute values, float64) of the seeded random initialisation.

Bookkeeping that `transformers` adds, drops or reorders from one release to the next (its version string,
`_name_or_path`, output flags, label maps) is not part of the snapshot, so a new transformers release passes
as long as the model it builds is the same. Rewrite the fixture only for an intended change:
`python tests/test_model_configs.py --write`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "model_configs.json"
TINY = ("tiny-llava", "tiny-llava-next")
SERIES = ("tiny-llava-1.6-mistral", "tiny-llava-1.6-34b", "tiny-llava-onevision", "tiny-qwen2.5-vl")
REPLICAS = ("llava-1.5-7b", "llava-1.5-13b", "llava-1.6-vicuna-7b", "llama3-llava-next-8b")
GPU = ("llava-1.5-7b", "llama3-llava-next-8b")
CASES = (
    [f"tiny/{n}" for n in TINY]
    + [f"series/{n}" for n in SERIES]
    + ["toy/toy-llava"]
    + [f"replica/{n}" for n in REPLICAS]
    + [f"replica-full/{n}" for n in REPLICAS]
    + [f"gpu-dry/{n}" for n in GPU]
    + [f"gpu-full/{n}" for n in GPU]
)


def fingerprint(model) -> dict[str, list[float]]:
    """{parameter or buffer name: [sum, sum of |x|]} in float64 (robust to summation order at 1e-9)."""
    return {
        name: [float(t.double().sum()), float(t.double().abs().sum())]
        for name, t in model.state_dict().items()
        if t.is_floating_point() and t.device.type != "meta"
    }


def build(case: str):
    """(config dict, weight fingerprint or None) of one case, from the public builders."""
    kind, name = case.split("/")
    if kind == "tiny":
        from mmflow.models.synthetic import tiny

        spec = tiny.TINY_SPECS[name]
        tokenizer = tiny_tokenizer(name)
        model = tiny.build_model(spec, tokenizer)
    elif kind == "series":
        from mmflow.models.synthetic import tiny_series

        spec = tiny_series.SERIES_SPECS[name]
        corpus = tiny_series.tokenizer_corpus(("vicuna_v1", "llama3", tiny_series.PROMPT_FORMAT[name]))
        model = tiny_series.build_series_model(spec, tiny_series.build_series_tokenizer(spec, corpus))
    elif kind == "toy":
        from mmflow.models.synthetic import toy

        cfg = toy.ToyConfig()
        model = toy.build_model(cfg, toy.build_processor_for(cfg).tokenizer)
    elif kind.startswith("replica"):
        from mmflow.models.synthetic import replica
        from mmflow.models.synthetic.builder import build_weights

        spec = replica.REPLICA_SPECS[name]
        config = replica.replica_config(spec, replica.build_tokenizer(spec), full_size=kind == "replica-full")
        if kind == "replica-full":
            return config.to_dict(), None
        model = build_weights(config, seed=0, dtype=torch.float32)
    else:
        from mmflow.bench import gpu_check

        if kind == "gpu-dry":
            loaded = gpu_check.build_full_size(name, gpu_check.DRY[name], torch.float32, torch.device("cpu"))
        else:
            size = gpu_check.MODELS[name][1]
            loaded = gpu_check.build_full_size(name, size, torch.float16, torch.device("meta"))
        model = loaded.model
    return model.config.to_dict(), (fingerprint(model) or None)


# The config fields that decide what a model computes, at the top level and inside its text and vision
# configs: everything `mmflow.models.synthetic.builder` sets, and the architecture defaults it relies on.
MODEL_FIELDS = {
    "model_type", "dtype", "tie_word_embeddings", "image_token_index", "image_token_id", "video_token_id",
    "video_token_index", "vision_start_token_id", "vision_end_token_id", "projector_hidden_act",
    "multimodal_projector_bias", "vision_feature_layer", "vision_feature_select_strategy",
    "image_grid_pinpoints", "image_seq_length", "vision_aspect_ratio", "pad_token_id",
}  # fmt: skip
TEXT_FIELDS = {
    "model_type", "dtype", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_parameters",
    "rms_norm_eps", "hidden_act", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id",
}  # fmt: skip
VISION_FIELDS = {
    "model_type", "dtype", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "depth", "num_heads", "image_size", "patch_size", "projection_dim", "hidden_act", "layer_norm_eps",
    "num_channels", "in_channels", "vision_use_head", "out_hidden_size", "fullatt_block_indexes",
    "window_size", "spatial_merge_size", "temporal_patch_size", "tokens_per_second", "rope_parameters",
}  # fmt: skip


def _normal(value):
    return json.loads(json.dumps(value, default=str))


def semantic_fields(config: dict) -> dict:
    """The fields of `config.to_dict()` that decide the computation (JSON-normal; absent keys left out)."""
    out = {k: v for k, v in config.items() if k in MODEL_FIELDS}
    for part, fields in (("text_config", TEXT_FIELDS), ("vision_config", VISION_FIELDS)):
        if isinstance(config.get(part), dict):
            out[part] = {k: v for k, v in config[part].items() if k in fields}
    return _normal(out)


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("case", CASES)
def test_config_and_weights_unchanged(case: str, expected: dict) -> None:
    config, weights = build(case)
    want = expected[case]
    assert semantic_fields(config) == want["config"]
    if want["weights"] is None:
        assert weights is None
        return
    assert_same_weights(weights, want["weights"])


def assert_same_weights(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, (total, absolute) in want.items():
        assert got[name] == pytest.approx([total, absolute], rel=1e-9, abs=1e-9), name


def test_snapshot_ignores_library_bookkeeping_but_not_a_real_field(expected: dict) -> None:
    """A new transformers' version string or added/dropped bookkeeping keys pass; one real field or one
    weight changed fails."""
    config, weights = build("tiny/tiny-llava")
    want = expected["tiny/tiny-llava"]
    noisy = {**config, "transformers_version": "99.0.0", "_name_or_path": "x", "brand_new_flag": True}
    noisy.pop("output_attentions", None)
    noisy["text_config"] = {**config["text_config"], "transformers_version": "99.0.0"}
    assert semantic_fields(noisy) == want["config"]
    for part, key in (
        ("text_config", "num_hidden_layers"),
        ("vision_config", "patch_size"),
        (None, "image_token_index"),
    ):
        changed = json.loads(json.dumps(config, default=str))
        target = changed[part] if part else changed
        target[key] = target[key] + 1
        assert semantic_fields(changed) != want["config"], key
    name = next(iter(weights))
    nudged = {**weights, name: [weights[name][0] + 1e-3, weights[name][1] + 1e-3]}
    with pytest.raises(AssertionError):
        assert_same_weights(nudged, want["weights"])


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    out = {}
    for case in CASES:
        config, weights = build(case)
        out[case] = {"config": semantic_fields(config), "weights": weights}
        print(case, flush=True)
    FIXTURE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


def test_builder_scales_qwen_fields_as_the_real_model() -> None:
    """At Qwen2.5-VL-7B's sizes the derived fields are the real ones (its config.json)."""
    from mmflow.models.synthetic.builder import ModelSpec, TextSpec, VisionSpec, text_config, vision_config

    spec = ModelSpec(
        "qwen2_5_vl",
        TextSpec(3584, 18944, 28, 28, 4, 1e6, family=None),
        VisionSpec(1280, 3420, 32, 16),
        vocab_size=152064,
        image_token_id=151655,
    )
    assert text_config(spec)["rope_parameters"]["mrope_section"] == [16, 24, 24]
    vision = vision_config(spec)
    assert vision["fullatt_block_indexes"] == [7, 15, 23, 31] and vision["out_hidden_size"] == 3584


def test_builder_architecture_defaults_and_overrides() -> None:
    from mmflow.models.synthetic.builder import NEXT_PINPOINTS, ModelSpec, TextSpec, VisionSpec, model_config

    dims = dict(
        text=TextSpec(32, 64, 2, 4, 2), vision=VisionSpec(32, 64, 2, 2), vocab_size=100, image_token_id=99
    )
    nxt = model_config(ModelSpec("llava_next", **dims))
    assert (nxt.vision_feature_layer, nxt.vision_feature_select_strategy) == (-2, "default")
    assert nxt.image_grid_pinpoints == NEXT_PINPOINTS and nxt.text_config.num_key_value_heads == 2
    one = model_config(ModelSpec("llava_onevision", **dims, feature_layer=-2))
    assert (one.vision_feature_layer, one.vision_config.model_type) == (-2, "siglip_vision_model")
