"""The real checkpoints a replica copies (`mmflow.models.synthetic.replica`): one `ReplicaSpec` per model.

Every value is sourced in a comment and in the table "Replica checkpoints" of docs/models.md. Another model
family is one more entry in `REPLICA_SPECS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mmflow.models.synthetic.builder import IMAGE_TOKEN, NEXT_PINPOINTS, TextSpec, VisionSpec  # noqa: F401 - re-exported

PAD_TOKEN = "<pad>"

# openai/clip-vit-large-patch14-336 (the vision tower of all four checkpoints): config.json and
# preprocessor_config.json on the hub; the same values are in llava-hf's vision_config.
CLIP_L_336 = VisionSpec(
    hidden=1024,
    intermediate=4096,
    layers=24,
    heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    fields={"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
)
# Its image normalisation (CLIP_MEAN, CLIP_STD) and the other image-processor fields are sourced in
# mmflow.models.synthetic.processor_builder; NEXT_PINPOINTS (llava-v1.6's `image_grid_pinpoints`) is sourced
# in mmflow.models.synthetic.builder.

# lmsys/vicuna-7b-v1.5 and -13b-v1.5 config.json (Llama-2 architecture).
VICUNA_7B = TextSpec(
    hidden=4096,
    intermediate=11008,
    layers=32,
    heads=32,
    kv_heads=32,
    max_positions=4096,
    norm_eps=1e-5,
    rope_theta=10000.0,
)
VICUNA_13B = replace(VICUNA_7B, hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40)
# meta-llama/Meta-Llama-3-8B-Instruct config.json.
LLAMA3_8B = TextSpec(
    hidden=4096,
    intermediate=14336,
    layers=32,
    heads=32,
    kv_heads=8,
    max_positions=8192,
    norm_eps=1e-5,
    rope_theta=500000.0,
)

# Chat templates in the llava-hf style. mmflow builds the paper's prompts itself
# (`mmflow.inputs.prompts`); these render the same text for a system + user(image, text) turn.
VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class ReplicaSpec:
    """One real checkpoint: what its replica copies (full size) and how small the CPU replica is."""

    name: str  # mmflow model config name (conf/model/<name>.yaml)
    hub_id: str  # the llava-hf checkpoint it replicates
    architecture: str  # "llava" | "llava_next"
    vocab: str  # file stem in mmflow/models/vocab
    tokenizer_class: str  # tokenizer_class written to tokenizer_config.json
    special_tokens: dict[str, str]  # bos/eos/unk/pad token strings
    add_pad_token: bool  # llava-hf's conversion adds "<pad>" after "<image>"
    text: TextSpec  # full-size decoder
    generation: dict[str, Any]  # generation_config.json
    chat_template: str
    pinpoints: list[list[int]] | None = None
    vision: VisionSpec = CLIP_L_336
    legacy: bool | None = False  # tokenizer_config `legacy` (Llama SentencePiece tokenizers only)
    pad_vocab_to: int = 64  # llava-hf resizes the embeddings to a multiple of 64
    shrink_text: dict[str, Any] = field(  # TextSpec fields of the CPU replica
        default_factory=lambda: dict(hidden=32, intermediate=64, layers=2)
    )
    shrink_heads: int = 4  # CPU replica's attention heads; KV heads keep the real ratio
    shrink_vision: dict[str, Any] = field(  # VisionSpec fields of the CPU replica
        default_factory=lambda: dict(hidden=32, intermediate=64, layers=2, heads=2, projection_dim=32)
    )


LLAMA2_SPECIAL = {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}
REPLICA_SPECS: dict[str, ReplicaSpec] = {
    # llava-hf/llava-1.5-7b-hf: transformers' convert_llava_weights_to_hf.py (vicuna-7b-v1.5 +
    # clip-vit-large-patch14-336, "<image>" = 32000, "<pad>" = 32001 = config.pad_token_id, vocab 32064).
    "llava-1.5-7b": ReplicaSpec(
        name="llava-1.5-7b",
        hub_id="llava-hf/llava-1.5-7b-hf",
        architecture="llava",
        vocab="llama2",
        tokenizer_class="LlamaTokenizer",
        special_tokens={**LLAMA2_SPECIAL, "pad": PAD_TOKEN},
        add_pad_token=True,
        text=VICUNA_7B,
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001},
        chat_template=VICUNA_TEMPLATE,
    ),
    # llava-hf/llava-1.5-13b-hf: same script, vicuna-13b-v1.5.
    "llava-1.5-13b": ReplicaSpec(
        name="llava-1.5-13b",
        hub_id="llava-hf/llava-1.5-13b-hf",
        architecture="llava",
        vocab="llama2",
        tokenizer_class="LlamaTokenizer",
        special_tokens={**LLAMA2_SPECIAL, "pad": PAD_TOKEN},
        add_pad_token=True,
        text=VICUNA_13B,
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001},
        chat_template=VICUNA_TEMPLATE,
    ),
    # llava-hf/llava-v1.6-vicuna-7b-hf: convert_llava_next_weights_to_hf.py adds only "<image>" (32000)
    # for Vicuna (no "<pad>"; Vicuna's tokenizer_config has pad_token null, so mmflow pads with
    # "<unk>" = 0, Vicuna's generation_config pad_token_id); embeddings resized to vocab + 2 -> 32064.
    "llava-1.6-vicuna-7b": ReplicaSpec(
        name="llava-1.6-vicuna-7b",
        hub_id="llava-hf/llava-v1.6-vicuna-7b-hf",
        architecture="llava_next",
        vocab="llama2",
        tokenizer_class="LlamaTokenizer",
        special_tokens={**LLAMA2_SPECIAL, "pad": "<unk>"},
        add_pad_token=False,
        text=VICUNA_7B,
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        chat_template=VICUNA_TEMPLATE,
        pinpoints=NEXT_PINPOINTS,
    ),
    # llava-hf/llama3-llava-next-8b-hf: same script, Meta-Llama-3-8B-Instruct, "<image>" = 128256 and
    # "<pad>" = 128257 added, vocab 128256 + 2 padded to 128320; generation_config from
    # Meta-Llama-3-8B-Instruct (eos: <|end_of_text|> 128001 and <|eot_id|> 128009).
    "llama3-llava-next-8b": ReplicaSpec(
        name="llama3-llava-next-8b",
        hub_id="llava-hf/llama3-llava-next-8b-hf",
        architecture="llava_next",
        vocab="llama3",
        tokenizer_class="PreTrainedTokenizerFast",
        special_tokens={"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": PAD_TOKEN},
        add_pad_token=True,
        text=LLAMA3_8B,
        generation={"bos_token_id": 128000, "eos_token_id": [128001, 128009], "pad_token_id": 128257},
        chat_template=LLAMA3_TEMPLATE,
        pinpoints=NEXT_PINPOINTS,
        legacy=None,
    ),
}
