"""The one renderer of inspected frames: live video outputs, saved overlays (and the evaluation report's
heatmaps, which use ``heat_overlay``).

An annotated frame an operator reads at a glance: a banner with the verdict (OK / NG, UNKNOWN for a part
unlike every trained product, NO THRESHOLD when uncalibrated), the product, the score against its
threshold as text and as a gauge; the frame with the anomaly map blended in where it is high (low levels
stay transparent, so a good part looks like itself); the anomalous region outlined, only on an NG
verdict and only at a pixel threshold; and a colour bar giving the heat scale, with the pixel threshold
marked. Text is fitted to its box (scaled down, then shortened with an ellipsis), never clipped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reconad.runtime.atomic import write_bytes_atomic
from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import Roi, import_cv2, rgb_to_bgr, to_rgb_uint8

# RGB. Red/green as the line's lamps; amber for "not a product we know"; gray for "not judged".
VERDICT_COLOURS = {
    "NG": (215, 25, 28),
    "OK": (26, 150, 65),
    "UNKNOWN": (255, 176, 0),
    "NO THRESHOLD": (110, 110, 110),
    "CAMERA BLIND": (150, 60, 210),  # not a verdict on the part: the camera shows no part at all
}
BANNER_BACKGROUND = (24, 24, 24)
TEXT = (240, 240, 240)
OUTLINE = (255, 255, 255)
TRUTH_OUTLINE = (0, 255, 0)  # ground-truth masks in reports
ROI_OUTLINE = (0, 200, 255)  # the region the model sees, when --roi crops the frame
TRANSPARENT_BELOW = 0.25  # heat levels (0..1 of the scale) below this are not drawn: a good part looks like itself
MIN_REGION_FRACTION = 2e-4  # outlined regions smaller than this fraction of the map are specks, not defects
FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX (a literal, so importing this module does not need OpenCV)


@dataclasses.dataclass(frozen=True)
class Annotation:
    """What the banner says about one frame.

    Attributes:
        image_score: raw score (higher is more anomalous).
        threshold: the image threshold used, raw units, or None when uncalibrated.
        is_anomalous: the verdict; None when there is no threshold.
        category: the product's name, when the model (issue 11) or the operator named it.
        known_product: False when the part is unlike every trained product: the verdict is UNKNOWN.
        caption: small text at the banner's right, e.g. the frame's name or time.
        blind: for a camera-blind frame (``blind.py``), its reason and measurement; the frame was not judged.
    """

    image_score: float
    threshold: float | None
    is_anomalous: bool | None
    category: str | None = None
    known_product: bool = True
    caption: str | None = None
    blind: str | None = None

    @property
    def word(self) -> str:
        """``"NG"``, ``"OK"``, ``"UNKNOWN"``, ``"NO THRESHOLD"`` or ``"CAMERA BLIND"``."""
        if self.blind is not None:
            return "CAMERA BLIND"
        if not self.known_product:
            return "UNKNOWN"
        if self.is_anomalous is None or self.threshold is None:
            return "NO THRESHOLD"
        return "NG" if self.is_anomalous else "OK"


@functools.cache
def _jet_rgb() -> np.ndarray:
    """OpenCV's JET colour map as an RGB lookup table (uint8 [256, 1, 3]), to colour RGB frames directly."""
    cv2 = import_cv2()
    return np.ascontiguousarray(cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, :, ::-1])


@functools.lru_cache(maxsize=8)
def _alpha_table(alpha_max: float) -> np.ndarray:
    """uint8 [256]: the heat's opacity (x 255) per level: 0 up to ``TRANSPARENT_BELOW``, then linear to ``alpha_max``."""
    ramp = np.clip((np.arange(256) / 255.0 - TRANSPARENT_BELOW) / (1.0 - TRANSPARENT_BELOW), 0.0, 1.0)
    return np.round(ramp * alpha_max * 255.0).astype(np.uint8)


