"""GStreamer from Python for the video outputs (``line/outputs.py``) and doctor (``doctor_outputs.py``):
importing it safely (``import_gst``), the H.264 encoder an RTSP output uses (``choose_h264_encoder``,
``h264_encoder``) and the live ``appsrc`` every output pipeline starts with (``appsrc_section``).

GStreamer comes through PyGObject (extra ``gst``, or JetPack's python3-gi); nothing here runs a pipeline.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Collection
from typing import Any

from reconad.runtime.errors import ReconadError

GST_PACKAGES = (
    "pip install 'reconad[gst]' (PyGObject; on Jetson use JetPack's python3-gi) and the GStreamer packages "
    "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-ugly"
)
# H.264 encoders, best first, with the elements each needs: Jetson's hardware encoder (JetPack), x264, OpenH264.
H264_ENCODERS = {"nvv4l2h264enc": ("nvv4l2h264enc", "nvvidconv"), "x264enc": ("x264enc",), "openh264enc": ("openh264enc",)}


def _keep_gcc_unwinder() -> None:
    """Put GCC's unwinder into the global symbol scope before GStreamer is loaded.

    libgstreamer links libunwind, which also exports the ``_Unwind_*`` functions C++ exceptions are
    thrown with; PyGObject loads libgstreamer globally, so without this a C++ exception raised later
    by another library (ONNX Runtime refusing a corrupt model, once the onnx package is loaded) goes
    through libunwind's copy and the process aborts.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libgcc_s.so.1", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass  # not glibc/GCC (musl): nothing to protect


def import_gst(feature: str, rtsp_server: bool = False) -> tuple[Any, Any, Any]:
    """(Gst, GLib, GstRtspServer or None), initialised; a ``ReconadError`` naming what to install."""
    _keep_gcc_unwinder()
    try:
        import gi

        gi.require_version("Gst", "1.0")
        if rtsp_server:
            gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst

        server = None
        if rtsp_server:
            from gi.repository import GstRtspServer as server
    except (ImportError, ValueError) as error:  # kept as the cause: doctor reports it
        raise ReconadError(f"{feature} needs GStreamer for Python: {GST_PACKAGES}.") from error
    Gst.init(None)
    return Gst, GLib, server


def choose_h264_encoder(elements: Collection[str]) -> str | None:
    """The ``H264_ENCODERS`` key an RTSP output uses given the GStreamer element names present, None if none."""
    return next((encoder for encoder, needs in H264_ENCODERS.items() if set(needs) <= set(elements)), None)


def h264_encoder(Gst: Any, fps: int, bitrate_kbps: int) -> str:
    """The pipeline section RGB frames -> H.264, by ``choose_h264_encoder`` of this GStreamer's elements."""
    encoder = choose_h264_encoder([name for needs in H264_ENCODERS.values() for name in needs if Gst.ElementFactory.find(name)])
    if encoder == "nvv4l2h264enc":
        return (
            "nvvidconv ! video/x-raw(memory:NVMM),format=NV12 ! "
            f"nvv4l2h264enc bitrate={bitrate_kbps * 1000} iframeinterval={fps} idrinterval={fps} insert-sps-pps=true"
        )
    if encoder == "x264enc":  # zerolatency: no B-frames, no lookahead: a frame leaves as soon as it is encoded
        return (
            "videoconvert ! video/x-raw,format=I420 ! "
            f"x264enc tune=zerolatency speed-preset=ultrafast bitrate={bitrate_kbps} key-int-max={fps}"
        )
    if encoder == "openh264enc":
        return f"videoconvert ! video/x-raw,format=I420 ! openh264enc bitrate={bitrate_kbps * 1000} gop-size={fps}"
    raise ReconadError("An RTSP output needs an H.264 encoder in GStreamer: install gstreamer1.0-plugins-ugly (x264enc).")


def appsrc_section(width: int, height: int, fps: int) -> str:
    """The pipeline's source: an ``appsrc`` named ``src`` taking uint8 RGB frames of ``width`` x ``height``
    pixels at ``fps``. Live, timestamped on arrival, never blocking the writer: at most 2 frames wait,
    the oldest is dropped."""
    caps = f"video/x-raw,format=RGB,width={width},height={height},framerate={fps}/1"
    return (
        f'appsrc name=src is-live=true format=time do-timestamp=true block=false max-buffers=2 '
        f'leaky-type=downstream caps="{caps}"'
    )
