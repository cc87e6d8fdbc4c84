"""The `mmflow` command's dispatch, and the configs found in the package from any folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mmflow.cli import cell_config, main
from mmflow.config.dirs import CONF_DIR


def test_without_a_command_it_prints_the_commands_and_fails(capsys) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in (
        "mmflow run",
        "mmflow run -m",
        "-cn smoke",
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
        ("bench --driver", "python -m mmflow.bench --driver"),
        ("toy", "python -m mmflow.models.synthetic.toy"),
    ],
)
def test_subcommands_reach_their_modules(command: str, prog: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main([*command.split(), "--help"])
    assert stop.value.code == 0 and f"usage: {prog}" in capsys.readouterr().out


def test_the_retired_ray_block_is_refused_with_its_new_place(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
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
    from mmflow.storage.locks import Terminated

    def stopped() -> None:
        exc = Terminated(15) if raised == "sigterm" else KeyboardInterrupt()
        if raised != "ctrl-c before it":
            exc.mmflow_reported = True
        raise exc

    monkeypatch.setattr(cli, "hydra_main", stopped)
    assert main(["run"]) == code
    assert capsys.readouterr().err.strip() == printed


@pytest.mark.parametrize(
    ("results_dir", "line"),
    [
        ("afile", "results_dir 'afile' is a file, not a folder"),
        ("afile/sub", "results_dir 'afile/sub': 'afile' is a file, not a folder"),
    ],
)
def test_a_results_dir_that_is_a_file_is_one_line_and_exit_2(results_dir, line, tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "afile").write_text("")
    launch = Path(__file__).resolve().parents[1] / "launch.py"
    cmd = [sys.executable, str(launch), f"results_dir={results_dir}", "logger=none"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).strip().splitlines() == [f"[mmflow] error: {line}"]


def test_a_read_only_results_dir_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys) -> None:
    import errno
    from pathlib import Path

    import mmflow.cli as cli
    from mmflow.storage.locks import exclusive_dir

    def read_only(self, *args, **kwargs) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr(cli, "hydra_main", lambda: exclusive_dir(f"{tmp_path}/ro/_hydra/runs/2026"))
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"[mmflow] error: cannot write to results_dir '{tmp_path}/ro': read-only file system"


def test_report_of_a_missing_folder_is_an_error_and_creates_nothing(tmp_path, capsys) -> None:
    missing = tmp_path / "nonexist"
    assert main(["report", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"[mmflow] error: report folder '{missing}' does not exist"
    assert not missing.exists()
    (tmp_path / "afile").write_text("")
    assert main(["report", str(tmp_path / "afile")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_report_of_a_folder_without_cells_says_so(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"no cells found below '{tmp_path}'" in captured.err
    assert (tmp_path / "report" / "index.html").exists()


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["runn"],
            "[mmflow] error: unknown command 'runn'; did you mean `mmflow run`? (see `mmflow --help`)",
        ),
        (
            ["repot", "r1"],
            "[mmflow] error: unknown command 'repot'; did you mean `mmflow report`? (see `mmflow --help`)",
        ),
    ],
)
def test_an_unknown_command_is_one_line_naming_the_closest(argv, line, capsys) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


@pytest.mark.slow
def test_a_failed_single_run_says_so_once_with_its_fix(tmp_path) -> None:
    """The cell's failure is one line at the end (with its fix), not also a warning while it runs."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    # heads=7 passes the config checks and fails where the model is known (tiny-llava has 4 heads)
    command = [sys.executable, str(root / "launch.py"), "model=tiny-llava", "knockout.heads=7"]
    command += ["logger=none", "n_samples=1", f"results_dir={tmp_path}"]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if " failed: " in line]
    assert out.returncode == 1
    assert len(lines) == 1 and "heads in 0..3, got 7" in lines[0], lines
