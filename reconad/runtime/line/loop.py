"""The inspection loop: capture, inference and sinks on their own threads, joined by drop-oldest queues.

Shaped like jetson-inference's my-detection.py (source -> process -> sink, FPS on screen, stop at end of
stream) but pipelined: with a live source the camera never waits for the model nor the model for a disk
or a network (full queues drop their oldest item, counted); files and folders wait instead, losing
nothing. Bad frames, camera loss and failing sinks are counted and survived; a failed or hung inference
thread ends the run with a non-zero exit code.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reconad.runtime.errors import ReconadError
from reconad.runtime.folder import OVERLAY_MODES, VERDICTS_FILE
from reconad.runtime.inspector import Verdict
from reconad.runtime.atomic import write_text_atomic
from reconad.runtime.manifest import Manifest
from reconad.runtime.frames import Roi, crop_roi, prepare_image, resize_image, to_rgb_uint8
from reconad.runtime.line.sinks import FrameFault, InspectionResult, JsonlSink, OverlaySink, Sink, WebhookSink, describe_error
from reconad.runtime.line.sources import (
    FrameReadError,
    FrameSource,
    ImageFolderSource,
    SourceConfig,
    SourceLostError,
    open_source,
)
from reconad.runtime.line.stats import LoopStats, StatsSnapshot

SUMMARY_FILE = "summary.json"
EXIT_INFERENCE_FAILED = 3  # the model raised or hung: not the operator's input (that is exit code 2)
_WARNING_INTERVAL_S = 30.0  # a recurring fault (corrupt frames, a failing sink) is reported at most this often


@dataclasses.dataclass(frozen=True)
class InspectConfig:
    """Settings of one ``recon-inspect run``; each field is the option of the same name."""

    max_frames: int | None = None  # stop after this many verdicts; None: until the stream ends or a signal
    roi: Roi | None = None  # (x, y, width, height) of every frame the model sees
    batch_size: int = 1  # frames per inference call: more raises throughput and latency
    queue_size: int = 4  # frames waiting for inference; a live source drops the oldest beyond this
    preprocess_threads: int = 2  # crop/resize workers: one core cannot resize 720p+ as fast as a GPU infers
    skip_blank: bool | None = None  # skip flat frames; None: for live sources only (a folder may hold flat images)
    blank_range: int = 2  # a frame whose gray levels span at most this is blank (lens cap, dead sensor)
    reconnect_initial_s: float = 0.5  # first wait before reopening a lost camera; doubles per failure
    reconnect_max_s: float = 10.0
    stall_s: float = 5.0  # a live source silent this long is reported as stalled
    stats_interval_s: float = 5.0  # status line period; 0 for none
    inference_timeout_s: float = 60.0  # a batch that has not returned after this long is a hung backend
    drain_timeout_s: float = 10.0  # at stop, how long queues may take to drain
    out: Path | None = None  # folder of verdicts.jsonl, overlays/ and summary.json; None: no files
    overlays: str = "anomalies"  # which frames get a heatmap overlay PNG: anomalies, all or none
    overlay_interval_s: float | None = None  # at most one overlay per this many s; None: 1 live, 0 files
    overlay_quota_mb: float = 500.0  # no more overlays once overlays/ holds this much
    overlay_min_free_mb: float = 200.0  # nor while the disk has less free than this
    webhook: str | None = None  # http(s) URL receiving a JSON POST per anomalous frame
    webhook_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise ReconadError(f"max_frames must be at least 1, got {self.max_frames}.")
        if self.batch_size < 1 or self.queue_size < 1 or self.preprocess_threads < 1:
            raise ReconadError("batch_size, queue_size and preprocess_threads must be at least 1.")
        if self.overlays not in OVERLAY_MODES:
            raise ReconadError(f"Overlay mode must be one of {list(OVERLAY_MODES)}, got {self.overlays!r}.")


@dataclasses.dataclass(frozen=True)
class LoopResult:
    """How a run ended.

    Attributes:
        stop_reason: ``"end of stream"``, ``"max frames"``, ``"SIGINT"``, ``"SIGTERM"`` or ``"failure"``.
        stats: the final statistics.
        failure: one sentence when the run failed, else None.
        exit_code: 0; 2 for bad input found while running (e.g. a ROI outside the frames);
            ``EXIT_INFERENCE_FAILED`` when inference raised or hung.
        backend: the backend that ran, when known (``inspect_stream`` sets it).
    """

    stop_reason: str
    stats: StatsSnapshot
    failure: str | None = None
    exit_code: int = 0
    backend: str | None = None

    def headline(self) -> str:
        """``3 frames inspected on ort-cpu: 2 anomalous, 1 unreadable, 0 blank, 0 dropped, 2 overlays``."""
        counters = self.stats.counters
        overlays = self.stats.sinks.get(OverlaySink.name)
        text = f"{counters['inspected']} frames inspected on {self.backend or 'an inspector'}: "
        text += f"{counters['anomalous']} anomalous, {counters['corrupt']} unreadable, {counters['blank']} blank, "
        text += f"{counters['dropped']} dropped"
        return text + (f", {overlays.written} overlays" if overlays is not None else "")


class FrameInspector(Protocol):
    """What the loop needs from ``reconad.runtime.Inspector``."""

    @property
    def input_hw(self) -> tuple[int, int]: ...

    def inspect(self, frames: np.ndarray) -> list[Verdict]:
        """Verdicts for uint8 [N, H, W, 3] RGB frames at ``input_hw``."""
        ...


class DropOldestQueue:
    """A bounded FIFO: a full queue drops its oldest item to take a new one (``put``) or waits (``put_wait``).

    ``close`` ends it: getters receive what is left, then None. ``on_drop`` is called with every item
    that ``put`` or ``clear`` throws away.
    """

    def __init__(self, maxsize: int, on_drop: Callable[[Any], None] | None = None) -> None:
        self.maxsize = maxsize
        self._on_drop = on_drop
        self._items: collections.deque[Any] = collections.deque()
        self._condition = threading.Condition()
        self._closed = False

    def put(self, item: Any) -> int:
        """Add ``item``; returns how many items were dropped to make room (0 or 1)."""
        with self._condition:
            dropped = 0
            if len(self._items) >= self.maxsize:
                oldest = self._items.popleft()
                if self._on_drop is not None:
                    self._on_drop(oldest)
                dropped = 1
            self._items.append(item)
            self._condition.notify_all()
            return dropped

    def put_wait(self, item: Any, stop: threading.Event) -> bool:
        """Add ``item`` once there is room (back-pressure for files); False if ``stop`` is set first."""
        with self._condition:
            while len(self._items) >= self.maxsize:
                if stop.is_set() or self._closed:
                    return False
                self._condition.wait(0.05)
            self._items.append(item)
            self._condition.notify_all()
            return True

    def get_batch(self, max_items: int, timeout_s: float) -> list[Any] | None:
        """Up to ``max_items`` items, waiting at most ``timeout_s`` for the first; [] on timeout, None when
        closed and empty."""
        with self._condition:
            if not self._items and not self._closed:
                self._condition.wait(timeout_s)
            if not self._items:
                return None if self._closed else []
            count = min(max_items, len(self._items))
            batch = [self._items.popleft() for _ in range(count)]
            self._condition.notify_all()
            return batch

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def clear(self) -> int:
        """Drop every waiting item; returns how many."""
        with self._condition:
            count = len(self._items)
            if self._on_drop is not None:
                for item in self._items:
                    self._on_drop(item)
            self._items.clear()
            self._condition.notify_all()
            return count

    def __len__(self) -> int:
        with self._condition:
            return len(self._items)


class RateLimitedReporter:
    """Reports a recurring fault at most once per ``_WARNING_INTERVAL_S``, with how often it recurred."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self._report = report
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # key -> (time reported, occurrences since)

    def __call__(self, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            reported_at, since = self._last.get(key, (None, 0))
            if reported_at is not None and now - reported_at < _WARNING_INTERVAL_S:
                self._last[key] = (reported_at, since + 1)
                return
            self._last[key] = (now, 0)
        self._report(message + (f" ({since} more since the last report)" if since else ""))


@dataclasses.dataclass(frozen=True)
class _Captured:
    index: int
    name: str
    captured_at: str  # ISO wall time
    captured_s: float  # perf_counter when read
    image: concurrent.futures.Future  # -> uint8 [H, W, 3] RGB at the model's size, from a preprocess worker
    frame: np.ndarray  # the original frame in the source's colour order


def check_frame(image: Any, blank_range: int | None) -> str | None:
    """``"corrupt"`` for a malformed frame, ``"blank"`` for a flat one (``blank_range`` None: never), else None.

    Flatness is judged on a grid of at most ~64k pixels, so the check costs little on large frames.
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or 0 in image.shape:
        return "corrupt"
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        return "corrupt"
    if blank_range is None or image.dtype != np.uint8:
        return None
    step = max(1, int((image.shape[0] * image.shape[1] / 65536) ** 0.5))
    sample = image[::step, ::step]
    return "blank" if int(sample.max()) - int(sample.min()) <= blank_range else None


def prepare_frame(image: np.ndarray, input_hw: tuple[int, int], colour: str, roi: Roi | None) -> np.ndarray:
    """``prepare_image`` with the colour conversion after the resize for uint8 colour frames.

    Resizing acts per channel, so the result is identical, but the channel copy then touches the small
    image: 3-4x faster on 480p-1080p camera frames, on the capture thread's budget.
    """
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return to_rgb_uint8(resize_image(crop_roi(image, roi), input_hw), colour=colour)
    return prepare_image(image, input_hw, colour=colour, roi=roi)


def report_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _iso_now_ms() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class SinkWorker:
    """One sink on its own thread behind a drop-oldest queue; failures are counted and reported."""

    def __init__(self, sink: Sink, stats: LoopStats, warn: RateLimitedReporter, abort: threading.Event) -> None:
        self.sink = sink
        self.queue = DropOldestQueue(sink.queue_size)
        self._stats = stats
        self._warn = warn
        self._abort = abort
        self.thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)
        stats.update_sink(sink.name)

    def submit(self, result: InspectionResult, wait: bool) -> None:
        """Queue ``result``: drop the oldest when full, or with ``wait`` (files: lossless) wait for room."""
        if wait:
            self.queue.put_wait(result, self._abort)
            return
        dropped = self.queue.put(result)
        if dropped:
            self._stats.update_sink(self.sink.name, dropped=dropped)

    def _run(self) -> None:
        name = self.sink.name
        try:
            while not self._abort.is_set():
                batch = self.queue.get_batch(1, timeout_s=0.2)
                if batch is None:
                    break
                for result in batch:
                    started = time.perf_counter()
                    try:
                        written = self.sink.write(result)
                    except Exception as error:  # a sink must never take the loop down
                        reason = describe_error(error)
                        self._stats.update_sink(name, errors=1, last_error=reason)
                        self._warn(f"sink:{name}", f"warning: sink {name} failed: {reason}; the loop goes on.")
                        continue
                    self._stats.update_sink(name, **({"written": 1} if written else {"skipped": 1}))
                    self._stats.add_latency(f"sink:{name}", (time.perf_counter() - started) * 1e3)
        finally:
            lost = self.queue.clear()
            if lost:
                self._stats.update_sink(name, dropped=lost)
            try:
                self.sink.close()
            except Exception as error:
                self._stats.update_sink(name, errors=1, last_error=describe_error(error))


class InspectionLoop:
    """One run: a capture thread, an inference thread and one thread per sink, watched by the caller's thread.

    Use ``run_inspection``; the object exists to share state between the threads.
    """

    def __init__(
        self,
        source: FrameSource,
        inspector: FrameInspector,
        config: InspectConfig,
        sinks: Sequence[Sink],
        report: Callable[[str], None],
    ) -> None:
        self.source = source
        self.inspector = inspector
        self.config = config
        self.report = report
        self.warn = RateLimitedReporter(report)
        self.stats = LoopStats()
        self.stop = threading.Event()  # stop capturing; what is queued is still inspected
        self.abort = threading.Event()  # a second signal: stop without draining
        self.frames = DropOldestQueue(config.queue_size, on_drop=lambda item: item.image.cancel())  # no work for drops
        self.preprocess = concurrent.futures.ThreadPoolExecutor(config.preprocess_threads, "preprocess")
        self.sinks = tuple(sinks)
        self.workers: list[SinkWorker] = []
        self.overlay_sink = next((sink for sink in sinks if isinstance(sink, OverlaySink)), None)
        self.stop_reason: str | None = None
        self.failure: tuple[str, int] | None = None  # (sentence, exit code) of the first fatal error
        self._lock = threading.Lock()
        self._busy_since: float | None = None  # perf_counter when the current inference call started
        self._last_frame_s = time.perf_counter()

    def _set_reason(self, reason: str) -> None:
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason

    def _fail(self, message: str, exit_code: int) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = (message, exit_code)
            self.stop_reason = "failure"  # wins over an end of stream or a signal seen just before
        self.stop.set()

    def request_stop(self, reason: str) -> None:
        """Stop capturing and drain the queues; a second request aborts without draining."""
        if self.stop.is_set() and reason in ("SIGINT", "SIGTERM"):
            self.abort.set()
            self.frames.clear()
            self.report(f"{reason} again: stopping now without draining the queues.")
            return
        self._set_reason(reason)
        self.stop.set()
        if reason in ("SIGINT", "SIGTERM"):
            self.report(f"{reason}: stopping; draining the queues (send it again to stop at once).")

    # capture thread ------------------------------------------------------------------------------------

    def _capture_main(self) -> None:
        try:
            self._capture_frames()
        except ReconadError as error:
            self._fail(str(error), error.exit_code)
        except Exception as error:
            self._fail(f"The capture thread failed: {describe_error(error)}.", EXIT_INFERENCE_FAILED)
        finally:
            self.stats.source_state = "ended"
            self.source.close()
            self.frames.close()

    def _capture_frames(self) -> None:
        config, source = self.config, self.source
        skip_blank = source.live if config.skip_blank is None else config.skip_blank
        blank_range = config.blank_range if skip_blank else None
        index = 0
        while not self.stop.is_set():
            if config.max_frames is not None and not source.live and index >= config.max_frames:
                self._set_reason("max frames")
                return
            started = time.perf_counter()
            try:
                raw = source.read()
            except FrameReadError as error:
                self._skip("corrupt", error.name, str(error))
                continue
            except SourceLostError as error:
                if not source.live:
                    raise
                self.stats.count("source_lost")
                self.report(f"warning: {error} Reopening it.")
                self._reopen()
                continue
            if raw is None:
                self._set_reason("end of stream")
                return
            read_s = time.perf_counter()
            self._last_frame_s = read_s
            captured_at = _iso_now_ms()
            self.stats.add_latency("capture", (read_s - started) * 1e3)
            problem = check_frame(raw.image, blank_range)
            if problem is not None:
                self._skip(problem, raw.name, f"{raw.name} is {problem}.", captured_at)
                continue
            image = self.preprocess.submit(self._prepare, raw.image, source.colour)
            item = _Captured(index, raw.name, captured_at, read_s, image, raw.image)
            index += 1
            self.stats.count("captured")
            if source.live:
                self.stats.count("dropped", self.frames.put(item))
            elif not self.frames.put_wait(item, self.stop):
                return

    def _prepare(self, image: np.ndarray, colour: str) -> np.ndarray:
        """On a preprocess worker: crop, resize and convert one frame (OpenCV releases the GIL meanwhile)."""
        started = time.perf_counter()
        prepared = prepare_frame(image, self.inspector.input_hw, colour, self.config.roi)
        self.stats.add_latency("preprocess", (time.perf_counter() - started) * 1e3)
        return prepared

    def _skip(self, kind: str, name: str, message: str, captured_at: str | None = None) -> None:
        """Count a skipped frame (``kind``: corrupt or blank), warn, and log it in the JSONL."""
        self.stats.count(kind)
        self.warn(kind, f"warning: skipped a {kind} frame: {message}")
        fault = FrameFault(name=name, captured_at=captured_at or _iso_now_ms(), error=message)
        for worker in self.workers:
            if worker.sink.accepts(fault):
                worker.submit(fault, wait=not self.source.live)

    def _reopen(self) -> None:
        """Reopen a lost live source with exponential backoff until it works or the loop stops."""
        self.stats.source_state = "reconnecting"
        self.source.close()
        delay, attempt = self.config.reconnect_initial_s, 0
        while not self.stop.is_set():
            attempt += 1
            try:
                self.source.open()
            except ReconadError as error:
                self.warn("reopen", f"warning: reopening {self.source.uri} failed (attempt {attempt}): {error}")
                self.stop.wait(delay)
                delay = min(delay * 2, self.config.reconnect_max_s)
                continue
            self.stats.count("reconnects")
            self.stats.source_state = "ok"
            self._last_frame_s = time.perf_counter()
            self.report(f"{self.source.uri} reopened after {attempt} attempt(s).")
            return

    # inference thread ----------------------------------------------------------------------------------

    def _inference_main(self) -> None:
        try:
            self._inspect_frames()
        except BaseException as error:
            self._fail(f"Inference failed: {describe_error(error)}.", EXIT_INFERENCE_FAILED)

    def _inspect_frames(self) -> None:
        max_frames = self.config.max_frames
        inspected = 0
        while not self.abort.is_set():
            batch = self.frames.get_batch(self.config.batch_size, timeout_s=0.1)
            if batch is None:
                return
            if not batch:
                continue
            if max_frames is not None:
                batch = batch[: max_frames - inspected]
            batch, images = self._prepared(batch)
            if batch is None:
                return
            if not batch:
                continue
            started = time.perf_counter()
            for item in batch:
                self.stats.add_latency("queue", (started - item.captured_s) * 1e3)
            self._busy_since = started
            verdicts = self.inspector.inspect(np.stack(images))  # [B, H, W, 3] in
            decided = time.perf_counter()
            self._busy_since = None
            if len(verdicts) != len(batch):
                raise ReconadError(f"the inspector returned {len(verdicts)} verdicts for {len(batch)} frames")
            self.stats.add_latency("inference", (decided - started) * 1e3)
            for item, verdict in zip(batch, verdicts):
                self._dispatch(item, verdict, decided)
            inspected += len(batch)
            if max_frames is not None and inspected >= max_frames:
                self._set_reason("max frames")
                self.stop.set()
                return

    def _prepared(self, batch: list[_Captured]) -> tuple[list[_Captured] | None, list[np.ndarray]]:
        """The items whose preprocessing worked, with their images; (None, []) after a configuration error.

        A frame that cannot be prepared is skipped as corrupt, unless it is the first one: then the
        settings (e.g. a ROI outside the frame) are wrong for this source and the run fails.
        """
        kept, images = [], []
        for item in batch:
            try:
                images.append(item.image.result())
            except Exception as error:  # OpenCV raises its own error type on malformed frames
                message = str(error) if isinstance(error, ReconadError) else f"{item.name}: {describe_error(error)}"
                if item.index == 0:
                    self._fail(message, getattr(error, "exit_code", 2))
                    return None, []
                self._skip("corrupt", item.name, message, item.captured_at)
                continue
            kept.append(item)
        return kept, images

    def _dispatch(self, item: _Captured, verdict: Verdict, decided_s: float) -> None:
        latency_ms = (decided_s - item.captured_s) * 1e3
        self.stats.add_latency("capture_to_decision", latency_ms)
        self.stats.count("inspected")
        if verdict.is_anomalous:
            self.stats.count("anomalous")
        overlay = self.overlay_sink.plan(item.index, item.name, verdict.is_anomalous) if self.overlay_sink else None
        if overlay is None and verdict.is_anomalous and self.overlay_sink is not None:
            self.stats.update_sink(self.overlay_sink.name, skipped=1)
        # Only an overlay needs the map and the frame; dropping them keeps queued results small.
        kept_map = np.array(verdict.anomaly_map, copy=True) if overlay else None
        result = InspectionResult(
            index=item.index,
            name=item.name,
            captured_at=item.captured_at,
            verdict=dataclasses.replace(verdict, anomaly_map=kept_map),
            latency_ms=latency_ms,
            overlay=overlay,
            frame=item.frame if overlay else None,
            colour=self.source.colour,
            roi=self.config.roi,
        )
        for worker in self.workers:
            if worker.sink.accepts(result):
                worker.submit(result, wait=not self.source.live)

    # the caller's thread -------------------------------------------------------------------------------

    def run(self, handle_signals: bool = True) -> LoopResult:
        config = self.config
        height, width = self.inspector.input_hw
        try:
            self.inspector.inspect(np.zeros((1, height, width, 3), dtype=np.uint8))  # warm-up: lazy init off the clock
        except Exception as error:
            raise ReconadError(f"Inference failed on a warm-up frame: {describe_error(error)}.") from None
        self.source.open()
        self.stats = LoopStats()  # the clock starts once model and source are ready
        self.workers = [SinkWorker(sink, self.stats, self.warn, self.abort) for sink in self.sinks]
        previous = self._install_signal_handlers() if handle_signals else {}
        capture = threading.Thread(target=self._capture_main, name="capture", daemon=True)
        inference = threading.Thread(target=self._inference_main, name="inference", daemon=True)
        for worker in self.workers:
            worker.thread.start()
        inference.start()
        capture.start()
        next_report = time.monotonic() + config.stats_interval_s
        try:
            while inference.is_alive() and not self.stop.is_set():
                inference.join(timeout=0.1)
                self._watch_inference()
                self._watch_source()
                if config.stats_interval_s > 0 and time.monotonic() >= next_report:
                    next_report = time.monotonic() + config.stats_interval_s
                    self.report(self.stats.snapshot().status_line())
        finally:
            self.stop.set()
            capture.join(timeout=config.drain_timeout_s)  # a camera read can block for good; it is a daemon
            self.frames.close()  # the inference thread drains what is queued, then ends
            while inference.is_alive() and not self._watch_inference():
                inference.join(timeout=0.1)
            self.preprocess.shutdown(wait=False, cancel_futures=True)
            for worker in self.workers:
                worker.queue.close()
            deadline = time.monotonic() + config.drain_timeout_s
            for worker in self.workers:
                worker.thread.join(timeout=max(0.0, deadline - time.monotonic()))
                if worker.thread.is_alive():
                    self.report(f"warning: sink {worker.sink.name} did not drain within {config.drain_timeout_s:g} s.")
            self._restore_signal_handlers(previous)
        failure = self.failure
        return LoopResult(
            stop_reason=self.stop_reason or "end of stream",
            stats=self.stats.snapshot(),
            failure=failure[0] if failure else None,
            exit_code=failure[1] if failure else 0,
        )

    def _watch_inference(self) -> bool:
        """Fail the run when one inference call has run past ``inference_timeout_s``; True if so."""
        busy = self._busy_since
        if busy is None or time.perf_counter() - busy <= self.config.inference_timeout_s:
            return False
        self._fail(
            f"Inference has not returned for {self.config.inference_timeout_s:g} s: the backend is hung.",
            EXIT_INFERENCE_FAILED,
        )
        return True

    def _watch_source(self) -> None:
        if not self.source.live or self.stats.source_state not in ("ok", "stalled"):
            return
        silent_s = time.perf_counter() - self._last_frame_s
        self.stats.source_state = "stalled" if silent_s > self.config.stall_s else "ok"

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda number, _frame: self.request_stop(signal.Signals(number).name))
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_inspection(
    source: FrameSource,
    inspector: FrameInspector,
    config: InspectConfig = InspectConfig(),
    sinks: Sequence[Sink] = (),
    *,
    report: Callable[[str], None] = report_stderr,
    handle_signals: bool = True,
) -> LoopResult:
    """Inspect ``source`` until it ends, ``config.max_frames`` verdicts, SIGINT/SIGTERM, or a fatal error.

    Opens the source (a ``ReconadError`` if it cannot), warms the inspector up, then runs the threads;
    the calling thread reports a status line every ``config.stats_interval_s`` and watches the others.
    Sinks are closed (flushed) before it returns; it never closes the inspector.

    Args:
        source: an unopened ``FrameSource``; it is closed on return.
        inspector: ``reconad.runtime.Inspector`` or anything with ``input_hw`` and ``inspect``.
        config: loop settings (the sink fields are read by ``build_sinks``, not here).
        sinks: where results go; see ``build_sinks``.
        report: receives status lines and warnings.
        handle_signals: turn SIGINT/SIGTERM into a clean stop (main thread only).
    """
    return InspectionLoop(source, inspector, config, sinks, report).run(handle_signals)


def build_sinks(
    config: InspectConfig,
    manifest: Manifest | None,
    *,
    live: bool = True,
    name_by_file: bool = False,
    run_id: str | None = None,
    warn: Callable[[str], None] = report_stderr,
) -> list[Sink]:
    """The sinks ``config`` asks for: JSONL log and overlays in ``config.out``, and the webhook.

    Args:
        live: the source is a camera or stream, so overlays are rate-limited by default.
        name_by_file: the source is an image folder: overlays are named after its files, not frame numbers.
    """
    sinks: list[Sink] = []
    if config.out is not None:
        out = Path(config.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ReconadError(f"Cannot create the output folder {out}: {error.strerror}.") from None
        sinks.append(JsonlSink(out / VERDICTS_FILE, run_id=run_id))
        if config.overlays != "none":
            normalization = manifest.score_normalization if manifest else None
            pixel = manifest.pixel_threshold if manifest else None
            sinks.append(
                OverlaySink(
                    out,
                    mode=config.overlays,
                    name_by_file=name_by_file,
                    min_interval_s=config.overlay_interval_s if config.overlay_interval_s is not None else float(live),
                    quota_mb=config.overlay_quota_mb,
                    min_free_mb=config.overlay_min_free_mb,
                    low=normalization.low if normalization else None,
                    high=normalization.high if normalization else None,
                    pixel_threshold=pixel.value if pixel else None,
                    warn=warn,
                )
            )
    if config.webhook:
        sinks.append(WebhookSink(config.webhook, timeout_s=config.webhook_timeout_s))
    return sinks


def inspect_stream(
    uri: str,
    artifact: str | os.PathLike,
    config: InspectConfig = InspectConfig(),
    source_config: SourceConfig = SourceConfig(),
    *,
    backend: str = "auto",
    threshold: float | None = None,
    num_threads: int | None = None,
    report: Callable[[str], None] = report_stderr,
) -> LoopResult:
    """``recon-inspect run``: open the artifact and the source, run the loop, write ``summary.json``.

    Args:
        uri: ``csi://N``, ``v4l2:///dev/videoN``, ``rtsp://...``, a video file or an image folder.
        artifact: ``.onnx`` or ``.engine`` with its manifest.
        backend: see ``reconad.runtime.backends.BACKEND_CHOICES``.
        threshold: overrides the manifest's image threshold (raw score units).
        num_threads: ONNX Runtime intra-op threads; None for all cores.
    """
    from reconad.runtime.inspector import Inspector

    source = open_source(uri, source_config)
    run_id = _iso_now_ms()
    with Inspector.open(artifact, backend, threshold=threshold, num_threads=num_threads) as inspector:
        if inspector.threshold is None:
            report("No image threshold: is_anomalous is null; run recon-inspect calibrate or pass --threshold.")
        by_file = isinstance(source, ImageFolderSource)
        sinks = build_sinks(config, inspector.manifest, live=source.live, name_by_file=by_file, run_id=run_id, warn=report)
        batch_size = min(config.batch_size, inspector.backend.max_batch)
        result = run_inspection(source, inspector, dataclasses.replace(config, batch_size=batch_size), sinks, report=report)
        result = dataclasses.replace(result, backend=inspector.backend.name)
    if config.out is not None:
        summary = {
            "run": run_id,
            "source": uri,
            "model": str(artifact),
            "backend": inspector.backend.name,
            "stop_reason": result.stop_reason,
            "failure": result.failure,
            **result.stats.to_dict(),
        }
        try:
            write_text_atomic(Path(config.out) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        except OSError as error:
            report(f"warning: cannot write {SUMMARY_FILE}: {describe_error(error)}")
    return result
