"""``recon-inspect doctor`` for the GStreamer video outputs of ``recon-inspect run --output``.

``probe_gstreamer`` reads GStreamer for Python (PyGObject), the GstRtspServer typelib, the elements the
outputs' pipelines use, the desktop variables and whether their desktop answers
(``line/desktop.py``, as ``DisplayOutput`` asks it) into the values of ``doctor.Environment``'s fields;
``diagnose_rtsp`` and ``diagnose_display`` judge them (pure, as ``doctor.diagnose``). The rules are
``line/gst.py``'s own: ``import_gst``, ``choose_h264_encoder``, ``GST_PACKAGES``. Video files
(OpenCV) are judged in ``doctor.py`` beside the sources.
"""

from __future__ import annotations

import os
from typing import Any

from reconad.runtime.line.desktop import DESKTOP_VARIABLES, check_desktop, no_desktop_sentence
from reconad.runtime.line.gst import GST_PACKAGES, choose_h264_encoder, import_gst
from reconad.runtime.line.outputs import WAYLAND_SINKS, X11_SINKS, display_sinks

# What the outputs' pipelines use: the H.264 encoders (and Jetson's converter), the RTSP payloader,
# the window sinks, and what every pipeline starts with.
GST_ELEMENTS = ("nvv4l2h264enc", "nvvidconv", "x264enc", "openh264enc", "rtph264pay", "autovideosink",
                "ximagesink", "waylandsink", "videoconvert", "appsrc")
# The Debian/Ubuntu package of each element a fix may name (nvv4l2h264enc and nvvidconv come with JetPack).
ELEMENT_PACKAGES = {"rtph264pay": "gstreamer1.0-plugins-good", "autovideosink": "gstreamer1.0-plugins-good",
                    "ximagesink": "gstreamer1.0-x", "waylandsink": "gstreamer1.0-plugins-bad", "videoconvert": "gstreamer1.0-plugins-base",
                    "appsrc": "gstreamer1.0-plugins-base"}
JETSON_GST = ("JetPack's python3-gi (apt install python3-gi) in a venv made with --system-site-packages, and "
              "apt install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp")


def _reason(error: BaseException) -> str:
    """The first line of the import error behind ``error`` (``import_gst`` keeps it as the cause)."""
    cause = error.__cause__ or error
    lines = str(cause).strip().splitlines()
    return (lines[0] if lines else type(cause).__name__)[:200]


def probe_gstreamer() -> dict[str, Any]:
    """``gst``, ``gst_error``, ``gst_rtsp_server``, ``gst_elements``, ``desktop`` and ``desktop_checks``
    of this process.

    Never raises: GStreamer that does not import (no PyGObject, no typelib) is recorded in
    ``gst_error``, with ``gst_rtsp_server`` and ``gst_elements`` left None (not read).
    """
    values: dict[str, Any] = {"desktop": tuple(name for name in DESKTOP_VARIABLES if os.environ.get(name)),
                              "desktop_checks": check_desktop()}
    try:
        Gst, _, _ = import_gst("recon-inspect doctor")
    except Exception as error:  # ReconadError from an ImportError/ValueError, or Gst.init failing
        return {**values, "gst_error": _reason(error)}
    values["gst"] = ".".join(str(part) for part in tuple(Gst.version())[:3])
    try:
        import_gst("recon-inspect doctor", rtsp_server=True)
        values["gst_rtsp_server"] = True
    except Exception:
        values["gst_rtsp_server"] = False
    values["gst_elements"] = {name: Gst.ElementFactory.find(name) is not None for name in GST_ELEMENTS}
    return values


def _not_read(name: str) -> tuple[str, bool, str, tuple[str, ...]]:
    return (name, False, "GStreamer not recorded (an older recording)",
            ("This recording predates the output checks: record it again with recon-inspect doctor --json.",))


def _gst_fix(env: Any) -> str:
    how = JETSON_GST if env.is_jetson else GST_PACKAGES + " (PyGObject builds against libgirepository1.0-dev libcairo2-dev)"
    return f"GStreamer for Python does not import ({env.gst_error}): {how}."


