"""Video outputs by URI, after jetson-utils' videoOutput (docs/aux-streaming.md): ``display://0``,
``rtsp://[address]:port/path`` (an RTSP server of ours) and video files (``.mp4``, ``.mkv``, ``.mov``,
``.avi``); several at once.

``line/video_sink.py``'s ``VideoOutputSink`` renders each inspected frame once and hands it to these
outputs. RTSP and display go through GStreamer from Python
(PyGObject: extra ``gst``, or JetPack's python3-gi); files through OpenCV's VideoWriter. An RTSP output
binds to 127.0.0.1 unless the URI names an address (``rtsp://0.0.0.0:8554/inspect`` for every
interface), encodes only while a client watches, and on Jetson uses the hardware encoder.
"""

from __future__ import annotations

import abc
import dataclasses
import ipaddress
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import import_cv2, rgb_to_bgr
from reconad.runtime.line.addresses import client_url
from reconad.runtime.line.desktop import DesktopCheck, check_desktop, no_desktop_sentence
from reconad.runtime.line.gst import appsrc_section, h264_encoder, import_gst

FILE_FOURCCS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
DEFAULT_RTSP_PORT = 8554
DISK_FULL_MB = 16  # less free than this when a video file is finished: the writer may have been cut short
DEFAULT_RTSP_PATH = "/inspect"
LOOPBACK = "127.0.0.1"



@dataclasses.dataclass(frozen=True)
class OutputTarget:
    """A parsed ``--output`` URI.

    Attributes:
        kind: ``"display"``, ``"rtsp"`` or ``"file"``.
        uri: as given.
        path: the video file (kind file).
        host: the address the RTSP server binds to (kind rtsp); loopback unless the URI names one.
        port: its TCP port.
        mount: the stream's path on the server, e.g. ``/inspect``.
        screen: the display number (kind display).
    """

    kind: str
    uri: str
    path: Path | None = None
    host: str | None = None
    port: int | None = None
    mount: str | None = None
    screen: int | None = None


