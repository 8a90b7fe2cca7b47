"""Where the verdict is decided: thresholds with their provenance, the one decision rule, and the 0..1 score scale.

Every threshold in raw score units sits in the manifest with where it came from (``Calibration``);
``Threshold.is_exceeded_by`` is the rule the Inspector, verify and calibration all apply. The thresholds
one verdict is judged with form an ``OperatingPoint``: a category's own, or the global one. Computed from
good images by ``reconad.runtime.calibration``; ``OperatingPointCounts`` scores a rule on labelled images.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from reconad.runtime.config import check_choice, check_iso_date, require, utc_now_iso

NORMALIZATION_METHODS = ("minmax", "quantile")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """Where a threshold or a score normalisation came from.

    Attributes:
        method: how it was computed, e.g. ``"max_fpr"`` (a quantile of defect-free scores),
            ``"f1"`` (best F1 on labelled images) or ``"manual"``.
        n_images: number of images it was computed from (0 for ``"manual"``).
        max_fpr: the false-positive rate allowed on defect-free images, when the method uses one.
        date: ISO 8601 date of the calibration.
        source: what it was computed on: a folder, a dataset split, or who set it by hand.
        margin: for ``"max_fpr"``, the fraction of the good-score spread added above the quantile
            (``reconad.runtime.calibration.threshold_at_fpr``).
    """

    method: str
    n_images: int
    max_fpr: float | None = None
    date: str
    source: str
    margin: float | None = None

    def __post_init__(self) -> None:
        require(self.n_images >= 0, f"manifest calibration n_images must be >= 0, got {self.n_images}")
        require(
            self.max_fpr is None or 0.0 <= self.max_fpr <= 1.0,
            f"manifest calibration max_fpr must be in [0, 1], got {self.max_fpr}",
        )
        check_iso_date(self.date, "calibration.date")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Threshold:
    """A decision threshold in raw score units (not normalised): anomalous when ``score >= value``.

    Attributes:
        value: the threshold on ``image_score`` (image threshold) or on ``anomaly_map`` values
            (pixel threshold, for defect masks).
        calibration: how the value was obtained.
    """

    value: float
    calibration: Calibration

    def __post_init__(self) -> None:
        require(math.isfinite(self.value), f"manifest threshold value must be finite, got {self.value}")

    def is_exceeded_by(self, scores: np.ndarray | float) -> np.ndarray:
        """The one decision rule (Inspector, verify, calibration): ``scores >= value``; NaN is never anomalous."""
        return np.asarray(scores) >= self.value

    @classmethod
    def manual(cls, value: float, source: str = "set by hand") -> Threshold:
        """A threshold given by a person or a tool rather than calibrated (``method="manual"``)."""
        return cls(value=float(value), calibration=Calibration(method="manual", n_images=0, date=utc_now_iso(), source=source))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreNormalization:
    """An affine map from raw image scores to 0..1 so operators read a familiar scale.

    ``normalized = clip((score - low) / (high - low), 0, 1)``; the threshold stays in raw units.

    Attributes:
        method: ``"minmax"`` (low/high = min/max of calibration scores) or ``"quantile"``
            (low/high = two quantiles of them, robust to outliers). ``recon-inspect calibrate`` takes
            ``low`` = the min (minmax) or the ``max_fpr`` quantile (quantile) of the good scores and
            ``high = 2 * threshold - low``, so the image threshold reads 0.5.
        low: raw score mapped to 0.
        high: raw score mapped to 1; greater than ``low``.
        calibration: where low and high came from.
    """

    method: str
    low: float
    high: float
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        check_choice(self.method, NORMALIZATION_METHODS, "score_normalization.method")
        require(
            math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low,
            f"manifest score_normalization needs finite low < high, got {self.low} and {self.high}",
        )

    def apply(self, scores: np.ndarray | float) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        return np.clip((scores - self.low) / (self.high - self.low), 0.0, 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """The thresholds a verdict is judged with: one category's (``Manifest.category_thresholds``) or the global ones.

    Attributes:
        image_threshold: on ``image_score``; None: not calibrated.
        pixel_threshold: on ``anomaly_map`` values (defect masks, overlays).
        score_normalization: the 0..1 display scale, with ``image_threshold`` at 0.5.
        distance_limit: the out-of-distribution limit on ``category_distance`` (cosine distance of the
            image's pooled features to the nearest category centroid): at or beyond it the image is
            UNKNOWN, not judged. None: no limit (the model names no category, or it was not calibrated).
    """

    image_threshold: Threshold | None = None
    pixel_threshold: Threshold | None = None
    score_normalization: ScoreNormalization | None = None
    distance_limit: Threshold | None = None

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, field.name) is None for field in dataclasses.fields(self))

    def describe(self) -> str:
        """One line naming the image threshold and where it came from, e.g. for "replaced ..." reports."""
        if self.image_threshold is None:
            return "no image threshold"
        calibration = self.image_threshold.calibration
        text = f"image threshold {self.image_threshold.value:.6g} ({calibration.method}"
        if calibration.n_images:
            text += f" on {calibration.n_images} images of {calibration.source}"
        else:
            text += f", {calibration.source}"
        return text + f", {calibration.date})"


@dataclasses.dataclass(frozen=True)
class OperatingPointCounts:
    """A threshold's confusion counts on labelled images (defective = positive), with the rule ``score >= value``.

    Images flagged UNKNOWN (beyond the distance limit) are not judged, so they count in ``unknown`` and in
    neither rate.

    Attributes:
        threshold: the image threshold, raw score units.
        true_positives: defective images at or above it; ``false_negatives`` below it.
        false_positives: good images at or above it (false alarms); ``true_negatives`` below it.
        unknown: images left unjudged as out of distribution.
    """

    threshold: float
    true_positives: int
    false_negatives: int
    false_positives: int
    true_negatives: int
    unknown: int = 0

    @classmethod
    def count(
        cls, threshold: Threshold, labels: np.ndarray, scores: np.ndarray, unknown: np.ndarray | None = None
    ) -> OperatingPointCounts:
        """Counts of ``threshold`` on ``labels`` (1 = defective) [N] and ``scores`` [N]; ``unknown`` bool [N]."""
        labels = np.asarray(labels).astype(bool)
        flagged = threshold.is_exceeded_by(np.asarray(scores, dtype=np.float64))
        judged = np.ones(len(labels), bool) if unknown is None else ~np.asarray(unknown, bool)
        return cls(
            threshold=float(threshold.value),
            true_positives=int((flagged & labels & judged).sum()),
            false_negatives=int((~flagged & labels & judged).sum()),
            false_positives=int((flagged & ~labels & judged).sum()),
            true_negatives=int((~flagged & ~labels & judged).sum()),
            unknown=int((~judged).sum()),
        )

    @property
    def recall(self) -> float:
        """Defective images caught: TP / (TP + FN); NaN without defective images."""
        positives = self.true_positives + self.false_negatives
        return self.true_positives / positives if positives else math.nan

    @property
    def false_alarm_rate(self) -> float:
        """Good images flagged: FP / (FP + TN); NaN without good images."""
        negatives = self.false_positives + self.true_negatives
        return self.false_positives / negatives if negatives else math.nan

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-able, NaN as None."""
        rates = {"recall": self.recall, "false_alarm_rate": self.false_alarm_rate}
        return dataclasses.asdict(self) | {k: (None if math.isnan(v) else v) for k, v in rates.items()}
