"""Make an .avi from image folders, e.g. the sample data's test images, for `recon-inspect run VIDEO`.

Images are taken in sorted order from each folder (recursively), interleaved across folders so every
product shows up early, and resized to one frame size. Torch-free (OpenCV and the runtime's image reader).
The default codec is lossless FFV1: the loop then sees the pixels the thresholds were calibrated on.
A lossy one (``--codec MJPG``, ~2 grey levels of error per pixel) moves the pooled backbone features of
the sample data's flat-background parts (pill, washer) from a cosine distance of ~0.002 to ~0.19 from
their centroid, beyond the distance limit calibrated on the PNGs (~0.09), so those frames are UNKNOWN:
calibrate on frames from the line's own camera and codec.

    .venv/bin/python scripts/make_video.py demo/data/*/test --out demo/line.avi --fps 5
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import cv2

from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import list_images, read_image, resize_image


def write_video(folders: list[Path], out: Path, fps: float, size: int, codec: str = "FFV1") -> int:
    """Write the video with the four-character ``codec``; returns the number of frames."""
    per_folder = [list_images(folder) for folder in folders]
    paths = [path for group in itertools.zip_longest(*per_folder) for path in group if path is not None]
    if not paths:
        raise ReconadError(f"No images under {', '.join(map(str, folders))}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*codec.ljust(4)[:4]), fps, (size, size))
    if not writer.isOpened():
        raise ReconadError(f"OpenCV cannot write {out} with codec {codec}; try --codec MJPG.")
    try:
        for path in paths:
            writer.write(resize_image(read_image(path), (size, size))[:, :, ::-1])  # RGB -> OpenCV's BGR
    finally:
        writer.release()
    return len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fps", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=256, help="frame width and height in pixels")
    parser.add_argument("--codec", default="FFV1", help="FourCC: FFV1 (lossless, default) or MJPG (lossy)")
    args = parser.parse_args()
    try:
        count = write_video(args.folders, args.out, args.fps, args.size, args.codec)
    except ReconadError as error:
        print(error, file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    print(f"wrote {args.out}: {count} frames of {args.size}x{args.size} at {args.fps:g} fps ({args.codec})")


if __name__ == "__main__":
    main()
