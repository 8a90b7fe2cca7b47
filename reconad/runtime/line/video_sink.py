"""The loop's sink for video outputs: render each inspected frame once (``render.render_result``) and hand it
to every output of ``line/outputs.py``, on the loop's sink worker behind a small drop-oldest queue, so a
slow encoder or display drops frames (counted) rather than delaying inference; a live source renders at
most at the outputs' frame rate. ``recon-inspect run`` runs it in a child process
(``line/render_process.py``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.outputs import VideoOutput
from reconad.runtime.line.render import render_result

Scale = tuple[float | None, float | None, float | None]  # (low, high, pixel threshold) of the heat


class OutputRateLimit:
    """The video sinks' ``accepts``: results with a frame and a verdict, and camera-blind events with their
    frame (drawn with the CAMERA BLIND banner, so a live view shows why there are no verdicts), at most
    ``max_fps`` of them per second (None: every one), the rest counted in ``frames_over_rate``."""

    def __init__(self, max_fps: float | None) -> None:
        if max_fps is not None and max_fps <= 0:
            raise ReconadError(f"max_fps must be positive, got {max_fps}.")
        self.interval_s = None if max_fps is None else 1.0 / max_fps
        self.frames_over_rate = 0
        self._next_due = float("-inf")

    def accepts(self, result: Any) -> bool:
        if getattr(result, "frame", None) is None:
            return False  # no frame kept (a fault, or a result made for sinks without frames)
        if getattr(result, "verdict", None) is None and getattr(result, "reason", None) is None:
            return False  # neither a verdict nor a camera-blind event
        if self.interval_s is not None:
            # Called on the loop's thread in result order. Half an interval of slack, so a camera at
            # exactly the output's rate is never thinned by its own jitter.
            now = time.monotonic()
            if now + 0.5 * self.interval_s < self._next_due:
                self.frames_over_rate += 1
                return False
            self._next_due = max(self._next_due, now - self.interval_s) + self.interval_s
        return True


class VideoOutputSink(OutputRateLimit):
    """The loop's sink for video outputs: render each inspected frame once, write it to every output.

    Needs results that carry their frame and anomaly map (``needs_frames``); others are not accepted.
    Nothing is rendered while no output wants frames (RTSP outputs without a client): ``write`` returns
    False, which the loop counts as skipped. A failing output does not stop the others: ``write`` raises
    the first failure after trying them all.

    Args:
        outputs: from ``open_outputs``; closed by ``close``.
        low, high: the heat scale (the manifest's score normalisation), or None.
        pixel_threshold: outline level for NG frames (the manifest's pixel threshold), or None.
        scales: per category, its own (low, high, pixel threshold) (``session.overlay_scales`` of its
            operating point), used for verdicts of that category; the others use the three above. The
            same scales as the overlays, so a saved overlay and the live view of a frame look alike.
        queue_size: frames waiting for rendering; more are dropped oldest first (live view, not a log).
        max_fps: render at most this many frames per second (a live source: the outputs' own frame rate,
            so a camera or inference faster than the stream does not pay for frames nobody sees; the rest
            are counted in ``frames_over_rate``); None renders every frame (a file source's record).
    """

    name = "video"
    heavy = True  # renders and encodes: runs below inference's priority
    needs_frames = True  # the loop keeps frame and map in results for sinks that say so

    def __init__(self, outputs: Sequence[VideoOutput], *, low: float | None = None, high: float | None = None,
                 pixel_threshold: float | None = None, scales: Mapping[str, Scale] | None = None,
                 queue_size: int = 2, max_fps: float | None = None) -> None:
        super().__init__(max_fps)
        self.outputs = list(outputs)
        self.low, self.high, self.pixel_threshold = low, high, pixel_threshold
        self.scales = dict(scales or {})
        self.queue_size = queue_size
        self.render_ms = 0.0  # last render's duration

    def write(self, result: Any) -> bool:
        if not any(getattr(output, "wants_frames", True) for output in self.outputs):
            return False  # only RTSP outputs, and nobody watches: counted as skipped, nothing rendered
        started = time.perf_counter()
        category = getattr(getattr(result, "verdict", None), "category", None)
        low, high, pixel_threshold = self.scales.get(category, (self.low, self.high, self.pixel_threshold))
        image = render_result(result, low=low, high=high, pixel_threshold=pixel_threshold)
        self.render_ms = (time.perf_counter() - started) * 1e3
        failures = []
        for output in self.outputs:
            try:
                output.write(image)
            except Exception as error:  # one output's failure must not starve the others
                failures.append(error)
        if failures:
            raise failures[0]
        return True

    def close(self) -> None:
        failures = []
        for output in self.outputs:
            try:
                output.close()
            except Exception as error:
                failures.append(error)
        if failures:
            raise failures[0]
