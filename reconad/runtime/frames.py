"""The one image path: from any frame or image file to the graph input, uint8 [N, H, W, 3] RGB.

Training, evaluation, calibration, the export's reference images and the inspection loop all call
these functions, so the pixels a model is evaluated on are the pixels the line gives it:

- decode (files): any mode an image or annotation tool writes (gray, gray+alpha, palette, RGB, RGBA,
  8 or 16 bits), truncated JPEGs refused, the EXIF orientation applied (as every viewer does);
- colour: to RGB, alpha dropped; 16-bit data scaled by its real bit depth (the PNG sBIT chunk, else
  the caller's ``bit_depth``, else 16), with a warning when a frame uses under 1/16 of its range;
- checks (``check_frame``): corrupt frames (frames showing nothing are for ``line/blind.py``);
- ROI, then resize with one filter rule (``resize_image``).

Masks (``read_mask``) are decoded by the same rules and binarised for every common mask encoding.
OpenCV decodes and resizes; Pillow only reads the EXIF orientation tag. Both are imported on first use
so that importing the runtime stays light.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from reconad.runtime.errors import ReconadError

Frame = Union[np.ndarray, str, os.PathLike]  # an image array [H, W] / [H, W, C] or an image file path
Roi = tuple[int, int, int, int]  # (x, y, width, height) in pixels of the original frame

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")
COLOUR_ORDERS = ("RGB", "BGR")
LOW_RANGE_FRACTION = 1 / 16  # a 16-bit frame whose maximum is below this fraction of its range is suspect
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_LOG = logging.getLogger(__name__)


def import_cv2() -> Any:
    """OpenCV, or a one-sentence ``ReconadError`` saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise ReconadError("OpenCV is not installed; install it with pip install 'reconad[runtime]'.") from None
    return cv2


# --- decode ---------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ReconadError(f"Cannot read image {path}: {error.strerror or type(error).__name__}.") from None


