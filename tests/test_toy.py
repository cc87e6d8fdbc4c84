"""toy-llava on its committed weights: held-out accuracy, the model needs the image, knockout sanity,
fast == reference. The training recipe and command are tested in test_toy_training.py."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass

import pytest
import torch

from mmflow.data import TASKS, Sample, load_shapes
from mmflow.execution.runtime import generate_answer, normalise_answer
from mmflow.inputs.encode import ModelInputs, encode
from mmflow.inputs.groups import TokenGroups, build_token_groups
from mmflow.knockout import make_engine
from mmflow.knockout.clean_pass import CleanPass
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import NAMED_KNOCKOUTS, BlockEdges, KnockoutJob, window_layers
from mmflow.models.synthetic.toy import (
    EVAL_DATA_SEED,
    TOY_ROOT,
    ensure_toy_model,
)
from mmflow.models.synthetic.toy_training.train import load_toy

pytestmark = pytest.mark.slow  # runs sweeps, trains or builds for real: `make test`, not `make test-fast`

N_PER_TASK = (
    100  # held-out questions per family (data seed 0, as training.json's heldout: never used in training)
)
MIN_ACCURACY = 0.90
MIN_FAMILIES = 4
MIN_PROB_DROP = 0.50  # mean relative drop of p(answer) when the image is cut off from question and last
MIN_FLIP_SHARE = 0.30


@dataclass
class Evaluated:
    """One held-out sample through the clean model."""

    sample: Sample
    inputs: ModelInputs
    groups: TokenGroups
    clean: CleanPass
    predicted: str

    @property
    def correct(self) -> bool:
        return normalise_answer(self.predicted) == normalise_answer(self.sample.answer)


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return load_toy()


@pytest.fixture(scope="module")
def reference(loaded) -> ReferenceEngine:
    return ReferenceEngine(loaded, "sdpa")


@pytest.fixture(scope="module")
def heldout(loaded, reference, tmp_path_factory) -> dict[str, list[Evaluated]]:
    """Every family's held-out samples with the clean pass and the greedy answer (as in the runtime)."""
    cache = tmp_path_factory.mktemp("shapes")
    out: dict[str, list[Evaluated]] = {}
    for task in TASKS:
        samples = load_shapes(task, N_PER_TASK, seed=EVAL_DATA_SEED, cache_dir=cache)
        out[task] = []
        for sample in samples:
            assert isinstance(sample, Sample), sample
            inputs = encode(loaded, sample)
            groups = build_token_groups(loaded, inputs, sample)
            predicted = generate_answer(loaded, inputs, 8)
            out[task].append(Evaluated(sample, inputs, groups, reference.clean(inputs), predicted))
    return out


def test_committed_folder_is_small_and_documented():
    folder = ensure_toy_model("toy-llava")
    assert folder == TOY_ROOT / "toy-llava"
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20 * 2**20
    record = json.loads((folder / "training.json").read_text())
    module = record["command"].split()[2]  # the command reproduces it: its module is importable
    assert record["command"].startswith("python -m ") and importlib.util.find_spec(module) is not None
    assert record["command"].split()[3] == "train"
    assert set(record["heldout"]["accuracy"]) == set(TASKS)
    assert math.isfinite(record["final_loss"])


def test_heldout_accuracy(heldout):
    accuracy = {task: _accuracy(items) for task, items in heldout.items()}
    print("held-out accuracy:", {t: f"{a:.0%}" for t, a in accuracy.items()})
    assert sum(a >= MIN_ACCURACY for a in accuracy.values()) >= MIN_FAMILIES, accuracy


def test_top1_is_the_answer_token_when_correct(heldout, loaded):
    """The knockout metric reads the top-1 token: for correct samples it is the answer's first token."""
    for items in heldout.values():
        for e in items:
            if e.correct:
                first = loaded.tokenizer(" " + e.sample.answer, add_special_tokens=False)["input_ids"][0]
                assert e.clean.top1 == first


def _accuracy(items: list[Evaluated]) -> float:
    return sum(e.correct for e in items) / len(items)


def test_model_needs_the_image(heldout, reference, loaded):
    """Image -> (Question and Last) in every layer, on every correct held-out sample: p(answer) drops
    by >= 50% on average and a clear share of answers flip (printed per family too)."""
    drops: list[float] = []
    flips: list[bool] = []
    for task, items in heldout.items():
        start = len(drops)
        for e in items:
            if not e.correct:
                continue
            targets = torch.cat([e.groups.question, e.groups.last])
            job = KnockoutJob(BlockEdges(e.groups.image, targets), range(loaded.n_layers))
            new = reference.run(e.clean, [job])[0]
            token = e.clean.top1
            p_base, p_new = e.clean.logprobs[token].exp(), new[token].exp()
            drops.append(float((p_base - p_new) / p_base))
            flips.append(int(new.argmax()) != token)
        n = len(drops) - start
        print(f"{task}: mean drop {sum(drops[start:]) / n:.1%}, flipped {sum(flips[start:]) / n:.1%} of {n}")
    print(
        f"all correct samples: mean drop {sum(drops) / len(drops):.1%}, flipped {sum(flips) / len(flips):.1%}"
    )
    assert sum(drops) / len(drops) >= MIN_PROB_DROP
    assert sum(flips) / len(flips) >= MIN_FLIP_SHARE


def _some(heldout, per_task: int = 2) -> list[Evaluated]:
    return [e for items in heldout.values() for e in [x for x in items if x.correct][:per_task]]


def test_empty_knockout_changes_nothing(heldout, reference, loaded):
    for e in _some(heldout):
        empty = torch.empty(0, dtype=torch.long)
        jobs = [
            KnockoutJob(BlockEdges(empty, e.groups.question), range(loaded.n_layers)),
            KnockoutJob(BlockEdges(e.groups.image, e.groups.last), range(0)),
        ]
        for new in reference.run(e.clean, jobs):
            assert torch.equal(new, e.clean.logprobs)


def test_fast_engine_agrees_with_reference(heldout, reference, loaded):
    pytest.importorskip("mmflow.knockout.fast")
    fast = make_engine("fast", loaded, "sdpa")
    width = 3
    for e in _some(heldout, per_task=1):
        jobs = [
            KnockoutJob(
                BlockEdges(e.groups.get(src), e.groups.get(tgt)), window_layers(c, width, loaded.n_layers)
            )
            for name, (src, tgt) in NAMED_KNOCKOUTS.items()
            if name in {"image_to_question", "image_to_last", "question_to_last", "last_to_last"}
            for c in range(loaded.n_layers)
        ]
        first = min(job.edges.first_target for job in jobs)
        clean = fast.clean(e.inputs, first_target=first)
        torch.testing.assert_close(clean.logprobs, e.clean.logprobs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.run(clean, jobs), reference.run(e.clean, jobs), atol=1e-4, rtol=1e-4)
