"""Frame sources by URI, after jetson-inference's videoSource (docs/aux-streaming.md): csi://, v4l2://,
rtsp://, video files and image folders behind one ``FrameSource`` interface.

Cameras and streams go through OpenCV: GStreamer pipelines where OpenCV has GStreamer (JetPack's build),
else its V4L2 / FFmpeg backends; the pipeline strings are built in ``line/pipelines.py``. OpenCV is
imported on first use.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from reconad.runtime.backends.device import is_jetson
from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import IMAGE_SUFFIXES, import_cv2, list_images, read_image, resize_image
from reconad.runtime.line.pipelines import FLIP_METHODS, V4L2_CODECS, csi_pipeline, has_gstreamer, rtsp_pipeline, v4l2_pipeline

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".flv", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".mjpeg", ".mjpg")
CSI_DEFAULT_SIZE = (1280, 720)  # (width, height), jetson-inference's default for CSI cameras
CSI_DEFAULT_FPS = 30.0


class FrameReadError(ReconadError):
    """One frame could not be read or decoded; the source itself is still usable (skip the frame).

    Attributes:
        name: the frame's name (file name, or ``"<uri>#<n>"``).
    """

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


class SourceLostError(ReconadError):
    """A live source stopped delivering frames (camera unplugged, stream down); reopen it."""


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """How to open a source; every field is optional and named like its ``recon-inspect run`` option."""

    width: int | None = None  # requested capture width; files are rescaled to it (with height)
    height: int | None = None
    fps: float | None = None  # requested camera frame rate
    flip: str = "none"  # one of FLIP_METHODS
    loop: bool = False  # files and folders: start again at the end instead of ending the stream
    codec: str = "raw"  # v4l2 only: "raw" (YUYV/GRAY...) or "mjpeg" (USB cameras' high-fps mode)
    rtsp_latency_ms: int = 200  # rtspsrc jitter buffer
    open_timeout_ms: int = 10_000  # FFmpeg backend: give up opening a stream after this long
    read_timeout_ms: int = 5_000  # FFmpeg backend: a read blocked this long means the stream is lost
    bit_depth: int | None = None  # image files: real depth of 16-bit samples without an sBIT chunk; None: 16

    def __post_init__(self) -> None:
        if self.flip not in FLIP_METHODS:
            raise ReconadError(f"Flip must be one of {list(FLIP_METHODS)}, got {self.flip!r}.")
        if self.codec not in V4L2_CODECS:
            raise ReconadError(f"Codec must be one of {list(V4L2_CODECS)}, got {self.codec!r}.")
        if (self.width is None) != (self.height is None):
            raise ReconadError("Give both width and height, or neither.")
        for name in ("width", "height", "fps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ReconadError(f"The source {name} must be positive, got {value}.")


@dataclasses.dataclass(frozen=True)
class RawFrame:
    """One frame as a source delivers it.

    Attributes:
        image: uint8 [H, W, 3] (or [H, W] gray) in the source's ``colour`` order.
        name: what identifies the frame to an operator: a file name, or ``"<uri>#<n>"``.
    """

    image: np.ndarray
    name: str


MAX_REPORTED_FPS = 240.0  # a larger frame rate reported by OpenCV is not the stream's


class FrameSource(abc.ABC):
    """A camera, stream, video file or image folder.

    Attributes:
        uri: the URI it was opened from.
        live: True for cameras and streams: a failed read means the device is gone (reopen it), and the
            stream has no end. False for files and folders: they end (unless looping) and never drop frames.
        colour: channel order of the images it returns, ``"BGR"`` (OpenCV) or ``"RGB"``.
    """

    uri: str
    live: bool
    colour: str

    @property
    def frame_rate(self) -> float | None:
        """Frames per second the open source reports (a video file's or stream's), or None if unknown."""
        return None

    @abc.abstractmethod
    def open(self) -> None:
        """Open (or reopen after ``close``); raises a ``ReconadError`` saying why it cannot."""

    @abc.abstractmethod
    def read(self) -> RawFrame | None:
        """The next frame, or None at the end of the stream.

        Raises:
            FrameReadError: this frame is unreadable; the next call moves on.
            SourceLostError: a live source stopped delivering; ``close`` and ``open`` it again.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device or file; idempotent."""

    @property
    def is_open(self) -> bool:
        """Whether ``open`` succeeded and ``close`` has not been called since (a source that cannot tell: False)."""
        return False

    def __enter__(self) -> FrameSource:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def apply_flip(image: np.ndarray, flip: str) -> np.ndarray:
    """Flip or rotate an [H, W, ...] image as nvvidconv's flip-method of the same name does."""
    if flip == "none":
        return image
    cv2 = import_cv2()
    operations = {
        "counterclockwise": lambda: cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE),
        "rotate-180": lambda: cv2.rotate(image, cv2.ROTATE_180),
        "clockwise": lambda: cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE),
        "horizontal": lambda: cv2.flip(image, 1),
        "vertical": lambda: cv2.flip(image, 0),
        "upper-left-diagonal": lambda: cv2.transpose(image),  # mirror about the main diagonal
        "upper-right-diagonal": lambda: cv2.flip(cv2.transpose(image), -1),  # about the anti-diagonal
    }
    if flip not in operations:
        raise ReconadError(f"Flip must be one of {list(FLIP_METHODS)}, got {flip!r}.")
    return operations[flip]()


