"""toy-llava's training recipe without weights (packed prompts, questions correct by construction,
balanced targets, word facts, grounding probe, patch labels) and a CI smoke run of the training
command, including a clean stop on SIGTERM. The committed weights are tested in test_toy.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmflow.data import TASKS, load_shapes
from mmflow.data.shapes import COLORS, SHAPES, SIZES
from mmflow.inputs.encode import encode
from mmflow.models.synthetic.toy import (
    VAL_DATA_SEED,
    ToyConfig,
    build_model,
    build_processor_for,
)
from mmflow.models.synthetic.toy_training.data import (
    NAMING_WORDS,
    collate,
    patch_labels,
    training_data,
    training_scene,
    validation_data,
    word_facts,
)
from mmflow.models.synthetic.toy_training.probes import GroundingHead, decoder_states
from mmflow.models.synthetic.toy_training.train import load_toy

pytestmark = pytest.mark.slow  # runs sweeps, trains or builds for real: `make test`, not `make test-fast`


@pytest.fixture(scope="module")
def recipe():
    """A small config, its processor (saved for the loader) and a seeded untrained model."""
    cfg = ToyConfig(images=4, val_per_task=1)
    processor = build_processor_for(cfg)
    return cfg, processor, build_model(cfg, processor.tokenizer).eval()


def test_packed_segments_equal_single_turn_prompts(recipe, tmp_path):
    """Every packed segment gives exactly the hidden states of its own single-turn prompt."""
    cfg, processor, model = recipe
    data = training_data(cfg, processor, tmp_path)
    tok = processor.tokenizer
    batch = collate(data, [0, 1], tok.pad_token_id, tok.eos_token_id)
    with torch.no_grad():
        packed = model.model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).last_hidden_state
        for b in (0, 1):
            start = len(data.shared[b])
            for segment, _ in data.segments[b]:
                single = torch.tensor([data.shared[b] + segment])
                alone = model.model(input_ids=single, pixel_values=batch["pixel_values"][b : b + 1])
                got = packed[b, start : start + len(segment)]
                torch.testing.assert_close(
                    got, alone.last_hidden_state[0, len(data.shared[b]) :], atol=2e-5, rtol=0
                )
                start += len(segment)


def test_segments_are_the_analysis_prompt(recipe, tmp_path):
    """A validation item's shared prefix + segment is exactly what mmflow.inputs.encode feeds the model."""
    from mmflow.models.registry import LoadedModel

    cfg, processor, model = recipe
    data = validation_data(cfg, processor, tmp_path)
    loaded = LoadedModel(
        name="toy-untrained",
        model=model,
        processor=processor,
        path="",
        prompt_format="vicuna_v1",
        image_preprocess="pad",
        device=torch.device("cpu"),
    )
    samples = {s.task: s for t in TASKS for s in load_shapes(t, 1, seed=VAL_DATA_SEED, cache_dir=tmp_path)}
    for i, task in enumerate(data.tasks):
        segment, n_answer = data.segments[i][0]
        expected = encode(loaded, samples[task]).input_ids.tolist()
        assert data.shared[i] + segment[:-n_answer] == expected
        answer = processor.tokenizer.decode(segment[-n_answer:]).strip()
        assert answer == samples[task].answer


def test_training_questions_are_correct_by_construction(recipe):
    """Training scenes are deterministic, carry every question the recipe asks, and answers are true."""
    cfg, _, _ = recipe
    asked = Counter(cfg.questions) + Counter({"Describe": cfg.descriptions})  # + drops zero counts
    for index in range(20):
        scene, qa = training_scene(cfg, index)
        assert (scene, qa) == training_scene(cfg, index)
        assert Counter(task for task, _, _ in qa) == asked
        for task, question, answer in qa:
            if task == "QueryAttr":  # "What color is the <shape>?" names a unique shape
                shape = question.removeprefix("What color is the ").removesuffix("?")
                assert [o.color for o in scene.objects if o.shape == shape] == [answer]
            if task == "Describe":
                assert len(answer.split(" , ")) == len(scene.objects)


