"""Whether a desktop answers (line/desktop.py), against a real X server (Xvfb), a display number nothing
listens on, and real Unix sockets standing where a Wayland compositor's would."""

import socket

import pytest

from reconad.runtime.line.desktop import (
    DesktopCheck,
    check_desktop,
    check_wayland,
    check_x11,
    desktop_problem,
    no_desktop_sentence,
)
from tests.runtime.line.services import require_xvfb, unused_display

NO_LIBX11 = "libreconad-no-such-x11.so.6"  # as a machine without libX11: the probe falls back to the socket


def test_a_running_x_server_answers_and_one_that_is_not_there_does_not(tmp_path):
    screen = require_xvfb(tmp_path / "x")
    try:
        for value in (screen.display, f"{screen.display}.0", f"unix{screen.display}"):
            assert check_x11(value) == DesktopCheck("DISPLAY", value, True, "answers")
        assert check_desktop({"DISPLAY": screen.display})[0].describe() == f"DISPLAY={screen.display} (answers)"
        without_libx11 = check_x11(screen.display, library=NO_LIBX11)
        assert without_libx11.answers is True and "accepts connections, libX11 not found" in without_libx11.detail
    finally:
        screen.stop()
    # the same number once its server is gone: nothing answers
    gone = check_x11(screen.display)
    assert gone.answers is False and gone.detail == "no X server answers"


def test_a_display_nobody_serves_is_refused_in_one_sentence():
    display = unused_display()
    checks = check_desktop({"DISPLAY": display})
    assert checks == (DesktopCheck("DISPLAY", display, False, "no X server answers"),)
    assert desktop_problem(checks) == f"no X server answers on DISPLAY={display}"
    assert no_desktop_sentence("display://0", checks) == (
        f"display://0 needs a desktop, but no X server answers on DISPLAY={display}: start the X server or log in "
        "to the desktop, or watch from another machine with --output rtsp://0.0.0.0:8554/inspect.")
    fallback = check_x11(display, library=NO_LIBX11)
    assert fallback.answers is False and fallback.detail == f"no socket /tmp/.X11-unix/X{display[1:]}, libX11 not found"


def test_without_libx11_a_remote_display_is_not_claimed_to_work():
    remote = check_x11("otherhost:10.0", library=NO_LIBX11)
    assert remote.answers is None and remote.detail.startswith("not checked: libX11 not found")
    assert desktop_problem([remote]) is None  # unknown: the output is tried, not refused
    slow = check_x11(unused_display(), timeout_s=0.001)  # no answer in time (a starved probe): not claimed either way
    assert slow == DesktopCheck("DISPLAY", slow.value, None, "not checked: no answer within 0.001 s")


def test_wayland_needs_its_compositors_socket(tmp_path):
    assert check_wayland("wayland-0", None).answers is False
    assert check_wayland("wayland-0", str(tmp_path)) == DesktopCheck(
        "WAYLAND_DISPLAY", "wayland-0", False, f"no socket {tmp_path / 'wayland-0'}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as compositor:
        compositor.bind(str(tmp_path / "wayland-1"))
        compositor.listen(1)
        assert check_wayland("wayland-1", str(tmp_path)).answers is True
        assert check_wayland(str(tmp_path / "wayland-1"), None).answers is True  # an absolute path needs no runtime dir
    stale = check_wayland("wayland-1", str(tmp_path))  # the socket file is left behind, nobody listens
    assert stale.answers is False and "refuses connections" in stale.detail


def test_one_desktop_that_answers_is_enough(tmp_path):
    display = unused_display()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as compositor:
        compositor.bind(str(tmp_path / "wayland-0"))
        compositor.listen(1)
        both = check_desktop({"DISPLAY": display, "WAYLAND_DISPLAY": "wayland-0", "XDG_RUNTIME_DIR": str(tmp_path)})
    assert [check.variable for check in both] == ["DISPLAY", "WAYLAND_DISPLAY"] and desktop_problem(both) is None
    assert desktop_problem(()) == "neither DISPLAY nor WAYLAND_DISPLAY is set"
    neither = check_desktop({"DISPLAY": display, "WAYLAND_DISPLAY": "wayland-9", "XDG_RUNTIME_DIR": str(tmp_path)})
    assert desktop_problem(neither) == (f"no X server answers on DISPLAY={display} and no Wayland compositor answers "
                                        f"on WAYLAND_DISPLAY=wayland-9 (no socket {tmp_path / 'wayland-9'})")


@pytest.mark.parametrize("value", ["", None])
def test_unset_or_empty_variables_are_no_desktop(value):
    environ = {} if value is None else {"DISPLAY": value, "WAYLAND_DISPLAY": value}
    assert check_desktop(environ) == ()
    assert "neither DISPLAY nor WAYLAND_DISPLAY is set: run on the machine's desktop" in no_desktop_sentence("display://0", ())