def _adjust(image: np.ndarray, config: SourceConfig, rescale: bool) -> np.ndarray:
    """Apply the flip and, for files (``rescale``), the requested capture size (the one resize rule)."""
    image = apply_flip(image, config.flip)
    if rescale and config.width is not None:
        image = resize_image(image, (config.height, config.width))
    return image


class ImageFolderSource(FrameSource):
    """Image files of a folder (recursively) or one image file, in sorted order, optionally looping."""

    live = False
    colour = "RGB"

    def __init__(self, path: str | os.PathLike, config: SourceConfig = SourceConfig(), uri: str | None = None) -> None:
        self.path = Path(path)
        self.config = config
        self.uri = uri or str(path)
        self._files: list[Path] = []
        self._position = 0
        self._decoded_this_pass = 0

    def open(self) -> None:
        if self.path.is_file():
            self._files = [self.path]
        else:
            self._files = list_images(self.path)
        if not self._files:
            raise ReconadError(f"No image files under {self.path} ({', '.join(IMAGE_SUFFIXES)}).")
        self._position = 0
        self._decoded_this_pass = 0

    def read(self) -> RawFrame | None:
        if self._position == len(self._files):
            if not self.config.loop:
                return None
            if self._decoded_this_pass == 0:
                raise ReconadError(f"None of the {len(self._files)} images in {self.path} can be decoded.")
            self._position, self._decoded_this_pass = 0, 0
        path = self._files[self._position]
        self._position += 1
        name = path.relative_to(self.path).as_posix() if path != self.path else path.name
        try:
            image = read_image(path, self.config.bit_depth)
        except ReconadError as error:
            raise FrameReadError(str(error), name) from None
        self._decoded_this_pass += 1
        return RawFrame(_adjust(image, self.config, rescale=True), name)

    def close(self) -> None:
        self._files = []

    @property
    def is_open(self) -> bool:
        return bool(self._files)

    def __len__(self) -> int:
        return len(self._files)


FFMPEG_OPTIONS_VARIABLE = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
# FFmpeg probes a stream for up to 5 s by default before the first frame; 0.5 s finds an RTSP camera's
# H.264 or H.265 stream all the same, and a reconnect after an outage then takes 0.7 s instead of 2 s.
RTSP_FFMPEG_OPTIONS = "analyzeduration;500000"


@contextlib.contextmanager
def _ffmpeg_capture_options(options: str | None):
    """OpenCV reads FFmpeg options from the environment when it opens a capture: set ours for that open."""
    if options is None or FFMPEG_OPTIONS_VARIABLE in os.environ:
        yield
        return
    os.environ[FFMPEG_OPTIONS_VARIABLE] = options
    try:
        yield
    finally:
        os.environ.pop(FFMPEG_OPTIONS_VARIABLE, None)


