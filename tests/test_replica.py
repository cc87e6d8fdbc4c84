"""Replica checkpoints: real vocabularies, llava-hf layout and config fields, and the exact prompt ids
the original LLaVA code gives, in both parity modes, for GQA rows."""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from llava_oracle import oracle  # noqa: E402
from replica_helpers import REAL_MODELS, loaded_replica  # noqa: E402

from mmflow.data.gqa import GQA_TASKS_DIR, read_task_csv  # noqa: E402
from mmflow.inputs.encode import encode  # noqa: E402
from mmflow.inputs.prompts import INSTRUCTION, LLAMA3_SYSTEM, VICUNA_SYSTEM, build_prompt  # noqa: E402
from mmflow.models.synthetic.builder import build_weights  # noqa: E402
from mmflow.models.synthetic.processor_builder import vocabulary_json  # noqa: E402
from mmflow.models.synthetic.replica import REPLICA_SPECS, ensure_replica, replica_config  # noqa: E402

ORACLE = oracle()
needs_oracle = pytest.mark.skipif(ORACLE is None, reason="llava-torch not installed (scripts/setup.sh test)")
ROWS = {"ChooseAttr": ("011016888", "171031170"), "QueryAttr": ("02452198",), "ChooseRel": ("13515212",)}


@lru_cache(maxsize=1)
def gqa_rows() -> list:
    out = []
    for task, ids in ROWS.items():
        rows = read_task_csv(GQA_TASKS_DIR / f"{task}.csv", task, Path("/nonexistent"), check_images=False)
        out += [r for r in rows if r.question_id in ids]
    return out


