"""Atomic writes and staging folders get a plain open() / mkdir() mode, not tempfile's 0600 / 0700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from mmflow.storage.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    current_umask,
    make_temp_dir,
)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_changing_it(umask: int) -> None:
    assert current_umask() == umask
    assert current_umask() == umask


def test_new_files_get_the_mode_open_would_give(umask: int, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    atomic_write_json(tmp_path / "cell.json", {"a": 1})
    atomic_write_parquet(tmp_path / "parts" / "samples-0.parquet", pd.DataFrame({"a": [1]}))
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    expected = 0o666 & ~umask
    assert mode(plain) == expected
    for name in ("cell.json", "parts/samples-0.parquet", "b.bin"):
        assert oct(mode(tmp_path / name)) == oct(expected), name
    assert mode(tmp_path / "parts") == 0o777 & ~umask


def test_a_rewritten_file_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret.yaml"
    target.write_text("a: 1")
    target.chmod(0o600)
    atomic_write_bytes(target, b"a: 2")
    assert mode(target) == 0o600 and target.read_text() == "a: 2"


def test_staging_folders_get_the_mode_mkdir_would_give(umask: int, tmp_path: Path) -> None:
    folder = make_temp_dir(tmp_path, ".stage-")
    assert folder.parent == tmp_path and folder.name.startswith(".stage-")
    assert oct(mode(folder)) == oct(0o777 & ~umask)


def test_a_finished_folder_is_opened_to_the_umask(umask: int, tmp_path: Path) -> None:
    from mmflow.storage.files import apply_umask

    folder = make_temp_dir(tmp_path, ".stage-")
    (folder / "sub").mkdir(mode=0o700)
    (folder / "sub" / "model.safetensors").write_bytes(b"x")
    (folder / "sub" / "model.safetensors").chmod(0o600)
    apply_umask(folder)
    assert mode(folder / "sub") == 0o777 & ~umask
    assert mode(folder / "sub" / "model.safetensors") == 0o666 & ~umask


def test_the_shapes_cache_is_readable_by_others(umask: int, tmp_path: Path) -> None:
    from mmflow.data.shapes import CSV_NAME, generate_shapes

    folder = generate_shapes(tmp_path, "ChooseAttr", 2, seed=0)
    assert mode(folder) == 0o777 & ~umask
    assert mode(folder / CSV_NAME) == 0o666 & ~umask
