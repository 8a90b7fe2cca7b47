"""Prometheus metrics of a running line on ``--metrics-port`` (prometheus_client, extra ``line``).

Each number has one source, so ``/metrics``, the status line and ``summary.json`` never disagree:
- frame counters, sink counters and the source state are read from the loop's ``LoopStats`` at scrape
  time (nothing is counted twice);
- latency histograms per stage are fed every sample by ``LoopStats``'s ``on_latency`` hook (a histogram
  needs every sample; the stats keep only a recent window for percentiles);
- verdicts per product come from the results themselves, as a sink: only a result knows its product
  (``category``, from issue 11's graph output, else ``"all"``) and its score against the threshold.
The HTTP endpoint binds to 127.0.0.1 unless an address is given.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.blind import BLIND_REASONS

LOOPBACK = "127.0.0.1"
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
SCORE_RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)  # image_score / threshold
FRAME_COUNTERS = {  # LoopStats counter -> (metric name, help)
    "captured": ("reconad_frames_captured", "Frames read from the source."),
    "inspected": ("reconad_frames_inspected", "Frames with a verdict."),
    "anomalous": ("reconad_frames_anomalous", "Frames judged anomalous."),
    "dropped": ("reconad_frames_dropped", "Frames dropped unseen because inference fell behind a live source."),
    "source_lost": ("reconad_source_lost", "Times the live source stopped delivering."),
    "reconnects": ("reconad_camera_reconnects", "Times the live source was reopened."),
    "prepared_inline": ("reconad_frames_prepared_inline",
                        "Frames the inference thread prepared itself (the idle-priority preprocessing workers were behind)."),
}
SKIP_REASONS = ("corrupt",)
SOURCE_STATES = ("ok", "stalled", "reconnecting", "ended")


def import_prometheus() -> Any:
    """prometheus_client, or a one-sentence ``ReconadError`` naming the extra to install."""
    try:
        import prometheus_client
    except ImportError:
        raise ReconadError("--metrics-port needs prometheus_client; install it with pip install 'reconad[line]'.") from None
    return prometheus_client


def verdict_label(verdict: Any) -> str:
    """``"ng"``, ``"ok"``, ``"unknown"`` (a part unlike every product) or ``"uncalibrated"``."""
    if getattr(verdict, "known_product", True) is False:
        return "unknown"
    if verdict.is_anomalous is None:
        return "uncalibrated"
    return "ng" if verdict.is_anomalous else "ok"


class LineMetrics:
    """The metrics of one run, in their own registry; also the loop's ``metrics`` sink.

    Exposed (all prefixed ``reconad_``): ``frames_{captured,inspected,anomalous,dropped}_total``,
    ``frames_skipped_total{reason}``, ``source_lost_total``, ``camera_reconnects_total``, ``fps``
    (inspected frames per second since the previous scrape), ``camera_blind_total{reason}``,
    ``source_state{state}``, ``uptime_seconds``,
    ``sink_results_total{sink,outcome}``, ``stage_latency_seconds{stage}`` (histogram),
    ``verdicts_total{category,verdict}``, ``score_to_threshold_ratio{category}`` (histogram), and for an
    MQTT sink given to ``watch_mqtt``: ``mqtt_messages_total{outcome}``, ``mqtt_buffered``,
    ``mqtt_connected``, ``mqtt_disconnects_total``.

    Usage: among the loop's sinks and as ``run_inspection(..., metrics=metrics)`` (which binds the run's
    ``LoopStats`` and feeds its latencies), with ``serve_metrics(metrics, port)``.
    """

    name = "metrics"

    def __init__(self, queue_size: int = 256) -> None:
        prometheus = import_prometheus()
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self._families = (CounterMetricFamily, GaugeMetricFamily)
        self.queue_size = queue_size
        self.registry = prometheus.CollectorRegistry(auto_describe=True)
        self._latency = prometheus.Histogram(
            "reconad_stage_latency_seconds",
            "Latency per stage: capture, preprocess, queue, inference (per batch), capture_to_decision, sink:<name>.",
            ["stage"], buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self._verdicts = prometheus.Counter(
            "reconad_verdicts", "Verdicts per product (category; 'all' when the model names none).",
            ["category", "verdict"], registry=self.registry,
        )
        self._ratio = prometheus.Histogram(
            "reconad_score_to_threshold_ratio", "image_score / threshold per product: 1 is the decision boundary.",
            ["category"], buckets=SCORE_RATIO_BUCKETS, registry=self.registry,
        )
        self._lock = threading.Lock()
        self._stats: Any = None
        self._mqtt: Any = None
        self._rate_mark: tuple[float, int] | None = None
        self.registry.register(_ScrapeCollector(self))

    # feeding ------------------------------------------------------------------------------------------

    def bind(self, stats: Any) -> None:
        """Read frame and sink counters from this ``LoopStats`` at each scrape (a new run: bind again)."""
        with self._lock:
            self._stats, self._rate_mark = stats, None

    def watch_mqtt(self, sink: Any) -> None:
        """Export this ``MqttSink``'s message counters and connection state."""
        with self._lock:
            self._mqtt = sink

    def observe_latency(self, stage: str, latency_ms: float) -> None:
        """``LoopStats``'s ``on_latency`` hook: one sample of one stage, in milliseconds."""
        self._latency.labels(stage).observe(latency_ms / 1e3)

    # the sink ------------------------------------------------------------------------------------------

    def accepts(self, result: Any) -> bool:
        return getattr(result, "verdict", None) is not None

    def write(self, result: Any) -> bool:
        verdict = result.verdict
        category = getattr(verdict, "category", None) or "all"
        self._verdicts.labels(category, verdict_label(verdict)).inc()
        if verdict.threshold:
            self._ratio.labels(category).observe(float(verdict.image_score) / float(verdict.threshold))
        return True

    def close(self) -> None:
        pass

    # scraping ------------------------------------------------------------------------------------------

    def _collect(self):
        counter_family, gauge_family = self._families
        with self._lock:
            stats, mqtt = self._stats, self._mqtt
        if stats is not None:
            snapshot = stats.snapshot(mark_rate=False)
            counters = snapshot.counters
            for key, (name, help_text) in FRAME_COUNTERS.items():
                yield counter_family(name, help_text, value=counters[key])
            skipped = counter_family("reconad_frames_skipped", "Frames read but skipped, by reason.", labels=["reason"])
            for reason in SKIP_REASONS:
                skipped.add_metric([reason], counters[reason])
            yield skipped
            blind = counter_family("reconad_camera_blind", "Camera-blind frames (not judged), by reason.",
                                   labels=["reason"])
            for reason in BLIND_REASONS:
                blind.add_metric([reason], counters[f"blind_{reason}"])
            yield blind
            now = time.monotonic()
            with self._lock:
                mark, self._rate_mark = self._rate_mark, (now, counters["inspected"])
            fps = snapshot.mean_fps if mark is None or now <= mark[0] else (counters["inspected"] - mark[1]) / (now - mark[0])
            yield gauge_family("reconad_fps", "Inspected frames per second since the previous scrape.", value=fps)
            state = gauge_family("reconad_source_state", "1 for the source's current state.", labels=["state"])
            for name in SOURCE_STATES:
                state.add_metric([name], 1.0 if snapshot.source_state == name else 0.0)
            yield state
            yield gauge_family("reconad_uptime_seconds", "Seconds since the loop started.", value=snapshot.elapsed_s)
            sinks = counter_family("reconad_sink_results", "Results per sink and outcome.", labels=["sink", "outcome"])
            for sink_name, sink in snapshot.sinks.items():
                for outcome in ("written", "skipped", "dropped", "errors"):
                    sinks.add_metric([sink_name, outcome], getattr(sink, outcome))
            yield sinks
        if mqtt is not None:
            values = mqtt.counters()
            messages = counter_family("reconad_mqtt_messages", "MQTT messages by outcome.", labels=["outcome"])
            for outcome in ("queued", "sent", "acknowledged", "dropped"):
                messages.add_metric([outcome], getattr(values, outcome))
            yield messages
            yield gauge_family("reconad_mqtt_buffered", "MQTT messages waiting for the broker.", value=values.buffered)
            yield gauge_family("reconad_mqtt_connected", "1 while connected to the broker.", value=float(mqtt.connected))
            yield counter_family("reconad_mqtt_disconnects", "Broker connections lost.", value=values.disconnects)


