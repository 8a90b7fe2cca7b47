"""The one image path: from any frame or image file to the graph input, uint8 [N, H, W, 3] RGB.

Decode (files), checks (corrupt frames), colour, ROI, resize (one filter rule): what the loop,
calibration, the export's reference images and training all call. Accepts gray, RGB/BGR, RGBA/BGRA,
8- or 16-bit or float images, arrays or paths. Cast and normalisation stay in the graph. OpenCV is
imported on first use so that importing the runtime stays light.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from reconad.runtime.errors import ReconadError

Frame = Union[np.ndarray, str, os.PathLike]  # an image array [H, W] / [H, W, C] or an image file path
Roi = tuple[int, int, int, int]  # (x, y, width, height) in pixels of the original frame

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")
COLOUR_ORDERS = ("RGB", "BGR")


def import_cv2() -> Any:
    """OpenCV, or a one-sentence ``ReconadError`` saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise ReconadError("OpenCV is not installed; install it with pip install 'reconad[runtime]'.") from None
    return cv2


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3] RGB (gray, alpha and 16-bit files are converted)."""
    cv2 = import_cv2()
    path = Path(path)
    try:
        encoded = np.fromfile(path, dtype=np.uint8)  # imdecode, unlike imread, handles any path encoding
    except OSError as error:
        raise ReconadError(f"Cannot read image {path}: {error.strerror or type(error).__name__}.") from None
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if encoded.size else None
    if decoded is None:
        raise ReconadError(f"Cannot read image {path}: it is empty or not a format OpenCV can decode.")
    return to_rgb_uint8(decoded, colour="BGR", name=str(path))  # OpenCV decodes colour as BGR(A)


def to_rgb_uint8(image: np.ndarray, colour: str = "RGB", name: str = "frame") -> np.ndarray:
    """Convert one image array to uint8 [H, W, 3] RGB.

    Args:
        image: [H, W] gray, [H, W, 1] gray, [H, W, 3] colour or [H, W, 4] colour + alpha (alpha dropped).
            uint8 as is; uint16 scaled by 255/65535; float and bool taken as 0..1 and clipped.
        colour: channel order of a colour ``image``, ``"RGB"`` or ``"BGR"`` (OpenCV frames are BGR).
        name: what to call the image in error messages.
    """
    if colour not in COLOUR_ORDERS:
        raise ReconadError(f"Colour order must be one of {list(COLOUR_ORDERS)}, got {colour!r}.")
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))) or 0 in image.shape:
        raise ReconadError(f"{name} has shape {list(image.shape)}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].")
    image = _to_uint8(image, name)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    rgb = image[:, :, 2::-1] if colour == "BGR" else image[:, :, :3]  # drops alpha in both orders
    return np.ascontiguousarray(rgb)


def _to_uint8(image: np.ndarray, name: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # rounded 65535 -> 255
    if image.dtype == np.bool_ or np.issubdtype(image.dtype, np.floating):
        values = np.nan_to_num(image.astype(np.float32), nan=0.0)
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ReconadError(f"{name} has dtype {image.dtype}; expected uint8, uint16, bool or float in 0..1.")


def crop_roi(image: np.ndarray, roi: Roi | None, name: str = "frame") -> np.ndarray:
    """The ``(x, y, width, height)`` region of ``image`` (a view); the whole image when ``roi`` is None."""
    if roi is None:
        return image
    x, y, width, height = (int(value) for value in roi)
    image_height, image_width = image.shape[:2]
    if width <= 0 or height <= 0 or x < 0 or y < 0 or x + width > image_width or y + height > image_height:
        raise ReconadError(
            f"ROI (x={x}, y={y}, w={width}, h={height}) does not fit inside {name} "
            f"of {image_width}x{image_height} pixels."
        )
    return image[y : y + height, x : x + width]


def resize_image(image: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """Stretch an image to ``input_hw`` (no letterbox, as in training).

    INTER_AREA when shrinking both sides: it averages every source pixel, so no aliasing on
    fine textures; INTER_LINEAR otherwise (INTER_AREA degenerates to nearest-like when growing).
    """
    height, width = input_hw
    if image.shape[:2] == (height, width):
        return image
    cv2 = import_cv2()
    shrinking = image.shape[0] >= height and image.shape[1] >= width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def prepare_image(frame: Frame, input_hw: tuple[int, int], colour: str = "RGB", roi: Roi | None = None) -> np.ndarray:
    """One frame (array or path) -> uint8 [H, W, 3] RGB at ``input_hw``; ``colour`` applies to arrays only.

    A uint8 3-channel array is cropped and resized before its channels are reordered: resizing acts per
    channel, so the result is identical, but the channel copy then touches the small image (3-4x faster
    on 480p-1080p camera frames).
    """
    if isinstance(frame, (str, os.PathLike)):
        return resize_image(crop_roi(read_image(frame), roi, str(frame)), input_hw)
    frame = np.asarray(frame)
    if frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 and colour in COLOUR_ORDERS:
        return to_rgb_uint8(resize_image(crop_roi(frame, roi), input_hw), colour=colour)
    return resize_image(crop_roi(to_rgb_uint8(frame, colour=colour), roi), input_hw)


def is_graph_batch(frames: object, input_hw: tuple[int, int]) -> bool:
    """Whether ``frames`` already is the graph input: a uint8 [N, H, W, 3] array at ``input_hw``."""
    return (
        isinstance(frames, np.ndarray)
        and frames.dtype == np.uint8
        and frames.ndim == 4
        and frames.shape[1:] == (*input_hw, 3)
        and len(frames) > 0
    )


def prepare_batch(
    frames: Frame | Sequence[Frame], input_hw: tuple[int, int], colour: str = "RGB", roi: Roi | None = None
) -> np.ndarray:
    """Frames -> the graph input uint8 [N, H, W, 3] RGB.

    Args:
        frames: one frame (a path, or an array of 2 or 3 dims), a 4-D array [N, H, W, C] of frames,
            or a sequence of paths and arrays (sizes and kinds may differ). A uint8 RGB batch already
            at ``input_hw`` is returned as it is (no ROI, RGB order).
        input_hw: the graph's (H, W), ``manifest.input_hw``.
        colour: channel order of colour arrays, ``"RGB"`` or ``"BGR"``; files are always decoded right.
        roi: optional (x, y, width, height) crop applied to every frame before resizing.
    """
    if colour == "RGB" and roi is None and is_graph_batch(frames, input_hw):
        return frames  # already prepared (e.g. by the loop's workers): no second pass
    if isinstance(frames, (str, os.PathLike)) or (isinstance(frames, np.ndarray) and frames.ndim in (2, 3)):
        frames = [frames]
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise ReconadError(f"A batch of frames must be a 4-D array [N, H, W, C], got shape {list(frames.shape)}.")
    if len(frames) == 0:
        raise ReconadError("No frames to prepare: the batch is empty.")
    height, width = input_hw
    batch = np.empty((len(frames), height, width, 3), dtype=np.uint8)  # [N, H, W, 3]
    for index, frame in enumerate(frames):
        batch[index] = prepare_image(frame, input_hw, colour=colour, roi=roi)
    return batch


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (by suffix, ``IMAGE_SUFFIXES``) under ``folder``, recursively, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReconadError(f"Image folder {folder} does not exist or is not a folder.")
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def parse_roi(text: str) -> Roi:
    """``"X,Y,W,H"`` (pixels) -> a ROI tuple; a one-sentence error otherwise."""
    parts = text.replace(" ", "").split(",")
    try:
        x, y, width, height = (int(part) for part in parts)
    except ValueError:
        raise ReconadError(f"ROI must be four integers X,Y,W,H, got {text!r}.") from None
    if x < 0 or y < 0 or width <= 0 or height <= 0:
        raise ReconadError(f"ROI needs X, Y >= 0 and W, H > 0, got {text!r}.")
    return (x, y, width, height)


def check_frame(image: Any) -> str | None:
    """``"corrupt"`` for a malformed frame (not an array, empty, or an impossible channel count), else None.

    Frames that are well formed but show nothing (black, flat, frozen) are for ``line/blind.py``.
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or 0 in image.shape:
        return "corrupt"
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        return "corrupt"
    return None
