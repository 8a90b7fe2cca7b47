"""Where the inspection loop's verdicts go: a JSONL event log (rotated by size) and annotated overlays of
anomalies, the events every sink receives, and the worker thread each sink runs on. The webhook, MQTT,
Prometheus and video outputs are sinks of their own modules (``webhook.py``, ``mqtt.py``,
``prometheus.py``, ``video_sink.py``/``render_process.py``).

Each sink runs on its own thread behind a drop-oldest queue (``reconad.runtime.line.loop``), so a slow disk
or network never stalls inference. A sink raises on failure; its worker counts, reports and moves on.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.priority import lower_thread_priority
from reconad.runtime.line.queues import DropOldestQueue
from reconad.runtime.line.report import RateLimitedReporter
from reconad.runtime.line.stats import LoopStats
from reconad.runtime.inspector import Verdict
from reconad.runtime.frames import Roi
from reconad.runtime.line.render import render_result, write_png

VERDICTS_FILE = "verdicts.jsonl"
OVERLAY_DIR = "overlays"
OVERLAY_MODES = ("anomalies", "all", "none")


@dataclasses.dataclass(frozen=True)
class InspectionResult:
    """One inspected frame, as every sink receives it.

    Attributes:
        index: the frame's sequence number in this run (0-based, over captured frames).
        name: the frame's name: a file path relative to the folder, or ``"<uri>#<n>"``.
        captured_at: ISO 8601 UTC time (milliseconds) the frame was read.
        verdict: the Inspector's verdict; its ``anomaly_map`` is only kept when an overlay is planned.
        latency_ms: capture to decision.
        overlay: path, relative to the output folder, of the overlay planned for this frame, or None.
        frame: the original frame (only when an overlay is planned), in ``colour`` order.
        colour: ``"RGB"`` or ``"BGR"``.
        roi: the (x, y, width, height) region of ``frame`` the model saw, or None.
    """

    index: int
    name: str
    captured_at: str
    verdict: Verdict
    latency_ms: float
    overlay: str | None = None
    frame: np.ndarray | None = None
    colour: str = "RGB"
    roi: Roi | None = None

    event = "verdict"  # what MQTT and webhook messages call it

    def record(self) -> dict[str, Any]:
        """The JSON event: ``frame``, ``time``, ``latency_ms``, ``file``, the verdict's fields and ``overlay``."""
        record = {"frame": self.index, "time": self.captured_at, "latency_ms": round(self.latency_ms, 3)}
        return record | {"file": self.name} | self.verdict.record() | {"overlay": self.overlay}


@dataclasses.dataclass(frozen=True)
class FrameFault:
    """A frame that was read but skipped (unreadable, corrupt, blank); only the JSONL log records it.

    Attributes:
        name: the frame's name, as in ``InspectionResult``.
        captured_at: ISO 8601 UTC time it was read.
        error: why it was skipped, one sentence.
    """

    name: str
    captured_at: str
    error: str

    event = "fault"

    def record(self) -> dict[str, Any]:
        """The JSON event: ``{"time", "file", "error"}``."""
        return {"time": self.captured_at, "file": self.name, "error": self.error}


@dataclasses.dataclass(frozen=True)
class CameraBlind:
    """A frame the camera-blind checks (``blind.py``) refused to judge: black, saturated, flat or frozen.

    Every sink sees it, so a controller hears that the camera is blind rather than a stream of OK
    verdicts. Its JSONL line keeps an ``error`` key, so readers that skip faulty frames skip it too.

    Attributes:
        name: the frame's name, as in ``InspectionResult``.
        captured_at: ISO 8601 UTC time it was read.
        reason: ``"black"``, ``"saturated"``, ``"flat"`` or ``"frozen"``.
        detail: the measurement against its threshold.
        episode_start: the first blind frame after a seeing one (the webhook posts these only).
        frame: the frame itself, for video outputs (None when no sink needs frames).
        colour: its channel order.
    """

    name: str
    captured_at: str
    reason: str
    detail: str
    episode_start: bool = True
    frame: np.ndarray | None = None
    colour: str = "BGR"

    event = "camera_blind"

    @property
    def error(self) -> str:
        return f"{self.name} is camera-blind ({self.reason}): {self.detail}."

    def record(self) -> dict[str, Any]:
        """The JSON event: ``{"time", "file", "camera_blind": reason, "error"}``."""
        return {"time": self.captured_at, "file": self.name, "camera_blind": self.reason, "error": self.error}


