"""Atomic file writes: a temp file in the target's folder, then ``os.replace``.

Readers (and a process killed mid-write) see the old file or the whole new one, never a part. Used for
every artifact, manifest, checkpoint, report and log summary reconad writes. The file gets the mode a
plain ``open(path, "w")`` would give it (0666 less the process umask), not ``mkstemp``'s private 0600,
so a dashboard or service running as another user can read what the tools write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # reading the umask means setting it: keep other threads of ours out meanwhile
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a newly created file gets in this process: ``0o666`` less the current umask."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode a newly created folder gets in this process: ``0o777`` less the current umask."""
    return 0o777 & ~_umask()


def temp_file_beside(path: Path) -> Path:
    """A new empty temp file in ``path``'s folder, with ``file_mode()``, for a write-then-rename."""
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, file_mode())
    finally:
        os.close(descriptor)
    return Path(temp_name)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``: a clean exit renames it onto ``path``, an error removes it."""
    path = Path(path)
    temp = temp_file_beside(path)
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``path`` (mode ``folder_mode()``): a clean exit replaces ``path``
    (an existing folder is removed first) by it, an error removes it. Between the removal and the rename
    a reader sees no folder, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    os.chmod(staging, folder_mode())  # mkdtemp's folder is private (0700)
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, flushed to disk before the rename."""
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))
