"""The paper's prompts (METHOD.md, "Prompt"), built by mmflow for every model.

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


PROMPT_FORMATS = {"vicuna_v1": (_vicuna_v1, True), "llama3": (_llama3, False)}
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
    wrap, add_bos = PROMPT_FORMATS[prompt_format]
    user = f"{IMAGE_PLACEHOLDER}\n{question}{INSTRUCTION}"
    prefix, suffix = wrap(user)
    if parity == "paper" and prompt_format == "llama3":
        add_bos, suffix = True, suffix + PAPER_LLAMA3_TAIL
    start = len(prefix) + len(IMAGE_PLACEHOLDER) + 1
    return Prompt(prefix + user + suffix, (start, start + len(question)), add_bos)