def parse_output_uri(uri: str) -> OutputTarget:
    """``display://0``, ``rtsp://@:8554/inspect``, ``rtsp://0.0.0.0:8554/x``, ``line.mp4``, ``file://…``.

    As in jetson-utils, ``@`` (or no host) in an RTSP output means this machine; here that is loopback
    only, so nothing is exposed on the network unless an address is named.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "display":
        screen = parts.netloc or parts.path.lstrip("/") or "0"
        if not screen.isdigit():
            raise ReconadError(f"A display output is display://N, got {uri!r}.")
        if int(screen) != 0:
            raise ReconadError(f"Only display://0 (the desktop of $DISPLAY) is supported, got {uri!r}.")
        return OutputTarget("display", uri, screen=0)
    if scheme == "rtsp":
        hostport = parts.netloc.rsplit("@", 1)[-1]
        try:
            located = urlsplit(f"rtsp://{hostport}")
            port = located.port or DEFAULT_RTSP_PORT
        except ValueError:
            raise ReconadError(f"The RTSP output {uri!r} has an invalid port.") from None
        host = located.hostname or LOOPBACK
        if host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ReconadError(
                    f"An RTSP output binds to an address of this machine (e.g. 0.0.0.0 or 192.168.1.5), got {host!r}."
                ) from None
        mount = parts.path if parts.path not in ("", "/") else DEFAULT_RTSP_PATH
        return OutputTarget("rtsp", uri, host=host, port=port, mount=mount)
    if scheme == "file":
        path = Path((parts.netloc + parts.path) or uri[len("file://") :])
    elif scheme and len(scheme) > 1:
        raise ReconadError(
            f"Unknown output {uri!r}: use display://0, rtsp://[address]:port/path or a video file "
            f"({', '.join(FILE_FOURCCS)})."
        )
    else:
        path = Path(uri)
    if path.suffix.lower() not in FILE_FOURCCS:
        raise ReconadError(f"A video file output must end in one of {', '.join(FILE_FOURCCS)}, got {uri!r}.")
    return OutputTarget("file", uri, path=path)


class VideoOutput(abc.ABC):
    """Where rendered frames go. The first frame fixes the size; later ones of another size are scaled to
    fit and letterboxed.

    Attributes:
        uri: the URI it was opened from.
        frames_written: frames handed to the output (an RTSP output counts only watched frames).
    """

    uri: str
    frames_written: int = 0

    @property
    def wants_frames(self) -> bool:
        """False while a frame would be thrown away (an RTSP output nobody watches): not worth rendering."""
        return True

    @abc.abstractmethod
    def write(self, frame: np.ndarray) -> None:
        """Show or send one uint8 [H, W, 3] RGB frame; raises ``ReconadError`` when the output failed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish (a file is complete only after this) and release; idempotent."""


def _fit(frame: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``frame`` in a stream of ``shape`` (fixed by the first frame): scaled to fit whole and centred on
    black (letterboxed), so a folder of mixed sizes is never stretched and its text never squashed."""
    if frame.shape == shape:
        return frame
    cv2 = import_cv2()
    height, width = shape[:2]
    factor = min(height / frame.shape[0], width / frame.shape[1])
    fitted_width, fitted_height = max(1, round(frame.shape[1] * factor)), max(1, round(frame.shape[0] * factor))
    scaled = cv2.resize(frame, (fitted_width, fitted_height),
                        interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    canvas = np.zeros(shape, dtype=frame.dtype)
    top, left = (height - fitted_height) // 2, (width - fitted_width) // 2
    canvas[top : top + fitted_height, left : left + fitted_width] = scaled
    return canvas


class FileOutput(VideoOutput):
    """A video file written by OpenCV (MPEG-4 Part 2 in .mp4/.mkv/.mov, Motion JPEG in .avi).

    Frames go to ``<stem>.partial<suffix>`` beside it, renamed to the final name at ``close``: a run
    that is killed leaves a file named partial, never a truncated file under the name asked for.
    An existing file of that name is replaced at ``close``.
    """

    def __init__(self, target: OutputTarget, fps: float = 30.0) -> None:
        self.uri = target.uri
        self.path = Path(target.path)
        self.fps = fps
        _check_writable(self.path)
        self.partial = self.path.with_name(f"{self.path.stem}.partial{self.path.suffix}")
        self._writer: Any = None
        self._shape: tuple[int, ...] | None = None
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        cv2 = import_cv2()
        if self._writer is None:
            height, width = frame.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*FILE_FOURCCS[self.path.suffix.lower()])
            writer = cv2.VideoWriter(str(self.partial), fourcc, float(self.fps), (width, height))
            if not writer.isOpened():
                raise ReconadError(f"OpenCV cannot write the video {self.partial} ({width}x{height}).")
            self._writer, self._shape = writer, frame.shape
        self._writer.write(rgb_to_bgr(_fit(frame, self._shape)))  # OpenCV wants BGR
        self.frames_written += 1

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        # OpenCV's writer reports no write errors, a full disk included: an mp4 then lacks its index and
        # does not open, an mkv or avi opens but ends early. The file is read back before it gets the
        # name asked for (on a full disk, to its last frame), so a short video is never passed off as done.
        full = shutil.disk_usage(self.partial.parent).free / 1e6 < DISK_FULL_MB
        if self.frames_written and not _reads_back(self.partial, self.frames_written if full else None):
            why = " (the disk is full)" if full else ""
            raise ReconadError(f"The video {self.partial} did not come out readable{why}; it keeps its partial name.")
        try:
            os.replace(self.partial, self.path)
        except OSError as error:
            raise ReconadError(f"Cannot finish {self.path}: {error.strerror}.") from None


def _reads_back(path: Path, frames: int | None = None) -> bool:
    """Whether OpenCV's reader opens a finished video and decodes its first frame; with ``frames``, also
    that it holds that many (read to the end: only asked for on a full disk, about 2 ms a 720p frame)."""
    capture = import_cv2().VideoCapture(str(path))
    try:
        if not (capture.isOpened() and capture.read()[0]):
            return False
        count = 1
        while frames is not None and count < frames and capture.grab():
            count += 1
        return frames is None or count >= frames
    finally:
        capture.release()


