"""requirements.lock: complete for pyproject.toml, free of torch and its CUDA packages, and what is installed.

`make test-latest` deselects `test_environment_is_the_lock` on purpose: it runs the newest versions.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

import tomllib
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def locked() -> list[Requirement]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return [Requirement(line) for line in lines if re.match(r"^[A-Za-z0-9]", line)]


def test_every_dependency_of_the_project_is_locked() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    names = {canonicalize_name(r.name) for r in locked()}
    missing = {canonicalize_name(r.name) for r in wanted} - names - {"torch"}
    assert not missing, f"not in requirements.lock (run `make lock`): {sorted(missing)}"
    for requirement in wanted:  # each locked version is inside the project's range
        for pin in locked():
            if canonicalize_name(pin.name) == canonicalize_name(requirement.name):
                assert requirement.specifier.contains(next(iter(pin.specifier)).version), pin


def test_the_lock_leaves_torch_to_the_machine() -> None:
    names = {canonicalize_name(r.name) for r in locked()}
    assert "torch" not in names
    assert not {n for n in names if n.startswith(("nvidia-", "cuda-", "triton"))}
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in locked())


def test_environment_is_the_lock() -> None:
    """Every locked package that applies to this Python and platform is installed at its locked version."""
    wrong = []
    for pin in locked():
        if pin.marker is not None and not pin.marker.evaluate():
            continue
        want = next(iter(pin.specifier)).version
        try:
            have = version(pin.name)
        except PackageNotFoundError:
            have = None
        if have != want:
            wrong.append(f"{pin.name}: locked {want}, installed {have}")
    assert not wrong, wrong
