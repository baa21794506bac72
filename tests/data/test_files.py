"""The one atomic writer: the path holds the old complete content or the new one, never a part, never a leftover."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hippos.data.files import atomic_write


def test_writes_a_new_file_and_creates_its_folder(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write(path, lambda tmp: Path(tmp).write_text("new")) == path
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["out.txt"]


def test_the_temporary_file_is_a_hidden_sibling(tmp_path):
    seen = []

    def write(tmp):
        seen.append(Path(tmp))
        Path(tmp).write_text("x")

    atomic_write(tmp_path / "out.txt", write)
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.") and tmp.name.endswith(".tmp")


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path, error):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def half_written(tmp):
        Path(tmp).write_text("ne")
        raise error

    with pytest.raises(error):
        atomic_write(path, half_written)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_a_failed_rename_leaves_nothing(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "out.txt", lambda tmp: Path(tmp).write_text("new"))
    assert os.listdir(tmp_path) == []


def test_the_file_gets_the_umasks_permissions_like_any_other(tmp_path):
    atomic_write(tmp_path / "atomic.txt", lambda tmp: Path(tmp).write_text("x"))
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_a_directory_is_filled_then_renamed_into_place(tmp_path):
    def fill(tmp):
        assert Path(tmp).is_dir() and not any(Path(tmp).iterdir())
        (Path(tmp) / "meta.json").write_text("{}")

    final = atomic_write(tmp_path / "corpus", fill, directory=True)
    assert (final / "meta.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["corpus"]


def test_a_failed_directory_is_removed_with_its_contents(tmp_path):
    def fill(tmp):
        (Path(tmp) / "shard.bin").write_bytes(b"12")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "corpus", fill, directory=True)
    assert os.listdir(tmp_path) == []


def test_a_directory_does_not_replace_a_complete_one(tmp_path):
    """Two jobs building the same folder: the second rename fails (the caller keeps the first), nothing is left."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "meta.json").write_text("first")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "corpus", lambda tmp: (Path(tmp) / "meta.json").write_text("second"), directory=True)
    assert (tmp_path / "corpus" / "meta.json").read_text() == "first"
    assert os.listdir(tmp_path) == ["corpus"]
