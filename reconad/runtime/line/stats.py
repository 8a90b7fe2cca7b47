"""Live statistics of the inspection loop: counters, frame rate and latency percentiles per stage.

Every thread of the loop writes here; the main thread reads a ``StatsSnapshot`` for the status line,
the final summary and ``summary.json``. Latencies keep a bounded window of recent samples.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

LATENCY_WINDOW = 4096  # samples kept per stage: percentiles describe the recent past, memory stays flat
COUNTER_NAMES = (
    "captured",  # frames read from the source and queued for inference
    "inspected",  # frames with a verdict
    "anomalous",
    "unknown",  # frames not judged: unlike every training category (beyond the distance limit)
    "dropped",  # frames dropped unseen because inference fell behind a live source
    "corrupt",  # unreadable, undecodable or malformed frames, skipped
    "blind",  # camera-blind frames (black, saturated, flat or frozen: see line/blind.py), not judged
    "blind_black",
    "blind_saturated",
    "blind_flat",
    "blind_frozen",
    "source_lost",  # times a live source stopped delivering
    "reconnects",  # times it was reopened
    "server_lost",  # times a remote inference server became unreachable (the batch was retried)
    "prepared_inline",  # frames the inference thread prepared itself: the background workers were behind
)

BLIND_COUNTERS = tuple(name for name in COUNTER_NAMES if name.startswith("blind_"))


class LatencyWindow:
    """The last ``size`` latency samples of one stage, in milliseconds."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=size)
        self.count = 0

    def add(self, latency_ms: float) -> None:
        self._samples.append(latency_ms)
        self.count += 1

    def percentiles_ms(self) -> dict[str, float]:
        """``{"p50": ..., "p99": ..., "max": ...}`` over the window; empty when no sample yet."""
        if not self._samples:
            return {}
        samples = np.fromiter(self._samples, dtype=np.float64)
        p50, p99 = np.percentile(samples, [50, 99])
        return {"p50": round(float(p50), 3), "p99": round(float(p99), 3), "max": round(float(samples.max()), 3)}


@dataclasses.dataclass(frozen=True)
class SinkStats:
    """Counters of one sink: handled results, results dropped because it fell behind, failed writes."""

    written: int = 0
    dropped: int = 0
    errors: int = 0
    skipped: int = 0  # deliberately not written: rate limit or disk quota
    last_error: str | None = None


@dataclasses.dataclass(frozen=True)
class StatsSnapshot:
    """The loop's state at one moment; ``to_dict`` is what ``summary.json`` holds.

    Attributes:
        elapsed_s: seconds since the loop started.
        fps: inspected frames per second over the last reporting interval.
        mean_fps: inspected frames per second from the start of the loop to the last verdict.
        counters: see ``COUNTER_NAMES``.
        latency_ms: per stage, p50/p99/max over the recent window: ``capture`` (source read),
            ``preprocess`` (crop/resize, on a worker), ``queue`` (frame read to inference start, so
            preprocessing included), ``inference`` (per batch),
            ``capture_to_decision`` (frame read to verdict), ``sink:<name>`` (per write).
        sinks: per sink counters.
        source_state: ``"ok"``, ``"reconnecting"`` or ``"ended"``.
    """

    elapsed_s: float
    fps: float
    mean_fps: float
    counters: dict[str, int]
    latency_ms: dict[str, dict[str, float]]
    sinks: dict[str, SinkStats]
    source_state: str

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["fps"] = round(self.fps, 2)
        data["mean_fps"] = round(self.mean_fps, 2)
        return data

    def status_line(self) -> str:
        """One line for the terminal, e.g. ``28.9 fps | 1200 inspected, 3 anomalous | dropped 0 | ...``."""
        counters = self.counters
        parts = [
            f"{self.fps:.1f} fps",
            f"{counters['inspected']} inspected, {counters['anomalous']} anomalous, {counters['unknown']} unknown",
            f"dropped {counters['dropped']}",
        ]
        if counters["corrupt"]:
            parts.append(f"{counters['corrupt']} corrupt")
        if counters["blind"]:
            reasons = ", ".join(f"{counters[name]} {name[6:]}" for name in BLIND_COUNTERS if counters[name])
            parts.append(f"{counters['blind']} camera-blind ({reasons})")
        for stage in ("inference", "capture_to_decision"):
            latency = self.latency_ms.get(stage)
            if latency:
                parts.append(f"{stage} p50 {latency['p50']:.1f} / p99 {latency['p99']:.1f} ms")
        for name, sink in self.sinks.items():
            if sink.errors or sink.dropped:
                parts.append(f"{name}: {sink.errors} errors, {sink.dropped} dropped")
        if self.source_state != "ok":
            parts.append(f"source {self.source_state}")
        return " | ".join(parts)

    def summary_lines(self) -> list[str]:
        """The end-of-run summary, one fact per line."""
        counters = self.counters
        lines = [
            f"inspected {counters['inspected']} frames in {self.elapsed_s:.1f} s ({self.mean_fps:.1f} fps), "
            f"{counters['anomalous']} anomalous, {counters['unknown']} unknown",
            f"captured {counters['captured']}, dropped {counters['dropped']}, corrupt {counters['corrupt']}, "
            f"camera-blind {counters['blind']}, source lost {counters['source_lost']} times, "
            f"reconnected {counters['reconnects']}",
        ]
        if counters["blind"]:
            lines.append("camera-blind: " + ", ".join(f"{name[6:]} {counters[name]}" for name in BLIND_COUNTERS))
        if counters["server_lost"]:
            lines.append(f"inference server lost {counters['server_lost']} times (every frame retried)")
        if counters["prepared_inline"]:
            lines.append(f"prepared {counters['prepared_inline']} frames on the inference thread (the preprocessing "
                         "workers, which get only idle CPU, were behind)")
        for stage, latency in self.latency_ms.items():
            if latency:
                lines.append(f"latency {stage}: p50 {latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms, max {latency['max']:.2f} ms")
        for name, sink in self.sinks.items():
            line = f"sink {name}: {sink.written} written, {sink.skipped} skipped, {sink.dropped} dropped, {sink.errors} errors"
            lines.append(line + (f" (last: {sink.last_error})" if sink.last_error else ""))
        return lines


