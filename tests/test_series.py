"""The LLaVA series beyond the paper and Qwen2.5-VL (issue 17): exact fast engine, prompts, object patches."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cell_config, model_config, noise_sample
from test_fast_engine import KNOCKOUTS, assert_same, named_jobs, prepared, run_both

from mmflow.config.spec import ModelSpec
from mmflow.data.sample import Box
from mmflow.execution.runtime import run_cells
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups
from mmflow.inputs.object_patches import object_token_flags
from mmflow.inputs.prompts import build_prompt
from mmflow.knockout import make_engine
from mmflow.knockout.attention import knockout_undefined_reason, prepare_model
from mmflow.knockout.fast import FastEngine
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import BlockEdges, KnockoutJob
from mmflow.models.registry import load_model

SERIES = ("tiny-llava-1.6-mistral", "tiny-llava-1.6-34b", "tiny-llava-onevision", "tiny-qwen2.5-vl")
DECODERS = {
    "tiny-llava-1.6-mistral": "mistral",
    "tiny-llava-1.6-34b": "llama",
    "tiny-llava-onevision": "qwen2",
    "tiny-qwen2.5-vl": "qwen2_5_vl_text",
}
# Parity images: the smallest that still exercise each family's tiling (tall anyres tiles with unpadding
# for LLaVA-NeXT, a wide OneVision grid, Qwen2.5-VL's dynamic resolution at a GQA size); the 500 x 375
# figures of the table in docs/models.md come from `scripts/series_table.py`.
PARITY_SIZES = {
    "tiny-llava-1.6-mistral": (120, 200),
    "tiny-llava-1.6-34b": (120, 200),
    "tiny-llava-onevision": (200, 120),
    "tiny-qwen2.5-vl": (500, 375),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def series() -> dict:
    return {name: load_model(ModelSpec.from_mapping(model_config(name))) for name in SERIES}


@pytest.mark.parametrize("name", SERIES)
def test_fast_engine_is_exact_on_every_series_model(series, tmp_path, name):
    """Every knockout type at windows 1, 3 and full depth: fast == reference within 1e-5 in p."""
    loaded = series[name]
    assert loaded.model.config.get_text_config().model_type == DECODERS[name]
    assert make_engine("fast", loaded, "sdpa").name == "fast"
    rng = np.random.default_rng(17)
    inputs, groups = prepared(loaded, tmp_path, rng, PARITY_SIZES[name])
    jobs = named_jobs(groups, loaded.n_layers, rng)
    assert len(jobs) == 3 * len(KNOCKOUTS)
    fast, ref, clean = run_both(loaded, inputs, jobs)
    assert_same(fast, ref)
    assert (ref - clean.logprobs).abs().max() > 1e-2  # the knockouts do change the output
    empty = KnockoutJob(BlockEdges(groups.image, groups.question), range(0))
    engine = FastEngine(loaded, "sdpa")
    clean_fast = engine.clean(inputs, first_target=int(groups.question[0]))
    assert torch.equal(engine.run(clean_fast, [empty])[0], clean.logprobs)  # empty knockout == clean


def test_mistral_window_in_use_falls_back_per_sample(series, tmp_path, monkeypatch):
    """sliding_window 4096 is set but cuts nothing at these lengths (fast, above); one that cuts must not."""
    loaded = series["tiny-llava-1.6-mistral"]
    text = loaded.model.config.get_text_config()
    assert text.sliding_window == 4096
    inputs, groups = prepared(loaded, tmp_path, np.random.default_rng(3), (120, 200))
    monkeypatch.setattr(text, "sliding_window", inputs.length // 2)
    jobs = [KnockoutJob(BlockEdges(groups.image, groups.question), range(2, 5))]
    engine = make_engine("fast", loaded, "sdpa")
    fast, ref, _ = run_both(loaded, inputs, jobs, engine)
    assert torch.equal(fast, ref)
    assert f"sliding window {inputs.length // 2} in use" in engine.name


def test_qwen_rotary_tables_are_the_clean_runs_own(series, tmp_path):
    """Qwen2.5-VL: the cached cos table is the model's multimodal one, not positions from indices."""
    loaded = series["tiny-qwen2.5-vl"]
    inputs, groups = prepared(loaded, tmp_path, np.random.default_rng(4), (500, 375))
    clean = FastEngine(loaded, "sdpa").clean(inputs, first_target=0)
    inner = loaded.model.model
    tensors = inputs.tensors
    positions, _ = inner.get_rope_index(
        tensors["input_ids"],
        mm_token_type_ids=tensors["mm_token_type_ids"],
        image_grid_thw=tensors["image_grid_thw"],
        attention_mask=tensors["attention_mask"],
    )  # [3, 1, T]
    after = int(groups.image[-1]) + 2  # the first text token after <|vision_end|>
    image_max = int(positions[:, 0, groups.image].max())
    assert positions[:, 0, after].tolist() == [image_max + 2] * 3  # resumes after the image (and vision_end)
    rotary = inner.language_model.rotary_emb
    hidden = torch.zeros(1, inputs.length, 1)
    assert torch.allclose(clean.cos, rotary(hidden, positions)[0][0], atol=1e-6)
    naive = rotary(hidden, torch.arange(inputs.length)[None])[0][0]
    assert not torch.allclose(clean.cos[after:], naive[after:], atol=1e-3)


