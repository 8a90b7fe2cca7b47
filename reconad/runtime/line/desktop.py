"""Whether a desktop answers, for ``display://0`` (``line/outputs.py``'s ``DisplayOutput``) and doctor.

A set ``DISPLAY`` says nothing about an X server being there: GStreamer's autovideosink then tries
every sink it knows, and on Debian 12's GStreamer 1.22 it reaches DirectFB's dfbvideosink
(gstreamer1.0-plugins-bad), which crashes the process (SIGSEGV) when it cannot start. So a display
output asks first:

- X11: libX11's ``XOpenDisplay`` (then ``XCloseDisplay``), called through ctypes in a child process
  with a time limit, so neither a crash inside Xlib nor a server that never replies can reach the
  caller. Without libX11 a local display (``:N``, ``unix:N``) is checked by connecting to its socket
  ``/tmp/.X11-unix/XN``; a remote one (``host:N``, SSH forwarding) is then reported as not checked.
- Wayland: the compositor's socket, ``$XDG_RUNTIME_DIR/$WAYLAND_DISPLAY`` (or ``WAYLAND_DISPLAY``
  itself when it is an absolute path, as libwayland-client resolves it), must accept a connection.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

DESKTOP_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY")
RTSP_INSTEAD = "watch from another machine with --output rtsp://0.0.0.0:8554/inspect"
X11_SOCKETS = Path("/tmp/.X11-unix")
X11_LIBRARY = "libX11.so.6"
PROBE_TIMEOUT_S = 5.0  # a remote X server over TCP that never replies: then not claimed either way
# The child: exit 0 when XOpenDisplay opens the display, 1 when it does not, 3 when libX11 is absent.
_X11_PROBE = """
import ctypes, sys
try:
    x11 = ctypes.CDLL(sys.argv[2])
except OSError:
    sys.exit(3)
x11.XOpenDisplay.restype = ctypes.c_void_p
x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
display = x11.XOpenDisplay(sys.argv[1].encode())
if not display:
    sys.exit(1)