class CaptureSource(FrameSource):
    """Anything ``cv2.VideoCapture`` opens: a video file, a GStreamer pipeline, a V4L2 device or a stream.

    Args:
        uri: the URI shown to operators.
        target: what ``cv2.VideoCapture`` is given (a path, a pipeline string, a URL).
        api: the OpenCV backend, e.g. ``cv2.CAP_GSTREAMER``; ``cv2.CAP_ANY`` to let OpenCV choose.
        live: camera or stream (reopen on loss) rather than a file (ends, may loop).
        config: size, fps, flip and loop options; ``flip_in_pipeline`` when GStreamer already flips.
        properties: ``cv2.CAP_PROP_*`` values to set after opening (V4L2 size, FOURCC, fps).
        params: ``cv2.VideoCapture`` open parameters (FFmpeg timeouts).
        ffmpeg_options: FFmpeg demuxer options for this open (OpenCV's ``OPENCV_FFMPEG_CAPTURE_OPTIONS``
            syntax, ``key;value|key;value``); a value the user set in that variable wins.
    """

    colour = "BGR"

    def __init__(
        self,
        uri: str,
        target: str | int,
        api: int,
        *,
        live: bool,
        config: SourceConfig = SourceConfig(),
        flip_in_pipeline: bool = False,
        properties: tuple[tuple[int, float], ...] = (),
        params: tuple[int, ...] = (),
        ffmpeg_options: str | None = None,
    ) -> None:
        self.uri = uri
        self.ffmpeg_options = ffmpeg_options
        self.target = target
        self.api = api
        self.live = live
        self.config = config
        self.flip_in_pipeline = flip_in_pipeline
        self.properties = properties
        self.params = params
        self._capture: Any = None
        self._count = 0

    def open(self) -> None:
        cv2 = import_cv2()
        self.close()
        with _ffmpeg_capture_options(self.ffmpeg_options):
            capture = cv2.VideoCapture(self.target, self.api, list(self.params)) if self.params else None
            if capture is None:
                capture = cv2.VideoCapture(self.target, self.api)
        if not capture.isOpened():
            capture.release()
            raise ReconadError(f"Cannot open {self.uri}: OpenCV could not start it (is it connected and free?).")
        for prop, value in self.properties:
            capture.set(prop, value)
        self._capture = capture
        self._count = 0

    def read(self) -> RawFrame | None:
        if self._capture is None:
            raise SourceLostError(f"{self.uri} is not open.")
        ok, image = self._capture.read()
        if not ok:
            if self.live:
                raise SourceLostError(f"{self.uri} stopped delivering frames.")
            if self.config.loop and self._count > 0:
                self.open()  # reopening is the one rewind that works for every container and codec
                return self.read()
            return None
        self._count += 1
        name = f"{self.uri}#{self._count}"
        if image is None or image.size == 0:
            raise FrameReadError(f"{name} is empty.", name)
        flip = "none" if self.flip_in_pipeline else self.config.flip
        return RawFrame(_adjust(image, dataclasses.replace(self.config, flip=flip), rescale=not self.live), name)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    @property
    def is_open(self) -> bool:
        return self._capture is not None

    @property
    def frame_rate(self) -> float | None:
        if self._capture is None:
            return None
        fps = float(self._capture.get(import_cv2().CAP_PROP_FPS) or 0.0)
        return fps if 0.0 < fps <= MAX_REPORTED_FPS else None  # some streams report 0 or a 90 kHz clock