def map_scale(anomaly_map: np.ndarray, low: float | None, high: float | None, threshold: float | None) -> tuple[float, float]:
    """The heat scale (value drawn transparent blue, value drawn red).

    A fixed scale (the manifest's score normalisation) makes one colour mean one level on every frame;
    without it, the frame's own minimum up to the larger of its maximum and the threshold, so a good
    part never turns red merely because its own maximum is drawn red.
    """
    finite = anomaly_map[np.isfinite(anomaly_map)]
    frame_low = float(finite.min()) if finite.size else 0.0
    frame_high = float(finite.max()) if finite.size else 1.0
    low = frame_low if low is None else float(low)
    if high is None:
        high = max(frame_high, threshold) if threshold is not None else frame_high
    high = float(high)
    return (low, high) if high > low else (low, low + 1.0)


def heat_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    low: float,
    high: float,
    roi: Roi | None = None,
    alpha_max: float = 0.65,
    outline_threshold: float | None = None,
    truth_mask: np.ndarray | None = None,
) -> np.ndarray:
    """``image`` with the map blended in, its alpha rising from 0 at ``TRANSPARENT_BELOW`` to ``alpha_max``.

    Args:
        image: uint8 [H, W, 3] RGB, any size.
        anomaly_map: float [h, w]; resized (linear) to the ROI or the whole image.
        low: the level drawn fully transparent (blue); ``high`` is drawn red at ``alpha_max``.
        roi: (x, y, width, height) of ``image`` the map covers, or None for all of it.
        outline_threshold: outline, in white, the regions at or above this level (pixels larger than
            ``MIN_REGION_FRACTION`` of the map); None draws no outline.
        truth_mask: bool/uint8 [H', W'] ground truth over the ROI, outlined in green (reports).

    Returns:
        uint8 [H, W, 3] RGB, a new array.
    """
    cv2 = import_cv2()
    result = np.array(image, dtype=np.uint8, copy=True, order="C")
    x, y, width, height = roi if roi is not None else (0, 0, result.shape[1], result.shape[0])
    region = result[y : y + height, x : x + width]
    resized = cv2.resize(np.nan_to_num(anomaly_map.astype(np.float32), nan=high), (width, height),
                         interpolation=cv2.INTER_LINEAR)  # [height, width]
    # Blend only where the heat is visible: on a good part that is nowhere, and the frame is left as is.
    visible = np.nan_to_num(anomaly_map, nan=high) > low + TRANSPARENT_BELOW * (high - low)  # [h, w]
    if visible.any():
        rows, columns = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        scale_y, scale_x = height / anomaly_map.shape[0], width / anomaly_map.shape[1]
        top, bottom = max(0, int((rows[0] - 1) * scale_y)), min(height, int(np.ceil((rows[-1] + 2) * scale_y)))
        left, right = max(0, int((columns[0] - 1) * scale_x)), min(width, int(np.ceil((columns[-1] + 2) * scale_x)))
        window = region[top:bottom, left:right]
        # In 8-bit steps, each a single saturating OpenCV pass (3x faster than float weights for
        # blendLinear: the live outputs render with what inference leaves): the level 0..255...
        span = 255.0 / (high - low)
        level = resized[top:bottom, left:right]
        level = cv2.addWeighted(level, span, level, 0.0, 0.5 - low * span, dtype=cv2.CV_8U)
        heat = cv2.applyColorMap(level, _jet_rgb())
        # ...its opacity from a table (0 up to TRANSPARENT_BELOW, then rising to alpha_max)...
        alpha = cv2.cvtColor(cv2.LUT(level, _alpha_table(alpha_max)), cv2.COLOR_GRAY2RGB)
        # ...and window * (1 - alpha) + heat * alpha, alpha in 1/255 steps
        window[:] = cv2.add(cv2.multiply(heat, alpha, scale=1 / 255),
                            cv2.multiply(window, cv2.bitwise_not(alpha), scale=1 / 255))
    thickness = max(2, min(width, height) // 240)
    if outline_threshold is not None:
        mask = (resized >= outline_threshold).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        smallest = MIN_REGION_FRACTION * width * height
        contours = [c for c in contours if cv2.contourArea(c) >= smallest or len(c) > 8]
        cv2.drawContours(region, contours, -1, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.drawContours(region, contours, -1, OUTLINE, thickness, cv2.LINE_AA)
    if truth_mask is not None:
        truth = cv2.resize(np.asarray(truth_mask).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours((truth > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(region, contours, -1, TRUTH_OUTLINE, thickness, cv2.LINE_AA)
    return result


def fit_text(text: str, max_width: int, max_height: int, thickness: int = 1) -> tuple[str, float]:
    """(text, font scale) so that ``text`` fits ``max_width`` x ``max_height`` pixels in ``FONT``.

    The scale shrinks to fit the width down to a legible minimum; below it the text is cut with '…'
    (drawn as '...', Hershey fonts have no ellipsis).
    """
    cv2 = import_cv2()
    (width, height), baseline = cv2.getTextSize(text, FONT, 1.0, thickness)
    scale = min(max_height / max(1, height + baseline), max_width / max(1, width))
    minimum = min(0.35, max_height / max(1, height + baseline))
    while scale >= minimum:
        # Hershey text is not exactly linear in the scale (integer rounding): check, and shrink if needed.
        (width, height), baseline = cv2.getTextSize(text, FONT, scale, thickness)
        if width <= max_width and height + baseline <= max_height:
            return text, scale
        scale *= 0.97
    scale = minimum
    while len(text) > 1:
        text = text[:-1]
        if cv2.getTextSize(text.rstrip() + "...", FONT, scale, thickness)[0][0] <= max_width:
            return text.rstrip() + "...", scale
    return "", scale


def _put(canvas: np.ndarray, text: str | Sequence[str], box: tuple[int, int, int, int], colour, *,
         thickness: int = 1, align: str = "left") -> None:
    """Draw ``text`` fitted into ``box`` (x, y, width, height), vertically centred. ``text`` may be a list
    of wordings, preferred first: the first that fits whole at a legible size is drawn (a narrow frame
    reads "147 / 122 (120%)" rather than "score 147 / thre..."), the last one is cut if it must be."""
    cv2 = import_cv2()
    x, y, width, height = box
    wordings = [text] if isinstance(text, str) else list(text)
    for wording in wordings:
        text, scale = fit_text(wording, width, height, thickness)
        if text == wording:
            break
    if not text:
        return
    (text_width, text_height), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    origin_x = x + (width - text_width if align == "right" else (width - text_width) // 2 if align == "center" else 0)
    origin_y = y + (height + text_height - baseline) // 2 + baseline // 2
    cv2.putText(canvas, text, (origin_x, origin_y), FONT, scale, colour, thickness, cv2.LINE_AA)


def _format(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.{digits - 1}e}"


def score_wordings(score: float, threshold: float) -> list[str]:
    """The banner's score line, preferred wording first. Enough digits that a score and a threshold that differ
    never print alike, and the percentage rounded down, so an OK part (score below the threshold) never
    reads "100%" and an NG one never reads "99%"."""
    digits = 3
    while digits < 7 and score != threshold and _format(score, digits) == _format(threshold, digits):
        digits += 1
    value, limit = _format(score, digits), _format(threshold, digits)
    percent = f"{math.floor(score / threshold * 100)}%" if threshold > 0 and math.isfinite(score) else "n/a"
    return [f"score {value} / threshold {limit} ({percent})", f"score {value} / thr {limit} ({percent})",
            f"{value} / {limit} ({percent})", f"{value}/{limit} ({percent})", f"{percent} of threshold", percent]


def _banner(canvas: np.ndarray, annotation: Annotation, height: int) -> None:
    cv2 = import_cv2()
    width = canvas.shape[1]
    canvas[:height] = BANNER_BACKGROUND
    word = annotation.word
    colour = VERDICT_COLOURS[word]
    gauge_height = max(4, height // 8)
    text_height = height - gauge_height
    pad = max(2, height // 12)
    box_width = min(width // 3, max(int(text_height * (2.2 if len(word) <= 2 else 4.5 if len(word) <= 7 else 6.0)), 1))
    cv2.rectangle(canvas, (0, 0), (box_width - 1, text_height - 1), colour, thickness=-1)
    ink = (0, 0, 0) if word == "UNKNOWN" else (255, 255, 255)
    _put(canvas, word, (pad, pad, box_width - 2 * pad, text_height - 2 * pad), ink, thickness=max(1, height // 24),
         align="center")
    left = box_width + 2 * pad
    caption_width = (width - left) // 4 if annotation.caption else 0
    middle = width - left - caption_width - 2 * pad
    line = (text_height - 2 * pad) // 2
    if annotation.blind is not None:
        product = "not judged: the camera shows no part"
    elif not annotation.known_product:
        product = "unknown product" + (f" (nearest: {annotation.category})" if annotation.category else "")
    else:
        product = annotation.category or "product not named"
    _put(canvas, product, (left, pad, middle, line), TEXT, thickness=max(1, height // 40))
    if annotation.blind is not None:
        score = annotation.blind
    elif annotation.threshold is not None:
        score = score_wordings(annotation.image_score, annotation.threshold)
    else:
        score = f"score {_format(annotation.image_score)} (no threshold)"
    _put(canvas, score, (left, pad + line, middle, line), TEXT)
    if annotation.caption:
        time_first = annotation.caption.split("  ")[0]  # the time is kept whole; the name goes first
        _put(canvas, [annotation.caption, time_first, time_first[:8]],
             (width - caption_width - pad, pad, caption_width, line), (170, 170, 170), align="right")
    # The gauge: the bar fills with the score, the white tick is the threshold (half-way).
    top = text_height
    canvas[top:height] = (60, 60, 60)
    if annotation.blind is not None:
        canvas[top:height] = colour
    elif annotation.threshold is not None and annotation.threshold > 0:
        fill = int(np.clip(annotation.image_score / (2.0 * annotation.threshold), 0.0, 1.0) * width)
        canvas[top:height, :fill] = colour
        tick = width // 2
        canvas[top:height, max(0, tick - 1) : tick + 2] = (255, 255, 255)


def _colour_bar(canvas: np.ndarray, box: tuple[int, int, int, int], low: float, high: float,
                pixel_threshold: float | None) -> None:
    cv2 = import_cv2()
    x, y, width, height = box
    canvas[y : y + height, x : x + width] = BANNER_BACKGROUND
    label_height = max(10, min(height // 16, 28))
    strip_x, strip_width = x + max(2, width // 10), max(4, width // 3)
    top, bottom = y + label_height + 4, y + height - label_height - 4
    if bottom - top < 8:
        return
    ramp = np.linspace(255, 0, bottom - top).astype(np.uint8)[:, None]  # high at the top
    colours = cv2.applyColorMap(ramp, _jet_rgb())  # [n, 1, 3]
    canvas[top:bottom, strip_x : strip_x + strip_width] = colours
    label_x = strip_x + strip_width + 3
    label_width = x + width - label_x - 2
    _put(canvas, _format(high), (x + 2, y + 2, width - 4, label_height), TEXT, align="center")
    _put(canvas, _format(low), (x + 2, bottom + 2, width - 4, label_height), TEXT, align="center")
    if pixel_threshold is not None and low < pixel_threshold < high:
        row = int(round(bottom - (pixel_threshold - low) / (high - low) * (bottom - top)))
        cv2.line(canvas, (strip_x - 2, row), (strip_x + strip_width + 1, row), (255, 255, 255), max(1, height // 200))
        if label_width > 8:
            _put(canvas, "px", (label_x, row - label_height // 2, label_width, label_height), TEXT)


def render_inspection(
    image: np.ndarray,
    anomaly_map: np.ndarray | None,
    annotation: Annotation,
    *,
    low: float | None = None,
    high: float | None = None,
    roi: Roi | None = None,
    pixel_threshold: float | None = None,
    truth_mask: np.ndarray | None = None,
    min_height: int = 360,
) -> np.ndarray:
    """The annotated frame: banner on top, heat-blended frame, colour bar on the right.

    Args:
        image: uint8 [H, W, 3] RGB, the original frame.
        anomaly_map: float [h, w] at the graph's size, over ``roi`` (or the whole frame); None draws the
            plain frame (no heat; the bar stays, empty).
        annotation: score, threshold, verdict and product.
        low, high: fixed heat scale (the manifest's score normalisation); see ``map_scale`` otherwise.
        roi: (x, y, width, height) of ``image`` the map covers; drawn as a thin box.
        pixel_threshold: outline regions at or above it, on NG verdicts only (a good part is never
            outlined, and without a pixel threshold nothing is).
        truth_mask: ground truth over the ROI, outlined in green (the evaluation report).
        min_height: frames smaller than this are scaled up first so the text stays legible.

    Returns:
        uint8 [H' + banner, W' + bar, 3] RGB; H', W' the frame's size scaled up to ``min_height``.
        The size depends only on the frame's size, so a video of equal frames has one size.
    """
    cv2 = import_cv2()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"render_inspection needs a uint8 [H, W, 3] RGB frame, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    factor = max(1.0, min_height / height)
    if factor > 1.0:
        image = cv2.resize(image, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_LINEAR)
        if roi is not None:
            roi = tuple(int(round(value * factor)) for value in roi)
        height, width = image.shape[:2]
    banner_height = max(36, round(height * 0.09))
    bar_width = max(44, round(width * 0.06))
    canvas = np.empty((banner_height + height, width + bar_width, 3), dtype=np.uint8)
    if anomaly_map is None:  # a frame that was not judged: no heat, an empty bar (same size as the others)
        canvas[banner_height:, :width] = image
        canvas[banner_height:, width:] = BANNER_BACKGROUND
    else:
        scale_low, scale_high = map_scale(anomaly_map, low, high, annotation.threshold)
        outline = pixel_threshold if annotation.word == "NG" else None
        canvas[banner_height:, :width] = heat_overlay(image, anomaly_map, low=scale_low, high=scale_high, roi=roi,
                                                      outline_threshold=outline, truth_mask=truth_mask)
        _colour_bar(canvas, (width, banner_height, bar_width, height), scale_low, scale_high, pixel_threshold)
    if roi is not None:  # what the model judged: the heat and outlines stop at its edge
        x, y, roi_width, roi_height = roi
        cv2.rectangle(canvas, (x, banner_height + y), (x + roi_width - 1, banner_height + y + roi_height - 1),
                      ROI_OUTLINE, max(1, min(width, height) // 360), cv2.LINE_AA)
    _banner(canvas, annotation, banner_height)
    return canvas


def render_result(result: Any, *, low: float | None = None, high: float | None = None,
                  pixel_threshold: float | None = None) -> np.ndarray:
    """``render_inspection`` of a loop event: an ``InspectionResult`` (frame in ``result.colour`` order,
    verdict with its map, ROI) or a ``CameraBlind`` frame, captioned with its name and capture time.

    The product comes from the verdict's ``category`` and ``known_product`` when it has them (issue 11).
    """
    time_of_day = result.captured_at[11:23] if len(result.captured_at) >= 23 else result.captured_at
    frame = to_rgb_uint8(result.frame, colour=result.colour)
    verdict = getattr(result, "verdict", None)
    if verdict is None:  # camera-blind
        annotation = Annotation(0.0, None, None, caption=f"{time_of_day}  {result.name}",
                                blind=f"{result.reason}: {result.detail}")
        return render_inspection(frame, None, annotation)
    annotation = Annotation(
        image_score=float(verdict.image_score),
        threshold=verdict.threshold,
        is_anomalous=verdict.is_anomalous,
        category=getattr(verdict, "category", None),
        known_product=getattr(verdict, "known_product", True) is not False,
        caption=f"{time_of_day}  {result.name}",  # the time first: a long name is cut, never the time
    )
    return render_inspection(frame, verdict.anomaly_map, annotation, low=low, high=high, roi=result.roi,
                             pixel_threshold=pixel_threshold)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG atomically (temp file in the same folder, then rename)."""
    cv2 = import_cv2()
    path = Path(path)
    ok, encoded = cv2.imencode(".png", rgb_to_bgr(image))
    if not ok:
        raise ReconadError(f"OpenCV could not encode {path} as PNG.")
    try:
        write_bytes_atomic(path, encoded.tobytes())
    except OSError as error:
        raise ReconadError(f"Cannot write {path}: {error.strerror or type(error).__name__}.") from None