def test_rotary_tables_of_another_layout_are_not_guessed(series, tmp_path):
    """A [3, T, d] table (Qwen2-VL's older per-section layout) is refused per sample, never sliced."""
    loaded = series["tiny-qwen2.5-vl"]
    inputs, groups = prepared(loaded, tmp_path, np.random.default_rng(6), (300, 200))
    engine = FastEngine(loaded, "sdpa")
    clean = engine.clean(inputs, first_target=int(groups.question[0]))
    clean.cos, clean.sin = clean.cos.expand(3, -1, -1), clean.sin.expand(3, -1, -1)
    jobs = [KnockoutJob(BlockEdges(groups.image, groups.question), range(1, 4))]
    reference = ReferenceEngine(loaded, "sdpa")
    assert torch.equal(engine.run(clean, jobs), reference.run(reference.clean(inputs), jobs))
    assert "rotary tables (3, " in engine.name


def test_object_patches_on_known_boxes_onevision(series):
    """SigLIP 384 px / 14 px: a 384 x 384 image is one tile plus the base view, 27 x 27 patches each."""
    loaded = series["tiny-llava-onevision"]
    inputs = _blank_inputs(loaded, (384, 384))
    box = Box(0.0, 0.0, 42.0, 42.0)  # patches (0..2, 0..2)
    is_object, is_patch = object_token_flags(loaded, inputs, (box,))
    assert is_object.numel() == int((inputs.input_ids == loaded.model.config.image_token_id).sum())
    base = [r * 27 + c for r in range(3) for c in range(3)]
    tile = [729 + r * 28 + c for r in range(3) for c in range(3)]  # 27 patches + a newline per row
    assert torch.nonzero(is_object).flatten().tolist() == base + tile
    assert (~is_patch).sum() == 27 and not is_patch[729 + 27]
    edge = Box(378.0, 0.0, 6.0, 384.0)  # the 6 px the 27 x 14 px patch grid never sees
    assert not object_token_flags(loaded, inputs, (edge,))[0].any()


