"""Atomic writes (archir.fileio): the umask decides the mode, and a failed write changes nothing."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from archir.fileio import atomic_path, save_torch, write_bytes, write_text


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        expected = 0o666 & ~_umask()
        write_text(tmp_path / "a.txt", "hi")
        write_bytes(tmp_path / "b.bin", b"\x00\x01")
        save_torch({"w": torch.zeros(2)}, tmp_path / "c.pt")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("hi")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.bin", "c.pt", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    write_text(path, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "sub" / "new.bin") as tmp:
            tmp.write_bytes(b"x")
            raise ValueError
    assert list((tmp_path / "sub").iterdir()) == []
