"""parity=paper|corrected: anyres tile choice, pixel values and object patches against the original LLaVA
code, bad boxes that only skip what needs them, and the cell-id rule."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from llava_oracle import oracle, original_image_token_count  # noqa: E402
from replica_helpers import NEXT_MODELS, REAL_MODELS, loaded_replica, real_model_config  # noqa: E402

from mmflow.data.sample import Box, Sample  # noqa: E402
from mmflow.errors import GroupError
from mmflow.inputs.encode import encode  # noqa: E402
from mmflow.inputs.groups import build_token_groups  # noqa: E402
from mmflow.models.synthetic.builder import NEXT_PINPOINTS  # noqa: E402
from mmflow.models.synthetic.processor_builder import CLIP_MEAN, CLIP_STD  # noqa: E402

ORACLE = oracle()
needs_oracle = pytest.mark.skipif(ORACLE is None, reason="llava-torch not installed (scripts/setup.sh test)")
TIE_SIZES = [(320, 240), (240, 320), (240, 166), (176, 144), (256, 256)]
COMMON_SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500)]


def sample_of(size: tuple[int, int], boxes=(Box(40, 30, 100, 80),), box_issue=None) -> Sample:
    return Sample(
        question_id="q",
        task="QueryAttr",
        image_path=Path("/nonexistent.jpg"),
        question="What colour is the jar?",
        answer="red",
        image_size=size,
        object_names=("jar",) * len(boxes),
        object_boxes=tuple(boxes),
        box_issue=box_issue,
    )


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def original_processor(**changes):
    """The CLIP-L/336 image processor the original code calls (`processor.preprocess`), PIL backend."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    settings = dict(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )
    return CLIPImageProcessorPil(**{**settings, **changes})