x11.XCloseDisplay(display)
"""
_X11_DISPLAY = re.compile(r"^(?P<host>.*):(?P<number>\d+)(\.\d+)?$")


@dataclasses.dataclass(frozen=True)
class DesktopCheck:
    """What one desktop variable leads to.

    Attributes:
        variable: ``"DISPLAY"`` or ``"WAYLAND_DISPLAY"``.
        value: the variable's value, e.g. ``":99"`` or ``"wayland-0"``.
        answers: True when the X server or compositor accepted a connection, False when nothing
            answers, None when it could not be checked (no libX11 and a remote display, a crashed probe,
            no answer in time: the render process runs under SCHED_IDLE, and a busy CPU may starve it).
        detail: what was found, e.g. ``"answers"``, ``"no X server answers"``,
            ``"no socket /run/user/1000/wayland-0"``.
    """

    variable: str
    value: str
    answers: bool | None
    detail: str

    def describe(self) -> str:
        """``DISPLAY=:99 (answers)``: the variable, its value and what was found."""
        return f"{self.variable}={self.value} ({self.detail})"


def _accepts(path: Path) -> bool | None:
    """Whether the Unix socket ``path`` accepts a connection; None when there is no such file."""
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def check_x11(display: str, timeout_s: float = PROBE_TIMEOUT_S, library: str = X11_LIBRARY) -> DesktopCheck:
    """Whether an X server answers on ``display`` (a ``DISPLAY`` value such as ``":0"``), asked through
    ``library`` (libX11) within ``timeout_s`` seconds; never raises."""

    def check(answers: bool | None, detail: str) -> DesktopCheck:
        return DesktopCheck("DISPLAY", display, answers, detail)

    try:
        probe = subprocess.run([sys.executable, "-I", "-c", _X11_PROBE, display, library], capture_output=True,
                               text=True, timeout=timeout_s, check=False)
        code, said = probe.returncode, (probe.stderr.strip().splitlines() or [""])[0][:160]
    except subprocess.TimeoutExpired:  # a server that never replies, or a probe starved of CPU (SCHED_IDLE)
        return check(None, f"not checked: no answer within {timeout_s:g} s")
    except OSError as error:
        code, said = None, f"the probe did not start: {error.strerror}"
    if code == 0:
        return check(True, "answers")
    if code == 1:
        return check(False, f"refused: {said}" if said else "no X server answers")
    match = _X11_DISPLAY.match(display)
    local = match is not None and match["host"] in ("", "unix")
    if code is not None and code < 0:
        said = f"the probe crashed (signal {-code})"
    elif code == 3:
        said = "libX11 not found"
    elif code is not None:
        said = f"the probe failed (exit code {code})"
    if not local:
        return check(None, f"not checked: {said}, and a remote display is not checked otherwise")
    path = X11_SOCKETS / f"X{match['number']}"
    accepts = _accepts(path)
    if accepts is None:
        return check(False, f"no socket {path}, {said}")
    return check(accepts, f"its socket {path} {'accepts' if accepts else 'refuses'} connections, {said}")


def check_wayland(value: str, runtime_dir: str | None) -> DesktopCheck:
    """Whether a Wayland compositor answers on ``WAYLAND_DISPLAY=value``; never raises."""
    if os.path.isabs(value):
        path = Path(value)
    elif not runtime_dir:
        return DesktopCheck("WAYLAND_DISPLAY", value, False, "XDG_RUNTIME_DIR is not set, so its socket cannot be found")
    else:
        path = Path(runtime_dir) / value
    accepts = _accepts(path)
    if accepts is None:
        return DesktopCheck("WAYLAND_DISPLAY", value, False, f"no socket {path}")
    return DesktopCheck("WAYLAND_DISPLAY", value, accepts, "answers" if accepts else f"{path} refuses connections")


def check_desktop(environ: Mapping[str, str] | None = None) -> tuple[DesktopCheck, ...]:
    """One ``DesktopCheck`` per desktop variable set in ``environ`` (default ``os.environ``), DISPLAY first."""
    environ = os.environ if environ is None else environ
    checks = []
    if environ.get("DISPLAY"):
        checks.append(check_x11(environ["DISPLAY"]))
    if environ.get("WAYLAND_DISPLAY"):
        checks.append(check_wayland(environ["WAYLAND_DISPLAY"], environ.get("XDG_RUNTIME_DIR")))
    return tuple(checks)


def desktop_problem(checks: Sequence[DesktopCheck]) -> str | None:
    """Why no desktop can show a window, as the end of a sentence (``"no X server answers on
    DISPLAY=:42"``), or None when one answers or could not be checked (then the output is tried)."""
    if not checks:
        return "neither DISPLAY nor WAYLAND_DISPLAY is set"
    if any(check.answers is not False for check in checks):
        return None
    reasons = []
    for check in checks:
        server = "X server" if check.variable == "DISPLAY" else "Wayland compositor"
        said = "" if check.detail == f"no {server} answers" else f" ({check.detail})"
        reasons.append(f"no {server} answers on {check.variable}={check.value}{said}")
    return " and ".join(reasons)


def no_desktop_sentence(uri: str, checks: Sequence[DesktopCheck]) -> str | None:
    """The one sentence a display output ``uri`` is refused with (``DisplayOutput`` and doctor say the
    same), e.g. ``"display://0 needs a desktop, but no X server answers on DISPLAY=:42: start the X
    server or log in to the desktop, or watch ..."``; None when ``desktop_problem`` finds none."""
    problem = desktop_problem(checks)
    if problem is None:
        return None
    fix = "run on the machine's desktop" if not checks else "start the X server or log in to the desktop"
    return f"{uri} needs a desktop, but {problem}: {fix}, or {RTSP_INSTEAD}."
