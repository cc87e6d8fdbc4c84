"""Issue 23, item 7: `model.trust_remote_code=true` says which of the checkpoint's Python files run,
before they run, and `cell.json` records them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import cell_config, model_config

from mmflow.config.spec import ModelSpec
from mmflow.execution.runtime import run_cells
from mmflow.models.registry import load_model, resolve_checkpoint
from mmflow.models.remote_code import remote_code_files

CUSTOM = '''from pathlib import Path

from transformers import LlavaProcessor

MARKER.write_text("imported")


class CustomProcessor(LlavaProcessor):
    """A checkpoint's own processor class (trust_remote_code imports this file)."""
'''


def checkpoint_with_code(folder: Path, marker: Path) -> Path:
    """tiny-llava's files plus a `processing_custom.py` its processor_config.json names in auto_map."""
    source = Path(resolve_checkpoint(model_config("tiny-llava")["checkpoint"]))
    folder.mkdir()
    for path in source.iterdir():
        if path.name != "processor_config.json":
            (folder / path.name).symlink_to(path)
    processor = json.loads((source / "processor_config.json").read_text())
    processor["auto_map"] = {"AutoProcessor": "processing_custom.CustomProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(processor))
    (folder / "processing_custom.py").write_text(CUSTOM.replace("MARKER", f"Path({str(marker)!r})"))
    return folder


def test_trusted_remote_code_is_named_before_it_runs_and_recorded_in_cell_json(tmp_path, capsys):
    marker = tmp_path / "ran.marker"
    checkpoint = checkpoint_with_code(tmp_path / "ckpt", marker)
    model = {**model_config("tiny-llava"), "checkpoint": str(checkpoint), "trust_remote_code": True}
    loaded = load_model(ModelSpec.from_mapping(model))
    assert marker.read_text() == "imported"  # the checkpoint's code did run
    assert type(loaded.processor).__name__ == "CustomProcessor"
    digest = hashlib.sha256((checkpoint / "processing_custom.py").read_bytes()).hexdigest()
    out = capsys.readouterr().out
    assert (
        "[mmflow] WARNING model tiny-llava: trust_remote_code=true; this runs the checkpoint's own "
        f"Python: processing_custom.py (sha256 {digest[:12]})"
    ) in out
    expected = {
        "trust_remote_code": True,
        "checkpoint": str(checkpoint),
        "revision": None,
        "files": [{"file": "processing_custom.py", "sha256": digest, "named_by": ["processor_config.json"]}],
    }
    assert loaded.remote_code == expected

    config = {**cell_config(tmp_path / "results", n_samples=1), "model": model}
    (outcome,) = run_cells(loaded, [config])
    assert json.loads((Path(outcome.path) / "cell.json").read_text())["remote_code"] == expected


def test_trust_without_code_says_nothing_runs_and_untrusted_records_null(tmp_path, capsys):
    model = {**model_config("tiny-llava"), "trust_remote_code": True}
    loaded = load_model(ModelSpec.from_mapping(model))
    assert "its configs name no Python file (no auto_map): no checkpoint code runs" in capsys.readouterr().out
    assert loaded.remote_code["files"] == []
    plain = load_model(ModelSpec.from_mapping(model_config("tiny-llava")))
    assert plain.remote_code is None and "trust_remote_code" not in capsys.readouterr().out
    (outcome,) = run_cells(plain, [cell_config(tmp_path, n_samples=1)])
    assert json.loads((Path(outcome.path) / "cell.json").read_text())["remote_code"] is None


def test_auto_map_entries_are_listed_from_every_config_except_automodel(tmp_path):
    """`AutoModel*` entries never run (mmflow loads an explicit model class); AutoConfig's and the
    tokenizer's do; a named file the folder lacks is listed with sha256 null."""
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": auto_map}))
    tokenizer = {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (tmp_path / "configuration_x.py").write_text("X = 1\n")
    (tmp_path / "modeling_x.py").write_text("X = 2\n")
    assert remote_code_files(tmp_path) == [
        {
            "file": "configuration_x.py",
            "sha256": hashlib.sha256(b"X = 1\n").hexdigest(),
            "named_by": ["config.json"],
        },
        {"file": "tokenization_x.py", "sha256": None, "named_by": ["tokenizer_config.json"]},
    ]