def original_pixels(image: Image.Image, aspect: str, processor=None) -> torch.Tensor:
    """`llava.mm_utils.process_images` as the paper called it: [views, 3, 336, 336]."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(image_aspect_ratio=aspect, image_grid_pinpoints=NEXT_PINPOINTS)
    out = ORACLE.mm.process_images([image], processor or original_processor(), cfg)
    return out.reshape(-1, 3, 336, 336)


# ---------------------------------------------------------------- anyres tile choice


@pytest.mark.slow
@needs_oracle
@pytest.mark.parametrize("name", NEXT_MODELS)
def test_image_token_counts(name: str) -> None:
    """paper = the original code's tiles and packing; corrected = transformers' order; the model's own
    packing agrees with the processor in both modes (else groups raise image_packing_mismatch)."""
    counts = {}
    for parity in ("paper", "corrected"):
        loaded = loaded_replica(name, parity)
        for size in TIE_SIZES + COMMON_SIZES:
            inputs = encode(loaded, sample_of(size), Image.new("RGB", size))
            counts[parity, size] = int((inputs.input_ids == loaded.model.config.image_token_id).sum())
            if size in TIE_SIZES:  # the model's packing gives as many features as the processor tokens
                groups = build_token_groups(loaded, inputs, sample_of(size))
                assert groups.image.numel() == counts[parity, size]
    for size in TIE_SIZES + COMMON_SIZES:
        original = original_image_token_count(ORACLE.mm, ORACLE.unpad_image, size, NEXT_PINPOINTS)
        assert counts["paper", size] == original, size
    for size in COMMON_SIZES:  # no ties: both modes agree
        assert counts["corrected", size] == counts["paper", size]
    assert counts["paper", (320, 240)] == 1026 and counts["corrected", (320, 240)] == 1368
    assert counts["paper", (500, 375)] == 2340 and counts["paper", (375, 500)] == 2352
    assert sum(counts["corrected", s] != counts["paper", s] for s in TIE_SIZES) == 4  # 256x256: transposed


@needs_oracle
def test_square_tie_gets_transposed_tiles() -> None:
    """256x256: the original code picks 336x672 as (width, height), i.e. one column of two tiles."""
    assert ORACLE.mm.select_best_resolution((256, 256), NEXT_PINPOINTS) == (336, 672)
    for parity, shape in (("paper", (2, 1)), ("corrected", (1, 2))):
        loaded = loaded_replica("llava-1.6-vicuna-7b", parity)
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        rows, cols = get_anyres_image_grid_shape((256, 256), loaded.model.config.image_grid_pinpoints, 336)
        assert (rows, cols) == shape


# ---------------------------------------------------------------- pixel values


@needs_oracle
@pytest.mark.parametrize("name", REAL_MODELS)
def test_pixel_values_equal_the_original_preprocessing(name: str) -> None:
    """pad: expand2square with the mean colour, CLIP resize and crop; anyres: squashed base view,
    resize_and_pad_image, 336 px tiles. Paper mode equals the original for every size, ties included."""
    aspect = "anyres" if name in NEXT_MODELS else "pad"
    sizes = [(500, 375), (333, 500), (320, 240), (256, 256)]
    for parity in ("paper", "corrected"):
        loaded = loaded_replica(name, parity)
        for seed, size in enumerate(sizes):
            image = noise(size, seed)
            ours = encode(loaded, sample_of(size), image).tensors["pixel_values"].reshape(-1, 3, 336, 336)
            theirs = original_pixels(image, aspect)
            tie = aspect == "anyres" and size in TIE_SIZES
            if parity == "paper" or not tie:
                assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5), (parity, size)
            else:
                assert ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-5)


# ---------------------------------------------------------------- object patches


def paper_object_indices(image_size, boxes, aspect: str) -> set[int]:
    """The paper's object patches: create_mask_with_bbox (red, inclusive end, on green), the mask
    through process_images without rescale/normalise, prepare_image_patch_bbx, any pixel exactly red."""
    mask = Image.new("RGB", image_size, (0, 255, 0))
    draw = ImageDraw.Draw(mask)
    for b in boxes:
        draw.rectangle((int(b.x), int(b.y), int(b.x) + int(b.w), int(b.y) + int(b.h)), fill=(255, 0, 0))
    pixels = original_pixels(mask, aspect, original_processor(do_rescale=False, do_normalize=False))
    patches = pixels.unfold(2, 14, 14).unfold(3, 14, 14).reshape(len(pixels), 3, 576, 196).permute(0, 2, 3, 1)
    if aspect == "anyres":
        cols, rows = ORACLE.mm.get_anyres_image_grid_shape(image_size, NEXT_PINPOINTS, 336)
        tiles = patches[1:].reshape(rows, cols, 24, 24, 588).permute(4, 0, 2, 1, 3)
        tiles = tiles.flatten(1, 2).flatten(2, 3)
        tiles = ORACLE.unpad_image(tiles, image_size)
        tiles = torch.cat([tiles, torch.full((*tiles.shape[:-1], 1), -1.0)], dim=-1).flatten(1, 2)
        patches = torch.cat([patches[0], tiles.permute(1, 0).reshape(-1, 196, 3)])
    else:
        patches = patches[0]
    red = (patches == torch.tensor([255.0, 0.0, 0.0])).all(dim=-1).any(dim=-1)
    return set(torch.nonzero(red).flatten().tolist())


@needs_oracle
@pytest.mark.parametrize("name", REAL_MODELS)
def test_paper_object_patches_equal_the_papers(name: str) -> None:
    aspect = "anyres" if name in NEXT_MODELS else "pad"
    loaded = loaded_replica(name, "paper")
    cases = [
        ((500, 375), (Box(40, 30, 100, 80),)),
        ((375, 500), (Box(0, 0, 375, 20), Box(200, 410, 60, 90))),
        ((320, 240), (Box(13, 27, 29, 15),)),
        ((333, 500), (Box(100, 100, 1, 1),)),
    ]
    for size, boxes in cases:
        sample = sample_of(size, boxes)
        groups = build_token_groups(loaded, encode(loaded, sample, Image.new("RGB", size)), sample)
        ours = set((groups.object - groups.image[0]).tolist())
        assert ours == paper_object_indices(size, boxes, aspect), (size, boxes)


def test_known_box_object_sets_in_both_modes() -> None:
    """A 336x336 image (no padding, no resize): box x 14-41, y 28-41 covers patch row 2, columns 1-2;
    the paper's inclusive end pixel (42, 42) adds column 3 and row 3."""
    sample = sample_of((336, 336), (Box(14, 28, 28, 14),))
    found = {}
    for parity in ("paper", "corrected"):
        loaded = loaded_replica("llava-1.5-7b", parity)
        groups = build_token_groups(loaded, encode(loaded, sample, Image.new("RGB", (336, 336))), sample)
        found[parity] = (groups.object - groups.image[0]).tolist()
        assert groups.object.numel() + groups.nonobject.numel() == 576
    assert found["corrected"] == [49, 50]
    assert found["paper"] == [49, 50, 51, 73, 74, 75]


