"""Atomic writes: a failing writer leaves the target as it was and raises SaveError naming the cause."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inc_core._files import atomic_write, atomic_write_text
from inc_core.errors import SaveError


def test_a_writer_that_raises_leaves_no_partial_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"previous model")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half a mod")
        raise ValueError("tensor of unsupported dtype bfloat17")

    with pytest.raises(SaveError, match=r"failed \(ValueError: tensor of unsupported dtype bfloat17\); nothing was written") as info:
        atomic_write(target, write, what="model")
    assert isinstance(info.value.__cause__, ValueError)
    assert target.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]  # no temporary directory left behind


def test_a_writer_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SaveError, match="produced no file"):
        atomic_write(tmp_path / "out.json", lambda tmp: None, what="report")
    assert list(tmp_path.iterdir()) == []


def test_text_is_written_in_one_rename(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "h.json", '{"a": 1}', what="history")
    assert (tmp_path / "h.json").read_text(encoding="utf-8") == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]


def test_a_killed_writers_staging_directory_is_removed_by_the_next_write(tmp_path: Path) -> None:
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(child.stdout)  # that process has exited: a writer killed mid-save looks the same
    stale = tmp_path / f".model.bin.inc-{dead_pid}.abc123"
    (stale / "model.bin").parent.mkdir()
    (stale / "model.bin").write_bytes(b"half a model")
    live = tmp_path / f".model.bin.inc-{os.getpid()}.def456"  # a write in progress in a live process
    live.mkdir()
    atomic_write_text(tmp_path / "model.bin", "model", what="model")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.bin", live.name])


def test_an_existing_directory_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "model.bin").mkdir()
    (tmp_path / "model.bin" / "keep.txt").write_text("user data")
    with pytest.raises(SaveError, match="inc never deletes a directory"):
        atomic_write_text(tmp_path / "model.bin", "model", what="model")
    assert (tmp_path / "model.bin" / "keep.txt").read_text() == "user data"