def png_significant_bits(data: bytes) -> int | None:
    """The bit depth a PNG's sBIT chunk declares (the largest over its channels), or None without one.

    Cameras write 10-, 12- or 14-bit samples into 16-bit PNGs and record the real depth here. Pillow
    does not expose this chunk, so its header is read directly (chunks before the first IDAT).
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"sBIT":
            body = data[offset + 8 : offset + 8 + length]
            return max(body) if body else None
        if kind in (b"IDAT", b"IEND"):
            return None
        offset += 12 + length  # length, type, data, CRC
    return None


def exif_orientation(data: bytes) -> int:
    """The EXIF Orientation tag (1..8) of an encoded image (JPEG, PNG eXIf, TIFF, WebP); 1 without one."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ReconadError("Reading image files needs Pillow (for the EXIF orientation); pip install pillow.") from None
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return 1  # a format Pillow does not know (e.g. PNM variants) carries no EXIF
    return int(orientation) if orientation in range(1, 9) else 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a decoded ``image`` ([H, W] or [H, W, C]) upright, as EXIF ``orientation`` (1..8) says."""
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1]
    if orientation == 5:
        return np.swapaxes(image, 0, 1)
    if orientation == 6:
        return np.rot90(image, k=-1)  # stored rotated 90 degrees counter-clockwise: turn it clockwise
    if orientation == 7:
        return np.swapaxes(image, 0, 1)[::-1, ::-1]  # transverse: mirrored about the anti-diagonal
    if orientation == 8:
        return np.rot90(image, k=1)
    return image


def decode_image(data: bytes, name: str) -> tuple[np.ndarray, int | None]:
    """Decode an image file's bytes as stored, upright: ``(array, significant bits or None)``.

    The array is OpenCV's unchanged decode ([H, W], [H, W, 3] BGR or [H, W, 4] BGRA, uint8 or uint16;
    palettes expanded) with the EXIF orientation applied.

    Raises:
        ReconadError: empty, undecodable, or a truncated JPEG (OpenCV would return it with its
            missing part grey).
    """
    cv2 = import_cv2()
    if Path(name).suffix.lower() in _JPEG_SUFFIXES and data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-64:]:
        raise ReconadError(f"Cannot read image {name}: it is truncated (no JPEG end marker).")
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if decoded is None:
        raise ReconadError(f"Cannot read image {name}: it is empty, truncated or not a format OpenCV can decode.")
    return np.ascontiguousarray(apply_orientation(decoded, exif_orientation(data))), png_significant_bits(data)


def read_image(path: str | os.PathLike, bit_depth: int | None = None) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3] RGB, upright (EXIF), alpha dropped, 16-bit scaled.

    Args:
        path: the file.
        bit_depth: the real bit depth of 16-bit samples when the file does not say (no sBIT chunk),
            e.g. 12 for a Mono12 camera; None: 16.
    """
    path = Path(path)
    decoded, significant_bits = decode_image(_read_bytes(path), str(path))
    return to_rgb_uint8(decoded, colour="BGR", name=str(path), bit_depth=significant_bits or bit_depth)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a ground-truth mask to bool [H, W] (True = defective), by the same decode rules as images.

    Works for every encoding annotation tools commonly write: 0/255 gray or colour masks (also
    anti-aliased or JPEG-compressed: a pixel is defective above half the range), label masks whose
    defect values are small integers (1, 2, ...: any non-zero value), RGBA masks with an opaque alpha
    (the colour decides) and layers painted on a transparent background (the alpha decides), palette
    and 16-bit masks.
    """
    path = Path(path)
    decoded, significant_bits = decode_image(_read_bytes(path), str(path))
    levels = 2 ** (significant_bits or (16 if decoded.dtype == np.uint16 else 8)) - 1
    if decoded.ndim == 3 and decoded.shape[2] in (2, 4):
        alpha = decoded[:, :, -1]
        if alpha.min() <= levels // 2 < alpha.max():  # some transparent, some opaque: a layer on nothing
            return alpha > levels // 2
        decoded = decoded[:, :, :-1]
    gray = decoded.max(axis=2) if decoded.ndim == 3 else decoded
    if decoded.dtype not in (np.uint8, np.uint16):
        raise ReconadError(f"Mask {path} has dtype {decoded.dtype}; expected an 8- or 16-bit image.")
    return gray > (levels // 2 if gray.max() > levels // 2 else 0)


# --- colour ---------------------------------------------------------------------------------------


def to_rgb_uint8(image: np.ndarray, colour: str = "RGB", name: str = "frame", bit_depth: int | None = None) -> np.ndarray:
    """Convert one image array to uint8 [H, W, 3] RGB.

    Args:
        image: [H, W] gray, [H, W, 1] gray, [H, W, 3] colour or [H, W, 4] colour + alpha (alpha dropped).
            uint8 as is; uint16 scaled by 255 / (2**bit_depth - 1); float and bool taken as 0..1 and clipped.
        colour: channel order of a colour ``image``, ``"RGB"`` or ``"BGR"`` (OpenCV frames are BGR).
        name: what to call the image in messages.
        bit_depth: the real depth of uint16 samples (e.g. 12); None: 16. Values above it saturate.
    """
    if colour not in COLOUR_ORDERS:
        raise ReconadError(f"Colour order must be one of {list(COLOUR_ORDERS)}, got {colour!r}.")
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 2:  # gray + alpha
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))) or 0 in image.shape:
        raise ReconadError(f"{name} has shape {list(image.shape)}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].")
    image = _to_uint8(image, name, bit_depth)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return swap_to_rgb(image, colour)


_TO_RGB_CODES = {("BGR", 3): "COLOR_BGR2RGB", ("BGR", 4): "COLOR_BGRA2RGB", ("RGB", 4): "COLOR_RGBA2RGB"}


def swap_to_rgb(image: np.ndarray, colour: str) -> np.ndarray:
    """uint8 [H, W, 3|4] in ``colour`` order (alpha last) -> contiguous uint8 [H, W, 3] RGB (a new array,
    except for contiguous RGB input, which is returned as is).

    Through OpenCV's ``cvtColor``, a pure channel copy (the same bytes as numpy's ``image[:, :, 2::-1]``)
    that is about 40x faster on a 720p frame than numpy's copy of a negative-stride view, which matters
    on a camera loop that converts every rendered frame.
    """
    code = _TO_RGB_CODES.get((colour, image.shape[2]))
    if code is None:
        return np.ascontiguousarray(image)
    return import_cv2().cvtColor(np.ascontiguousarray(image), getattr(import_cv2(), code))


def rgb_to_bgr(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> a new contiguous uint8 [H, W, 3] BGR array (what OpenCV's writers take)."""
    cv2 = import_cv2()
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)


