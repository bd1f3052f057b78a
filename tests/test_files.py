"""Atomic writes leave either the old file or the complete new one, and never a temporary file, whatever
interrupts them (Ctrl-C arrives between any two bytecodes, also right after the temporary file is created)."""

from __future__ import annotations

import os

import pytest

from embedlens import files
from embedlens.files import atomic_path, atomic_write_text, temporary_sibling


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_replaces_the_target_and_leaves_nothing(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and leftovers(tmp_path) == []
    assert target.stat().st_mode & 0o777 == 0o666 & ~files.umask()


def test_interrupted_inside_the_block_keeps_the_old_file(tmp_path):
    target = tmp_path / "tokens.parquet"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_interrupted_right_after_the_temporary_file_is_created(tmp_path, monkeypatch):
    """The name is chosen before the file exists, so even this interruption is cleaned up."""
    real_close = os.close

    def interrupted(fd):
        real_close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "close", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "x.json"):
        pass  # never reached
    monkeypatch.setattr(files.os, "close", real_close)
    assert leftovers(tmp_path) == [] and not (tmp_path / "x.json").exists()


def test_temporary_siblings_are_hidden_unique_and_not_created(tmp_path):
    first, second = temporary_sibling(tmp_path / "a.txt"), temporary_sibling(tmp_path / "a.txt")
    assert first != second and first.parent == tmp_path
    assert first.name.startswith(".a.txt.") and first.name.endswith(".tmp") and not first.exists()