# ---------------------------------------------------------------- bad boxes


def test_bad_box_skips_only_object_groups(tiny_llava, tmp_path: Path, monkeypatch) -> None:
    """A box outside the image: object/non-object knockouts record the skip, Image -> Question scores."""
    import pandas as pd
    from conftest import cell_config

    from mmflow.execution import runtime

    path = tmp_path / "img.jpg"
    noise((64, 48)).save(path)
    issue = ("box_outside_image", "central object box is outside the 64x48 image")
    bad = Sample("bad1", "QueryAttr", path, "What colour is the jar?", "red", (64, 48), box_issue=issue)
    monkeypatch.setattr(runtime, "load_samples", lambda config: [bad])
    knockouts = [("image_to_question", "image"), ("object_to_question", "object")]
    configs = [
        cell_config(tmp_path, knockout={"name": k, "source": src, "target": "question"}, n_samples=1)
        for k, src in knockouts
    ]
    outcomes = runtime.run_cells(tiny_llava, configs)
    paths = {k: Path(o.path) for (k, _), o in zip(knockouts, outcomes, strict=True)}
    rows = {k: pd.read_parquet(path / "samples.parquet").iloc[0] for k, path in paths.items()}
    assert rows["image_to_question"]["status"] == "scored"
    assert rows["object_to_question"]["status"] == "skipped"
    assert rows["object_to_question"]["skip_reason"] == "box_outside_image"
    assert len(pd.read_parquet(Path(outcomes[0].path) / "results.parquet")) == tiny_llava.n_layers


def test_bad_box_group_error() -> None:
    loaded = loaded_replica("llava-1.5-7b", "paper")
    issue = ("box_outside_image", "detail")
    sample = sample_of((500, 375), boxes=(), box_issue=issue)
    groups = build_token_groups(loaded, encode(loaded, sample, Image.new("RGB", (500, 375))), sample)
    assert groups.require("image").numel() == 576 and groups.require("question").numel() > 0
    for name in ("object", "nonobject"):
        with pytest.raises(GroupError) as err:
            groups.require(name)
        assert (err.value.reason, err.value.detail) == issue


# ---------------------------------------------------------------- cell ids and cell.json

# Ids of these configs before the `parity` key existed (computed with main's store.cell_id).
# Computed by main 13f7c92's `cell_id` on these configs with `data.cache_dir: null` (the default; where
# shapes are cached is not part of an id since issue 15).
OLD_IDS = {
    "tiny-llava": "734244fad2d1617f",
    "tiny-llava-next": "72e21a5947375f94",
    "toy-llava": "112e78476aa80ca0",
}


def test_cell_ids_keep_their_old_values_where_the_modes_agree() -> None:
    from conftest import cell_config

    from mmflow.storage.store import cell_id

    for model, old in OLD_IDS.items():
        for parity in ("paper", "corrected", None):
            extra = {} if parity is None else {"parity": parity}
            config = cell_config(Path("/tmp/x"), model=model, **extra)
            config["data"]["cache_dir"] = None
            assert cell_id(config) == old
    real = {p: cell_config(Path("/tmp/x"), parity=p, model="tiny-llava") for p in ("paper", "corrected")}
    for parity, config in real.items():
        config["model"] = real_model_config("llava-1.5-7b", parity, checkpoint="llava-hf/llava-1.5-7b-hf")
    assert cell_id(real["paper"]) != cell_id(real["corrected"])