class LoopStats:
    """Thread-safe counters, latency windows and sink counters of one run.

    Args:
        on_latency: called with (stage, latency_ms) for every sample, outside the lock (e.g. a Prometheus
            histogram's observe, which needs every sample where the window keeps only the recent ones).
    """

    def __init__(self, on_latency: Callable[[str, float], None] | None = None) -> None:
        self.on_latency = on_latency
        self._lock = threading.Lock()  # every method takes it: counters are written from several threads
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._latencies: dict[str, LatencyWindow] = {}
        self._sinks: dict[str, SinkStats] = {}
        self._started = time.perf_counter()
        self._last_verdict: float | None = None
        self._rate_mark = (self._started, 0)  # (time, inspected) at the last snapshot
        self.source_state = "ok"

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] += amount
            if name == "inspected":
                self._last_verdict = time.perf_counter()

    def counter(self, name: str) -> int:
        with self._lock:
            return self._counters[name]

    def add_latency(self, stage: str, latency_ms: float) -> None:
        with self._lock:
            window = self._latencies.get(stage)
            if window is None:
                window = self._latencies[stage] = LatencyWindow()
            window.add(latency_ms)
        if self.on_latency is not None:
            self.on_latency(stage, latency_ms)

    def update_sink(self, name: str, **changes: Any) -> None:
        """Add to a sink's counters (``written=1``, ``errors=1``...); ``last_error`` is replaced."""
        with self._lock:
            sink = self._sinks.get(name, SinkStats())
            values = {
                key: value if key == "last_error" else getattr(sink, key) + value for key, value in changes.items()
            }
            self._sinks[name] = dataclasses.replace(sink, **values)

    def snapshot(self, mark_rate: bool = True) -> StatsSnapshot:
        """The current state; the ``fps`` field covers the time since the previous marking snapshot.

        ``mark_rate=False`` leaves that mark alone, for readers other than the status line (metrics).
        """
        with self._lock:
            now = time.perf_counter()
            inspected = self._counters["inspected"]
            mark_time, mark_inspected = self._rate_mark
            fps = (inspected - mark_inspected) / (now - mark_time) if now > mark_time else 0.0
            if mark_rate:
                self._rate_mark = (now, inspected)
            mean_fps = 0.0
            if self._last_verdict is not None and self._last_verdict > self._started:
                mean_fps = inspected / (self._last_verdict - self._started)
            return StatsSnapshot(
                elapsed_s=now - self._started,
                fps=fps,
                mean_fps=mean_fps,
                counters=dict(self._counters),
                latency_ms={stage: window.percentiles_ms() for stage, window in self._latencies.items()},
                sinks=dict(self._sinks),
                source_state=self.source_state,
            )
