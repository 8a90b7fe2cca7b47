"""Heatmap overlays: anomaly maps as JET colours blended over the frame, for operators and reports.

Colours use a fixed scale across frames (the manifest's score normalisation when present) so
that the same colour means the same anomaly level everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from reconad.runtime.atomic import write_bytes_atomic
from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import Roi, import_cv2


def colorize_map(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """float [H, W] -> uint8 [H, W, 3] RGB JET colours, ``low`` blue to ``high`` red (clipped)."""
    cv2 = import_cv2()
    span = high - low if high > low else 1.0
    levels = np.clip((np.nan_to_num(anomaly_map, nan=high) - low) / span, 0.0, 1.0)
    levels = np.rint(levels * 255.0).astype(np.uint8)
    return cv2.applyColorMap(levels, cv2.COLORMAP_JET)[:, :, ::-1]  # OpenCV writes BGR


def overlay_heatmap(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    low: float | None = None,
    high: float | None = None,
    alpha: float = 0.5,
    roi: Roi | None = None,
    pixel_threshold: float | None = None,
    label: str | None = None,
) -> np.ndarray:
    """Blend a colourised ``anomaly_map`` over ``image`` (uint8 [H, W, 3] RGB, any size).

    Args:
        image: the original frame, RGB.
        anomaly_map: float [h, w] at the graph's size; resized (linear) to the frame or ROI.
        low: value drawn blue; defaults to the map's minimum.
        high: value drawn red; defaults to the map's maximum.
        alpha: weight of the heatmap in the blend.
        roi: (x, y, width, height) the map covers; the whole frame when None.
        pixel_threshold: when given, regions at or above it are outlined in white.
        label: text drawn in the top-left corner, e.g. the score.

    Returns:
        uint8 [H, W, 3] RGB, a new array.
    """
    cv2 = import_cv2()
    result = np.ascontiguousarray(image, dtype=np.uint8).copy()
    x, y, width, height = roi if roi is not None else (0, 0, result.shape[1], result.shape[0])
    resized = cv2.resize(anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    low = float(np.nanmin(anomaly_map)) if low is None else low
    high = float(np.nanmax(anomaly_map)) if high is None else high
    region = result[y : y + height, x : x + width]
    region[:] = cv2.addWeighted(region, 1.0 - alpha, colorize_map(resized, low, high), alpha, 0.0)
    if pixel_threshold is not None:
        mask = (resized >= pixel_threshold).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(region, contours, -1, (255, 255, 255), thickness=max(1, min(width, height) // 128))
    if label:
        scale = max(0.4, result.shape[0] / 640.0)
        origin = (4, int(20 * scale) + 2)
        cv2.putText(result, label, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(result, label, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return result


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG atomically (temp file in the same folder, then rename)."""
    cv2 = import_cv2()
    path = Path(path)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    if not ok:
        raise ReconadError(f"OpenCV could not encode {path} as PNG.")
    try:
        write_bytes_atomic(path, encoded.tobytes())
    except OSError as error:
        raise ReconadError(f"Cannot write {path}: {error.strerror or type(error).__name__}.") from None
