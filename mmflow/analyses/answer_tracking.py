"""Answer tracking: a logit lens on the last position's residual stream (docs/method.md, "Answer tracking").

Every layer's hidden state at the last position (`CleanPass.last_hidden` [L+1, D]: the embeddings,
then the output of each decoder layer, before the final norm) is projected onto the vocabulary, and
the probability of the answer's first token is read in lower case and with a capital initial (and,
for Choose tasks, of the false option likewise). No knockout is needed, so the clean pass is the one
shared with the knockout cells of the same sample.

Answer token forms: the model emits its answer right after the prompt, so the answer is tokenized as
a continuation of the prompt text: appended directly when the prompt already ends in whitespace
(LLaMA-3's "<|end_header_id|>\\n\\n"), after one space otherwise (Vicuna's "ASSISTANT:", whose reply
is "ASSISTANT: Red</s>"). The tokenizer then decides the surface form: "▁red" for SentencePiece-style
vocabularies, "red" for byte-level ones. Nothing is keyed on the model's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from mmflow.analyses.base import Analysis, Labels, SamplePlan, register
from mmflow.analyses.curves import curve_stats
from mmflow.config.checks import check_choice
from mmflow.data.sample import CHOOSE_TASKS, Sample
from mmflow.errors import SampleSkip
from mmflow.inputs.groups import TokenGroups
from mmflow.inputs.prompts import build_prompt

if TYPE_CHECKING:
    from mmflow.execution.engines import Engines
    from mmflow.knockout.clean_pass import CleanPass
    from mmflow.models.registry import LoadedModel

LENSES = ("norm", "raw")
TOP_K = 5
THRESHOLD = 0.5  # the headline's "answer is there" level (mean probability over samples)
FORMS = ("lower", "capital", "false_lower", "false_capital")
FORM_LABELS = {
    "lower": "answer (lower case)",
    "capital": "Answer (capitalised)",
    "false_lower": "false option (lower case)",
    "false_capital": "False option (capitalised)",
}
RESULT_COLUMNS = [
    "question_id",
    "layer",
    "lens",
    *(f"{c}_{form}" for form in FORMS for c in ("p", "token_id", "token")),
    "gold_rank",
    "capital_rank",
    "top5_ids",
    "top5_tokens",
    "top5_text",
    "top5_probs",
    "model",
    "task",
]
RESULT_TYPES = {
    "question_id": "string",
    "layer": "int64",
    "lens": "string",
    **{f"p_{form}": "float64" for form in FORMS},
    **{f"token_id_{form}": "int64" for form in FORMS},
    **{f"token_{form}": "string" for form in FORMS},
    "gold_rank": "int64",
    "capital_rank": "int64",
    "top5_ids": "list<int64>",
    "top5_tokens": "list<string>",
    "top5_text": "list<string>",
    "top5_probs": "list<float64>",
    "model": "string",
    "task": "string",
}


# ---------------------------------------------------------------- answer token forms


@dataclass(frozen=True)
class AnswerToken:
    """The first token of one surface form of a word, as the model would emit it after the prompt."""

    text: str  # the surface form, e.g. "Red"
    token_id: int
    piece: str  # the vocabulary piece, e.g. "▁R" or "R"


def lower_and_capital(word: str) -> tuple[str, str]:
    """("red", "Red") for "red", "Red" or "RED": lower case, and lower case with a capital initial."""
    lower = word.strip().lower()
    return lower, lower[:1].upper() + lower[1:]


def continuation_ids(tokenizer, prompt_text: str, add_bos: bool, text: str) -> list[int]:
    """Token ids `text` gets when it continues the prompt (the tokens after the prompt's own).

    Raises `SampleSkip('answer_merges_with_prompt')` if the prompt's tokens change when text follows.
    """
    separator = "" if prompt_text[-1:].isspace() else " "
    prefix = tokenizer(prompt_text, add_special_tokens=add_bos)["input_ids"]
    full = tokenizer(prompt_text + separator + text, add_special_tokens=add_bos)["input_ids"]
    if full[: len(prefix)] != prefix or len(full) == len(prefix):
        raise SampleSkip("answer_merges_with_prompt", f"{text!r} does not tokenize as its own tokens")
    return full[len(prefix) :]


def no_token_reason(tokenizer, token_id: int) -> str | None:
    """Why `token_id` cannot stand for a word's first token, or None if it can.

    It cannot when it is the unknown or a special token, or when it holds no whole character of the
    word: a bare word-boundary marker ("▁" before byte-fallback pieces) or a lone byte of a
    multi-byte character (SentencePiece "<0xE6>", byte-level "æ"), which decode to "" or "\\ufffd".
    """
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if token_id == tokenizer.unk_token_id or token_id in tokenizer.all_special_ids:
        return f"first token {piece!r} is the unknown or a special token"
    text = tokenizer.decode([token_id])
    if not text.strip() or "\ufffd" in text:
        return f"first token {piece!r} decodes to {text!r}, not to a character of the answer"
    return None


def answer_token(tokenizer, prompt_text: str, add_bos: bool, text: str) -> AnswerToken:
    """The first token of `text` continuing the prompt; `SampleSkip('answer_not_in_vocabulary')` if none."""
    ids = continuation_ids(tokenizer, prompt_text, add_bos, text)
    reason = no_token_reason(tokenizer, ids[0])
    if reason is not None:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise SampleSkip("answer_not_in_vocabulary", f"{text!r} -> {pieces}: {reason}")
    return AnswerToken(text, ids[0], tokenizer.convert_ids_to_tokens(ids[0]))


def answer_tokens(
    tokenizer, prompt_text: str, add_bos: bool, sample: Sample
) -> dict[str, AnswerToken | None]:
    """First tokens of the forms in `FORMS` (false ones None outside Choose tasks); `SampleSkip` if bad."""
    if not sample.answer.strip():
        raise SampleSkip("empty_answer", "the gold answer is empty")
    words = {"": sample.answer}
    if sample.task in CHOOSE_TASKS:
        for name, option in (("true", sample.true_option), ("false", sample.false_option)):
            if not (option or "").strip():
                raise SampleSkip("empty_option", f"the {name} option is empty")
        words["false_"] = sample.false_option
    out: dict[str, AnswerToken | None] = dict.fromkeys(FORMS)
    for prefix, word in words.items():
        lower, capital = lower_and_capital(word)
        out[f"{prefix}lower"] = answer_token(tokenizer, prompt_text, add_bos, lower)
        out[f"{prefix}capital"] = answer_token(tokenizer, prompt_text, add_bos, capital)
    return out


# ---------------------------------------------------------------- the lens


@torch.no_grad()
def lens_probs(loaded: LoadedModel, hidden: torch.Tensor, lens: str = "norm") -> torch.Tensor:
    """Vocabulary probabilities [L+1, V] (float32) of the last-position residual stream `hidden` [L+1, D].

    `norm`: final norm then unembedding on every row (the standard logit lens; the last row is then
    the model's own output). `raw`: the unembedding alone on rows 0..L-1, the final norm on row L
    only (the paper's code). Computed in the model's dtype, softmax in float32 like the engine.
    """
    if lens not in LENSES:
        raise ValueError(f"lens must be one of {LENSES}, got {lens!r}")
    head, norm = loaded.anatomy.unembedding, loaded.anatomy.final_norm
    hidden = hidden.to(device=head.weight.device, dtype=head.weight.dtype)
    normed = norm(hidden) if lens == "norm" else torch.cat([hidden[:-1], norm(hidden[-1:])])
    logits = head(normed).float()
    return torch.log_softmax(logits, dim=-1).exp().cpu()


def ranks(probs: torch.Tensor, token_id: int) -> torch.Tensor:
    """Rank [L+1] of `token_id` in each row of `probs` [L+1, V]: 1 + tokens with a higher probability."""
    return (probs > probs[:, token_id : token_id + 1]).sum(dim=-1) + 1


def form_columns(probs: torch.Tensor, tokens: dict[str, AnswerToken | None]) -> dict[str, list]:
    """Per-layer columns of each form (p_*, token_id_*, token_*) and the two ranks, from `probs` [L+1, V]."""
    n = len(probs)
    out: dict[str, list] = {}
    for form, token in tokens.items():
        out[f"p_{form}"] = probs[:, token.token_id].tolist() if token else [math.nan] * n
        out[f"token_id_{form}"] = [token.token_id if token else None] * n
        out[f"token_{form}"] = [token.piece if token else None] * n
    out["gold_rank"] = ranks(probs, tokens["lower"].token_id).tolist()
    out["capital_rank"] = ranks(probs, tokens["capital"].token_id).tolist()
    return out


def top_columns(probs: torch.Tensor, tokenizer) -> dict[str, list]:
    """Per-layer top-5 ids, vocabulary pieces, decoded text and probabilities of `probs` [L+1, V]."""
    top_p, top_ids = probs.topk(TOP_K, dim=-1)
    ids = top_ids.tolist()
    return {
        "top5_ids": ids,
        "top5_tokens": [tokenizer.convert_ids_to_tokens(row) for row in ids],
        "top5_text": [[tokenizer.decode([i]) for i in row] for row in ids],
        "top5_probs": top_p.tolist(),
    }


# ---------------------------------------------------------------- the analysis


@register
class AnswerTrackingAnalysis(Analysis):
    """Logit lens at the last position: the answer's probability per layer in each surface form.

    Config (`conf/analysis/answer_tracking.yaml`): `lens` (norm | raw). No knockout, so no jobs and
    no engine capability: the clean pass's last-position hidden states are all it reads.
    """

    name = "answer_tracking"
    curve_role = "lens"
    config_keys = ("lens",)
    result_columns = RESULT_COLUMNS
    result_types = RESULT_TYPES
    value_columns = tuple(f"p_{form}" for form in FORMS)

    @classmethod
    def validate(cls, config) -> None:
        """A known lens (norm | raw)."""
        check_choice("lens", config.get("lens", "norm"), LENSES)

    def __init__(self, config) -> None:
        super().__init__(config)
        self.lens = self.config["lens"]
        if self.lens not in LENSES:
            raise ValueError(f"lens must be one of {LENSES}, got {self.lens!r}")

    # ------------------------------------------------------------ compute side

    def plan(self, groups: TokenGroups | None, sample: Sample) -> SamplePlan:
        """No knockouts; the state is the answer's token forms (`answer_tokens`, as they continue the
        sample's prompt). Raises `SampleSkip` when the answer has no usable token."""
        prompt = build_prompt(self.loaded.prompt_format, sample.question, self.loaded.parity)
        return SamplePlan(state=answer_tokens(self.loaded.tokenizer, prompt.text, prompt.add_bos, sample))

    def rows(
        self,
        sample: Sample,
        clean: CleanPass,
        token_id: int,
        plan: SamplePlan,
        outputs: torch.Tensor,
        engines: Engines,
    ) -> list[dict]:
        """L+1 rows for one sample (layer 0 = embeddings, layer l = output of decoder layer l)."""
        tokens = plan.state
        probs = lens_probs(self.loaded, clean.last_hidden, self.lens)  # [L+1, V]
        per_layer = {
            "layer": list(range(len(probs))),
            **form_columns(probs, tokens),
            **top_columns(probs, self.loaded.tokenizer),
        }
        constant = {"question_id": sample.question_id, "lens": self.lens, **self.row_labels}
        return [
            {c: constant[c] if c in constant else per_layer[c][layer] for c in RESULT_COLUMNS}
            for layer in per_layer["layer"]
        ]

    # ------------------------------------------------------------ output side

    def headline(self, results: pd.DataFrame) -> dict:
        """Per form: first layer where the mean probability over samples exceeds 50%, and the maximum."""
        out: dict[str, Any] = {"lens": self.lens}
        if not len(results):
            return out
        table = self.curve_table(results)
        for form in FORMS:
            curve = table[table["value"] == f"p_{form}_pct"].set_index("layer")["mean"] / 100.0
            if not len(curve):
                continue
            above = curve.index[curve > THRESHOLD]
            out[f"{form}_first_layer_over_50"] = int(above[0]) if len(above) else None
            out[f"{form}_max_pct"] = round(float(curve.max()) * 100.0, 4)
            out[f"{form}_max_layer"] = int(curve.idxmax())
        return out

    def curve_table(self, results: pd.DataFrame) -> pd.DataFrame:
        """One curve per token form (`form_curves`)."""
        return form_curves(results)

    @property
    def labels(self) -> Labels:
        model, task = str(self.config["model"]["name"]), str(self.config["task"])
        return Labels(
            variant=self.name,
            legend=f"answer tracking (lens = {self.lens})",
            tags=(model, task, self.name),
            order=(self.lens,),
        )

    def figure(self, cell: Any):
        from mmflow.analyses.plots import new_figure

        figure, ax = new_figure()
        title = f"{cell.model_title} — {cell.task}: answer tracking (lens = {self.lens})"
        plot_answer_tracking(cell.results, ax=ax, title=title)
        return figure

    @classmethod
    def title(cls) -> str:
        return "Answer tracking (logit lens)"


# ---------------------------------------------------------------- the figure


def form_curves(results: pd.DataFrame) -> pd.DataFrame:
    """The curve table of answer tracking: one curve per token form present in `results`.

    Rows (value = `p_<form>_pct`, label, layer, n, mean, sem, ci_low, ci_high): the probability in %,
    its mean over samples and the 95% band clipped to 0..100 (`mmflow.analyses.curves.curve_stats`).
    """
    frames = []
    for form in FORMS:
        column = f"p_{form}"
        if column not in results or results[column].isna().all():
            continue
        stats = curve_stats(results, column, scale=100.0, clip=(0.0, 100.0))
        frames.append(stats.assign(value=f"{column}_pct", label=FORM_LABELS[form]))
    columns = ["value", "label", "layer", "n", "mean", "sem", "ci_low", "ci_high"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def plot_answer_tracking(results: pd.DataFrame, ax=None, title: str | None = None):
    """The paper-style figure on `ax` (a new Agg figure if None): probability (%) against layer,
    one line per token form with its 95% band. Returns the axis."""
    if ax is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.0, 3.6), layout="constrained")
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
    curves = form_curves(results)
    for form in FORMS:
        curve = curves[curves["value"] == f"p_{form}_pct"]
        if not len(curve):
            continue
        style = "--" if form.startswith("false") else "-"
        x = curve["layer"]
        (line,) = ax.plot(x, curve["mean"], style, marker="o", ms=3, label=FORM_LABELS[form])
        ax.fill_between(x, curve["ci_low"], curve["ci_high"], color=line.get_color(), alpha=0.2)
    if len(results) and title is None and "lens" in results:
        parts = [str(results[c].iloc[0]) for c in ("model", "task") if c in results]
        title = " / ".join(parts + [f"lens={results['lens'].iloc[0]}"])
    ax.set(xlabel="layer (0 = embeddings)", ylabel="probability (%)", ylim=(0, 100), title=title or "")
    ax.legend(loc="upper left", fontsize="small")
    return ax