def raw_vocabulary(vocab: str):
    """The vocabulary straight from tokenizer.json (tokenizers library, no transformers conversion)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(vocabulary_json(vocab))


# ---------------------------------------------------------------- vocabularies and the builder


def test_vocabularies_are_the_real_ones() -> None:
    llama2, llama3 = raw_vocabulary("llama2"), raw_vocabulary("llama3")
    assert llama2.encode("Hello this is a test").ids == [1, 15043, 445, 338, 263, 1243]
    assert [llama2.token_to_id(t) for t in ("▁", ":", "<0x0A>")] == [29871, 29901, 13]
    assert llama2.get_vocab_size() == 32000 and llama3.get_vocab_size() == 128256
    assert llama3.encode("\n\n", add_special_tokens=False).ids == [271]
    assert llama3.encode(" \n", add_special_tokens=False).ids == [720]
    assert llama3.encode("Hi").ids[0] == 128000
    assert raw_vocabulary("mistral").token_to_id("▁") == 28705


@pytest.mark.parametrize("name", REAL_MODELS)
def test_replica_config_fields(name: str) -> None:
    spec = REPLICA_SPECS[name]
    folder = ensure_replica(name) if name == "llava-1.5-7b" else None
    tokenizer = loaded_replica(name, "corrected").tokenizer
    config = replica_config(spec, tokenizer)
    llama3 = spec.vocab == "llama3"
    assert config.image_token_index == (128256 if llama3 else 32000)
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    assert config.text_config.vocab_size == (128320 if llama3 else 32064)  # + <image>, <pad>, padded to 64
    assert config.pad_token_id == {"llava-1.6-vicuna-7b": 0, "llama3-llava-next-8b": 128257}.get(name, 32001)
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert config.text_config.rope_parameters["rope_theta"] == (500000.0 if llama3 else 10000.0)
    text = config.text_config
    assert text.num_attention_heads // text.num_key_value_heads == (4 if llama3 else 1)
    if spec.architecture == "llava_next":
        assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    if folder is not None:  # the folder a user points mmflow at
        files = {p.name for p in folder.iterdir()}
        expected = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json"}
        assert expected | {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
        assert json.loads((folder / "generation_config.json").read_text())["pad_token_id"] == 32001
        saved = json.loads((folder / "config.json").read_text())
        assert saved["image_token_index"] == 32000 and saved["text_config"]["vocab_size"] == 32064


# Published parameter counts (hub model cards): LLaVA-1.5-7B 7.06B, 13B 13.35B, LLaVA-1.6-Vicuna-7B 7.06B,
# LLaMA-3-LLaVA-NeXT-8B 8.36B.
FULL_SIZE = {
    "llava-1.5-7b": (4096, 32, 32, 11008, 7.06),
    "llava-1.5-13b": (5120, 40, 40, 13824, 13.35),
    "llava-1.6-vicuna-7b": (4096, 32, 32, 11008, 7.06),
    "llama3-llava-next-8b": (4096, 32, 8, 14336, 8.36),
}


@pytest.mark.parametrize("name", REAL_MODELS)
def test_full_size_replica_dims(name: str) -> None:
    """`--full-size` builds the real architecture: checked on the meta device (no weights allocated)."""
    spec = REPLICA_SPECS[name]
    config = replica_config(spec, loaded_replica(name, "corrected").tokenizer, full_size=True)
    hidden, layers, kv_heads, intermediate, billions = FULL_SIZE[name]
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (hidden, layers, kv_heads)
    assert text.intermediate_size == intermediate and text.num_attention_heads == hidden // 128
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    model = build_weights(config, dtype="meta")
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e9, 2) == pytest.approx(billions, abs=0.011)
    assert len(model.model.language_model.layers) == layers


def test_cli_builds_a_loadable_folder(tmp_path: Path) -> None:
    import os
    import stat

    from replica_helpers import real_model_config

    from mmflow.config.spec import ModelSpec
    from mmflow.models.registry import load_model
    from mmflow.models.synthetic.replica import main

    old_umask = os.umask(0o022)
    try:
        main(["build", "llava-1.6-vicuna-7b", "--out", str(tmp_path / "r")])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "r").stat().st_mode) == 0o755  # readable by others, as mkdir
    for name in ("model.safetensors", "replica.json", "config.json"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o644, name
    config = real_model_config("llava-1.6-vicuna-7b", "corrected", str(tmp_path / "r"))
    loaded = load_model(ModelSpec.from_mapping(config))
    assert loaded.path == str(tmp_path / "r") and loaded.model.config.image_token_id == 32000
    assert type(loaded.processor.image_processor).__name__ == "LlavaNextImageProcessorPil"


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llama3-llava-next-8b"])
def test_chat_template_renders_the_prompt(name: str) -> None:
    """The replica's chat template gives mmflow's (corrected) prompt for a system + user(image, text) turn."""
    processor = loaded_replica(name, "corrected").processor
    question = "Is the jar full or empty?"
    fmt, system = ("vicuna_v1", VICUNA_SYSTEM) if "1.5" in name else ("llama3", LLAMA3_SYSTEM)
    text = build_prompt(fmt, question).text
    user = [{"type": "image"}, {"type": "text", "text": f"{question} {INSTRUCTION.lstrip(' ')}"}]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": user},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == text


# ---------------------------------------------------------------- exact prompt ids, both modes


def paper_prompt_text(fmt: str, question: str) -> str:
    """The paper's prompt (LLaVA conv templates; InformationFlow.py appends " \\n" for LLaMA-3)."""
    user = f"<image>\n{question} \nAnswer the question using a single word or phrase."
    if fmt == "vicuna_v1":  # llava conv_vicuna_v1: system + " USER: " + msg + " ASSISTANT:"
        return f"{VICUNA_SYSTEM} USER: {user} ASSISTANT:"
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"  # LLaVA-NeXT conv_llava_llama_3 via chat template
    return (
        "<|begin_of_text|>" + header.format("system") + LLAMA3_SYSTEM + "<|eot_id|>" + header.format("user")
        + user + "<|eot_id|>" + header.format("assistant") + " \n"
    )  # fmt: skip


class RawTokenizer:
    """The callable interface `tokenizer_image_token` uses, over the raw vocabulary (legacy normaliser)."""

    def __init__(self, vocab: str):
        self.backend = raw_vocabulary(vocab)
        self.bos_token_id = self.backend.token_to_id("<s>" if vocab == "llama2" else "<|begin_of_text|>")

    def __call__(self, text: str):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=self.backend.encode(text).ids)