def test_object_patches_follow_onevision_downsizing(series):
    """A large image is downsized by bilinear interpolation (anyres_max_9): flags still match the tokens."""
    loaded = series["tiny-llava-onevision"]
    inputs = _blank_inputs(loaded, (2000, 1500))
    n_image = int((inputs.input_ids == loaded.model.config.image_token_id).sum())
    left = Box(0.0, 0.0, 1000.0, 1500.0)
    is_object, is_patch = object_token_flags(loaded, inputs, (left,))
    assert is_object.numel() == n_image and 729 + 9 * 729 < n_image + 900  # downsized near 9 crops
    tiles = torch.nonzero(is_patch).flatten()[729:]  # grid tokens after the base view
    rows = tiles.numel() // int((~is_patch).sum())
    flags = is_object[tiles].reshape(-1, rows)
    assert flags[:, : rows // 2 - 1].all() and not flags[:, rows // 2 + 2 :].any()  # left half only


def test_object_patches_on_known_boxes_qwen(series, tmp_path):
    """Qwen2.5-VL: 504 x 364 needs no resize; 14 px patches merged 2 x 2 -> a 13 x 18 token grid."""
    loaded = series["tiny-qwen2.5-vl"]
    box = Box(56.0, 28.0, 56.0, 56.0)  # patch cols 4..7, rows 2..5 -> merged cols 2..3, rows 1..2
    sample = noise_sample(tmp_path, np.random.default_rng(5), size=(504, 364), box=box)
    inputs = encode(loaded, sample)
    groups = build_token_groups(loaded, inputs, sample)
    assert groups.image.numel() == 13 * 18
    expected = [1 * 18 + 2, 1 * 18 + 3, 2 * 18 + 2, 2 * 18 + 3]
    assert groups.object.tolist() == groups.image[expected].tolist()
    assert groups.nonobject.numel() == 13 * 18 - 4


def _blank_inputs(loaded, size):
    from PIL import Image

    from mmflow.inputs.encode import ModelInputs

    prompt = build_prompt(loaded.prompt_format, "Is it red?")
    encoded = loaded.processor(text=prompt.text, images=Image.new("RGB", size), return_tensors="pt")
    return ModelInputs(prompt, dict(encoded), torch.zeros(0, 2), [], size)


PROMPTS = {
    "mistral_instruct": (
        "[INST] <image>\nIs it red? \nAnswer the question using a single word or phrase. [/INST]"
    ),
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n<image>\nIs it red? \n"
        "Answer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nIs it red? \n"
        "Answer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\nIs it red? \n"
        "Answer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize("fmt", sorted(PROMPTS))
def test_series_prompts_are_written_out(fmt):
    prompt = build_prompt(fmt, "Is it red?")
    assert prompt.text == PROMPTS[fmt]
    assert prompt.text[slice(*prompt.question_span)] == "Is it red?"
    assert prompt.add_bos == (fmt == "mistral_instruct")


def test_mistral_replica_uses_the_real_vocabulary(series):
    tokenizer = series["tiny-llava-1.6-mistral"].tokenizer
    assert tokenizer("[INST]", add_special_tokens=True)["input_ids"] == [1, 733, 16289, 28793]
    assert tokenizer.convert_tokens_to_ids(["▁", ":", "<image>", "<pad>"]) == [28705, 28747, 32000, 32001]


@pytest.mark.parametrize(
    ("config_class", "words"),
    [
        ("MllamaConfig", "cross-attention"),
        ("Gemma3Config", "bidirectionally"),
        ("PaliGemmaConfig", "bidirectionally"),
    ],
)
def test_knockout_is_refused_where_it_is_not_defined(config_class, words):
    import transformers

    config = getattr(transformers, config_class)()
    reason = knockout_undefined_reason(config)
    assert reason is not None and words in reason and "not defined" in reason
    with pytest.raises(NotImplementedError, match=words):
        prepare_model(types.SimpleNamespace(config=config), "sdpa")


@pytest.mark.parametrize("name", SERIES)
def test_series_cell_runs_end_to_end_on_the_fast_engine(series, tmp_path, monkeypatch, name):
    config = cell_config(tmp_path, model=name, engine={"name": "fast", "attention": "sdpa"}, n_samples=1)
    config["knockout"] = {"name": "question_to_last", "source": "question", "target": "last"}
    (outcome,) = run_cells(series[name], [config])
    assert outcome.status == "done", outcome.error
    meta = json.loads((Path(outcome.path) / "cell.json").read_text())
    assert meta["engine"] == "fast"
    assert meta["counts"]["scored"] == 1


REAL = {  # name: (layers, default window, decoder family in the legend)
    "llava-1.6-mistral-7b": (32, 7, "LLaVA-1.6 (Mistral) 7B"),
    "llava-1.6-34b": (60, 13, "LLaVA-1.6 (Yi) 34B"),
    "llava-onevision-0.5b": (24, 5, "LLaVA-OneVision (Qwen2) 0.5B"),
    "llava-onevision-7b": (28, 7, "LLaVA-OneVision (Qwen2) 7B"),
    "qwen2.5-vl-7b": (28, 7, "Qwen2.5-VL 7B"),
}


def test_series_sweep_has_every_llava_model_at_its_scaled_window(monkeypatch):
    from conftest import ROOT
    from hydra import compose, initialize_config_dir

    from mmflow.config.dirs import CONF_DIR

    monkeypatch.chdir(ROOT)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="series", return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        models = params.model.split(",")
        assert cfg.sweep_name == "series" and params.data == "gqa"
        assert len(models) * len(params.task.split(",")) * len(params.knockout.split(",")) == 8 * 6 * 6
        assert set(REAL) - set(models) == {"qwen2.5-vl-7b"}  # every LLaVA model of the issue
        assert {"llava-1.5-7b", "llava-1.5-13b", "llava-1.6-vicuna-7b", "llama3-llava-next-8b"} <= set(models)
        for name, (layers, window, _) in REAL.items():
            one = compose(config_name="series", overrides=[f"model={name}"])
            assert (one.model.n_layers, one.window) == (layers, window)
            assert abs(window - 7 * layers / 32) <= 1  # the paper's 7 of 32, scaled


def test_cross_model_legend_names_family_and_size(tmp_path):
    from test_report import curve_values, fabricate_cell

    from mmflow.report.figures import plot_cross_model
    from mmflow.storage.cell_data import load_cells
    from mmflow.storage.store import atomic_write_json, cell_id

    dirs = []
    for name, (layers, _, legend) in REAL.items():
        cell_dir = fabricate_cell(tmp_path, name, curve_values(3, layers, 10.0), "question_to_last")
        meta = json.loads((cell_dir / "cell.json").read_text())
        family, size = legend.rsplit(" ", 1)
        config = {**meta["config"], "model": {**meta["config"]["model"], "family": family, "size": size}}
        assert cell_id(config) == meta["cell_id"]  # legend labels are not part of a cell's id
        atomic_write_json(cell_dir / "cell.json", {**meta, "config": config})
        dirs.append(cell_dir)
    cells, _ = load_cells(dirs)
    ax = plot_cross_model(cells).axes[0]
    labels = {line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert labels == {f"{legend} (L = {layers})" for layers, _, legend in REAL.values()}


@pytest.mark.parametrize("name", SERIES)
def test_answer_from_the_clean_cache_equals_generate(series, tmp_path, name):
    """The answer decoded from the fast clean pass's cache is `generate`'s (Qwen2.5-VL: the decode steps
    continue its multimodal positions through the model's rope deltas)."""
    from mmflow.execution.answer import greedy_token_ids

    loaded = series[name]
    inputs, _ = prepared(loaded, tmp_path, np.random.default_rng(8), PARITY_SIZES[name])
    with torch.no_grad():
        out = loaded.model.generate(
            **inputs.tensors, max_new_tokens=5, do_sample=False, eos_token_id=None, min_new_tokens=5
        )
    expected = out[0, inputs.length :].tolist()
    config = loaded.model.generation_config
    eos = config.eos_token_id
    config.eos_token_id = None
    try:
        clean = FastEngine(loaded, "sdpa").clean(inputs, first_target=inputs.length - 3)
        assert greedy_token_ids(loaded, clean, 5) == expected
    finally:
        config.eos_token_id = eos