class RtspOutput(VideoOutput):
    """An RTSP server of ours (GStreamer rtsp-server, in-process) streaming the rendered frames as H.264.

    It listens from construction (a taken port fails at once); the stream is mounted with the first
    frame, whose size it keeps. Frames are encoded only while at least one client is connected; every
    client shares one encoder. Key frames each second let a new client start within a second.

    Attributes:
        url: what clients open (``client_url``), e.g. ``rtsp://127.0.0.1:8554/inspect``, or for a server
            bound to every interface ``rtsp://HOSTNAME:8554/inspect``.
        note: who can reach it and how to watch, for the run's ``streaming to`` line.
        frames_unwatched: frames that arrived while no client was connected.
    """

    def __init__(self, target: OutputTarget, fps: float = 30.0, bitrate_kbps: int = 4000) -> None:
        Gst, GLib, GstRtspServer = import_gst(f"--output {target.uri}", rtsp_server=True)
        self._Gst, self._GstRtspServer = Gst, GstRtspServer
        self.uri = target.uri
        self.target = target
        self.fps = max(1, round(fps))
        self.encoder = h264_encoder(Gst, self.fps, bitrate_kbps)
        self._context = GLib.MainContext.new()
        self._loop = GLib.MainLoop.new(self._context, False)
        server = GstRtspServer.RTSPServer.new()
        server.set_address(target.host)
        server.set_service(str(target.port))
        self._source_id = server.attach(self._context)
        if self._source_id == 0:
            raise ReconadError(
                f"Cannot serve {target.uri}: {target.host}:{target.port} is in use or not an address of this machine."
            )
        self._server = server
        self.url, self.note = client_url(target.host, server.get_bound_port(), target.mount)
        self._lock = threading.Lock()
        self._appsrcs: list[Any] = []
        self._shape: tuple[int, ...] | None = None
        self.frames_written = 0
        self.frames_unwatched = 0
        self._thread = threading.Thread(target=self._loop.run, name="rtsp-output", daemon=True)
        self._thread.start()

    def _mount(self, shape: tuple[int, ...]) -> None:
        height, width = shape[:2]
        factory = self._GstRtspServer.RTSPMediaFactory.new()
        factory.set_launch(f"( {appsrc_section(width, height, self.fps)} ! {self.encoder} ! rtph264pay name=pay0 pt=96 config-interval=1 )")
        factory.set_shared(True)
        factory.connect("media-configure", self._on_media_configure)
        self._server.get_mount_points().add_factory(self.target.mount, factory)
        self._shape = shape

    def _on_media_configure(self, factory: Any, media: Any) -> None:  # on our GLib thread
        appsrc = media.get_element().get_child_by_name("src")
        with self._lock:
            self._appsrcs.append(appsrc)
        media.connect("unprepared", lambda _media: self._forget(appsrc))

    def _forget(self, appsrc: Any) -> None:
        with self._lock:
            if appsrc in self._appsrcs:
                self._appsrcs.remove(appsrc)

    @property
    def clients(self) -> int:
        """Streams being served now (one shared stream however many clients watch it)."""
        with self._lock:
            return len(self._appsrcs)

    @property
    def wants_frames(self) -> bool:
        return self._shape is None or self.clients > 0  # the first frame mounts the stream

    def write(self, frame: np.ndarray) -> None:
        if self._shape is None:
            self._mount(frame.shape)
        with self._lock:
            appsrcs = list(self._appsrcs)
        if not appsrcs:
            self.frames_unwatched += 1
            return
        data = np.ascontiguousarray(_fit(frame, self._shape)).tobytes()
        for appsrc in appsrcs:
            appsrc.emit("push-buffer", self._Gst.Buffer.new_wrapped(data))
        self.frames_written += 1

    def close(self) -> None:
        if self._source_id == 0:
            return
        with self._lock:
            appsrcs, self._appsrcs = list(self._appsrcs), []
        for appsrc in appsrcs:
            appsrc.emit("end-of-stream")
        # Drop the clients and stop listening, on the GLib thread that owns the server.
        done = threading.Event()

        def shut_down() -> bool:
            self._server.client_filter(lambda server, client, *data: self._GstRtspServer.RTSPFilterResult.REMOVE)
            source = self._context.find_source_by_id(self._source_id)
            if source is not None:
                source.destroy()
            done.set()
            return False

        self._context.invoke_full(0, shut_down)
        done.wait(5)
        self._loop.quit()
        self._thread.join(timeout=5)
        self._source_id = 0


X11_SINKS = ("autovideosink", "ximagesink")
WAYLAND_SINKS = ("waylandsink", "autovideosink")


def display_sinks(checks: Sequence[DesktopCheck]) -> tuple[str, ...]:
    """The GStreamer sinks ``display://0`` tries, in order, for the desktop of ``checks`` that answers.

    X11 (its X server answers, or could not be checked): ``X11_SINKS``. Wayland alone: waylandsink
    itself, as autovideosink would try DirectFB's dfbvideosink first (same rank, sorted before it by
    name), which crashes the process where it cannot start; autovideosink only where waylandsink is not
    installed.
    """
    x11 = any(check.variable == "DISPLAY" and check.answers is not False for check in checks)
    return X11_SINKS if x11 else WAYLAND_SINKS


