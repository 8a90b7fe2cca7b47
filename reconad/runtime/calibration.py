"""Thresholds from defect-free images, written into the artifact's manifest with their provenance.

Image threshold: just above the (1 - max_fpr) quantile of the good images' scores, plus a margin
(``threshold_at_fpr``); pixel threshold: the same rule on a sample of the good anomaly-map values.
Optional normalisation maps raw scores to 0..1 with the image threshold at 0.5. Backs ``recon-inspect calibrate``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Inspector
from reconad.runtime.manifest import Manifest, manifest_path_for
from reconad.runtime.config import utc_now_iso
from reconad.runtime.thresholds import Calibration, ScoreNormalization, Threshold
from reconad.runtime.frames import Roi, list_images, prepare_image

NORMALIZE_CHOICES = ("quantile", "minmax", "none")
METHOD = "max_fpr"


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Settings of ``recon-inspect calibrate``; each field is the option of the same name."""

    max_fpr: float = 0.01  # false-positive rate allowed on defect-free images, for the image threshold
    pixel_max_fpr: float | None = None  # the same for anomaly-map pixels; None: max_fpr
    margin: float = 0.05  # fraction of the spread (quantile - median) added above the quantile
    normalize: str = "quantile"  # 0..1 score normalisation: quantile, minmax or none (removes it)
    roi: Roi | None = None  # the crop the line runs with; calibrate on what the model will see
    batch_size: int = 8
    pixel_samples_per_image: int = 16384  # anomaly-map values kept per image for the pixel quantile
    bit_depth: int | None = None  # real depth of 16-bit images without an sBIT chunk (e.g. 12); None: 16

    def __post_init__(self) -> None:
        for name in ("max_fpr", "pixel_max_fpr"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ReconadError(f"{name} must be in [0, 1), got {value}.")
        if self.margin < 0:
            raise ReconadError(f"margin must be >= 0, got {self.margin}.")
        if self.normalize not in NORMALIZE_CHOICES:
            raise ReconadError(f"normalize must be one of {list(NORMALIZE_CHOICES)}, got {self.normalize!r}.")
        if self.batch_size < 1 or self.pixel_samples_per_image < 1:
            raise ReconadError("batch_size and pixel_samples_per_image must be at least 1.")


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """What ``calibrate_artifact`` wrote and what it saw.

    Attributes:
        manifest_path: the manifest that now holds the thresholds.
        manifest: its new content.
        n_images: good images scored; ``n_unreadable`` were skipped.
        scores: the good images' raw scores, float64 [n_images].
        false_positive_rate: fraction of ``scores`` at or above the new image threshold.
    """

    manifest_path: Path
    manifest: Manifest
    n_images: int
    n_unreadable: int
    scores: np.ndarray
    false_positive_rate: float


def threshold_at_fpr(values: np.ndarray, max_fpr: float, margin: float) -> float:
    """The smallest sensible threshold that flags at most ``max_fpr`` of ``values`` (rule ``value >= t``).

    With n values and k = floor(max_fpr * n) allowed false positives, the anchor is the (k+1)-th largest
    value, so ``anchor`` itself must not be flagged: t = anchor + margin * (anchor - median), and at
    least the next float above the anchor. The margin, relative to the spread of the good values, leaves
    room for good images a little worse than any seen in calibration. With n < 1 / max_fpr, k = 0 and
    the anchor is the maximum.
    """
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())  # ascending
    if values.size == 0 or not np.isfinite(values).all():
        raise ReconadError("Calibration needs finite scores; the model produced NaN or infinite values.")
    allowed = math.floor(max_fpr * values.size + 1e-9)
    anchor = float(values[values.size - 1 - min(allowed, values.size - 1)])
    spread = anchor - float(np.median(values))
    threshold = anchor + margin * spread
    return threshold if threshold > anchor else float(np.nextafter(anchor, np.inf))


def normalization_for(
    scores: np.ndarray, threshold: float, method: str, max_fpr: float, calibration: Calibration
) -> ScoreNormalization:
    """0..1 normalisation with ``threshold`` at 0.5: low from the good scores (min, or their ``max_fpr``
    quantile for ``"quantile"``), ``high = 2 * threshold - low``; stronger anomalies saturate at 1."""
    low = float(np.min(scores)) if method == "minmax" else float(np.quantile(scores, max_fpr))
    low = min(low, float(np.nextafter(threshold, -np.inf)))  # keep low < threshold so high > low
    return ScoreNormalization(method=method, low=low, high=2.0 * threshold - low, calibration=calibration)


