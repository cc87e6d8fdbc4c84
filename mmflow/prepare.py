"""One sample -> model inputs and token groups, or that sample's `Skip`: never a cell's failure.

What is wrong with the row itself (its image cannot be read, a token group is empty, its text holds
special tokens) is a final skip with its reason. Any other exception while preparing it (the processor,
a config, the environment) is the sample's error (`Skip(..., error=True)`, reason `sample_error` with
the exception's type and message): recorded, but the cell is not done and the sample is retried.
Text that the tokenizer would read as a special token (e.g. a scraped question containing the
literal `<image>`) is skipped with reason `special_token_in_text`: rewriting the question would
change what is asked, and passing it on makes the processor count a second image.
"""

from __future__ import annotations

from mmflow.data.sample import Sample, Skip
from mmflow.groups import GroupError, TokenGroups, build_token_groups
from mmflow.inputs import ModelInputs, encode, load_image
from mmflow.models.registry import LoadedModel

SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"
UNREADABLE_IMAGE = "unreadable_image"
SAMPLE_ERROR = "sample_error"  # any other exception while preparing the sample: an error, not a skip


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


def prepare_or_skip(loaded: LoadedModel, sample: Sample) -> tuple[ModelInputs, TokenGroups] | Skip:
    """Encode `sample` and build its token groups; any failure is returned as the sample's `Skip`."""
    try:
        special = find_special_text(loaded, sample)
        if special:
            return Skip(sample.question_id, SPECIAL_TOKEN_IN_TEXT, special)
        inputs = encode(loaded, sample, load_image(sample))
        return inputs, build_token_groups(loaded, inputs, sample)
    except GroupError as exc:
        return Skip(sample.question_id, exc.reason, exc.detail)
    except OSError as exc:
        return Skip(sample.question_id, UNREADABLE_IMAGE, str(exc))
    except Exception as exc:  # noqa: BLE001 - code, config or environment: recorded as the sample's error
        return sample_error(sample.question_id, exc)


def sample_error(question_id: str, exc: BaseException, reason: str = SAMPLE_ERROR) -> Skip:
    """The error (not a skip) of one sample stopped by `exc`: its cell is not done, the sample retried."""
    return Skip(question_id, reason, f"{type(exc).__name__}: {exc}".strip(), error=True)