def parse_source_uri(uri: str) -> tuple[str, str]:
    """Split a source URI into (kind, target); kind is csi, v4l2, rtsp, video or images.

    As in jetson-inference, the ``file://``, ``v4l2://`` and ``csi://`` prefixes may be left out:
    ``/dev/video0`` is a V4L2 camera and a plain path is a file or folder.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "csi":
        sensor = parts.netloc or parts.path.lstrip("/")
        if not sensor.isdigit():
            raise ReconadError(f"A CSI camera URI is csi://N with a sensor number N, got {uri!r}.")
        return "csi", sensor
    if scheme == "v4l2":
        device = parts.path or parts.netloc
        if not device:
            raise ReconadError(f"A V4L2 camera URI is v4l2:///dev/videoN, got {uri!r}.")
        return "v4l2", device
    if scheme in ("rtsp", "rtsps"):
        return "rtsp", uri
    if scheme == "file":
        path = (parts.netloc + parts.path) or uri[len("file://") :]
    elif scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise ReconadError(f"Unknown source {uri!r}: use csi://N, v4l2:///dev/videoN, rtsp://..., a video file or a folder.")
    else:
        path = uri
    if path.startswith("/dev/video"):
        return "v4l2", path
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return "video", path
    if Path(path).is_dir() or suffix in IMAGE_SUFFIXES:
        return "images", path
    if not Path(path).exists():
        raise ReconadError(f"Source {path} does not exist or is not a folder, an image or a video file.")
    raise ReconadError(f"Source {path} is neither a folder, an image ({', '.join(IMAGE_SUFFIXES)}) nor a video file.")


def open_source(uri: str, config: SourceConfig = SourceConfig()) -> FrameSource:
    """The ``FrameSource`` for a URI (not yet opened: call ``open`` or use it as a context manager)."""
    kind, target = parse_source_uri(uri)
    if kind == "images":
        return ImageFolderSource(target, config, uri=uri)
    cv2 = import_cv2()
    if kind == "video":
        if not Path(target).is_file():
            raise ReconadError(f"Video file {target} does not exist.")
        return CaptureSource(uri, target, cv2.CAP_ANY, live=False, config=config)
    gstreamer = has_gstreamer()
    if kind == "csi":
        if not gstreamer:
            raise ReconadError(
                f"{uri} needs OpenCV built with GStreamer (JetPack's python3-opencv); this OpenCV has none."
            )
        width, height = (config.width, config.height) if config.width is not None else CSI_DEFAULT_SIZE
        pipeline = csi_pipeline(int(target), width, height, config.fps or CSI_DEFAULT_FPS, config.flip)
        return CaptureSource(uri, pipeline, cv2.CAP_GSTREAMER, live=True, config=config, flip_in_pipeline=True)
    if kind == "v4l2":
        if gstreamer:
            pipeline = v4l2_pipeline(target, config.width, config.height, config.fps, config.codec, config.flip)
            return CaptureSource(uri, pipeline, cv2.CAP_GSTREAMER, live=True, config=config, flip_in_pipeline=True)
        return CaptureSource(uri, target, cv2.CAP_V4L2, live=True, config=config, properties=v4l2_properties(config))
    if gstreamer:
        pipeline = rtsp_pipeline(target, config.rtsp_latency_ms, config.flip, config.width, config.height, is_jetson())
        return CaptureSource(uri, pipeline, cv2.CAP_GSTREAMER, live=True, config=config, flip_in_pipeline=True)
    timeouts = (cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, config.open_timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, config.read_timeout_ms)
    return CaptureSource(uri, target, cv2.CAP_FFMPEG, live=True, config=config, params=timeouts,
                         ffmpeg_options=RTSP_FFMPEG_OPTIONS)


def v4l2_properties(config: SourceConfig) -> tuple[tuple[int, float], ...]:
    """``cv2.CAP_PROP_*`` settings for OpenCV's own V4L2 backend (no GStreamer): codec first, then size."""
    cv2 = import_cv2()
    properties: list[tuple[int, float]] = []
    if config.codec == "mjpeg":
        properties.append((cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"MJPG")))
    if config.width is not None:
        properties += [(cv2.CAP_PROP_FRAME_WIDTH, config.width), (cv2.CAP_PROP_FRAME_HEIGHT, config.height)]
    if config.fps is not None:
        properties.append((cv2.CAP_PROP_FPS, config.fps))
    properties.append((cv2.CAP_PROP_BUFFERSIZE, 1))  # keep the driver from queueing stale frames
    return tuple(properties)

