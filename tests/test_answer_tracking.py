"""Answer tracking: answer token forms per tokenizer style, the logit lens, rows, headline, figure, cells."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import model_config

from mmflow.analyses import make_analysis
from mmflow.analyses.answer_tracking import (
    FORM_LABELS,
    RESULT_COLUMNS,
    AnswerTrackingAnalysis,
    answer_tokens,
    continuation_ids,
    lens_probs,
    no_token_reason,
    plot_answer_tracking,
)
from mmflow.analyses.knockout import RESULT_COLUMNS as KNOCKOUT_COLUMNS
from mmflow.data import Sample, load_shapes
from mmflow.errors import GroupError, SampleSkip
from mmflow.execution.engines import Engines
from mmflow.inputs.encode import encode
from mmflow.inputs.prompts import build_prompt
from mmflow.knockout.reference import ReferenceEngine
from mmflow.models.registry import get_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny-llava", "tiny-llava-next")
# First token of the answer as each tokenizer continues the prompt ("ASSISTANT:" -> " red";
# "<|end_header_id|>\n\n" -> "red"), and the piece of the other spacing, which the vocabulary also has.
EXPECTED_PIECES = {
    "tiny-llava": {"red": "▁red", "Red": "▁R", "blue": "▁blue", "Blue": "▁Bl", "other_spacing": "red"},
    "tiny-llava-next": {"red": "red", "Red": "R", "blue": "blue", "Blue": "B", "other_spacing": "Ġred"},
}


def load(name: str):
    return get_model(model_config(name))


def shapes(task: str, n: int, folder: Path) -> list:
    return load_shapes(task, n, seed=0, cache_dir=folder)


def make_sample(task: str = "QueryAttr", answer: str = "red", options=(None, None)) -> Sample:
    """A sample for tokenization checks only (no image is read)."""
    question = "Is the circle red or blue?"
    return Sample("q0", task, Path("/none.jpg"), question, answer, (500, 375), (), (), *options)


def pieces(loaded, sample) -> dict[str, str | None]:
    prompt = build_prompt(loaded.prompt_format, sample.question)
    tokens = answer_tokens(loaded.tokenizer, prompt.text, prompt.add_bos, sample)
    return {form: token.piece if token else None for form, token in tokens.items()}


def analysis(loaded, lens: str = "norm") -> AnswerTrackingAnalysis:
    config = {"analysis": "answer_tracking", "lens": lens, "model": {"name": loaded.name}}
    config["task"] = "ChooseAttr"
    analysis = make_analysis(config, loaded)
    assert isinstance(analysis, AnswerTrackingAnalysis)
    return analysis


# ---------------------------------------------------------------- token forms and bad input


@pytest.mark.parametrize("name", MODELS)
def test_answer_forms_follow_how_the_tokenizer_continues_the_prompt(name):
    loaded = load(name)
    expected = EXPECTED_PIECES[name]
    sample = make_sample("ChooseAttr", "red", ("red", "blue"))
    got = pieces(loaded, sample)
    assert got == {
        "lower": expected["red"],
        "capital": expected["Red"],
        "false_lower": expected["blue"],
        "false_capital": expected["Blue"],
    }
    # The other spacing is a real token too, so picking the wrong one would not go unnoticed.
    other = loaded.tokenizer.convert_tokens_to_ids(expected["other_spacing"])
    assert other not in (None, loaded.tokenizer.unk_token_id)
    assert other != loaded.tokenizer.convert_tokens_to_ids(expected["red"])
    # Outside Choose tasks there is no false option.
    assert pieces(loaded, make_sample("QueryAttr", "Red"))["false_lower"] is None
    assert pieces(loaded, make_sample("QueryAttr", "RED"))["lower"] == expected["red"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    ("task", "answer", "options", "reason"),
    [
        ("QueryAttr", "日本", (None, None), "answer_not_in_vocabulary"),
        ("QueryAttr", "  ", (None, None), "empty_answer"),
        ("ChooseAttr", "red", ("red", ""), "empty_option"),
        ("ChooseAttr", "red", ("red", None), "empty_option"),
        ("ChooseAttr", "red", ("red", "日本"), "answer_not_in_vocabulary"),
    ],
)
def test_bad_answers_are_per_sample_skips(name, task, answer, options, reason):
    loaded = load(name)
    with pytest.raises(SampleSkip) as info:
        analysis(loaded).plan(None, make_sample(task, answer, options))
    assert info.value.reason == reason
    assert not isinstance(info.value, GroupError)  # about the answer, not a token group
    plan = analysis(loaded).plan(None, make_sample("ChooseAttr", "red", ("red", "blue")))
    assert plan.knockouts == [] and plan.first_target is None
    assert {form: token.piece for form, token in plan.state.items()} == {
        "lower": EXPECTED_PIECES[name]["red"],
        "capital": EXPECTED_PIECES[name]["Red"],
        "false_lower": EXPECTED_PIECES[name]["blue"],
        "false_capital": EXPECTED_PIECES[name]["Blue"],
    }


@pytest.mark.parametrize(("name", "pieces_without_a_character"), [
    ("tiny-llava", ["<unk>", "</s>", "▁", "<0xE6>"]),
    ("tiny-llava-next", ["<|eot_id|>", "Ġ", "æ"]),
])  # fmt: skip
def test_tokens_that_hold_no_character_of_the_answer(name, pieces_without_a_character):
    tokenizer = load(name).tokenizer
    for piece in pieces_without_a_character:
        assert no_token_reason(tokenizer, tokenizer.convert_tokens_to_ids(piece)) is not None, piece
    for piece in ["R", EXPECTED_PIECES[name]["red"]]:
        assert no_token_reason(tokenizer, tokenizer.convert_tokens_to_ids(piece)) is None, piece


def test_an_answer_that_merges_with_the_prompt_is_a_skip():
    class MergingTokenizer:  # merges "\n\n" into one token, as byte-level vocabularies do
        def __call__(self, text: str, add_special_tokens: bool) -> dict:
            return {"input_ids": [ord(c) for c in text.replace("\n\n", "N")]}

    assert continuation_ids(MergingTokenizer(), "Q:\n", False, "red") == [ord(c) for c in "red"]
    assert continuation_ids(MergingTokenizer(), "Q:", False, "red") == [ord(c) for c in " red"]
    with pytest.raises(SampleSkip) as info:
        continuation_ids(MergingTokenizer(), "Q:\n", False, "\nred")
    assert info.value.reason == "answer_merges_with_prompt" and not isinstance(info.value, GroupError)


# ---------------------------------------------------------------- the lens and the rows


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


@pytest.fixture(scope="module", params=MODELS)
def clean_run(request, tmp_path_factory):
    """(loaded, sample, clean pass) of one ChooseAttr shapes sample."""
    loaded = load(request.param)
    sample = shapes("ChooseAttr", 1, tmp_path_factory.mktemp("shapes"))[0]
    return loaded, sample, ReferenceEngine(loaded, "sdpa").clean(encode(loaded, sample))


def test_norm_lens_at_the_final_layer_is_the_model_output(clean_run):
    loaded, _, clean = clean_run
    n_layers = loaded.n_layers
    assert clean.last_hidden.shape == (n_layers + 1, loaded.model.config.get_text_config().hidden_size)
    model_probs = clean.logprobs.exp()
    for lens in ("norm", "raw"):
        probs = lens_probs(loaded, clean.last_hidden, lens)
        assert probs.shape == (n_layers + 1, model_probs.shape[0])
        torch.testing.assert_close(probs[-1], model_probs, atol=1e-6, rtol=0)
        torch.testing.assert_close(probs.sum(-1), torch.ones(n_layers + 1))


def test_norm_and_raw_lens_match_a_plain_projection(clean_run):
    loaded, _, clean = clean_run
    head, norm = loaded.model.lm_head, loaded.model.model.language_model.norm
    with torch.no_grad():
        by_hand_norm = torch.softmax(head(_rms(clean.last_hidden, norm)).float(), -1)
        by_hand_raw = torch.softmax(head(clean.last_hidden).float(), -1)
    norm_probs = lens_probs(loaded, clean.last_hidden, "norm")
    raw_probs = lens_probs(loaded, clean.last_hidden, "raw")
    torch.testing.assert_close(norm_probs, by_hand_norm, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(raw_probs[:-1], by_hand_raw[:-1], atol=1e-6, rtol=1e-5)
    # The two lenses really differ (random weights give near-uniform rows: compare log-probabilities).
    assert (norm_probs[:-1].log() - raw_probs[:-1].log()).abs().max() > 0.1


def test_rows_hold_the_lens_probabilities(clean_run):
    loaded, sample, clean = clean_run
    tracking = analysis(loaded, "raw")
    plan = tracking.plan(None, sample)
    rows = tracking.rows(sample, clean, clean.top1, plan, torch.empty(0), Engines(loaded, engine=None))
    probs = lens_probs(loaded, clean.last_hidden, "raw")
    assert len(rows) == loaded.n_layers + 1
    assert [r["layer"] for r in rows] == list(range(loaded.n_layers + 1))
    assert all(list(r) == RESULT_COLUMNS for r in rows)
    expected = pieces(loaded, sample)
    for layer, row in enumerate(rows):
        assert row["lens"] == "raw" and row["question_id"] == sample.question_id
        for form in ("lower", "capital", "false_lower", "false_capital"):
            assert row[f"token_{form}"] == expected[form]
            assert row[f"p_{form}"] == pytest.approx(float(probs[layer, row[f"token_id_{form}"]]), abs=1e-9)
        gold = probs[layer, row["token_id_lower"]]
        assert row["gold_rank"] == int((probs[layer] > gold).sum()) + 1
        assert row["top5_ids"] == probs[layer].topk(5).indices.tolist()
        assert row["top5_probs"] == sorted(row["top5_probs"], reverse=True)
        assert row["top5_tokens"] == loaded.tokenizer.convert_ids_to_tokens(row["top5_ids"])
        assert (row["gold_rank"] == 1) == (row["top5_ids"][0] == row["token_id_lower"])
    assert rows[-1]["top5_ids"][0] == clean.top1


# ---------------------------------------------------------------- headline and figure


def synthetic_results() -> pd.DataFrame:
    """Two samples over layers 0..3: lower case peaks at layer 2, capitalised takes over at layer 3."""
    lower = {0: [0.0, 0.1], 1: [0.3, 0.5], 2: [0.6, 0.8], 3: [0.1, 0.3]}
    capital = {0: [0.0, 0.0], 1: [0.0, 0.2], 2: [0.2, 0.4], 3: [0.9, 0.7]}
    rows = []
    for layer in range(4):
        for i in range(2):
            rows.append(
                {
                    "question_id": f"q{i}",
                    "layer": layer,
                    "lens": "norm",
                    "p_lower": lower[layer][i],
                    "p_capital": capital[layer][i],
                    "p_false_lower": 0.05,
                    "p_false_capital": math.nan if i else 0.01,
                    "model": "m",
                    "task": "ChooseAttr",
                }
            )
    return pd.DataFrame(rows)


def test_headline_first_layers_over_50_and_maxima():
    head = analysis(load("tiny-llava")).headline(synthetic_results())
    assert head["lens"] == "norm"
    assert head["lower_first_layer_over_50"] == 2
    assert head["capital_first_layer_over_50"] == 3
    assert head["false_lower_first_layer_over_50"] is None
    assert head["lower_max_pct"] == pytest.approx(70.0) and head["lower_max_layer"] == 2
    assert head["capital_max_pct"] == pytest.approx(80.0) and head["capital_max_layer"] == 3
    assert analysis(load("tiny-llava")).headline(synthetic_results().iloc[:0]) == {"lens": "norm"}


def test_plot_has_one_line_and_one_band_per_form():
    ax = plot_answer_tracking(synthetic_results())
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {FORM_LABELS[f] for f in ("lower", "capital", "false_lower", "false_capital")}
    assert list(lines[FORM_LABELS["lower"]].get_xdata()) == [0, 1, 2, 3]
    assert list(lines[FORM_LABELS["lower"]].get_ydata()) == pytest.approx([5.0, 40.0, 70.0, 20.0])
    assert list(lines[FORM_LABELS["capital"]].get_ydata()) == pytest.approx([0.0, 10.0, 30.0, 80.0])
    assert len(ax.collections) == 4  # the bands
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.0) and band.max() > 70.0  # clipped at 0, wider than the mean
    assert ax.get_ylabel() == "probability (%)" and ax.get_ylim() == (0.0, 100.0)
    assert "lens=norm" in ax.get_title()
    only_answer = synthetic_results().drop(columns=["p_false_lower", "p_false_capital"])
    assert len(plot_answer_tracking(only_answer).get_lines()) == 2


# ---------------------------------------------------------------- cells


def _compose(overrides: list[str], results_dir: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from mmflow.cli import cell_config
    from mmflow.config.dirs import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"results_dir={results_dir}", *overrides])
    return cell_config(cfg)


def test_cell_configs_hold_only_the_keys_their_analysis_reads(tmp_path):
    from hydra.errors import ConfigCompositionException

    from mmflow.storage.store import cell_id

    base = ["task=ChooseAttr", "analysis=answer_tracking"]
    at = _compose(base, tmp_path)
    assert "knockout" not in at and "window" not in at and at["lens"] == "norm"
    for foreign in (["knockout=image_to_last"], ["window=5"]):  # an error, not a silently ignored key
        with pytest.raises(ConfigCompositionException):
            _compose([*base, *foreign], tmp_path)
    assert cell_id(_compose([*base, "lens=raw"], tmp_path)) != cell_id(at)
    ko = _compose(["task=ChooseAttr"], tmp_path)
    assert "lens" not in ko and ko["window"] == ko["model"]["default_window"]
    with pytest.raises(ConfigCompositionException):
        _compose(["task=ChooseAttr", "lens=raw"], tmp_path)


def test_both_analyses_share_one_clean_pass_per_sample(tmp_path, monkeypatch):
    import mmflow.execution.runtime as runtime

    common = ["model=tiny-llava", "task=ChooseAttr", "n_samples=2", "max_new_tokens=2"]
    configs = [
        _compose([*common, "knockout=question_to_last"], tmp_path / "results"),
        _compose([*common, "analysis=answer_tracking"], tmp_path / "results"),
    ]
    loaded = get_model(configs[0]["model"])
    samples = shapes("ChooseAttr", 2, tmp_path / "shapes")
    # A bad answer: answer tracking skips the sample, the knockout cell still scores it.
    samples[1] = dataclasses.replace(samples[1], answer="日本")
    monkeypatch.setattr(runtime, "load_samples", lambda config: samples)
    outcomes = runtime.run_cells(loaded, configs)
    assert [o.status for o in outcomes] == ["done", "done"]
    (ko_dir, at_dir) = (Path(o.path) for o in outcomes)
    ko_meta, at_meta = (json.loads((d / "cell.json").read_text()) for d in (ko_dir, at_dir))
    assert ko_meta["clean_passes_per_sample"] == at_meta["clean_passes_per_sample"] == 1
    assert at_meta["config"]["lens"] == "norm" and at_meta["headline"]["lens"] == "norm"
    assert at_meta["counts"]["scored"] == 1
    assert at_meta["counts"]["skipped"] == {"answer_not_in_vocabulary": 1}
    assert ko_meta["counts"]["scored"] == 2
    at_samples = pd.read_parquet(at_dir / "samples.parquet")
    assert at_samples["skip_reason"].fillna("").tolist() == ["", "answer_not_in_vocabulary"]
    at_results = pd.read_parquet(at_dir / "results.parquet")
    assert list(at_results.columns) == RESULT_COLUMNS
    assert len(at_results) == loaded.n_layers + 1
    assert set(at_results["question_id"]) == {samples[0].question_id}
    ko_results = pd.read_parquet(ko_dir / "results.parquet")
    assert list(ko_results.columns) == KNOCKOUT_COLUMNS and len(ko_results) == 2 * loaded.n_layers
    # The final norm-lens row is the model's own distribution: p_base of its top-1 token.
    final = at_results[at_results["layer"] == loaded.n_layers].set_index("question_id")
    p_base = at_samples.set_index("question_id")["p_base"]
    for qid, row in final.iterrows():
        assert row["top5_probs"][0] == pytest.approx(p_base[qid], abs=1e-6)


@pytest.mark.slow
def test_launch_runs_both_analyses(tmp_path):
    common = [
        "model=tiny-llava",
        "task=QueryAttr",
        "n_samples=1",
        "max_new_tokens=2",
        "logger=none",  # hermetic: no W&B run (the logger has its own tests)
        f"results_dir={tmp_path / 'results'}",
        f"data.cache_dir={tmp_path / 'shapes'}",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    for analysis_kind in ("knockout", "answer_tracking"):
        command = [sys.executable, "launch.py", *common, f"analysis={analysis_kind}"]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    cells = {}
    for meta_path in (tmp_path / "results").glob("*/cell.json"):
        meta = json.loads(meta_path.read_text())
        cells[meta["config"]["analysis"]] = (meta, meta_path.parent)
    assert set(cells) == {"knockout", "answer_tracking"}
    n_layers = model_config("tiny-llava")["n_layers"]
    for kind, columns, rows_per_sample in (
        ("knockout", KNOCKOUT_COLUMNS, n_layers),
        ("answer_tracking", RESULT_COLUMNS, n_layers + 1),
    ):
        meta, folder = cells[kind]
        assert meta["status"] == "done" and meta["counts"]["scored"] == 1
        results = pd.read_parquet(folder / "results.parquet")
        assert list(results.columns) == columns and len(results) == rows_per_sample
    assert "knockout" not in cells["answer_tracking"][0]["config"]
    assert "lens" not in cells["knockout"][0]["config"]
    # The report's figure from the answer-tracking cell.
    results = pd.read_parquet(cells["answer_tracking"][1] / "results.parquet")
    ax = plot_answer_tracking(results)
    assert len(ax.get_lines()) == 2  # QueryAttr: no false option
    ax.figure.savefig(tmp_path / "answer_tracking.png")
    assert (tmp_path / "answer_tracking.png").stat().st_size > 1000


def test_make_analysis_rejects_an_unknown_lens():
    config = {"analysis": "answer_tracking", "lens": "tuned", "model": {"name": "m"}, "task": "ChooseAttr"}
    with pytest.raises(ValueError, match="lens"):
        make_analysis(config, load("tiny-llava"))
