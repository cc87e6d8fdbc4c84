"""The paper's prompts (docs/method.md, "Prompt"), built by mmflow for every model.

The llava-hf processors' default chat templates differ from what the paper used (no system
sentence), so mmflow builds the text itself and records where the question sits in it.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
INSTRUCTION = " \nAnswer the question using a single word or phrase."
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHATML_DIRECT_SYSTEM = "Answer the questions."
QWEN_SYSTEM = "You are a helpful assistant."
QWEN_VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class Prompt:
    """The full prompt text (special tokens spelled out) and the question's character span in it."""

    text: str
    question_span: tuple[int, int]
    add_bos: (
        bool  # whether the tokenizer must prepend its BOS token (in `parity=paper` on top of a spelled one)
    )


def _vicuna_v1(user: str) -> tuple[str, str]:
    prefix = f"{VICUNA_SYSTEM} USER: "
    return prefix, " ASSISTANT:"


def _llama3(user: str) -> tuple[str, str]:
    prefix = (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYSTEM}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    return prefix, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def _mistral_instruct(user: str) -> tuple[str, str]:
    """LLaVA's `mistral_instruct` conversation (LLaVA-1.6-Mistral): no system text, BOS from the tokenizer."""
    return "[INST] ", " [/INST]"


def _chatml(system: str):
    def wrap(user: str) -> tuple[str, str]:
        prefix = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
        return prefix, "<|im_end|>\n<|im_start|>assistant\n"

    return wrap


# name -> (wrapper, add_bos, image placeholder of the model's processor)
PROMPT_FORMATS = {
    "vicuna_v1": (_vicuna_v1, True, IMAGE_PLACEHOLDER),
    "llama3": (_llama3, False, IMAGE_PLACEHOLDER),
    "mistral_instruct": (_mistral_instruct, True, IMAGE_PLACEHOLDER),
    # LLaVA's `chatml_direct` (LLaVA-1.6-34B, Yi): ChatML with the system line "Answer the questions."
    "chatml_direct": (_chatml(CHATML_DIRECT_SYSTEM), False, IMAGE_PLACEHOLDER),
    # LLaVA's `qwen_1_5` (LLaVA-OneVision): ChatML with Qwen's default system line.
    "qwen": (_chatml(QWEN_SYSTEM), False, IMAGE_PLACEHOLDER),
    # Qwen2.5-VL's chat template: the image is a vision span the processor expands.
    "qwen2_vl": (_chatml(QWEN_SYSTEM), False, QWEN_VISION_PLACEHOLDER),
}
# The paper's code (InformationFlow.py) appends " \n" to llama3-llava-next-8b's prompt, and its
# `tokenizer_image_token` adds BOS although the conversation text already starts with <|begin_of_text|>.
PAPER_LLAMA3_TAIL = " \n"


def build_prompt(prompt_format: str, question: str, parity: str | None = None) -> Prompt:
    """User turn = image, newline, question, instruction; wrapped in the model's conversation format.

    `parity="paper"` reproduces the paper's LLaMA-3 prompt (a second BOS and a trailing `" \n"`);
    `"corrected"` and `None` (models the paper did not run) give the clean conversation.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; known: {sorted(PROMPT_FORMATS)}")
    wrap, add_bos, placeholder = PROMPT_FORMATS[prompt_format]
    user = f"{placeholder}\n{question}{INSTRUCTION}"
    prefix, suffix = wrap(user)
    if parity == "paper" and prompt_format == "llama3":
        add_bos, suffix = True, suffix + PAPER_LLAMA3_TAIL
    start = len(prefix) + len(placeholder) + 1
    return Prompt(prefix + user + suffix, (start, start + len(question)), add_bos)
