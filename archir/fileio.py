"""Atomic file writes: a failed or interrupted run never leaves a half-written output behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process's umask (read at call time: it is process-wide and may change)."""
    old = os.umask(0)
    os.umask(old)
    return old


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    The file ends up with mode ``0o666 & ~umask``, like one written with ``open()``. If the block
    raises, ``path`` keeps its previous contents and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; return ``path`` as a Path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path`` as a Path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_torch(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; return ``path`` as a Path."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files :func:`atomic_path` leaves when its process is killed
    (a kill -9 gives it no chance to clean up); returns what was removed. Nothing else is touched."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.glob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def replace_directory(new: str | Path, old: str | Path) -> None:
    """Put directory ``new`` in place of directory ``old`` as one unit: ``old`` is renamed aside
    (``.<name>.archir-old`` beside it), ``new`` renamed to ``old``'s name, and only then the aside
    copy deleted. Until the second rename ``old`` is whole under its own name or the aside name
    (:func:`recover_directory` puts it back after a crash in between), so a reader never sees a
    mix of two runs' files. ``old`` need not exist. Where ``old`` cannot be renamed (a mount
    point, say), its files are replaced one by one with ``os.replace`` instead."""
    new, old = Path(new), Path(old)
    aside = _aside(old)
    if aside.exists():
        shutil.rmtree(aside)
    if not old.exists():
        os.replace(new, old)
        return
    try:
        os.replace(old, aside)
    except OSError:  # cannot move the directory itself: replace its contents
        for p in old.iterdir():
            if not (new / p.name).exists():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        for p in new.iterdir():
            if (old / p.name).is_dir() and not (old / p.name).is_symlink():
                shutil.rmtree(old / p.name)
            os.replace(p, old / p.name)
        new.rmdir()
        return
    os.replace(new, old)
    shutil.rmtree(aside, ignore_errors=True)


def recover_directory(old: str | Path) -> None:
    """After a crash inside :func:`replace_directory`: put the aside copy of ``old`` back when
    ``old`` itself is missing, or delete it when ``old`` is whole."""
    old = Path(old)
    aside = _aside(old)
    if aside.is_dir():
        if old.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, old)


def _aside(path: Path) -> Path:
    return path.parent / f".{path.name}.archir-old"
