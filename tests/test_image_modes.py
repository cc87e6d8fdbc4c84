"""Issue 23, item 2: every PIL mode is converted faithfully or skipped with a reason.

For each mode, one shapes scene is stored in that mode and toy-llava's answer (first answer token and
its probability) is compared with its answer on the plain 8-bit RGB image of the same scene: the grey
scene for greyscale modes, the scene over white where its background is transparent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import model_config
from PIL import Image

from mmflow.config.spec import ModelSpec
from mmflow.data.sample import Sample, Skip
from mmflow.data.shapes import load_shapes
from mmflow.errors import UNSUPPORTED_IMAGE_MODE
from mmflow.execution.prepare import prepare_or_skip
from mmflow.inputs.encode import encode, load_image
from mmflow.inputs.images import to_rgb
from mmflow.models.registry import load_model

pytestmark = pytest.mark.slow  # runs cells on a model per case: `make test`, not `make test-fast`

JUNK = (1, 2, 3)  # the colour hidden under transparent pixels


@pytest.fixture(scope="module")
def toy():
    return load_model(ModelSpec.from_mapping(model_config("toy-llava")))


@pytest.fixture(scope="module")
def scene(toy, tmp_path_factory) -> tuple[Sample, Image.Image]:
    """A colour question the toy answers right and confidently from the image, and its RGB image."""
    samples = load_shapes("QueryAttr", 8, seed=0, cache_dir=tmp_path_factory.mktemp("shapes"))
    sample = next(s for s in samples if isinstance(s, Sample) and "color" in s.question)
    with Image.open(sample.image_path) as image:
        rgb = image.convert("RGB")
    answer, p = first_answer(toy, sample, rgb)
    assert answer == sample.answer and p > 0.9  # "What color is the square?" purple 0.99
    assert first_answer(toy, sample, rgb.convert("L").convert("RGB"))[0] != answer  # it looks at colour
    return sample, rgb


def background_mask(rgb: Image.Image) -> np.ndarray:
    pixels = np.asarray(rgb)
    return (pixels == pixels[0, 0]).all(axis=-1)


def over_white(rgb: Image.Image) -> Image.Image:
    """The scene with its background white: what a transparent background shows (composited on white)."""
    pixels = np.asarray(rgb).copy()
    pixels[background_mask(rgb)] = 255
    return Image.fromarray(pixels)


def transparent(rgb: Image.Image) -> Image.Image:
    """RGBA: the background transparent and hiding a junk colour."""
    pixels = np.asarray(rgb).copy()
    mask = background_mask(rgb)
    pixels[mask] = JUNK
    alpha = np.where(mask, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([pixels, alpha]), mode="RGBA")


def grey16(rgb: Image.Image, mode: str) -> Image.Image:
    values = np.asarray(rgb.convert("L")).astype(np.uint16) * 257  # 8-bit grey scaled to 16 bits
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, rgb.size, values.astype(dtype).tobytes())


def palette_transparent(rgb: Image.Image) -> Image.Image:
    junked = np.asarray(rgb).copy()
    junked[background_mask(rgb)] = JUNK
    palette = Image.fromarray(junked).quantize(256)
    index = next(i for i, c in enumerate(np.asarray(palette.getpalette()).reshape(-1, 3)) if tuple(c) == JUNK)
    palette.info["transparency"] = index
    return palette


def grey_alpha(rgb: Image.Image) -> Image.Image:
    return transparent(rgb).convert("LA")


# mode -> (the image in that mode, the plain 8-bit RGB image of the same scene)
MODES: dict[str, tuple[Callable, Callable]] = {
    "RGB": (lambda s: s, lambda s: s),
    "1": (lambda s: s.convert("1"), lambda s: s.convert("1").convert("RGB")),
    "L": (lambda s: s.convert("L"), lambda s: s.convert("L").convert("RGB")),
    "I;16": (lambda s: grey16(s, "I;16"), lambda s: s.convert("L").convert("RGB")),
    "I;16L": (lambda s: grey16(s, "I;16L"), lambda s: s.convert("L").convert("RGB")),
    "I;16B": (lambda s: grey16(s, "I;16B"), lambda s: s.convert("L").convert("RGB")),
    "I;16N": (lambda s: grey16(s, "I;16N"), lambda s: s.convert("L").convert("RGB")),
    "P": (lambda s: s.quantize(256), lambda s: s),
    "P+transparency": (palette_transparent, over_white),
    "PA": (lambda s: palette_transparent(s).convert("PA"), over_white),
    "RGBA": (transparent, over_white),
    "RGBa": (lambda s: transparent(s).convert("RGBa"), over_white),
    "LA": (grey_alpha, lambda s: over_white(s).convert("L").convert("RGB")),
    "La": (lambda s: grey_alpha(s).convert("La"), lambda s: over_white(s).convert("L").convert("RGB")),
    "RGBX": (lambda s: s.convert("RGBX"), lambda s: s),
    "CMYK": (lambda s: s.convert("CMYK"), lambda s: s),
    "YCbCr": (lambda s: s.convert("YCbCr"), lambda s: s),
    "LAB": (lambda s: s.convert("LAB"), lambda s: s),
    "HSV": (lambda s: s.convert("HSV"), lambda s: s),
}


def stored(image: Image.Image, folder: Path) -> Path | None:
    """`image` saved in a format that keeps its mode (PNG, else TIFF), or None when none does."""
    for suffix in (".png", ".tiff"):
        path = folder / f"image{suffix}"
        try:
            image.save(path)
            with Image.open(path) as back:
                if back.mode == image.mode and back.info.get("transparency") == image.info.get(
                    "transparency"
                ):
                    return path
        except (OSError, ValueError, KeyError):
            pass
    return None


@torch.no_grad()
def first_answer(toy, sample: Sample, image: Image.Image) -> tuple[str, float]:
    """The toy's first answer token and its probability."""
    inputs = encode(toy, sample, image)
    probs = toy.model(**inputs.tensors).logits[0, -1].float().softmax(-1)
    p, token = probs.max(-1)
    return toy.tokenizer.decode([int(token)]).strip(), float(p)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_gives_the_answer_of_the_plain_rgb_scene(toy, scene, mode, tmp_path):
    sample, rgb = scene
    make, plain = MODES[mode]
    image = make(rgb)
    assert image.mode == mode.split("+")[0]
    path = stored(image, tmp_path)  # through the file when a format keeps the mode (PNG: I;16, LA, P, ...)
    loaded = load_image(replace(sample, image_path=path)) if path is not None else to_rgb(image)
    assert loaded.mode == "RGB" and loaded.size == rgb.size
    answer, p = first_answer(toy, sample, loaded)
    expected, p_expected = first_answer(toy, sample, plain(rgb))
    assert answer == expected and p == pytest.approx(p_expected, abs=0.02), (
        mode,
        answer,
        p,
        expected,
        p_expected,
    )


