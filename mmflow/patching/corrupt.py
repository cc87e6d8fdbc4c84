"""Corrupted runs for activation patching: Gaussian noise on the image embeddings, a counterfactual
image, or a blank (mean-colour) image. The prompt and its tokens never change, only the image.

- `noise` (the causal-tracing recipe, Meng et al. 2022): the language model's input embeddings at
  the image positions (the projector's output; for LLaVA-NeXT also the newline tokens) get
  N(0, (scale * sd)^2) noise, where sd is the standard deviation of those embeddings: configured
  (`patching.noise_sd`) or measured over a fixed calibration set of the model's data source (the
  first `patching.calibration_per_task` samples of every task, `calibration_samples`), so it is a
  property of model and data source, never of the cell's task or n_samples. The generator is seeded
  by (seed, data source, task, question id): an id repeated across tasks or sources gets its own draw.
- `counterfactual`: the image of another sample of the same task whose gold answer differs, paired
  deterministically (`pair_counterfactuals`); resized to the clean image's size when its own size
  would give a different image-token layout (LLaVA-NeXT anyres).
- `blank`: an image of the clean image's size filled with the image processor's mean colour.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from mmflow.data.sample import Sample, Skip
from mmflow.errors import SampleSkip
from mmflow.inputs.encode import ModelInputs, encode, load_image
from mmflow.models.registry import LoadedModel

CORRUPTIONS = ("noise", "counterfactual", "blank")


@dataclass
class Corruption:
    """How the corrupted run of one sample differs from its clean run.

    `inputs`: the model inputs of the corrupted run (the clean ones for `noise`; same `input_ids`
    always). `positions` [n]: the only positions whose language-model input embeddings differ from
    the clean run's (the image tokens); `noise` [n, D], if set, is added to the embeddings there.
    `source`: what was used (the paired question id, the mean colour, or the noise seed and sd).
    """

    kind: str
    inputs: ModelInputs
    source: str
    noise: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def _language_model(loaded: LoadedModel) -> torch.nn.Module:
    return loaded.anatomy.language_model


@contextlib.contextmanager
def corrupting(loaded: LoadedModel, corruption: Corruption | None) -> Iterator[None]:
    """Add the corruption's noise to the language model's input embeddings inside the block."""
    if corruption is None or corruption.noise is None:
        yield
        return

    def pre_hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError("noise corruption needs the language model to get inputs_embeds")
        embeds = embeds.clone()
        positions = corruption.positions.to(embeds.device)
        embeds[0, positions] += corruption.noise.to(device=embeds.device, dtype=embeds.dtype)
        return args, {**kwargs, "inputs_embeds": embeds}

    handle = _language_model(loaded).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    pass


@torch.no_grad()
def image_embeddings(loaded: LoadedModel, inputs: ModelInputs, positions: torch.Tensor) -> torch.Tensor:
    """The language model's input embeddings [n, D] at `positions`; runs the vision tower only."""
    seen: list[torch.Tensor] = []

    def pre_hook(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"][0, positions.to(kwargs["inputs_embeds"].device)].float().cpu())
        raise _Stop

    handle = _language_model(loaded).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        loaded.model(**inputs.tensors, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def embedding_std(loaded: LoadedModel, samples: Sequence[Sample | Skip]) -> float:
    """Standard deviation of every element of the image-token input embeddings over `samples`.

    Samples that are skips or whose image cannot be read are left out; raises ValueError if none is left.
    """
    count, total, squares = 0, 0.0, 0.0
    image_token = loaded.model.config.image_token_id
    for sample in samples:
        if not isinstance(sample, Sample):
            continue
        try:
            inputs = encode(loaded, sample, load_image(sample))
        except OSError:
            continue
        values = image_embeddings(
            loaded, inputs, torch.nonzero(inputs.input_ids.cpu() == image_token).flatten()
        )
        values = values.double()
        count, total, squares = (
            count + values.numel(),
            total + float(values.sum()),
            squares + float((values**2).sum()),
        )
    if count < 2:
        raise ValueError("no readable sample to estimate the image embeddings' standard deviation from")
    mean = total / count
    return float(max(squares / count - mean * mean, 0.0) * count / (count - 1)) ** 0.5


def seed_for(seed: int, question_id: str, task: str = "", data_source: str = "") -> int:
    """A 63-bit generator seed from the cell's seed, data source, task and question id (order-independent)."""
    key = f"{seed}:{data_source}:{task}:{question_id}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def calibration_samples(load, tasks: Sequence[str], per_task: int) -> list[Sample]:
    """The noise scale's calibration set: the first `per_task` readable samples of each task the data
    source has (`load(task, n)` -> samples; a task it lacks is left out), in `tasks` order."""
    chosen: list[Sample] = []
    for task in tasks:
        try:
            samples = load(task, per_task)
        except Exception:  # noqa: BLE001 - a data source without this task: the other tasks calibrate
            continue
        chosen.extend(s for s in samples if isinstance(s, Sample))
    return chosen


def noise_corruption(
    inputs: ModelInputs,
    positions: torch.Tensor,
    hidden: int,
    sd: float,
    scale: float,
    seed: int,
    qid: str,
    task: str = "",
    data_source: str = "",
) -> Corruption:
    """Seeded N(0, (scale * sd)^2) noise [len(positions), hidden] on the embeddings at `positions`."""
    drawn = seed_for(seed, qid, task, data_source)
    generator = torch.Generator().manual_seed(drawn)
    noise = torch.randn(len(positions), hidden, generator=generator, dtype=torch.float32) * (scale * sd)
    source = f"noise seed={drawn} sd={sd:.6g} scale={scale:g}"
    return Corruption("noise", inputs, source, noise, positions)


def normalised(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def pair_counterfactuals(samples: Sequence[Sample | Skip]) -> dict[str, Sample]:
    """Each sample's counterfactual: the next sample (in order, wrapping round) of the same task whose
    normalised gold answer differs. Samples without one are missing from the result."""
    usable = [s for s in samples if isinstance(s, Sample)]
    pairs = {}
    for index, sample in enumerate(usable):
        for step in range(1, len(usable)):
            other = usable[(index + step) % len(usable)]
            if other.task == sample.task and normalised(other.answer) != normalised(sample.answer):
                pairs[sample.question_id] = other
                break
    return pairs


def _same_layout(clean: ModelInputs, other: ModelInputs) -> bool:
    return torch.equal(clean.input_ids.cpu(), other.input_ids.cpu())


def image_corruption(
    loaded: LoadedModel, sample: Sample, clean: ModelInputs, image: Image.Image, source: str
):
    """The clean prompt with another image; resized to the clean image's size if the layout differs.

    Raises `SampleSkip('corruption_layout_mismatch')` if the token layout still differs.
    """
    inputs = encode(loaded, sample, image)
    if not _same_layout(clean, inputs) and image.size != clean.image_size:
        image = image.resize(clean.image_size, Image.Resampling.BICUBIC)
        source += f" (resized to {clean.image_size[0]}x{clean.image_size[1]})"
        inputs = encode(loaded, sample, image)
    if not _same_layout(clean, inputs):
        raise SampleSkip("corruption_layout_mismatch", f"{source}: the image gives other input tokens")
    return inputs, source


def blank_image(loaded: LoadedModel, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int]]:
    """An image of `size` in the image processor's mean colour (0 after normalisation)."""
    mean = loaded.processor.image_processor.image_mean
    colour = tuple(int(round(255 * m)) for m in mean)
    return Image.new("RGB", size, colour), colour


def make_corruption(
    loaded: LoadedModel,
    kind: str,
    sample: Sample,
    clean: ModelInputs,
    image_positions: torch.Tensor,
    *,
    sd: float | None = None,
    scale: float = 3.0,
    seed: int = 0,
    counterfactual: Sample | None = None,
    data_source: str = "",
) -> Corruption:
    """The corruption of `kind` for one sample; `SampleSkip` (a per-sample skip) when it cannot apply."""
    if kind == "noise":
        if sd is None:
            raise ValueError("noise corruption needs the embeddings' standard deviation")
        hidden = loaded.model.config.get_text_config().hidden_size
        return noise_corruption(
            clean, image_positions, hidden, sd, scale, seed, sample.question_id, sample.task, data_source
        )
    if kind == "counterfactual":
        if counterfactual is None:
            raise SampleSkip("no_counterfactual", "no sample of this task has a different gold answer")
        try:
            image = load_image(counterfactual)
        except OSError as exc:
            raise SampleSkip(
                "unreadable_image", f"counterfactual {counterfactual.question_id}: {exc}"
            ) from exc
        inputs, source = image_corruption(loaded, sample, clean, image, counterfactual.question_id)
        return Corruption(kind, inputs, source, positions=image_positions)
    if kind == "blank":
        image, colour = blank_image(loaded, clean.image_size)
        inputs, source = image_corruption(loaded, sample, clean, image, f"blank rgb{colour}")
        return Corruption(kind, inputs, source, positions=image_positions)
    raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
