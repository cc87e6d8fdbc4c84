"""The training-only probes of toy-llava (patch and grounding heads) and its losses."""

from __future__ import annotations

import torch

from mmflow.data.shapes import COLORS, SHAPES, SIZES
from mmflow.models.anatomy import anatomy_of
from mmflow.models.synthetic.toy import AUX_CLASSES, ToyConfig
from mmflow.models.synthetic.toy_training.data import Packed

# ---------------------------------------------------------------- losses


def decoder_states(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The decoder's residual stream: embeddings, then the output of every layer (the last one normed)."""
    return (
        anatomy_of(model)
        .backbone(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
            output_hidden_states=True,
        )
        .hidden_states
    )


def answer_logits(model, batch: dict[str, torch.Tensor], states: tuple | None = None) -> torch.Tensor:
    """Logits at the answer-predicting positions only (the LM head on a few rows, not all)."""
    hidden = (states or decoder_states(model, batch))[-1]
    return anatomy_of(model).unembedding(hidden[batch["rows"], batch["cols"]])


class PatchHead(torch.nn.Module):
    """Training-only linear probe on the projector output: colour (or background), shape and size of
    the object under each patch and the patch's column, the last three scored on object patches
    only. Discarded after training (not part of the saved model)."""

    def __init__(self, model):
        super().__init__()
        vision = model.config.vision_config
        self.classes = (*AUX_CLASSES, vision.image_size // vision.patch_size + 1)  # + the patch column
        self.linear = torch.nn.Linear(model.config.text_config.hidden_size, sum(self.classes))
        self.features: torch.Tensor | None = None
        anatomy_of(model).backbone.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.features = output

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the labels of the features the last forward produced."""
        logits = self.linear(self.features).split(self.classes, dim=-1)
        losses = [
            torch.nn.functional.cross_entropy(
                lg.flatten(0, 1), labels[:, a].flatten(), ignore_index=-1 if a == 0 else 0
            )
            for a, lg in enumerate(logits)
        ]
        return sum(losses) / len(losses)


class GroundingHead(torch.nn.Module):
    """Training-only linear probe on the decoder's residual stream: the colour, shape, size and
    horizontal position in the image of `n_objects` objects named by the text (`word_facts`).

    Two of them build the route the paper found in LLaVA, image -> question -> last, into the toy:
    one reads every shape and colour word after `cfg.ground_layer` (the question tokens fetch the
    facts of the objects they name), one reads the last prompt position after `cfg.gather_layer`
    (it collects the facts of the question's first and last shape word, which the two-object
    families compare). Without them no two-object family left chance within the time budget (with
    them ChooseRel does). Discarded after training (not part of the saved model)."""

    X_WEIGHT = 10.0  # x is a fraction in [0, 1]: its squared error is ~10x smaller than a class loss
    SPLIT = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES), 1)  # colour, shape (0 = absent), size, x

    def __init__(self, model, n_objects: int):
        super().__init__()
        self.linear = torch.nn.Linear(model.config.text_config.hidden_size, n_objects * sum(self.SPLIT))

    def loss(self, states: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, facts: torch.Tensor):
        """Mean of the colour, shape, size and position losses; `facts` is [n, n_objects, 4]."""
        if len(facts) == 0:
            return states.sum() * 0.0
        out = self.linear(states[rows, cols]).view(-1, sum(self.SPLIT))
        facts = facts.reshape(-1, 4)
        colour, shape, size, x = out.split(self.SPLIT, dim=-1)
        ce = torch.nn.functional.cross_entropy
        losses = [
            ce(colour, facts[:, 0].long(), ignore_index=-1),
            ce(shape, facts[:, 1].long(), ignore_index=-1),
        ]
        known = facts[:, 3] >= 0
        if known.any():
            losses.append(ce(size[known], facts[known, 2].long()))
            losses.append(self.X_WEIGHT * (x[known, 0] - facts[known, 3]).square().mean())
        return sum(losses) / len(losses)


def vision_loss(model, head: PatchHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Stage 1: the patch loss of the vision tower + projector alone (the decoder is not run)."""
    anatomy_of(model).backbone.get_image_features(
        pixel_values=batch["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default"
    )
    loss = head.loss(batch["patch_labels"])
    return loss, loss.item()


def answer_loss(model, heads: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], cfg: ToyConfig):
    """Stage 2: cross-entropy on the answer tokens + EOS, plus the patch and grounding losses;
    (total, answer part)."""
    states = decoder_states(model, batch)
    answer = torch.nn.functional.cross_entropy(answer_logits(model, batch, states), batch["targets"])
    total = answer + cfg.aux_weight * heads["patch"].loss(batch["patch_labels"])
    if cfg.ground_weight:
        for name, layer in (("ground", cfg.ground_layer), ("gather", cfg.gather_layer)):
            keys = (f"{name}_rows", f"{name}_cols", f"{name}_facts")
            total = total + cfg.ground_weight * heads[name].loss(states[layer], *(batch[k] for k in keys))
    return total, answer.item()


def vision_batch(data: Packed, index: list[int]) -> dict[str, torch.Tensor]:
    return {"pixel_values": data.pixels[index].float(), "patch_labels": data.patch_labels[index]}
