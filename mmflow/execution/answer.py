"""The clean model's greedy answer, continued from the clean pass's key/value cache.

The clean pass already holds the first answer token's logits and every layer's keys/values of the
prompt, so the answer check needs no second image encoding or prefill: it decodes one token per step
from that cache until EOS or `max_new_tokens`, exactly as `model.generate(do_sample=False)` would.
When the clean pass kept no cache, or the model's generation config asks for something that changes
a greedy step (a repetition penalty, suppressed tokens, ...), it calls `model.generate` instead.
"""

from __future__ import annotations

import torch

from mmflow.inputs.encode import ModelInputs
from mmflow.knockout.clean_pass import CleanPass
from mmflow.models.kv_cache import cache_kwargs, output_cache
from mmflow.models.registry import LoadedModel

# Generation-config fields that would change a greedy step, with the value that changes nothing.
GREEDY_NEUTRAL = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "min_new_tokens": None,
    "exponential_decay_length_penalty": None,
    "force_words_ids": None,
    "constraints": None,
}


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """The ids that end an answer: the generation config's EOS (one or several), else the tokenizer's."""
    eos = loaded.model.generation_config.eos_token_id or loaded.tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def not_plain_greedy(loaded: LoadedModel) -> str | None:
    """Why a greedy step of `model.generate` would not be the argmax of the logits, or None."""
    config = loaded.model.generation_config
    for name, neutral in GREEDY_NEUTRAL.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            return f"generation_config.{name}={value!r}"
    if (getattr(config, "min_length", 0) or 0) > 0:
        return f"generation_config.min_length={config.min_length}"
    return None


@torch.no_grad()
def generate_answer(loaded: LoadedModel, inputs: ModelInputs, max_new_tokens: int) -> str:
    """The clean model's greedy short answer from `model.generate` (a second prefill; the reference)."""
    tokenizer = loaded.tokenizer
    out = loaded.model.generate(
        **inputs.tensors,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_ids(loaded) or None,
    )
    return tokenizer.decode(out[0, inputs.length :], skip_special_tokens=True)


@torch.no_grad()
def greedy_token_ids(loaded: LoadedModel, clean: CleanPass, max_new_tokens: int) -> list[int]:
    """Greedy answer token ids [<= max_new_tokens] decoded from `clean.cache`, EOS included if reached.

    Each step feeds the previous token with the grown attention mask, as `generate` does; the cache
    grows by one position per step (the clean pass's own K/V tensors are not written to). The cache
    is released from `clean` afterwards. Raises ValueError if `clean` kept no cache.
    """
    if clean.cache is None or clean.logits is None:
        raise ValueError("the clean pass kept no key/value cache to decode from")
    model, device = loaded.model, clean.inputs.input_ids.device
    eos = set(eos_token_ids(loaded))
    cache, length = clean.cache, clean.inputs.length
    tokens = [int(clean.logits.float().argmax())] if max_new_tokens > 0 else []
    # Multimodal-rotary models (Qwen2.5-VL) would rebuild positions over a full-length mask; without one
    # they continue at cache length + their rope deltas, as `generate` does (batch of one: no padding).
    mrope = getattr(getattr(model, "model", None), "rope_deltas", None) is not None
    while tokens and len(tokens) < max_new_tokens and tokens[-1] not in eos:
        mask = None if mrope else torch.ones(1, length + len(tokens), dtype=torch.long, device=device)
        out = model(
            input_ids=torch.tensor([[tokens[-1]]], device=device),
            attention_mask=mask,
            use_cache=True,
            **cache_kwargs(model, cache),
            logits_to_keep=1,
        )
        cache = output_cache(out)
        tokens.append(int(out.logits[0, -1].float().argmax()))
    clean.cache = None
    return tokens


def answer_from_clean(loaded: LoadedModel, clean: CleanPass, max_new_tokens: int) -> str:
    """The greedy answer text, from the clean pass's cache when possible, else from `generate`."""
    if clean.cache is None or clean.logits is None or not_plain_greedy(loaded):
        clean.cache = None
        return generate_answer(loaded, clean.inputs, max_new_tokens)
    ids = greedy_token_ids(loaded, clean, max_new_tokens)
    return loaded.tokenizer.decode(ids, skip_special_tokens=True)
