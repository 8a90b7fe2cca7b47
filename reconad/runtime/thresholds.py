"""Where the verdict is decided: thresholds with their provenance, the one decision rule, and the 0..1 score scale.

Every threshold in raw score units sits in the manifest with where it came from (``Calibration``);
``Threshold.is_exceeded_by`` is the rule the Inspector, verify and calibration all apply. Computed from
good images by ``reconad.runtime.calibration``.
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