class DisplayOutput(VideoOutput):
    """A window on this machine's desktop (GStreamer: autovideosink on X11, which finds Jetson's EGL sink
    too; waylandsink on Wayland alone, ``display_sinks``).

    The desktop must answer first (``line/desktop.py``): a ``DISPLAY`` with no X server behind it is
    refused here, in one sentence, because autovideosink would otherwise try every sink it knows and
    reach one that crashes the process (DirectFB's dfbvideosink). When the sink autovideosink picks
    cannot start (xvimagesink on an X server without the XVideo extension: Xvfb, VNC, SSH-forwarded X,
    "Could not initialise X output"), plain ximagesink is tried. Closing the window makes the next
    ``write`` raise; the loop goes on (losing the X server ends the process: Xlib exits on it).

    Raises:
        ReconadError: no desktop answers, or GStreamer for Python does not import.
    """

    def __init__(self, target: OutputTarget, fps: float = 30.0) -> None:
        checks = check_desktop()
        refused = no_desktop_sentence(target.uri, checks)
        if refused is not None:
            raise ReconadError(refused)
        self.sinks = display_sinks(checks)
        self._Gst, _, _ = import_gst(f"--output {target.uri}")
        self.uri = target.uri
        self.fps = max(1, round(fps))
        self._pipeline: Any = None
        self._appsrc: Any = None
        self._shape: tuple[int, ...] | None = None
        self.frames_written = 0

    def _start(self, shape: tuple[int, ...]) -> None:
        Gst = self._Gst
        height, width = shape[:2]
        errors = []
        for sink in self.sinks:
            try:
                launch = f"{appsrc_section(width, height, self.fps)} ! videoconvert ! {sink} sync=false"
                pipeline = Gst.parse_launch(launch)
            except Exception as error:  # GLib.Error: the element is not installed
                errors.append(str(error))
                continue
            if pipeline.set_state(Gst.State.PLAYING) != Gst.StateChangeReturn.FAILURE:
                self._pipeline, self._appsrc, self._shape = pipeline, pipeline.get_by_name("src"), shape
                return
            errors.append(self._bus_error(pipeline) or "GStreamer refused")
            pipeline.set_state(Gst.State.NULL)
            if self.sinks is WAYLAND_SINKS:
                break  # waylandsink is there but cannot start: autovideosink would reach dfbvideosink
        raise ReconadError(f"Cannot open a window for {self.uri}: {errors[0]}.")

    def _bus_error(self, pipeline: Any) -> str | None:
        message = pipeline.get_bus().pop_filtered(self._Gst.MessageType.ERROR)
        return message.parse_error()[0].message if message is not None else None

    def write(self, frame: np.ndarray) -> None:
        if self._pipeline is None:
            self._start(frame.shape)
        error = self._bus_error(self._pipeline)
        if error is not None:
            raise ReconadError(f"{self.uri} failed: {error}")
        data = np.ascontiguousarray(_fit(frame, self._shape)).tobytes()
        self._appsrc.emit("push-buffer", self._Gst.Buffer.new_wrapped(data))
        self.frames_written += 1

    def close(self) -> None:
        if self._pipeline is None:
            return
        self._appsrc.emit("end-of-stream")
        self._pipeline.get_bus().timed_pop_filtered(
            self._Gst.SECOND, self._Gst.MessageType.EOS | self._Gst.MessageType.ERROR
        )
        self._pipeline.set_state(self._Gst.State.NULL)
        self._pipeline = None


def open_output(uri: str, fps: float = 30.0) -> VideoOutput:
    """The ``VideoOutput`` for one ``--output`` URI; raises ``ReconadError`` when it cannot be opened."""
    target = parse_output_uri(uri)
    if target.kind == "display":
        return DisplayOutput(target, fps)
    if target.kind == "rtsp":
        return RtspOutput(target, fps)
    return FileOutput(target, fps)


def check_output_files(uris: Sequence[str], source: str | None = None) -> None:
    """Refuse, in one sentence, a video file that cannot be written (its folder missing or read-only, a
    folder of that name), named twice, or the same file as the source (it would be overwritten by the run
    that reads it): before any model loads, not frame by frame once the run is going."""
    seen: dict[Path, str] = {}
    source_path = _resolved(source) if source else None
    for uri in uris:
        target = parse_output_uri(uri)
        if target.kind != "file":
            continue
        _check_writable(Path(target.path))
        path = _resolved(str(target.path))
        if source_path is not None and path == source_path:
            raise ReconadError(f"The output {uri!r} is the source itself; write the video to another file.")
        if path in seen:
            raise ReconadError(f"The output file {uri!r} is named twice (also as {seen[path]!r}).")
        seen[path] = uri


def _check_writable(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise ReconadError(f"Cannot write {path}: the folder {folder} does not exist.")
    if path.is_dir():
        raise ReconadError(f"Cannot write {path}: it is a folder; name a video file.")
    if not os.access(folder, os.W_OK | os.X_OK):  # also false on a read-only file system, for root too
        raise ReconadError(f"Cannot write {path}: the folder {folder} is not writable here.")


def _resolved(path: str) -> Path | None:
    try:
        return Path(path.removeprefix("file://")).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def open_outputs(uris: Sequence[str], fps: float = 30.0) -> list[VideoOutput]:
    """Every output of ``uris``, or none: when one cannot be opened, those already open are closed."""
    check_output_files(uris)
    outputs: list[VideoOutput] = []
    try:
        for uri in uris:
            outputs.append(open_output(uri, fps))
    except BaseException:
        for output in outputs:
            output.close()
        raise
    return outputs