def test_bad_parity_value_is_refused() -> None:
    from conftest import cell_config

    from mmflow.inputs.parity import effective_parity

    with pytest.raises(ValueError, match="parity must be one of"):
        effective_parity(cell_config(Path("/tmp/x"), parity="papers"))


@pytest.mark.slow
def test_paper_cell_on_a_replica(tmp_path: Path) -> None:
    """A whole cell in paper mode on the LLaMA-3 replica: parity in cell.json, fast engine = reference."""
    import json

    import pandas as pd
    from conftest import cell_config

    from mmflow.config.spec import ModelSpec
    from mmflow.execution.runtime import run_cells
    from mmflow.models.registry import load_model

    model = real_model_config("llama3-llava-next-8b", "paper")
    loaded = load_model(ModelSpec.from_mapping(model))
    assert loaded.parity == "paper" and loaded.model.config.image_grid_pinpoints[0] == [672, 336]
    results = {}
    for engine in ("fast", "reference"):
        config = cell_config(tmp_path / engine, parity="paper", model="tiny-llava", window=1, n_samples=1)
        config.update(model=model, engine={"name": engine, "attention": "sdpa"})
        outcome = run_cells(loaded, [config])[0]
        meta = json.loads((Path(outcome.path) / "cell.json").read_text())
        assert meta["status"] == "done" and meta["parity"] == "paper"
        results[engine] = pd.read_parquet(Path(outcome.path) / "results.parquet")
        samples = pd.read_parquet(Path(outcome.path) / "samples.parquet")
        assert json.loads(samples["groups"][0])["last"] == [int(json.loads(samples["groups"][0])["last"][0])]
    assert len(results["fast"]) == loaded.n_layers
    assert np.allclose(results["fast"]["p_new"], results["reference"]["p_new"], atol=1e-5)


def test_pil_backend_is_pinned(tmp_path: Path) -> None:
    """A processor whose image processor is not the PIL one gets the PIL one from the folder."""
    from types import SimpleNamespace

    from mmflow.models.registry import pin_pil_backend
    from mmflow.models.synthetic.replica import ensure_replica

    class LlavaNextImageProcessor:  # stands in for the torchvision backend (absent on CPU machines)
        pass

    processor = SimpleNamespace(image_processor=LlavaNextImageProcessor())
    pin_pil_backend(processor, str(ensure_replica("llava-1.6-vicuna-7b")))
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"


def test_legacy_cells_keep_their_ids_in_both_modes() -> None:
    """The cells main computed before `parity` existed (tests/fixtures/legacy_results) get the same ids
    from today's composed config, whichever mode is chosen (they are all tiny/toy-model cells)."""
    import json

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mmflow.analyses import canonical_config
    from mmflow.config.dirs import CONF_DIR
    from mmflow.storage.store import cell_id

    cells = json.loads((Path(__file__).parent / "fixtures" / "legacy_results" / "cells.json").read_text())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for old_id, overrides in cells.items():
            for parity in ("paper", "corrected"):
                cfg = compose(config_name="config", overrides=[*overrides, "logger=none", f"parity={parity}"])
                assert cell_id(canonical_config(OmegaConf.to_container(cfg, resolve=True))) == old_id


@pytest.mark.slow
def test_launch_with_a_replica_folder(tmp_path: Path) -> None:
    """`model=<real> model.checkpoint=<folder>` runs a cell end to end through launch.py."""
    import json
    import os
    import subprocess

    from replica_helpers import ROOT

    from mmflow.models.synthetic.replica import ensure_replica

    folder = ensure_replica("llava-1.5-7b")
    overrides = [
        "model=llava-1.5-7b",
        f"model.checkpoint={folder}",
        "model.dtype=float32",
        "model.device=cpu",
        "n_samples=1",
        "window=1",
        "require_correct=false",
        "logger=none",
        "parity=corrected",
        f"results_dir={tmp_path}",
        f"data.cache_dir={tmp_path / 'shapes'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (meta_path,) = [p for p in tmp_path.glob("*/cell.json") if not p.parent.name.startswith("_")]
    meta = json.loads(meta_path.read_text())
    assert meta["status"] == "done" and meta["parity"] == "corrected" and meta["model_path"] == str(folder)
    assert meta["counts"]["scored"] == 1
