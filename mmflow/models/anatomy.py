"""One model anatomy: the parts of a LLaVA-style model that engines, hooks and analyses touch.

Every attribute path into a loaded model is written here and nowhere else. transformers' LLaVA and
LLaVA-NeXT classes (4.5x) keep the language model at `model.model.language_model` (decoder layers,
final norm) and the unembedding at `model.lm_head` (`get_output_embeddings()`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Decoder:
    """One supported decoder family: its transformers layer class and whether its rotary embedding
    takes one position id per token (`plain_rotary`; Qwen2.5-VL's multimodal rotary takes three)."""

    layer_class: str
    plain_rotary: bool = True


# The decoders mmflow's engines support, by the text config's `model_type`: the one list (docs/models.md).
# Each is causal self-attention over image and text tokens alike, so blocking edges is the knockout.
DECODERS: dict[str, Decoder] = {
    "llama": Decoder("LlamaDecoderLayer"),
    "mistral": Decoder("MistralDecoderLayer"),
    "qwen2": Decoder("Qwen2DecoderLayer"),
    "qwen2_5_vl_text": Decoder("Qwen2_5_VLDecoderLayer", plain_rotary=False),
}


@dataclass(frozen=True)
class Anatomy:
    """The language model's parts of one loaded model.

    `language_model`: the decoder stack (embeddings in, final norm out; its forward pre-hook sees
    the input embeddings);
    `layers`: the decoder layers in order (L of them); `final_norm`: the norm applied to the last
    layer's output before the unembedding; `unembedding`: hidden [.., D] -> logits [.., V];
    `decoder_kind`: the text config's `model_type` ("llama", "mistral", "qwen2", ...); `backbone`:
    the multimodal base model under the LM head (vision tower, projector, language model; LLaVA-NeXT's
    `pack_image_features`), whose forward returns hidden states.
    """

    language_model: torch.nn.Module
    layers: torch.nn.ModuleList
    final_norm: torch.nn.Module
    unembedding: torch.nn.Module
    decoder_kind: str
    backbone: torch.nn.Module

    @property
    def depth(self) -> int:
        """L, the number of decoder layers."""
        return len(self.layers)


def anatomy_of(model) -> Anatomy:
    """The anatomy of a LLaVA-style `...ForConditionalGeneration` model; TypeError if it has none."""
    language = getattr(getattr(model, "model", None), "language_model", None)
    if language is None or not hasattr(language, "layers") or not hasattr(language, "norm"):
        raise TypeError(
            f"{type(model).__name__} has no LLaVA-style language model (model.model.language_model)"
        )
    return Anatomy(
        language_model=language,
        layers=language.layers,
        final_norm=language.norm,
        unembedding=model.get_output_embeddings(),
        decoder_kind=str(model.config.get_text_config().model_type),
        backbone=model.model,
    )
