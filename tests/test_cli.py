"""The `mmflow` command's dispatch, and the configs found in the package from any folder."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from mmflow.cli import cell_config, main


def test_without_a_command_it_prints_the_commands_and_fails(capsys) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in (
        "mmflow run",
        "mmflow run -m",
        "experiment=smoke",
        "mmflow report",
        "mmflow bench",
        "toy train",
    ):
        assert command in out
    assert main(["--help"]) == 0


@pytest.mark.parametrize(
    ("command", "prog"),
    [
        ("report", "python -m mmflow.report"),
        ("bench", "python -m mmflow.bench"),
        ("toy", "python -m mmflow.models.toy"),
    ],
)
def test_subcommands_reach_their_modules(command: str, prog: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0 and f"usage: {prog}" in capsys.readouterr().out


def test_the_retired_ray_block_is_refused_with_its_new_place(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with initialize_config_module(config_module="mmflow.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+ray.address=auto", f"results_dir={tmp_path}"])
        ok = compose("config", overrides=[f"results_dir={tmp_path}"])
    with pytest.raises(ValueError, match="moved to `hydra.launcher.ray`.*init.address=auto"):
        cell_config(cfg)
    assert "ray" not in cell_config(ok) and cell_config(ok)["results_dir"] == str(tmp_path)


@pytest.mark.parametrize(
    ("raised", "code", "printed"),
    [
        ("ctrl-c in the sweep", 130, ""),  # the sweep already said how to resume
        ("ctrl-c before it", 130, "[mmflow] interrupted"),
        ("sigterm", 143, ""),
    ],
)
def test_an_interrupt_ends_with_its_signal_code(raised, code, printed, monkeypatch, capsys) -> None:
    import mmflow.cli as cli
    from mmflow.locks import Terminated

    def stopped() -> None:
        exc = Terminated(15) if raised == "sigterm" else KeyboardInterrupt()
        if raised != "ctrl-c before it":
            exc.mmflow_reported = True
        raise exc

    monkeypatch.setattr(cli, "hydra_main", stopped)
    assert main(["run"]) == code
    assert capsys.readouterr().err.strip() == printed
