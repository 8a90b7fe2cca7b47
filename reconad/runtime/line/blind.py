"""Camera-blind checks: frames that show no part at all, so the model must not judge them.

A lens cap or dead light gives a black frame, a flooded sensor a saturated one, a broken cable or a
capture card without signal a flat one (one colour), and a stuck camera or encoder repeats the same
frame. Each raises a ``camera_blind`` event (every sink sees it) and a counter, instead of a verdict:
an all-black frame scored by the model is judged OK, which is the one answer a line must never get
from a blind camera.

Thresholds (gray levels 0..255 of a grid of at most ~64k pixels of the ROI, or of the frame without
one, so 4K frames cost the same as VGA; percentiles make hot pixels or a timestamp overlay covering
under 1 % of it irrelevant; and, the other way round, a part covering under 1 % of it looks like its
background: set a ROI around the part):
- black:     99th percentile <= ``black_level`` (30): nothing in the frame is brighter than deep shadow;
- saturated: 1st percentile >= ``saturated_level`` (225): nothing in the frame is darker than glare;
- flat:      99th - 1st percentile <= ``flat_range`` (6): one colour, whatever its level;
- frozen:    the grid identical (max difference <= ``frozen_tolerance``, 0) to the previous frame's for
  ``frozen_s`` (3 s) and at least ``frozen_frames`` (3) frames in a row. A real sensor's noise changes
  pixels every frame, and a compressed stream re-encodes at least every key frame, so exact repeats for
  seconds mean a stuck source; a static scene on a noisy sensor never trips it.
The first rule that holds names the reason; black and saturated frames are also flat, and say so first.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from reconad.runtime.errors import ReconadError

BLIND_REASONS = ("black", "saturated", "flat", "frozen")
BLIND_CHECKS = ("live", "always", "never")  # which sources are checked: live ones by default
SAMPLE_PIXELS = 65536


@dataclasses.dataclass(frozen=True)
class BlindConfig:
    """The thresholds above; each field is the ``recon-inspect run`` option of the same name."""

    black_level: int = 30
    saturated_level: int = 225
    flat_range: int = 6
    frozen_s: float = 3.0  # 0 turns the frozen check off
    frozen_frames: int = 3
    frozen_tolerance: int = 0

    def __post_init__(self) -> None:
        for name in ("black_level", "saturated_level", "flat_range", "frozen_tolerance"):
            value = getattr(self, name)
            if not 0 <= value <= 255:
                raise ReconadError(f"{name} is a gray level 0..255, got {value}.")
        if self.frozen_s < 0 or self.frozen_frames < 2:
            raise ReconadError("frozen_s must be >= 0 and frozen_frames >= 2.")


@dataclasses.dataclass(frozen=True)
class Blindness:
    """Why a frame is camera-blind.

    Attributes:
        reason: one of ``BLIND_REASONS``.
        detail: the measured value against its threshold, e.g. ``"99% of pixels <= 4 (black <= 30)"``.
        episode_start: the first blind frame after a seeing one (webhooks fire on these only).
    """

    reason: str
    detail: str
    episode_start: bool


def gray_sample(image: np.ndarray) -> np.ndarray:
    """uint8 [h, w] gray levels of a grid of at most ``SAMPLE_PIXELS`` pixels (channel mean; alpha dropped)."""
    step = max(1, int((image.shape[0] * image.shape[1] / SAMPLE_PIXELS) ** 0.5))
    sample = image[::step, ::step]
    if sample.ndim == 3:
        channels = sample[:, :, :3] if sample.shape[2] >= 3 else sample[:, :, :1]
        sample = (channels.sum(axis=2, dtype=np.uint16) // channels.shape[2]).astype(np.uint8)
    return np.ascontiguousarray(sample)


def _percentiles(gray: np.ndarray) -> tuple[int, int]:
    """(1st, 99th) percentile of uint8 levels, from a histogram: O(n), no sort."""
    cumulative = np.cumsum(np.bincount(gray.ravel(), minlength=256))
    total = cumulative[-1]
    low = int(np.searchsorted(cumulative, 0.01 * total))
    high = int(np.searchsorted(cumulative, 0.99 * total))
    return low, high


class BlindDetector:
    """Classifies frames of one source in order; keeps the previous frame's grid for the frozen check.

    Call ``check(image, time_s)`` for every frame read (uint8 only; other dtypes are never blind).
    """

    def __init__(self, config: BlindConfig = BlindConfig()) -> None:
        self.config = config
        self._previous: np.ndarray | None = None
        self._previous_s = 0.0
        self._repeats = 0  # frames identical to their predecessor, in a row
        self._repeat_since: float | None = None
        self._blind = False

    def reset(self) -> None:
        """Forget the previous frame (after the source was reopened: a new stream is not a repeat)."""
        self._previous, self._repeats, self._repeat_since = None, 0, None

    def check(self, image: np.ndarray, time_s: float) -> Blindness | None:
        """The frame's blindness, or None when it can be inspected.

        Args:
            image: uint8 [H, W] or [H, W, C] frame.
            time_s: when it was read (any monotonic clock, seconds).
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
            return None
        config = self.config
        gray = gray_sample(image)
        low, high = _percentiles(gray)
        found = None
        if high <= config.black_level:
            found = ("black", f"99% of pixels <= {high} (black <= {config.black_level})")
        elif low >= config.saturated_level:
            found = ("saturated", f"99% of pixels >= {low} (saturated >= {config.saturated_level})")
        elif high - low <= config.flat_range:
            found = ("flat", f"98% of pixels within {high - low} levels (flat <= {config.flat_range})")
        frozen = self._frozen(gray, time_s)
        if found is None and frozen is not None:
            found = ("frozen", frozen)
        if found is None:
            self._blind = False
            return None
        start, self._blind = not self._blind, True
        return Blindness(found[0], found[1], episode_start=start)

    def _frozen(self, gray: np.ndarray, time_s: float) -> str | None:
        config = self.config
        previous, self._previous = self._previous, gray
        previous_s, self._previous_s = self._previous_s, time_s
        if config.frozen_s <= 0 or previous is None or previous.shape != gray.shape:
            self._repeats, self._repeat_since = 0, None
            return None
        difference = int(np.abs(gray.astype(np.int16) - previous).max())
        if difference > config.frozen_tolerance:
            self._repeats, self._repeat_since = 0, None
            return None
        if self._repeats == 0:
            self._repeat_since = previous_s  # the content has been on show since the previous frame
        self._repeats += 1
        held_s = time_s - self._repeat_since
        if self._repeats + 1 >= config.frozen_frames and held_s >= config.frozen_s:
            return f"the same frame for {held_s:.1f} s ({self._repeats + 1} frames; frozen after {config.frozen_s:g} s)"
        return None
