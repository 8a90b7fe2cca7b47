"""Secrets for the line's outputs (MQTT password, webhook authorization): from the environment or a
private file, never from the command line, whose arguments every user of the machine can read
(``ps``, ``/proc/<pid>/cmdline``)."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from reconad.runtime.errors import ReconadError


def read_secret(path: str | os.PathLike, what: str) -> str:
    """The first line of a secret file; refuses one that other users may read (it would not stay secret)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ReconadError(f"Cannot read the {what} file {path}: {error.strerror}.") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ReconadError(f"The {what} file {path} is readable by other users: chmod 600 it.")
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ReconadError(f"The {what} file {path} is empty.")
    return lines[0]


def secret_from(path: str | os.PathLike | None, variable: str, what: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The secret in ``path`` when given, else the environment variable ``variable``, else None."""
    if path is not None:
        return read_secret(path, what)
    return environ.get(variable) or None
