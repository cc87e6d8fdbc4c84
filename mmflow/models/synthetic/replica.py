"""Replica checkpoints: folders laid out like the llava-hf ones, with real vocabularies and random weights.

A replica has everything of its real checkpoint except trained weights: `config.json` with the
real architecture fields (vision tower, projector, `image_token_index`, feature layer and strategy,
`image_grid_pinpoints`, rope theta, KV heads), the processor and image-processor configs, the real
tokenizer with `<image>` (and `<pad>`) added as llava-hf's conversion scripts do, a chat template,
`generation_config.json` and seeded random safetensors weights. It loads through the same
`from_pretrained` path as a hub id. Depth and width are shrunk for CPU unless `full_size` is set.

    python -m mmflow.models.synthetic.replica build llava-1.5-7b --out DIR [--full-size] [--dtype float16]

Every field's source is in `mmflow.models.synthetic.replica_specs` (comments) and docs/models.md,
"Replica checkpoints".
Another model family is one more `ReplicaSpec` entry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmflow.models.synthetic.builder import ModelSpec, TextSpec, VisionSpec, build_weights, model_config
from mmflow.models.synthetic.processor_builder import ProcessorSpec, make_processor, vocabulary_json
from mmflow.models.synthetic.replica_specs import IMAGE_TOKEN, PAD_TOKEN, REPLICA_SPECS, ReplicaSpec
from mmflow.storage.files import apply_umask, make_temp_dir

BUILD_VERSION = 1  # bump when the builder changes, so cached replicas are rebuilt


def build_tokenizer(spec: ReplicaSpec, legacy: bool | None = None):
    """The real vocabulary with `<image>` (and `<pad>`) added as special tokens, as llava-hf does.

    `legacy` overrides the spec's tokenizer_config `legacy` flag (Llama SentencePiece vocabularies):
    transformers then normalises with `Prepend("▁")` semantics (True) or Metaspace
    `prepend_scheme="first"` (False), the two forms llava-hf tokenizers exist in.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer

    backend = Tokenizer.from_str(vocabulary_json(spec.vocab))
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    if spec.add_pad_token:
        backend.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
    config: dict[str, Any] = {
        "tokenizer_class": spec.tokenizer_class,
        **{f"{k}_token": v for k, v in spec.special_tokens.items()},
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.text.max_positions,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN},
    }
    legacy = spec.legacy if legacy is None else legacy
    if legacy is not None:
        config["legacy"] = legacy
    with tempfile.TemporaryDirectory() as folder:
        backend.save(str(Path(folder) / "tokenizer.json"))
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config))
        return AutoTokenizer.from_pretrained(folder)


def _shrunk(spec: ReplicaSpec) -> tuple[TextSpec, VisionSpec]:
    """CPU sizes: the spec's shrunk widths and depths, KV heads in the real ratio."""
    heads, ratio = spec.shrink_heads, spec.text.heads // spec.text.kv_heads
    text = replace(spec.text, **spec.shrink_text, heads=heads, kv_heads=max(1, heads // ratio))
    return text, replace(spec.vision, **spec.shrink_vision)


def replica_config(spec: ReplicaSpec, tokenizer, full_size: bool = False):
    """The `LlavaConfig` / `LlavaNextConfig` of the replica (full-size or shrunk dims)."""
    text, vision = (spec.text, spec.vision) if full_size else _shrunk(spec)
    pad_id = tokenizer.convert_tokens_to_ids(spec.special_tokens["pad"])
    model = ModelSpec(
        spec.architecture,
        text,
        vision,
        vocab_size=-(-len(tokenizer) // spec.pad_vocab_to) * spec.pad_vocab_to,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=spec.generation["eos_token_id"],
        pad_token_id=pad_id,
        pinpoints=spec.pinpoints,
        fields={"tie_word_embeddings": False, "pad_token_id": pad_id},  # llava-hf config.json, top level
    )
    return model_config(model)


def build_processor(spec: ReplicaSpec, tokenizer):
    """The llava-hf processor: CLIP-L/336 image processing (anyres for NeXT), 576 tokens per view."""
    processor = ProcessorSpec(
        spec.architecture,
        spec.vision.image_size,
        spec.vision.patch_size,
        # llava-hf's LLaVA-1.5 checkpoints save a CLIPImageProcessor (no padding to a square)
        image_processor="clip" if spec.architecture == "llava" else None,
        pinpoints=spec.pinpoints,
        chat_template=spec.chat_template,
        image_fields=dict(
            resample=3,  # bicubic, as clip-vit-large-patch14-336's preprocessor_config.json
            do_convert_rgb=True,
        ),
    )
    return make_processor(processor, tokenizer)


def build_replica(
    name: str,
    out: str | Path,
    full_size: bool = False,
    dtype: str | None = None,
    seed: int = 0,
    legacy: bool | None = None,
    overwrite: bool = True,
) -> Path:
    """Build the replica of `name` into folder `out` (written atomically); return the folder.

    `legacy` overrides the tokenizer's `legacy` flag (see `build_tokenizer`); `overwrite=False`
    raises OSError instead of replacing an existing folder.
    """
    import torch

    if name not in REPLICA_SPECS:
        raise KeyError(f"no replica spec for {name!r}; known: {sorted(REPLICA_SPECS)}")
    spec = REPLICA_SPECS[name]
    out = Path(out)
    tokenizer = build_tokenizer(spec, legacy)
    processor = build_processor(spec, tokenizer)
    config = replica_config(spec, tokenizer, full_size)
    torch_dtype = getattr(torch, dtype or ("float16" if full_size else "float32"))
    model = build_weights(config, seed, torch_dtype)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**spec.generation)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(out.parent, f".{out.name}-")
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "replica.json").write_text(
            json.dumps(
                {
                    "replicates": spec.hub_id,
                    "full_size": full_size,
                    "seed": seed,
                    "build_version": BUILD_VERSION,
                },
                indent=2,
            )
        )
        apply_umask(staging)
        if out.exists() and overwrite:
            shutil.rmtree(out)
        os.replace(staging, out)  # OSError if `out` is a non-empty folder (not overwritten)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def ensure_replica(name: str, root: Path | None = None, legacy: bool | None = None) -> Path:
    """The cached CPU-size replica of `name` (built on first use into `$MMFLOW_CACHE/models`)."""
    from mmflow.models.synthetic.tiny import cache_root

    legacy = None if legacy == REPLICA_SPECS[name].legacy else legacy  # the spec's own form: one folder
    tag = "" if legacy is None else f"-legacy{int(legacy)}"
    target = (root or cache_root() / "models") / f"replica-{name}{tag}-v{BUILD_VERSION}"
    if not (target / "config.json").exists():
        try:
            build_replica(name, target, legacy=legacy, overwrite=False)
        except OSError:  # another process finished the same build first
            if not (target / "config.json").exists():
                raise
    return target


def with_spec(name: str, **changes: Any) -> ReplicaSpec:
    """A copy of a spec with fields changed (e.g. another family built from an existing one)."""
    return replace(REPLICA_SPECS[name], **changes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mmflow.models.synthetic.replica", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a replica checkpoint folder")
    build.add_argument("name", choices=sorted(REPLICA_SPECS))
    build.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    build.add_argument("--full-size", action="store_true", help="real depths and widths (7-13B weights)")
    build.add_argument(
        "--dtype", default=None, help="float32 | float16 | bfloat16 (default: float16 full size)"
    )
    build.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_replica(args.name, args.out, args.full_size, args.dtype, args.seed)
    print(f"[mmflow] replica of {REPLICA_SPECS[args.name].hub_id} -> {path}")


if __name__ == "__main__":
    main()