def _missing_elements(present: set[str], needed: list[str]) -> list[str]:
    missing = [name for name in needed if name not in present]
    if not missing:
        return []
    packages = " ".join(sorted({ELEMENT_PACKAGES[name] for name in missing}))
    return [f"GStreamer lacks {', '.join(missing)}: apt install {packages}."]


def _present(env: Any) -> set[str]:
    return {name for name, found in (env.gst_elements or {}).items() if found}


def diagnose_rtsp(env: Any) -> tuple[str, bool, str, tuple[str, ...]]:
    """``--output rtsp://…`` (our GstRtspServer, H.264): (name, works, detail, fixes) for ``doctor.Finding``.

    ``env`` is a ``doctor.Environment``; the encoder is the one ``RtspOutput`` would use.
    """
    name = "out:rtsp"
    if env.gst is None and env.gst_error is None:
        return _not_read(name)
    if env.gst is None:
        return name, False, "GStreamer for Python not importable", (_gst_fix(env),)
    fixes = []
    if not env.gst_rtsp_server:
        fixes.append("The GstRtspServer typelib does not load: apt install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp"
                     + (" (and use JetPack's python3-gi)." if env.is_jetson else "."))
    present = _present(env)
    encoder = choose_h264_encoder(present)
    if encoder is None:
        fixes.append("No H.264 encoder in GStreamer: " + ("nvv4l2h264enc comes with JetPack (apt install "
                     "nvidia-l4t-gstreamer), or " if env.is_jetson else "") + "apt install gstreamer1.0-plugins-ugly (x264enc).")
    fixes += _missing_elements(present, ["appsrc", "rtph264pay"] + ([] if encoder == "nvv4l2h264enc" else ["videoconvert"]))
    kind = "hardware" if encoder == "nvv4l2h264enc" else "software"
    detail = (f"GStreamer {env.gst}, H.264 encoder {f'{encoder} ({kind})' if encoder else 'none'}, "
              f"RTSP server {'yes' if env.gst_rtsp_server else 'no'}")
    if env.is_jetson and encoder not in (None, "nvv4l2h264enc"):
        detail += " (no nvv4l2h264enc with nvvidconv, JetPack's nvidia-l4t-gstreamer: the CPU encodes)"
    return name, not fixes, detail, tuple(fixes)


def diagnose_display(env: Any) -> tuple[str, bool, str, tuple[str, ...]]:
    """``--output display://0`` (``outputs.display_sinks``: autovideosink or ximagesink on X11,
    waylandsink on Wayland alone): (name, works, detail, fixes).

    A desktop that does not answer (``env.desktop_checks``) gets the sentence ``DisplayOutput`` refuses
    the output with; a recording without those checks is judged by the variables alone.
    """
    name = "out:display"
    if env.desktop is None or (env.gst is None and env.gst_error is None):
        return _not_read(name)
    fixes = []
    if env.desktop_checks is not None or not env.desktop:
        refused = no_desktop_sentence("display://0", env.desktop_checks or ())
        fixes += [refused] if refused is not None else []
    if env.gst is None:
        fixes.append(_gst_fix(env))
    else:
        present = _present(env)
        sinks = list(display_sinks(env.desktop_checks) if env.desktop_checks is not None
                     else X11_SINKS if "DISPLAY" in env.desktop else WAYLAND_SINKS)
        if not any(sink in present for sink in sinks):
            fixes += _missing_elements(present, sinks)
        fixes += _missing_elements(present, ["appsrc", "videoconvert"])
    if env.desktop_checks is not None:
        desktop = ", ".join(check.describe() for check in env.desktop_checks) or "none"
    else:  # an older recording: which variables were set, not whether they answered
        desktop = ", ".join(f"${variable}" for variable in env.desktop) + " (whether it answers: not recorded)" \
            if env.desktop else "none"
    detail = f"GStreamer {env.gst or 'not importable'}, desktop: {desktop}"
    return name, not fixes, detail, tuple(fixes)
