"""Token groups: text spans by character offsets, object patches through the model's own packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_sample

from mmflow.data.sample import Box
from mmflow.errors import GroupError
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups


@pytest.fixture(params=["tiny_llava", "tiny_llava_next"])
def loaded(request):
    return request.getfixturevalue(request.param)


def _groups(loaded, sample):
    inputs = encode(loaded, sample)
    return inputs, build_token_groups(loaded, inputs, sample)


def test_text_groups_decode_to_their_text(loaded, tmp_path):
    rng = np.random.default_rng(0)
    for question, options in [
        ("Is the jar full or empty?", ("empty", "full")),
        ("Which color is the large diamond, purple or orange?", ("purple", "orange")),
        ("What color is the circle?", None),
    ]:
        sample = noise_sample(tmp_path, rng, question=question, options=options)
        inputs, groups = _groups(loaded, sample)
        decode = loaded.tokenizer.decode
        assert decode(inputs.input_ids[groups.question]).strip() == question
        assert groups.last.tolist() == [inputs.length - 1]
        assert int(groups.question.max()) < inputs.length - 1  # the instruction and role words follow
        if options:
            assert decode(inputs.input_ids[groups.true_option]).strip() == options[0]
            assert decode(inputs.input_ids[groups.false_option]).strip() == options[1]
        else:
            assert groups.true_option.numel() == 0 and groups.false_option.numel() == 0
        # contiguous question span, all after the image
        assert torch.equal(
            groups.question, torch.arange(int(groups.question[0]), int(groups.question[-1]) + 1)
        )
        assert int(groups.question.min()) > int(groups.image.max())


def test_image_groups_partition(loaded, tmp_path):
    sample = noise_sample(tmp_path, np.random.default_rng(1))
    inputs, groups = _groups(loaded, sample)
    image_id = loaded.model.config.image_token_id
    assert torch.equal(groups.image, torch.nonzero(inputs.input_ids.cpu() == image_id).flatten())
    obj, non = set(groups.object.tolist()), set(groups.nonobject.tolist())
    assert obj and non and not obj & non
    newlines = set(groups.image.tolist()) - obj - non
    if loaded.name == "tiny-llava":
        assert groups.image.numel() == 576 and not newlines
    else:  # anyres: one newline token per row of the tiled grid, none in the base view
        assert len(newlines) > 0
        assert min(newlines) >= int(groups.image[576])


def test_llava_pad_box_lands_on_expected_patches(tiny_llava, tmp_path):
    rng = np.random.default_rng(2)
    # 672x336 is padded to 672x672 (image at rows 168..503) and resized by 1/2: box (0,0,56,56) -> rows 6-7
    sample = noise_sample(tmp_path, rng, size=(672, 336), box=Box(0, 0, 56, 56))
    _, groups = _groups(tiny_llava, sample)
    expected = [6 * 24, 6 * 24 + 1, 7 * 24, 7 * 24 + 1]
    assert groups.object.tolist() == groups.image[expected].tolist()
    # a square image is not padded: a box on the bottom-right 2x2 patches
    sample = noise_sample(tmp_path, rng, size=(336, 336), box=Box(308, 308, 28, 28))
    _, groups = _groups(tiny_llava, sample)
    assert groups.object.tolist() == groups.image[[22 * 24 + 22, 22 * 24 + 23, 23 * 24 + 22, 575]].tolist()


def test_llava_next_box_lands_on_base_and_tile_patches(tiny_llava_next, tmp_path):
    # 672x672 -> base view (resized to 336) + a 2x2 grid of 336 tiles, no unpadding; 48 rows of 48 + newline
    sample = noise_sample(tmp_path, np.random.default_rng(3), size=(672, 672), box=Box(0, 0, 28, 28))
    _, groups = _groups(tiny_llava_next, sample)
    assert groups.image.numel() == 576 + 48 * 49
    expected = [0, 576, 577, 576 + 49, 576 + 50]
    assert groups.object.tolist() == groups.image[expected].tolist()
    newline_index = [576 + r * 49 + 48 for r in range(48)]
    assert not set(groups.image[newline_index].tolist()) & set(groups.nonobject.tolist())


def test_empty_groups_are_reported(tiny_llava, tmp_path):
    sample = noise_sample(tmp_path, np.random.default_rng(4), options=None)
    _, groups = _groups(tiny_llava, sample)
    with pytest.raises(GroupError) as info:
        groups.require("true_option")
    assert info.value.reason == "empty_group"
    with pytest.raises(KeyError):
        groups.get("nonsense")


def test_missing_question_is_a_skip_reason(tiny_llava, tmp_path):
    sample = noise_sample(tmp_path, np.random.default_rng(5), question="", options=None)
    with pytest.raises(GroupError) as info:
        _groups(tiny_llava, sample)
    assert info.value.reason == "question_not_found"
