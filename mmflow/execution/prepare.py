"""One sample -> model inputs and token groups, or that sample's `Skip`: never a cell's failure.

What is wrong with the row itself (its image cannot be read, a token group is empty, its text holds
special tokens) is a final skip with its reason. Any other exception while preparing it (the processor,
a config, the environment) is the sample's error (`Skip(..., error=True)`, reason `sample_error` with
the exception's type and message): recorded, but the cell is not done and the sample is retried.
Text that the tokenizer would read as a special token (e.g. a scraped question containing the
literal `<image>`) is skipped with reason `special_token_in_text`: rewriting the question would
change what is asked, and passing it on makes the processor count a second image.
A sample whose sequence (prompt and the answer's `max_new_tokens`) exceeds the model's positions or
the configured `model.max_tokens` is skipped with reason `prompt_too_long` before the model runs.
"""

from __future__ import annotations

from mmflow.data.sample import Sample, Skip
from mmflow.errors import GroupError, ImageModeError
from mmflow.inputs.encode import ModelInputs, encode, load_image
from mmflow.inputs.groups import TokenGroups, build_token_groups
from mmflow.models.registry import LoadedModel

SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"
UNREADABLE_IMAGE = "unreadable_image"
SAMPLE_ERROR = "sample_error"  # any other exception while preparing the sample: an error, not a skip
PROMPT_TOO_LONG = "prompt_too_long"


def context_limit(loaded: LoadedModel, max_tokens: int | None = None) -> tuple[int, str] | None:
    """The most tokens a sequence may have and where that limit comes from, or None when unknown.

    The language model's `max_position_embeddings`, or the configured `model.max_tokens` when lower.
    """
    config = getattr(loaded.model, "config", None)
    text = getattr(config, "text_config", None) or config
    positions = getattr(text, "max_position_embeddings", None)
    limits = []
    if isinstance(positions, int) and positions > 0:
        limits.append((positions, f"the model's {positions} positions (max_position_embeddings)"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"model.max_tokens must be a positive integer or null, got {max_tokens!r}")
        limits.append((max_tokens, f"model.max_tokens={max_tokens}"))
    return min(limits) if limits else None


def too_long(loaded: LoadedModel, inputs: ModelInputs, max_tokens: int | None, new_tokens: int) -> str | None:
    """Why the sequence (prompt plus up to `new_tokens` answer tokens) cannot run, or None."""
    limit = context_limit(loaded, max_tokens)
    needed = inputs.length + max(0, int(new_tokens))
    if limit is None or needed <= limit[0]:
        return None
    return (
        f"{inputs.length} prompt tokens + {int(new_tokens)} answer tokens = {needed} exceed {limit[1]} "
        f"(question of {len(inputs.prompt.text)} characters)"
    )


def special_tokens(loaded: LoadedModel) -> set[str]:
    """Strings the tokenizer or processor turns into special tokens (BOS/EOS, `<image>`, ...)."""
    tokens = {str(t) for t in getattr(loaded.tokenizer, "all_special_tokens", []) if t}
    image_token = getattr(loaded.processor, "image_token", None)
    if image_token:
        tokens.add(str(image_token))
    return tokens


def find_special_text(loaded: LoadedModel, sample: Sample) -> str | None:
    """Why the sample's text would be parsed as special tokens, or None."""
    for field in ("question", "true_option", "false_option"):
        text = getattr(sample, field) or ""
        for token in sorted(special_tokens(loaded)):
            if token in text:
                return f"{field} contains {token!r}, which the processor reads as a special token: {text!r}"
    return None


def prepare_or_skip(
    loaded: LoadedModel, sample: Sample, max_tokens: int | None = None, new_tokens: int = 0
) -> tuple[ModelInputs, TokenGroups] | Skip:
    """Encode `sample` and build its token groups; any failure is returned as the sample's `Skip`.

    `max_tokens` (`model.max_tokens`) caps the sequence below the model's positions; `new_tokens` is
    how many answer tokens will be generated after the prompt (`max_new_tokens`).
    """
    try:
        special = find_special_text(loaded, sample)
        if special:
            return Skip(sample.question_id, SPECIAL_TOKEN_IN_TEXT, special)
        inputs = encode(loaded, sample, load_image(sample))
        if reason := too_long(loaded, inputs, max_tokens, new_tokens):
            return Skip(sample.question_id, PROMPT_TOO_LONG, reason)
        return inputs, build_token_groups(loaded, inputs, sample)
    except GroupError as exc:
        return Skip(sample.question_id, exc.reason, exc.detail)
    except ImageModeError as exc:  # the file's own content: a 32-bit or unknown PIL mode
        return Skip(sample.question_id, exc.reason, str(exc))
    except OSError as exc:
        return Skip(sample.question_id, UNREADABLE_IMAGE, str(exc))
    except Exception as exc:  # noqa: BLE001 - code, config or environment: recorded as the sample's error
        return sample_error(sample.question_id, exc)


def sample_error(question_id: str, exc: BaseException, reason: str = SAMPLE_ERROR) -> Skip:
    """The error (not a skip) of one sample stopped by `exc`: its cell is not done, the sample retried."""
    return Skip(question_id, reason, f"{type(exc).__name__}: {exc}".strip(), error=True)