@needs_oracle
@pytest.mark.parametrize(
    ("name", "legacy"),  # each replica's own tokenizer (Metaspace-first for Vicuna), and the legacy form
    [(name, REPLICA_SPECS[name].legacy) for name in REAL_MODELS] + [("llava-1.5-7b", True)],
)
def test_prompt_ids_equal_the_original_code(name: str, legacy: bool | None) -> None:
    """mmflow's ids = the original `tokenizer_image_token` on the paper's prompt with the raw vocabulary
    (image token expanded), under both tokenizer normalisers; corrected LLaMA-3 drops BOS 2 and " \\n"."""
    spec = REPLICA_SPECS[name]
    fmt = "llama3" if spec.vocab == "llama3" else "vicuna_v1"
    raw = RawTokenizer(spec.vocab)
    for parity in ("paper", "corrected"):
        loaded = loaded_replica(name, parity, legacy=None if legacy == spec.legacy else legacy)
        image_id = loaded.model.config.image_token_id
        for sample in gqa_rows():
            ids = encode(loaded, sample, Image.new("RGB", sample.image_size)).input_ids.tolist()
            n_image = ids.count(image_id)
            original = ORACLE.mm.tokenizer_image_token(paper_prompt_text(fmt, sample.question), raw, -200)
            expanded = [t for i in original for t in ([image_id] * n_image if i == -200 else [i])]
            if parity == "corrected" and fmt == "llama3":
                assert expanded[:2] == [128000, 128000] and expanded[-2:] == [271, 720]
                expanded = expanded[1:-1]
            assert ids == expanded, (name, parity, sample.question_id)
            first = ids.index(image_id)
            if fmt == "vicuna_v1":
                assert ids[:2] == [1, 319] and ids[first - 1] == 29871 and ids[-1] == 29901
                assert ids[first + n_image : first + n_image + 2] == [29871, 13]


def test_whole_prompt_tokenization_would_drop_the_space() -> None:
    """Why mmflow tokenizes in pieces: a Metaspace prepend_scheme="first" tokenizer (llava-hf's
    non-legacy form) drops "▁" after the image when the prompt is tokenized in one piece."""
    first = loaded_replica("llava-1.5-7b", "paper").tokenizer  # the spec: legacy=False
    legacy = loaded_replica("llava-1.5-7b", "paper", legacy=True).tokenizer
    text = "USER: <image>\nWhat"
    assert first(text).input_ids[5:7] == [32000, 13]
    assert legacy(text).input_ids[5:8] == [32000, 29871, 13]


def test_llama3_paper_example() -> None:
    """The issue's example: ChooseAttr 011016888, 375x500 image, anyres."""
    sample = next(s for s in gqa_rows() if s.question_id == "011016888")
    got = {}
    for parity in ("paper", "corrected"):
        loaded = loaded_replica("llama3-llava-next-8b", parity)
        ids = encode(loaded, sample, Image.new("RGB", sample.image_size)).input_ids.tolist()
        got[parity] = (ids.index(128256), len(ids), ids[-1], ids[:3])
    assert got["paper"] == (46, 2424, 720, [128000, 128000, 128006])
    assert got["corrected"] == (45, 2422, 271, [128000, 128006, 9125])


@pytest.mark.parametrize("name", REAL_MODELS)
def test_group_positions(name: str) -> None:
    """Image span, question span and last position on the replicas, both modes."""
    from mmflow.inputs.groups import build_token_groups

    for parity in ("paper", "corrected"):
        loaded = loaded_replica(name, parity)
        tokenizer = loaded.tokenizer
        for sample in gqa_rows():
            inputs = encode(loaded, sample, Image.new("RGB", sample.image_size))
            ids = inputs.input_ids
            groups = build_token_groups(loaded, inputs, sample)
            image = torch.nonzero(ids == loaded.model.config.image_token_id).flatten()
            assert torch.equal(groups.image, torch.arange(int(image[0]), int(image[0]) + image.numel()))
            question = groups.question
            assert torch.equal(question, torch.arange(int(question[0]), int(question[-1]) + 1))
            assert tokenizer.decode(ids[question]).strip() == sample.question
            assert tokenizer.decode(ids[int(question[0]) - 1]) == "\n"  # the newline after the image
            assert int(question[0]) == int(groups.image[-1]) + (3 if "llama3" not in name else 2)
            assert groups.last.tolist() == [ids.numel() - 1]
