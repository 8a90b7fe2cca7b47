"""Small generated image files of every kind the one image path must read: EXIF-rotated JPEG/PNG, 16-bit
PNGs with and without an sBIT chunk, palette, gray, gray+alpha, RGBA, and masks as annotation tools save them."""

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    """An RGB (or gray) array as the file ``path`` names (lossless for PNG)."""
    array = rgb[..., ::-1] if rgb.ndim == 3 and rgb.shape[2] in (3, 4) else rgb
    if rgb.ndim == 3 and rgb.shape[2] == 4:
        array = np.ascontiguousarray(rgb[..., [2, 1, 0, 3]])
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix.lower() if path.suffix.lower() != ".jpeg" else ".jpg", np.ascontiguousarray(array))
    assert ok
    path.write_bytes(encoded.tobytes())
    return path


def with_exif_orientation(path: Path, stored_rgb: np.ndarray, orientation: int, quality: int = 95) -> Path:
    """Save ``stored_rgb`` as stored pixels with EXIF Orientation ``orientation`` (JPEG or PNG eXIf)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.fromarray(stored_rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, exif=exif.tobytes(), quality=quality)
    else:
        image.save(path, exif=exif.tobytes())
    return path


def add_sbit(png: bytes, bits: int, channels: int = 1) -> bytes:
    """The PNG ``png`` with an sBIT chunk declaring ``bits`` per channel, inserted after IHDR."""
    ihdr_end = 8 + 8 + 13 + 4
    body = bytes([bits] * channels)
    chunk = struct.pack(">I", len(body)) + b"sBIT" + body + struct.pack(">I", zlib.crc32(b"sBIT" + body))
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def write_16bit_png(path: Path, gray: np.ndarray, significant_bits: int | None = None) -> Path:
    """A 16-bit gray PNG of ``gray`` (uint16 [H, W]), with an sBIT chunk when ``significant_bits`` is given."""
    ok, encoded = cv2.imencode(".png", gray.astype(np.uint16))
    assert ok
    data = encoded.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(add_sbit(data, significant_bits) if significant_bits else data)
    return path


def write_palette_png(path: Path, rgb: np.ndarray) -> Path:
    """``rgb`` as an 8-bit palette ("P" mode) PNG, exact for images of at most 256 colours."""
    image = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def pil_upright(path: Path) -> np.ndarray:
    """What a viewer shows: Pillow's decode with the EXIF orientation applied, as RGB."""
    from PIL import ImageOps

    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def png_bytes_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