def test_training_scenes_with_few_families_asked():
    cfg = ToyConfig(questions={"QueryAttr": 2}, descriptions=1)
    for index in range(5):
        scene, qa = training_scene(cfg, index)
        assert Counter(task for task, _, _ in qa) == Counter({"QueryAttr": 2, "Describe": 1})
        assert len(qa[-1][2].split(" , ")) == len(scene.objects)  # the description names every object


def test_training_yes_no_targets_are_balanced():
    """Yes/no targets are drawn before the scene, so scenes that cannot carry a 'yes' do not turn the
    family into a 'no' prior (the held-out generator draws them the same way)."""
    cfg = ToyConfig(questions={"CompareAttr": 2, "LogicalObj": 2}, descriptions=0)
    answers = Counter(answer for i in range(300) for _, _, answer in training_scene(cfg, i)[1])
    assert answers["yes"] + answers["no"] == 1200
    assert abs(answers["yes"] - 600) < 60, answers  # binomial sd ~17


def test_word_facts_describe_the_named_object(recipe):
    """Grounding targets: colour/shape/size/x of the one object a word names, absent (class 0), or
    unknown (-1) when two objects share the word."""
    cfg, _, _ = recipe
    seen = Counter()
    for index in range(30):
        scene, _ = training_scene(cfg, index)
        facts = word_facts(scene)
        side = max(scene.width, scene.height)
        for k, word in enumerate(NAMING_WORDS):
            objects = [o for o in scene.objects if word in (o.shape, o.color)]
            if not objects:
                assert facts[k].tolist() == [0.0, 0.0, -1.0, -1.0]
                seen["absent"] += 1
            elif len(objects) > 1:
                assert facts[k].tolist() == [-1.0] * 4
                seen["ambiguous"] += 1
            else:
                o = objects[0]
                colour, shape, size, x = facts[k].tolist()
                assert (COLORS[int(colour) - 1], SHAPES[int(shape) - 1], SIZES[int(size)]) == (
                    o.color,
                    o.shape,
                    o.size,
                )
                assert x == pytest.approx((o.center_x + (side - scene.width) // 2) / side)
                seen["unique"] += 1
    assert seen["absent"] and seen["ambiguous"] and seen["unique"]


def test_grounding_positions_are_the_naming_words(recipe, tmp_path):
    """The word probe reads the last token of every shape and colour word in the segments, the gather
    probe the last prompt position of every question naming a shape, each with its own image's facts."""
    cfg, processor, _ = recipe
    data = training_data(cfg, processor, tmp_path)
    tok = processor.tokenizer
    batch = collate(data, [0, 1, 2], tok.pad_token_id, tok.eos_token_id)
    ids = batch["input_ids"]
    words = [
        tok.decode(ids[b, c - 1 : c + 1]).split()[-1]
        for b, c in zip(batch["ground_rows"].tolist(), batch["ground_cols"].tolist(), strict=True)
    ]
    segments = [tok.decode(segment) for b in range(3) for segment, _ in data.segments[b]]
    expected = sum(w.strip("?") in NAMING_WORDS for text in segments for w in text.split())
    assert len(words) == expected > 0 and set(words) <= set(NAMING_WORDS)
    assert set(words) & set(SHAPES) and set(words) & set(COLORS)
    for b, word, facts in zip(batch["ground_rows"].tolist(), words, batch["ground_facts"], strict=True):
        assert torch.equal(facts[0], data.word_facts[b, NAMING_WORDS.index(word)])
    expected = []  # (row, last prompt position, first and last shape named) per question naming one
    for b in range(3):
        start = len(data.shared[b])
        for segment, n_answer in data.segments[b]:
            prompt = tok.decode(segment[:-n_answer])
            named = [w.strip("?") for w in prompt.split() if w.strip("?") in SHAPES]
            start += len(segment)
            if named:
                expected.append((b, start - n_answer - 1, named[0], named[-1]))
    rows, cols = batch["gather_rows"].tolist(), batch["gather_cols"].tolist()
    assert len(expected) == len(rows) > 0
    colon = tok(" ASSISTANT:", add_special_tokens=False)["input_ids"][-1]  # the prompt's last token
    got = zip(rows, cols, batch["gather_facts"], strict=True)
    for (b, c, facts), (b_, c_, first, last) in zip(got, expected, strict=True):
        assert (b, c) == (b_, c_) and ids[b, c] == colon
        assert torch.equal(facts[0], data.word_facts[b, NAMING_WORDS.index(first)])
        assert torch.equal(facts[1], data.word_facts[b, NAMING_WORDS.index(last)])


def test_grounding_probe_fits_its_targets(recipe, tmp_path):
    """The probe's loss can fall on fixed states (its targets are well-formed and learnable)."""
    cfg, processor, model = recipe
    data = training_data(cfg, processor, tmp_path)
    tok = processor.tokenizer
    batch = collate(data, [0, 1, 2, 3], tok.pad_token_id, tok.eos_token_id)
    with torch.no_grad():
        states = decoder_states(model, batch)[cfg.gather_layer]
    head = GroundingHead(model, 2)
    targets = (batch["gather_rows"], batch["gather_cols"], batch["gather_facts"])
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    before = head.loss(states, *targets).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = head.loss(states, *targets)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * before


def test_patch_labels_mark_each_object_centre(recipe):
    cfg, _, _ = recipe
    scene, _ = training_scene(cfg, 0)
    labels = patch_labels(scene, cfg.image_size, cfg.patch_size)
    grid = cfg.image_size // cfg.patch_size
    side = max(scene.width, scene.height)
    scale = cfg.image_size / side
    for obj in scene.objects:
        x, y, w, h = obj.box
        cx = (x + w / 2 + (side - scene.width) // 2) * scale
        cy = (y + h / 2 + (side - scene.height) // 2) * scale
        centre = int(cy // cfg.patch_size) * grid + int(cx // cfg.patch_size)
        assert labels[1, centre] == SHAPES.index(obj.shape) + 1
        assert labels[3, centre] == int(cx // cfg.patch_size) + 1  # the patch's column
    assert (labels[0] == 0).sum() > labels.shape[1] // 2  # most patches are background
    assert torch.equal(labels[3] > 0, labels[0] > 0)  # columns are labelled on object patches only


def _train(out: Path, seed: int = 0) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "mmflow.models.synthetic.toy_training",
        "train",
        "--steps",
        "3",
        "--out",
        str(out),
    ]
    command += ["--seed", str(seed), "--images", "12", "--vision-steps", "2", "--val-n", "1", "--eval-n", "0"]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_training_command_smoke(tmp_path):
    """CI: a few training steps write a loadable model with a finite loss, identically for one seed."""
    from transformers import LlavaForConditionalGeneration

    run = _train(tmp_path / "a")
    _train(tmp_path / "b")
    assert "toy-llava answers" in run.stderr and "loss=" in run.stderr  # the progress bar
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["steps"] == 3 and math.isfinite(record["final_loss"])
    assert record["command"].startswith("python -m mmflow.models.synthetic.toy_training train --steps 3")
    assert record["train_data"]["images"] == 12
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    assert model.config.text_config.num_hidden_layers == load_toy().n_layers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_training_command_stops_cleanly_on_sigterm(tmp_path):
    """SIGTERM mid-training ends the data-parallel workers too and leaves no folder behind."""
    command = [
        sys.executable,
        "-m",
        "mmflow.models.synthetic.toy_training",
        "train",
        "--steps",
        "100000",
        "--images",
        "12",
    ]
    command += ["--vision-steps", "2", "--val-n", "0", "--eval-n", "0", "--out", str(tmp_path / "m")]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in iter(run.stderr.readline, ""):  # wait until the workers are training
        if "toy-llava answers" in line:
            break
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=60)  # drains stderr, so the exiting command never blocks on a full pipe
    assert run.returncode == 143
    deadline = time.monotonic() + 60  # a loaded machine may take a while to reap the workers
    while time.monotonic() < deadline and group_alive(run.pid):
        time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # nothing left in the command's process group
        os.killpg(run.pid, 0)
    assert list(tmp_path.iterdir()) == []


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group `pgid` still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
