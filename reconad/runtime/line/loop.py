"""The inspection loop: capture, inference and sinks on their own threads, joined by drop-oldest queues.

Shaped like jetson-inference's my-detection.py (source -> process -> sink, FPS on screen, stop at end of
stream) but pipelined: with a live source the camera never waits for the model nor the model for a disk
or a network (full queues drop their oldest item, counted); files and folders wait instead, losing
nothing. Bad frames, camera loss and failing sinks are counted and survived; camera-blind frames
(``blind.py``) become events for every sink instead of verdicts; a failed or hung inference thread ends
the run with a non-zero exit code.

``InspectConfig`` and ``LoopResult`` live in ``line/config.py``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reconad.runtime.errors import BackendUnavailableError, ReconadError
from reconad.runtime.frames import check_frame, crop_roi
from reconad.runtime.inspector import Verdict
from reconad.runtime.line.blind import BlindDetector, Blindness
from reconad.runtime.line.config import EXIT_INFERENCE_FAILED, FrameInspector, InspectConfig, LoopResult, StatsObserver
from reconad.runtime.line.preprocess import FramePreparer
from reconad.runtime.line.queues import DropOldestQueue
from reconad.runtime.line.report import RateLimitedReporter, report_stderr
from reconad.runtime.line.sinks import (
    CameraBlind,
    FrameFault,
    InspectionResult,
    OverlaySink,
    Sink,
    SinkWorker,
    describe_error,
)
from reconad.runtime.line.sources import FrameReadError, FrameSource, SourceLostError
from reconad.runtime.line.stats import LoopStats, StatsSnapshot

@dataclasses.dataclass(frozen=True)
class _Captured:
    index: int
    name: str
    captured_at: str  # ISO wall time
    captured_s: float  # perf_counter when read
    image: concurrent.futures.Future  # -> uint8 [H, W, 3] RGB at the model's size, from a preprocess worker
    frame: np.ndarray  # the original frame in the source's colour order


def _iso_now_ms() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


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
        metrics: StatsObserver | None = None,
        on_progress: Callable[[StatsSnapshot], None] | None = None,
    ) -> None:
        self.source = source
        self.metrics = metrics
        self.on_progress = on_progress
        self.inspector = inspector
        self.config = config
        self.report = report
        self.warn = RateLimitedReporter(report)
        self.stats = LoopStats()
        self.stop = threading.Event()  # stop capturing; what is queued is still inspected
        self.abort = threading.Event()  # a second signal: stop without draining
        self.frames = DropOldestQueue(config.queue_size, on_drop=lambda item: item.image.cancel())  # no work for drops
        self.preparer: FramePreparer | None = None  # the preprocess workers, while ``run`` runs
        self.sinks = tuple(sinks)
        self.workers: list[SinkWorker] = []
        self.overlay_sink = next((sink for sink in sinks if isinstance(sink, OverlaySink)), None)
        # Video outputs render every frame: their results keep the frame and the map (others drop them).
        self.keep_frames = any(getattr(sink, "needs_frames", False) for sink in sinks)
        checked = {"live": source.live, "always": True, "never": False}[config.blind_checks]
        self.blind = BlindDetector(config.blind) if checked else None
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
            problem = check_frame(raw.image)
            if problem is not None:
                self._skip(problem, raw.name, f"{raw.name} is {problem}.", captured_at)
                continue
            blindness = self.blind.check(self._checked_region(raw.image), read_s) if self.blind is not None else None
            if blindness is not None:
                self._camera_blind(raw.name, raw.image, captured_at, blindness)
                continue
            image = self.preparer.submit(raw.image, source.colour)
            item = _Captured(index, raw.name, captured_at, read_s, image, raw.image)
            index += 1
            self.stats.count("captured")
            if source.live:
                self.stats.count("dropped", self.frames.put(item))
            elif not self.frames.put_wait(item, self.stop):
                return

    def _checked_region(self, image: np.ndarray) -> np.ndarray:
        """What the blind checks judge: the ROI (what the model sees), or the whole frame."""
        try:
            return crop_roi(image, self.config.roi)
        except ReconadError:
            return image  # a ROI outside the frame: preprocessing reports it, as the run's error

    def _camera_blind(self, name: str, image: np.ndarray, captured_at: str, blindness: Blindness) -> None:
        """Count a camera-blind frame and tell every sink (a distinct event, not a verdict)."""
        self.stats.count("blind")
        self.stats.count(f"blind_{blindness.reason}")
        event = CameraBlind(name=name, captured_at=captured_at, reason=blindness.reason, detail=blindness.detail,
                            episode_start=blindness.episode_start, frame=image if self.keep_frames else None,
                            colour=self.source.colour)
        self.warn(f"blind:{blindness.reason}", f"warning: {event.error}")
        for worker in self.workers:
            if worker.sink.accepts(event):
                worker.submit(event, wait=not self.source.live)

    def _skip(self, kind: str, name: str, message: str, captured_at: str | None = None) -> None:
        """Count a skipped (corrupt) frame, warn, and log it in the JSONL."""
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
            if self.blind is not None:
                self.blind.reset()  # the reopened stream's first frame repeats nothing
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
            verdicts = self._inspect_retrying(np.stack(images))  # [B, H, W, 3] in
            if verdicts is None:  # aborted while the backend was unavailable
                return
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

    def _inspect_retrying(self, images: np.ndarray) -> list[Verdict] | None:
        """``inspect``, retried with backoff while the backend is unavailable (a remote server restarting).

        Like a lost camera: counted (``server_lost``), reported, retried until it answers; the batch is
        kept, so no frame loses its verdict. None when the run is aborted meanwhile.
        """
        delay, attempt = self.config.reconnect_initial_s, 0
        while True:
            try:
                verdicts = self.inspector.inspect(images)
            except BackendUnavailableError as error:
                attempt += 1
                if attempt == 1:
                    self.stats.count("server_lost")
                    self.report(f"warning: {error} Retrying.")
                else:
                    self.warn("backend", f"warning: still no answer (attempt {attempt}): {error}")
                self._busy_since = None  # waiting for a server is not a hung call
                if self.abort.wait(delay):
                    return None
                delay = min(delay * 2, self.config.reconnect_max_s)
                self._busy_since = time.perf_counter()
                continue
            if attempt:
                self.report(f"the inference backend answers again after {attempt} failed attempt(s).")
            return verdicts

    def _prepared(self, batch: list[_Captured]) -> tuple[list[_Captured] | None, list[np.ndarray]]:
        """The items whose preprocessing worked, with their images; (None, []) after a configuration error.

        A frame that cannot be prepared is skipped as corrupt, unless it is the first one: then the
        settings (e.g. a ROI outside the frame) are wrong for this source and the run fails.
        """
        kept, images = [], []
        for item in batch:
            try:
                images.append(self.preparer.result(item.image, item.frame, self.source.colour))
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
        if verdict.is_unknown:
            self.stats.count("unknown")
        needs_look = bool(verdict.is_anomalous or verdict.is_unknown)  # an UNKNOWN part needs a person too
        overlay = self.overlay_sink.plan(item.index, item.name, needs_look) if self.overlay_sink else None
        if overlay is None and needs_look and self.overlay_sink is not None:
            self.stats.update_sink(self.overlay_sink.name, skipped=1)
        # Only overlays and video outputs need the map and the frame; dropping them keeps queued results small.
        keep = overlay is not None or self.keep_frames
        kept_map = np.array(verdict.anomaly_map, copy=True) if keep else None
        result = InspectionResult(
            index=item.index,
            name=item.name,
            captured_at=item.captured_at,
            verdict=dataclasses.replace(verdict, anomaly_map=kept_map),
            latency_ms=latency_ms,
            overlay=overlay,
            frame=item.frame if keep else None,
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
            try:
                self.inspector.inspect(np.zeros((1, height, width, 3), dtype=np.uint8))  # warm-up: lazy init off the clock
            except Exception as error:
                raise ReconadError(f"Inference failed on a warm-up frame: {describe_error(error)}.") from None
            if not self.source.is_open:
                self.source.open()
        except BaseException:
            self._close_sinks()  # no worker will: release files, sockets and threads the sinks hold
            raise
        metrics = self.metrics
        self.stats = LoopStats(on_latency=metrics.observe_latency if metrics else None)  # the clock starts now
        if metrics is not None:
            metrics.bind(self.stats)
        self.workers = [SinkWorker(sink, self.stats, self.warn, self.abort) for sink in self.sinks]
        previous = self._install_signal_handlers() if handle_signals else {}
        # background workers (line/preprocess.py): preparing the next frames gets the CPU inference leaves
        self.preparer = FramePreparer(self.inspector.input_hw, config.roi, config.preprocess_threads,
                                      on_latency=lambda ms: self.stats.add_latency("preprocess", ms),
                                      on_inline=lambda: self.stats.count("prepared_inline"))
        capture = threading.Thread(target=self._capture_main, name="capture", daemon=True)
        inference = threading.Thread(target=self._inference_main, name="inference", daemon=True)
        for worker in self.workers:
            worker.thread.start()
        inference.start()
        capture.start()
        next_report = time.monotonic() + config.stats_interval_s
        next_progress = time.monotonic() + config.summary_interval_s
        try:
            while inference.is_alive() and not self.stop.is_set():
                inference.join(timeout=0.1)
                self._watch_inference()
                self._watch_source()
                if config.stats_interval_s > 0 and time.monotonic() >= next_report:
                    next_report = time.monotonic() + config.stats_interval_s
                    self.report(self.stats.snapshot().status_line())
                if self.on_progress is not None and config.summary_interval_s > 0 and time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + config.summary_interval_s
                    self._progress()
        finally:
            self.stop.set()
            capture.join(timeout=config.drain_timeout_s)  # a camera read can block for good; it is a daemon
            self.frames.close()  # the inference thread drains what is queued, then ends
            while inference.is_alive() and not self._watch_inference():
                inference.join(timeout=0.1)
            self.preparer.close()
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

    def _progress(self) -> None:
        try:
            self.on_progress(self.stats.snapshot(mark_rate=False))
        except Exception as error:  # e.g. summary.json on a full disk: report, go on
            self.warn("progress", f"warning: cannot record the run's progress: {describe_error(error)}")

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as error:
                self.report(f"warning: sink {sink.name} failed to close: {describe_error(error)}")

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
    metrics: StatsObserver | None = None,
    on_progress: Callable[[StatsSnapshot], None] | None = None,
) -> LoopResult:
    """Inspect ``source`` until it ends, ``config.max_frames`` verdicts, SIGINT/SIGTERM, or a fatal error.

    Opens the source (a ``ReconadError`` if it cannot), warms the inspector up, then runs the threads;
    the calling thread reports a status line every ``config.stats_interval_s``, calls ``on_progress``
    every ``config.summary_interval_s`` and watches the others. Sinks are closed (flushed) before it
    returns, also when it raises; it never closes the inspector.

    Args:
        source: an unopened ``FrameSource``; it is closed on return.
        inspector: ``reconad.runtime.Inspector`` or anything with ``input_hw`` and ``inspect``.
        config: loop settings (the sink fields are read by ``session.build_sinks``, not here).
        sinks: where results go; see ``session.build_sinks``.
        report: receives status lines and warnings.
        handle_signals: turn SIGINT/SIGTERM into a clean stop (main thread only).
        metrics: bound to the run's ``LoopStats`` and fed every latency sample (``--metrics-port``).
        on_progress: receives a snapshot while the run goes on (``summary.json`` refreshes).
    """
    return InspectionLoop(source, inspector, config, sinks, report, metrics, on_progress).run(handle_signals)