def _pixel_sample(anomaly_map: np.ndarray, count: int) -> np.ndarray:
    """About ``count`` values of a [H, W] map on a regular grid (deterministic)."""
    step = max(1, math.ceil(math.sqrt(anomaly_map.size / count)))
    return np.asarray(anomaly_map[::step, ::step], dtype=np.float32).ravel()


def score_images(
    inspector: Inspector,
    paths: list[Path],
    config: CalibrationConfig,
    report: Callable[[str], None] = print,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Raw scores [n] and a sample of anomaly-map values of the readable images; and how many were not."""
    scores: list[float] = []
    pixels: list[np.ndarray] = []
    unreadable = 0
    for start in range(0, len(paths), config.batch_size):
        images = []
        for path in paths[start : start + config.batch_size]:
            try:
                images.append(prepare_image(path, inspector.input_hw, roi=config.roi, bit_depth=config.bit_depth))
            except ReconadError as error:
                unreadable += 1
                report(f"warning: skipped {path}: {error}")
        if not images:
            continue
        for verdict in inspector.inspect(np.stack(images)):  # [B, H, W, 3] in
            scores.append(verdict.image_score)
            pixels.append(_pixel_sample(verdict.anomaly_map, config.pixel_samples_per_image))
    return np.asarray(scores, dtype=np.float64), np.concatenate(pixels) if pixels else np.empty(0), unreadable


def calibrate_artifact(
    artifact: str | os.PathLike,
    good_dirs: str | os.PathLike | Sequence[str | os.PathLike],
    config: CalibrationConfig = CalibrationConfig(),
    *,
    backend: str = "auto",
    report: Callable[[str], None] = print,
) -> CalibrationResult:
    """Score the defect-free images under ``good_dirs`` and write thresholds into ``artifact``'s manifest.

    The sidecar ``<stem>.json`` is replaced atomically (created from the ONNX file's embedded copy when
    absent); the model file is not touched, so its hash still matches.

    Args:
        artifact: ``.onnx`` or ``.engine`` with its manifest.
        good_dirs: one or more folders of defect-free images from the line (recursively); for a
            multi-class model, goods of every product.
        backend: see ``reconad.runtime.inspector.BACKEND_CHOICES``.
        report: receives warnings.
    """
    folders = [Path(good_dirs)] if isinstance(good_dirs, (str, os.PathLike)) else [Path(d) for d in good_dirs]
    paths = [path for folder in folders for path in list_images(folder)]
    where = ", ".join(str(folder) for folder in folders)
    if len(paths) < 2:
        raise ReconadError(f"Calibration needs at least 2 defect-free images; {where} has {len(paths)}.")
    with Inspector.open(artifact, backend) as inspector:
        manifest = inspector.manifest
        scores, pixels, unreadable = score_images(inspector, paths, config, report)
    if scores.size < 2:
        raise ReconadError(f"Only {scores.size} of the {len(paths)} images in {where} could be read.")
    if scores.size * config.max_fpr < 1:
        report(
            f"note: {scores.size} images cannot resolve max_fpr={config.max_fpr:g}; the threshold is set above "
            f"the highest good score (use at least {math.ceil(1 / config.max_fpr)} images for a real quantile)."
        )
    pixel_max_fpr = config.max_fpr if config.pixel_max_fpr is None else config.pixel_max_fpr

    def provenance(max_fpr: float) -> Calibration:
        return Calibration(
            method=METHOD,
            n_images=int(scores.size),
            max_fpr=max_fpr,
            date=utc_now_iso(),
            source=", ".join(str(folder.resolve()) for folder in folders),
            margin=config.margin,
        )

    image_threshold = Threshold(
        value=threshold_at_fpr(scores, config.max_fpr, config.margin), calibration=provenance(config.max_fpr)
    )
    pixel_threshold = Threshold(
        value=threshold_at_fpr(pixels, pixel_max_fpr, config.margin), calibration=provenance(pixel_max_fpr)
    )
    normalization = None
    if config.normalize != "none":
        normalization = normalization_for(
            scores, image_threshold.value, config.normalize, config.max_fpr, provenance(config.max_fpr)
        )
    updated = dataclasses.replace(
        manifest, image_threshold=image_threshold, pixel_threshold=pixel_threshold, score_normalization=normalization
    )
    manifest_path = manifest_path_for(artifact)
    if updated.artifact_sha256 is None:  # the embedded ONNX copy carries no hash of its own file
        updated = updated.stamp_artifact(artifact)
    updated.save(manifest_path)
    return CalibrationResult(
        manifest_path=manifest_path,
        manifest=updated,
        n_images=int(scores.size),
        n_unreadable=unreadable,
        scores=scores,
        false_positive_rate=float(np.mean(image_threshold.is_exceeded_by(scores))),
    )
