"""GStreamer capture pipelines for ``line/sources.py``'s cameras and streams (CSI on Jetson through
nvarguscamerasrc, USB/V4L2, RTSP), as pure functions of their settings, after jetson-utils' videoSource
pipelines; and whether this OpenCV can run them."""

from __future__ import annotations

from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import import_cv2

# jetson-inference's --input-flip names, in the order of nvvidconv's flip-method values 0..7.
FLIP_METHODS = (
    "none",
    "counterclockwise",
    "rotate-180",
    "clockwise",
    "horizontal",
    "upper-right-diagonal",
    "vertical",
    "upper-left-diagonal",
)
_VIDEOFLIP_METHODS = {  # GStreamer videoflip's names for the same flips
    "none": "none",
    "counterclockwise": "counterclockwise",
    "rotate-180": "rotate-180",
    "clockwise": "clockwise",
    "horizontal": "horizontal-flip",
    "upper-right-diagonal": "upper-right-diagonal",
    "vertical": "vertical-flip",
    "upper-left-diagonal": "upper-left-diagonal",
}
V4L2_CODECS = ("raw", "mjpeg")


def _fraction(fps: float) -> str:
    """GStreamer framerate caps: 30 -> '30/1', 29.97 -> '2997/100'."""
    if float(fps).is_integer():
        return f"{int(fps)}/1"
    return f"{round(fps * 100)}/100"


def _appsink() -> str:
    # drop=true max-buffers=1: the sink keeps only the newest frame, so a slow reader never builds latency
    return "appsink drop=true max-buffers=1 sync=false"


def csi_pipeline(sensor_id: int, width: int, height: int, fps: float, flip: str = "none") -> str:
    """GStreamer pipeline for a MIPI CSI camera on Jetson (nvarguscamerasrc through the ISP).

    nvvidconv flips in hardware and converts NVMM NV12 to BGRx; videoconvert drops the x for OpenCV.
    """
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM), width={width}, height={height}, framerate={_fraction(fps)}, format=NV12 ! "
        f"nvvidconv flip-method={FLIP_METHODS.index(flip)} ! video/x-raw, format=BGRx ! "
        f"videoconvert ! video/x-raw, format=BGR ! {_appsink()}"
    )


def _caps_size(width: int | None, height: int | None, fps: float | None) -> str:
    parts = []
    if width is not None:
        parts += [f"width={width}", f"height={height}"]
    if fps is not None:
        parts.append(f"framerate={_fraction(fps)}")
    return "".join(f", {part}" for part in parts)


def v4l2_pipeline(
    device: str,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    codec: str = "raw",
    flip: str = "none",
) -> str:
    """GStreamer pipeline for a USB (UVC) camera: raw frames, or MJPEG decoded by jpegdec."""
    if codec not in V4L2_CODECS:
        raise ReconadError(f"Codec must be one of {list(V4L2_CODECS)}, got {codec!r}.")
    caps = _caps_size(width, height, fps)
    head = f"v4l2src device={device} ! "
    head += f"image/jpeg{caps} ! jpegdec ! " if codec == "mjpeg" else f"video/x-raw{caps} ! "
    flip_stage = f"videoflip method={_VIDEOFLIP_METHODS[flip]} ! " if flip != "none" else ""
    return f"{head}videoconvert ! {flip_stage}video/x-raw, format=BGR ! {_appsink()}"


def rtsp_pipeline(
    uri: str,
    latency_ms: int = 200,
    flip: str = "none",
    width: int | None = None,
    height: int | None = None,
    jetson: bool = False,
) -> str:
    """GStreamer pipeline for an RTSP stream; decodebin picks the codec (nvv4l2decoder on Jetson).

    On Jetson, nvvidconv takes the decoder's NVMM buffers (videoconvert cannot) and flips and scales
    in hardware; elsewhere videoconvert/videoflip/videoscale do it on the CPU.
    """
    size = f", width={width}, height={height}" if width is not None else ""
    head = f"rtspsrc location={uri} latency={latency_ms} ! decodebin ! "
    if jetson:
        middle = f"nvvidconv flip-method={FLIP_METHODS.index(flip)} ! video/x-raw, format=BGRx{size} ! videoconvert ! "
    else:
        flip_stage = f"videoflip method={_VIDEOFLIP_METHODS[flip]} ! " if flip != "none" else ""
        scale_stage = f"videoscale ! video/x-raw{size} ! " if size else ""
        middle = f"videoconvert ! {flip_stage}{scale_stage}"
    return f"{head}{middle}video/x-raw, format=BGR ! {_appsink()}"


def has_gstreamer() -> bool:
    """Whether this OpenCV was built with GStreamer (JetPack's is; the pip wheels are not)."""
    for line in import_cv2().getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False
