"""Every processor mmflow builds keeps its saved files and its output: tiny, series, toy, replicas.

The fixture `fixtures/processors.json` was written from the builders as they were before processors were
built in one place: for each model, the files `processor.save_pretrained` writes (the JSON configs and
chat template as they are; `tokenizer.json` as a digest), its special tokens, and what the processor
gives for one fixed question and image in the model's own prompt format (`build_prompt`): the input
ids (run-length coded, so the image-token runs stay short) and every other tensor's shape and sums.
The saved JSON files are compared on what they recorded: every recorded key must keep its value, while
keys a new `transformers` adds and its bookkeeping (`LIBRARY_KEYS`) do not count, so a new release passes
as long as the processor it saves and what it computes are the same.
Rewrite it only for an intended change: `python tests/test_processor_snapshot.py --write`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import model_config, tiny_tokenizer
from PIL import Image

FIXTURE = Path(__file__).parent / "fixtures" / "processors.json"
TINY = ("tiny-llava", "tiny-llava-next")
SERIES = ("tiny-llava-1.6-mistral", "tiny-llava-1.6-34b", "tiny-llava-onevision", "tiny-qwen2.5-vl")
REPLICAS = ("llava-1.5-7b", "llava-1.5-13b", "llava-1.6-vicuna-7b", "llama3-llava-next-8b")
CASES = [f"tiny/{n}" for n in TINY] + [f"series/{n}" for n in SERIES] + ["toy/toy-llava"]
CASES += [f"replica/{n}" for n in REPLICAS]
QUESTION = "Is the red circle left or right of the square?"


def build(case: str):
    """(processor, prompt format) of one case, from the public builders."""
    kind, name = case.split("/")
    if kind == "tiny":
        from mmflow.models.synthetic import tiny

        spec = tiny.TINY_SPECS[name]
        tokenizer = tiny_tokenizer(name)
        return tiny.build_processor(spec, tokenizer), spec.prompt_format
    if kind == "series":
        from mmflow.models.synthetic import tiny_series

        spec = tiny_series.SERIES_SPECS[name]
        fmt = tiny_series.PROMPT_FORMAT[name]
        tokenizer = tiny_series.build_series_tokenizer(
            spec, tiny_series.tokenizer_corpus(("vicuna_v1", "llama3", fmt))
        )
        return tiny_series.build_series_processor(spec, tokenizer), fmt
    if kind == "toy":
        from mmflow.models.synthetic import toy

        return toy.build_processor_for(toy.ToyConfig()), toy.PROMPT_FORMAT
    from mmflow.models.synthetic import replica

    spec = replica.REPLICA_SPECS[name]
    prompt_format = model_config(name, resolve=False)["prompt_format"]
    return replica.build_processor(spec, replica.build_tokenizer(spec)), prompt_format


def image() -> Image.Image:
    """A fixed 500 x 375 RGB gradient (not square, so padding and anyres tiling both act)."""
    y, x = np.mgrid[0:375, 0:500]
    pixels = np.stack([x * 255 // 499, y * 255 // 374, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _run_length(ids: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][0] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return runs


def snapshot(case: str) -> dict:
    """The saved files, special tokens and outputs of one case's processor (JSON-ready)."""
    from mmflow.inputs.prompts import build_prompt

    processor, fmt = build(case)
    files: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        for path in sorted(Path(folder).iterdir()):
            text = path.read_text()
            if path.name == "tokenizer.json":
                canonical = json.dumps(json.loads(text), sort_keys=True)
                files[path.name] = hashlib.sha256(canonical.encode()).hexdigest()
            elif path.suffix == ".json":
                files[path.name] = json.loads(text)
            else:
                files[path.name] = text
    tokenizer = processor.tokenizer
    special = {
        "map": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "all": [[t, tokenizer.convert_tokens_to_ids(t)] for t in tokenizer.all_special_tokens],
        "len": len(tokenizer),
    }
    prompt = build_prompt(fmt, QUESTION)
    encoded = processor(
        text=prompt.text, images=image(), return_tensors="pt", add_special_tokens=prompt.add_bos
    )
    outputs: dict = {"input_ids": _run_length(encoded["input_ids"][0].tolist())}
    for key, value in sorted(encoded.items()):
        if key == "input_ids":
            continue
        if value.is_floating_point():
            v = value.double()
            outputs[key] = {"shape": list(value.shape), "sum": float(v.sum()), "abs": float(v.abs().sum())}
        else:
            outputs[key] = {"shape": list(value.shape), "values": value.flatten().tolist()[:64]}
    return {"class": type(processor).__name__, "files": files, "special": special, "outputs": outputs}


# Keys `transformers` writes for its own bookkeeping, not settings of the processor.
LIBRARY_KEYS = {"transformers_version", "_name_or_path", "backend"}


def _normal(value):
    return json.loads(json.dumps(value, default=str))


def recorded(got, want):
    """`got` cut to the keys `want` recorded (recursively), library bookkeeping left out of both."""
    if isinstance(want, dict) and isinstance(got, dict):
        keys = [k for k in want if k not in LIBRARY_KEYS]
        return {k: recorded(got.get(k, "<missing>"), want[k]) for k in keys}
    return got


def without_library_keys(value):
    if isinstance(value, dict):
        return {k: without_library_keys(v) for k, v in value.items() if k not in LIBRARY_KEYS}
    return value


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("case", CASES)
def test_processor_unchanged(case: str, expected: dict) -> None:
    got, want = _normal(snapshot(case)), expected[case]
    assert got["class"] == want["class"]
    assert sorted(got["files"]) == sorted(want["files"])
    for name, content in want["files"].items():
        assert recorded(got["files"][name], content) == without_library_keys(content), name
    assert got["special"] == want["special"]
    assert got["outputs"]["input_ids"] == want["outputs"]["input_ids"]
    for key, value in want["outputs"].items():
        if "sum" in value:
            assert got["outputs"][key]["shape"] == value["shape"], key
            assert [got["outputs"][key]["sum"], got["outputs"][key]["abs"]] == pytest.approx(
                [value["sum"], value["abs"]], rel=1e-9
            ), key
        else:
            assert got["outputs"][key] == value, key
    assert sorted(got["outputs"]) == sorted(want["outputs"])


def test_files_check_ignores_added_keys_but_not_a_changed_setting(expected: dict) -> None:
    want = expected["tiny/tiny-llava"]["files"]["processor_config.json"]
    added = {**want, "transformers_version": "99.0", "a_new_library_field": 1}
    assert recorded(added, want) == without_library_keys(want)
    changed = {**want, "patch_size": want["patch_size"] + 1}
    assert recorded(changed, want) != without_library_keys(want)
    dropped = {k: v for k, v in want.items() if k != "patch_size"}
    assert recorded(dropped, want) != without_library_keys(want)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    out = {}
    for case in CASES:
        out[case] = _normal(snapshot(case))
        print(case, flush=True)
    FIXTURE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