Event = InspectionResult | FrameFault | CameraBlind


class Sink(Protocol):
    """A consumer of results, driven by one worker thread.

    Attributes:
        name: short name for stats and warnings (``"jsonl"``, ``"overlays"``, ``"webhook"``).
        queue_size: how many results may wait for it before the oldest is dropped.
        heavy: optional, default False. True for sinks that render or encode images (overlays, video
            outputs): their thread runs below inference's priority (``priority.SINK_NICENESS``). Light sinks
            (JSON lines, webhook, MQTT, metrics) keep the default priority, so a verdict reaches the
            PLC or the dashboard without waiting behind an encoder.
    """

    name: str
    queue_size: int

    def accepts(self, result: Event) -> bool:
        """Whether this result is for this sink (called on the loop's threads: must be cheap)."""
        ...

    def write(self, result: Event) -> bool:
        """Handle one result; False when deliberately skipped (rate limit, quota). Raises on failure."""
        ...

    def close(self) -> None:
        """Flush and release; called once, after the last ``write``."""
        ...


class JsonlSink:
    """One JSON line per inspected (or skipped) frame, appended to ``path`` and handed to the OS at once.

    Each line is one ``os.write`` on an ``O_APPEND`` descriptor: nothing waits in a Python buffer, so
    a killed process loses no finished verdict, and a failed write (disk full) loses only that line.
    With ``max_bytes``, a line that would take the file past it first rotates the log, as logrotate and
    Python's RotatingFileHandler do: ``verdicts.jsonl`` becomes ``verdicts.jsonl.1``, ``.1`` becomes
    ``.2``..., and only the ``keep`` newest rotated files are kept (at 30 fps a line a frame is about
    0.8 GB a day). Lines are never split across files.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike, queue_size: int = 256, run_id: str | None = None,
                 max_bytes: int = 0, keep: int = 0) -> None:
        if max_bytes < 0 or keep < 0:
            raise ReconadError("The JSONL size limit and the number of rotated files kept must be >= 0.")
        self.path = Path(path)
        self.queue_size = queue_size
        self.run_id = run_id
        self.max_bytes, self.keep = max_bytes, keep
        self.rotations = 0
        self._descriptor: int | None = None
        self._open()
        self._torn = False  # a failed write may have left half a line: start the next one on a new line

    def _open(self) -> None:
        try:
            self._descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise ReconadError(f"Cannot open {self.path} for writing: {error.strerror}.") from None
        self._size = os.fstat(self._descriptor).st_size

    def rotated_path(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def _rotate(self) -> None:
        os.close(self._descriptor)
        self._descriptor = None
        for number in range(self.keep, 0, -1):  # .keep goes away, .N -> .N+1, the live file -> .1
            source = self.rotated_path(number - 1) if number > 1 else self.path
            if number == self.keep and self.rotated_path(number).exists():
                self.rotated_path(number).unlink()
            if source.exists():
                os.replace(source, self.rotated_path(number))
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        self.rotations += 1
        self._open()

    def accepts(self, result: Event) -> bool:
        return True

    def write(self, result: Event) -> bool:
        record = result.record()
        if self.run_id is not None:
            record = {"run": self.run_id, **record}
        line = ("\n" if self._torn else "") + json.dumps(record) + "\n"
        data = line.encode("utf-8")
        if self.max_bytes and self._size > 0 and self._size + len(data) > self.max_bytes:
            self._rotate()
            data = data.lstrip(b"\n")
        self._torn = True
        while data:
            written = os.write(self._descriptor, data)
            data = data[written:]
            self._size += written
        self._torn = False
        return True

    def close(self) -> None:
        if self._descriptor is None:
            return
        try:
            os.fsync(self._descriptor)
        except OSError:
            pass  # fsync fails on pipes and full disks; every line already reached the OS
        finally:
            os.close(self._descriptor)
            self._descriptor = None


class OverlaySink:
    """PNG overlays (``render.render_result``: verdict banner, heat, outline, colour bar) in ``out_dir/overlays/<frame index>.png``, rate-limited and within a quota.

    ``mode`` is one of ``OVERLAY_MODES``, as ``recon-inspect run --overlays``.
    ``plan`` runs on the inference thread: it picks which frames get an overlay (at most one per
    ``min_interval_s``, none once the folder holds ``quota_mb``) and names the file, so the JSONL line
    can point to it. ``write`` renders and saves it unless the quota filled up meanwhile (so the folder
    exceeds the quota by at most one file) or the disk has under ``min_free_mb`` free; a JSONL line may
    then name an overlay that was not written. The heat scale (``low``, ``high``) and the pixel threshold
    are the global ones, or, with ``scales``, those of each verdict's category.
    """

    name = "overlays"
    heavy = True  # renders and writes images: runs below inference's priority

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        mode: str = "anomalies",
        name_by_file: bool = False,
        min_interval_s: float = 1.0,
        quota_mb: float = 500.0,
        min_free_mb: float = 200.0,
        queue_size: int = 4,
        low: float | None = None,
        high: float | None = None,
        pixel_threshold: float | None = None,
        scales: Callable[[str | None], tuple[float | None, float | None, float | None]] | None = None,
        warn: Callable[[str], None] = print,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.mode = mode
        self.name_by_file = name_by_file
        self.folder = self.out_dir / OVERLAY_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.min_interval_s = min_interval_s
        self.quota_bytes = int(quota_mb * 1e6)
        self.min_free_bytes = int(min_free_mb * 1e6)
        self.queue_size = queue_size
        self.low, self.high, self.pixel_threshold = low, high, pixel_threshold
        self.scales = scales  # category -> (low, high, pixel threshold)
        self._lock = threading.Lock()
        self._used_bytes = sum(path.stat().st_size for path in self.folder.rglob("*") if path.is_file())
        self._last_planned: float | None = None
        self._warn = warn
        self._warned: set[str] = set()

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            self._warn(message)

    def plan(self, index: int, name: str, is_anomalous: bool | None) -> str | None:
        """The overlay path (relative to ``out_dir``) for this frame, or None when none will be written.

        ``overlays/<index>.png`` for camera frames; ``overlays/<name>.png`` with ``name_by_file`` (an image
        folder; the image's suffix is kept, a.jpg -> a.jpg.png, so names cannot collide).
        """
        if self.mode == "none" or (self.mode == "anomalies" and not is_anomalous):
            return None
        now = time.monotonic()
        with self._lock:
            if self._last_planned is not None and now - self._last_planned < self.min_interval_s:
                return None
            if self._used_bytes >= self.quota_bytes:
                self._warn_once("quota", f"{self.folder} holds {self._used_bytes / 1e6:.0f} MB, the overlay quota: no more overlays.")
                return None
            self._last_planned = now
        if self.name_by_file:
            return f"{OVERLAY_DIR}/{name}" + ("" if name.lower().endswith(".png") else ".png")
        return f"{OVERLAY_DIR}/{index:08d}.png"

    def accepts(self, result: Event) -> bool:
        return isinstance(result, InspectionResult) and result.overlay is not None

    def write(self, result: InspectionResult) -> bool:
        with self._lock:
            full = self._used_bytes >= self.quota_bytes  # checked again: overlays planned before it filled up
        if full:
            return False
        if shutil.disk_usage(self.folder).free < self.min_free_bytes:
            self._warn_once("disk", f"under {self.min_free_bytes / 1e6:.0f} MB free on the disk of {self.folder}: overlays paused.")
            return False
        verdict = getattr(result, "verdict", None)
        low, high, pixel_threshold = (
            self.scales(getattr(verdict, "category", None)) if self.scales is not None
            else (self.low, self.high, self.pixel_threshold)
        )  # fmt: skip
        image = render_result(result, low=low, high=high, pixel_threshold=pixel_threshold)
        path = self.out_dir / result.overlay
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, image)
        with self._lock:
            self._used_bytes += path.stat().st_size
        return True

    def close(self) -> None:
        pass


def describe_error(error: BaseException) -> str:
    """One line for a sink failure, naming a full disk plainly."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "disk full (No space left on device)"
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class SinkWorker:
    """One sink on its own thread behind a drop-oldest queue; failures are counted and reported.

    A ``heavy`` sink's thread runs at a lower CPU priority than inference (``priority.SINK_NICENESS``): on a
    device whose CPU also infers, rendering and encoding take what inference leaves, and a live
    source's results queue for them (dropping the oldest) instead of slowing the next verdict. Light
    sinks (verdict messages, counters) keep the default priority: their work is small and their timing
    is what the line waits on.
    """

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
        if getattr(self.sink, "heavy", False):
            lower_thread_priority()
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
                        self._warn(f"sink:{name}",
                                   f"warning: sink {name} failed: {reason.removesuffix('.')}; the loop goes on.")
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