def _to_uint8(image: np.ndarray, name: str, bit_depth: int | None) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        bits = bit_depth or 16
        if not 1 <= bits <= 16:
            raise ReconadError(f"The bit depth of 16-bit samples must be 1..16, got {bits}.")
        levels = (1 << bits) - 1
        peak = int(image.max())
        if peak < levels * LOW_RANGE_FRACTION:
            hint = f" (its samples may have fewer bits: pass --bit-depth {max(8, peak.bit_length())})" if bits == 16 else ""
            _LOG.warning(
                "warning: %s uses only values up to %d of its %d-bit range, so it reads almost black%s.",
                name, peak, bits, hint,
            )  # fmt: skip
        scaled = (np.minimum(image, levels).astype(np.uint32) * 255 + levels // 2) // levels
        return scaled.astype(np.uint8)
    if image.dtype == np.bool_ or np.issubdtype(image.dtype, np.floating):
        values = np.nan_to_num(image.astype(np.float32), nan=0.0)
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ReconadError(f"{name} has dtype {image.dtype}; expected uint8, uint16, bool or float in 0..1.")


# --- ROI and resize -------------------------------------------------------------------------------


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


def resize_image(image: np.ndarray, output_hw: tuple[int, int]) -> np.ndarray:
    """Stretch an image to ``output_hw`` (no letterbox), with one filter rule for every caller.

    Per axis: a shrinking axis is averaged (INTER_AREA: every source pixel counts, so fine textures do
    not alias), a growing axis is interpolated (INTER_LINEAR). When one axis shrinks and the other
    grows (a 1024x400 image to 512x512) the two are resized in turn, shrinking axis first.
    """
    height, width = output_hw
    in_height, in_width = image.shape[:2]
    if (in_height, in_width) == (height, width):
        return image
    cv2 = import_cv2()
    if in_height >= height and in_width >= width:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    if in_height <= height and in_width <= width:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if in_height > height:  # rows shrink, columns grow
        image = cv2.resize(image, (in_width, height), interpolation=cv2.INTER_AREA)
    else:
        image = cv2.resize(image, (width, in_height), interpolation=cv2.INTER_AREA)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, output_hw: tuple[int, int]) -> np.ndarray:
    """Resize bool [H, W] to ``output_hw`` with nearest-neighbour sampling (masks stay binary)."""
    if mask.shape == tuple(output_hw):
        return mask
    cv2 = import_cv2()
    resized = cv2.resize(mask.astype(np.uint8), (output_hw[1], output_hw[0]), interpolation=cv2.INTER_NEAREST)
    return resized > 0


# --- to the graph input ---------------------------------------------------------------------------


def prepare_image(
    frame: Frame,
    input_hw: tuple[int, int],
    colour: str = "RGB",
    roi: Roi | None = None,
    bit_depth: int | None = None,
) -> np.ndarray:
    """One frame (array or path) -> uint8 [H, W, 3] RGB at ``input_hw``; ``colour`` applies to arrays only.

    A uint8 3-channel array is cropped and resized before its channels are reordered: resizing acts per
    channel, so the result is identical, but the channel copy then touches the small image (3-4x faster
    on 480p-1080p camera frames).

    Args:
        bit_depth: the real depth of 16-bit samples (files with an sBIT chunk say it themselves).
    """
    if isinstance(frame, (str, os.PathLike)):
        return resize_image(crop_roi(read_image(frame, bit_depth), roi, str(frame)), input_hw)
    frame = np.asarray(frame)
    if frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 and colour in COLOUR_ORDERS:
        return to_rgb_uint8(resize_image(crop_roi(frame, roi), input_hw), colour=colour)
    return resize_image(crop_roi(to_rgb_uint8(frame, colour=colour, bit_depth=bit_depth), roi), input_hw)


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
    frames: Frame | Sequence[Frame],
    input_hw: tuple[int, int],
    colour: str = "RGB",
    roi: Roi | None = None,
    bit_depth: int | None = None,
) -> np.ndarray:
    """Frames -> the graph input uint8 [N, H, W, 3] RGB.

    Args:
        frames: one frame (a path, or an array of 2 or 3 dims), a 4-D array [N, H, W, C] of frames,
            or a sequence of paths and arrays (sizes and kinds may differ). A uint8 RGB batch already
            at ``input_hw`` is returned as it is (no ROI, RGB order).
        input_hw: the graph's (H, W), ``manifest.input_hw``.
        colour: channel order of colour arrays, ``"RGB"`` or ``"BGR"``; files are always decoded right.
        roi: optional (x, y, width, height) crop applied to every frame before resizing.
        bit_depth: the real depth of 16-bit samples; see ``to_rgb_uint8``.
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
        batch[index] = prepare_image(frame, input_hw, colour=colour, roi=roi, bit_depth=bit_depth)
    return batch


# --- files, settings and frame checks -------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a file with an image suffix (``IMAGE_SUFFIXES``, in any letter case)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files (``is_image_file``) under ``folder``, recursively by default, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReconadError(f"Image folder {folder} does not exist or is not a folder.")
    return sorted(path for path in (folder.rglob("*") if recursive else folder.iterdir()) if is_image_file(path))


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
