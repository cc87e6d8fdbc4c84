"""The README and docs/ say only what runs: every `mmflow …` / `python launch.py …` / `make run ARGS=…`
command composes (Hydra compose and the unknown-key check, no model), every `python -m …` module and
`scripts/…` file exists, the configuration page names every key, and no page cites a file that is
not in the repository."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mmflow.cli import launcher_key_error
from mmflow.config.dirs import CONF_DIR
from mmflow.config.known_keys import check_known_keys
from mmflow.config.overrides import check_overrides

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`((?:mmflow|python launch\.py|python -m|make run)\b[^`]*)`")
PLACEHOLDER = re.compile(r"<[^>]*>|…|\.\.\.|^\[.*\]$")
SUBCOMMANDS = {"run", "plan", "prefetch", "report", "wandb", "bench", "toy"}
COMMAND_LINE = re.compile(r"^\s*([A-Z_]+=\S+\s+)*((mmflow|python3?|make) |scripts/\S+\.(sh|py)\b)")


def commands(page: Path) -> list[str]:
    """The shell commands a page shows: lines of its shell blocks (continuations joined, comments and
    leading `VAR=value` dropped) and inline code spans that start with a command."""
    text = page.read_text()
    found = []
    for lang, body in FENCE.findall(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            if not COMMAND_LINE.match(line):
                continue
            words = shlex.split(line, comments=True)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words.pop(0)
            if words:
                found.append(shlex.join(words))
    prose = FENCE.sub("", text)
    found += [m.group(1) for m in INLINE.finditer(prose)]
    return found


def run_args(command: str) -> list[str] | None:
    """The arguments of `mmflow run …` / `python launch.py …` / `make run ARGS=…`, else None."""
    words = shlex.split(command)
    if words[:2] in (["mmflow", "run"], ["mmflow", "plan"], ["python", "launch.py"]):
        return [w for w in words[2:] if w not in ("--plan", "--no-preflight")]  # mmflow's own flags
    if words[:2] == ["make", "run"]:
        return [w for a in words[2:] if a.startswith("ARGS=") for w in shlex.split(a[5:])]
    return None


def runnable(args: list[str]) -> bool:
    """False for a template (`<name>`, `…`, `[overrides]`): it names no real command."""
    return not any(PLACEHOLDER.search(a) for a in args)


ALL = [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in commands(page)]
RUNS = [(p, c) for p, c in ALL if (a := run_args(c)) is not None and runnable(a) and "-cd" not in a]


def split_flags(args: list[str]) -> tuple[str, list[str]]:
    """(config name, overrides): `-m`/`--multirun` dropped, a swept override reduced to its first value."""
    name, overrides, rest = "config", [], list(args)
    parser = OverridesParser.create()
    while rest:
        arg = rest.pop(0)
        if arg in ("-m", "--multirun"):
            continue
        if arg in ("-cn", "--config-name"):
            name = rest.pop(0)
            continue
        (parsed,) = parser.parse_overrides([arg])
        if parsed.is_sweep_override():
            arg = f"{parsed.get_key_element()}={next(parsed.sweep_string_iterator())}"
        overrides.append(arg)
    return name, overrides


def test_the_pages_show_commands_and_the_checks_find_them() -> None:
    assert len(RUNS) >= 40 and {p for p, _ in RUNS} >= {"README.md", "docs/running.md"}
    assert split_flags(["-m", "window=1,3", "-cn", "smoke"]) == ("smoke", ["window=1"])
    assert not runnable(["-cn", "<name>"]) and runnable(["model=tiny-llava"])


@pytest.mark.parametrize(("page", "command"), RUNS, ids=[f"{p}: {c}"[:90] for p, c in RUNS])
def test_every_run_command_composes(page: str, command: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_overrides(run_args(command) or []) is None  # the CLI's own pre-checks let it through
    assert launcher_key_error(run_args(command) or []) is None
    name, overrides = split_flags(run_args(command) or [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra")
    check_known_keys(config)


def test_a_sweep_of_your_own_runs_as_the_pages_show_it(tmp_path: Path) -> None:
    """The `# my_sweeps/mine.yaml` blocks, written out, and their `-cd my_sweeps -cn mine` commands."""
    shown = [(p, c) for p, c in ALL if "-cd" in (run_args(c) or []) and runnable(run_args(c) or [])]
    assert shown
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text()):
            if lang == "yaml" and (head := re.match(r"# (\S+\.yaml)\n", body)):
                (tmp_path / head.group(1)).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / head.group(1)).write_text(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for page, command in sorted(set(shown)):
        args = [sys.executable, "-m", "mmflow.cli", "run", *run_args(command), "--cfg", "job"]
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{page}: {command}\n{done.stderr[-2000:]}"


def test_every_other_command_names_something_that_exists() -> None:
    checked = 0
    for page, command in ALL:
        words = shlex.split(command)
        if words[:2] == ["python", "-m"] and len(words) > 2 and runnable(words[2:3]):
            assert importlib.util.find_spec(words[2]) is not None, f"{page}: {command}"
            checked += 1
        elif words[0] == "mmflow" and len(words) > 1 and runnable(words[1:2]):
            assert words[1] in SUBCOMMANDS, f"{page}: {command}"
            checked += 1
        elif words[0] in ("python", "bash") and len(words) > 1 and words[1].endswith((".py", ".sh")):
            assert (ROOT / words[1]).is_file(), f"{page}: {command}"
            checked += 1
        elif words[0].startswith("scripts/"):
            assert (ROOT / words[0]).is_file(), f"{page}: {command}"
            checked += 1
    assert checked >= 10


def test_no_page_cites_a_file_outside_the_repository() -> None:
    for page in PAGES:
        text = page.read_text()
        assert "METHOD.md" not in text and "../shared" not in text, page
        assert (
            "python -m mmflow.models.synthetic.toy " not in text
            and "python -m mmflow.models.synthetic.toy`" not in text
        ), page
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png))(?:#[^)]*)?\)", text):
            assert (page.parent / target).is_file() or target in OTHERS, f"{page.name} links {target}"


OTHERS = {
    f"docs/{n}.md" for n in ("sweeps", "clusters", "wandb", "attribution", "faults", "endings", "statistics")
}
OTHERS |= {n.removeprefix("docs/") for n in OTHERS}  # pages other work adds; the README links them


def test_the_configuration_page_names_every_key_of_every_config() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        data.pop("defaults", None)
        data.pop("hydra", None)
        group = path.parent.name if path.parent != CONF_DIR else ""
        prefix = "" if group in ("", "analysis") else f"{group}."
        for key, value in data.items():
            keys = (
                [f"{prefix}{key}"] + [f"{prefix}{key}.{k}" for k in value]
                if isinstance(value, dict)
                else [f"{prefix}{key}"]
            )
            missing += [f"{path.relative_to(CONF_DIR)}: {k}" for k in keys if f"`{k}`" not in page]
    models = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    assert len(models) == 16
    assert not [m for m in models if f"`{m}`" not in (ROOT / "docs" / "models.md").read_text()]
    assert not missing, missing