class _ScrapeCollector:
    """prometheus_client's custom-collector protocol over ``LineMetrics._collect``."""

    def __init__(self, metrics: LineMetrics) -> None:
        self._metrics = metrics

    def collect(self):
        return self._metrics._collect()

    def describe(self):
        return []  # values exist only once a run is bound: nothing to describe up front


class MetricsServer:
    """``/metrics`` over HTTP on ``address:port`` (prometheus_client's threaded WSGI server).

    Attributes:
        url: e.g. ``http://127.0.0.1:9100/metrics``.
    """

    def __init__(self, metrics: LineMetrics, port: int, address: str = LOOPBACK) -> None:
        prometheus = import_prometheus()
        if not 0 <= port <= 65535:
            raise ReconadError(f"The metrics port must be 0..65535, got {port}.")
        try:
            self._server, self._thread = prometheus.start_http_server(port, addr=address, registry=metrics.registry)
        except OSError as error:
            raise ReconadError(f"Cannot serve metrics on {address}:{port}: {error.strerror or error}.") from None
        bound_port = self._server.server_address[1]
        host = f"[{address}]" if ":" in address else address
        self.url = f"http://{host}:{bound_port}/metrics"
        self.port = bound_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(metrics: LineMetrics, port: int, address: str | None = None) -> MetricsServer:
    """Start ``/metrics`` for ``--metrics-port`` (and ``--metrics-address``, loopback when None)."""
    return MetricsServer(metrics, port, address or LOOPBACK)