def test_sixteen_bit_grey_png_is_scaled_not_white(scene, tmp_path):
    _, rgb = scene
    grey16(rgb, "I;16").save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as image:
        assert image.mode == "I;16"
        assert np.array_equal(np.asarray(to_rgb(image).convert("L")), np.asarray(rgb.convert("L")))


@pytest.mark.parametrize("mode", ["I", "F"])
def test_modes_without_a_nominal_range_are_skipped_with_the_reason(toy, scene, mode, tmp_path):
    sample, rgb = scene
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32)).convert(mode).save(tmp_path / "x.tiff")
    with Image.open(tmp_path / "x.tiff") as image:
        assert image.mode == mode
    skip = prepare_or_skip(toy, replace(sample, image_path=tmp_path / "x.tiff"))
    assert isinstance(skip, Skip) and skip.reason == UNSUPPORTED_IMAGE_MODE
    assert f"image mode {mode!r}" in skip.detail and "no nominal range" in skip.detail


def test_an_i_image_from_a_sixteen_bit_file_is_scaled_as_sixteen_bit(scene):
    """Pillow before 10.? opens a 16-bit grey PNG as `I`, not `I;16`: it is still 16 bits, scaled by 1/257."""
    _, rgb = scene
    image = grey16(rgb, "I;16").convert("I")
    image.format = "PNG"  # as such a Pillow reads the file
    assert np.array_equal(np.asarray(to_rgb(image).convert("L")), np.asarray(rgb.convert("L")))
