"""The inspection loop's frame preparation (crop, resize, colour order) on background workers, so that
preparing the next frames takes only the CPU the inference running now leaves.

Where inference runs on the CPU (ONNX Runtime on every core), any other runnable thread holds back one of
its intra-op threads, and the whole parallel operator waits at its barrier for it. On a 2-core machine, a
live 720p camera at 1.5x the model's rate, the gain is small beside that machine's noise: interleaved
A/B runs gave 0.90 -> 0.95 and 0.93 -> 0.96 of bare inference (normal priority -> here), two
``benchmarks/bench_loop.py --compare-preprocess`` runs a paired median of +0.01 over 12 rounds (rounds
swing by +-0.08 there). Where a core is left free it makes no difference. Two things make the workers
background work:

- they run under SCHED_IDLE (``priority.background_thread``): a core only when no normal thread wants it;
- OpenCV runs each call on the calling thread alone (``cv2.setNumThreads(1)`` while a loop runs): the
  workers already parallelise across frames, and OpenCV's own pool threads would run the resize at
  normal priority beside inference.

A background thread can be starved by another process's load, so the inference thread never waits on
one for long: a frame whose preparation has not started when inference takes it is prepared on the
inference thread itself; one that started is waited for about three times as long as a preparation
usually takes (``late_after_s``), then prepared again there (the worker's copy is discarded). Frames a
live source drops are cancelled before anyone prepares them. Written on ``concurrent.futures``; no library schedules work by CPU priority.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable

import numpy as np

from reconad.runtime.frames import Roi, import_cv2, prepare_image
from reconad.runtime.line.priority import background_thread

LATE_FACTOR = 3.0  # a started preparation is waited for this many times a typical one's duration...
LATE_BOUNDS_S = (0.002, 0.05)  # ...within these bounds, then redone on the inference thread
TIMED = 32  # recent preparations whose durations give the typical one

_opencv_lock = threading.Lock()
_opencv_users = 0
_opencv_threads_before = 0


def _single_threaded_opencv(enter: bool) -> None:
    """``cv2.setNumThreads(1)`` while at least one loop runs in this process; the previous setting after."""
    global _opencv_users, _opencv_threads_before
    cv2 = import_cv2()
    with _opencv_lock:
        if enter:
            if _opencv_users == 0:
                _opencv_threads_before = cv2.getNumThreads()
                cv2.setNumThreads(1)
            _opencv_users += 1
        else:
            _opencv_users -= 1
            if _opencv_users == 0:
                cv2.setNumThreads(_opencv_threads_before)


class FramePreparer:
    """Prepares frames for the model on ``workers`` background threads (see the module).

    Args:
        input_hw: the model's input (height, width).
        roi: (x, y, width, height) cropped from each frame first, or None.
        workers: worker threads (``InspectConfig.preprocess_threads``).
        background: run them under SCHED_IDLE with OpenCV single-threaded (the default); False keeps
            normal priority and OpenCV's own threads (the design before 2026-12-01, for comparison).
        on_latency: receives each preparation's duration, ms (the ``preprocess`` latency).
        on_inline: called for each frame ``result`` prepares on the calling thread (not started, or late).

    Use as a context manager, or call ``close``.
    """

    def __init__(self, input_hw: tuple[int, int], roi: Roi | None, workers: int, *, background: bool = True,
                 on_latency: Callable[[float], None] | None = None,
                 on_inline: Callable[[], None] | None = None) -> None:
        self.input_hw, self.roi = input_hw, roi
        self.background = background
        self.on_latency = on_latency
        self.on_inline = on_inline
        self.priority: str | None = None  # what the workers got: "idle", "nice 19" or None (set by the first one)
        self.inline = 0  # frames the inference thread prepared itself (their worker had not started them)
        self.late = 0  # frames prepared again because their worker was late
        self._durations: collections.deque[float] = collections.deque(maxlen=TIMED)  # s, workers and inline
        if background:
            _single_threaded_opencv(True)
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            workers, "preprocess", initializer=self._start_worker if background else None)

    def _start_worker(self) -> None:
        self.priority = background_thread()

    def prepare(self, image: np.ndarray, colour: str) -> np.ndarray:
        """uint8 [H, W, 3] RGB at ``input_hw`` from one frame in ``colour`` order, on the calling thread.

        Raises:
            ReconadError: the ROI does not fit the frame; OpenCV's error for a malformed frame.
        """
        started = time.perf_counter()
        prepared = prepare_image(image, self.input_hw, colour=colour, roi=self.roi)
        elapsed_s = time.perf_counter() - started
        self._durations.append(elapsed_s)
        if self.on_latency is not None:
            self.on_latency(elapsed_s * 1e3)
        return prepared

    def late_after_s(self) -> float:
        """How long ``result`` waits for a preparation a worker has started: ``LATE_FACTOR`` times a typical
        one (the lower quartile of the last ``TIMED``, which a starved worker's stretched ones do not move),
        within ``LATE_BOUNDS_S``; the upper bound until one has been timed. Seconds."""
        durations = sorted(self._durations)
        if not durations:
            return LATE_BOUNDS_S[1]
        return min(LATE_BOUNDS_S[1], max(LATE_BOUNDS_S[0], LATE_FACTOR * durations[len(durations) // 4]))

    def submit(self, image: np.ndarray, colour: str) -> concurrent.futures.Future:
        """Start preparing ``image`` on a worker; cancel the future to drop it unprepared."""
        return self._executor.submit(self.prepare, image, colour)

    def result(self, future: concurrent.futures.Future, image: np.ndarray, colour: str) -> np.ndarray:
        """The prepared frame of ``submit(image, colour)``, without waiting on a starved worker.

        Raises: what ``prepare`` raises.
        """
        if future.cancel():  # not started: this thread prepares it now, at inference's priority
            self.inline += 1
        else:
            try:
                return future.result(timeout=self.late_after_s())
            except concurrent.futures.TimeoutError:
                self.late += 1
        if self.on_inline is not None:
            self.on_inline()
        return self.prepare(image, colour)

    def close(self) -> None:
        """Stop the workers (queued frames are cancelled) and restore OpenCV's thread count."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.background:
            _single_threaded_opencv(False)

    def __enter__(self) -> FramePreparer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
