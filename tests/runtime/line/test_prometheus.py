"""The Prometheus endpoint, scraped over HTTP like a Prometheus server would, fed by a real loop run."""

import socket
import types
import urllib.request

import numpy as np
import pytest

pytest.importorskip("prometheus_client", reason="needs prometheus_client: pip install 'reconad[line]'")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from reconad.runtime.errors import ReconadError  # noqa: E402
from reconad.runtime.inspector import Verdict  # noqa: E402
from reconad.runtime.line.prometheus import LineMetrics, serve_metrics  # noqa: E402
from reconad.runtime.line.sinks import InspectionResult  # noqa: E402
from reconad.runtime.line.sources import SourceLostError  # noqa: E402
from reconad.runtime.line.stats import LoopStats  # noqa: E402
from tests.runtime.fakes import FakeInspector, ScriptedSource, gray_frame  # noqa: E402
from tests.runtime.line.test_outputs import _non_loopback_address  # noqa: E402


def scrape(server):
    with urllib.request.urlopen(server.url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics_server():
    metrics = LineMetrics()
    server = serve_metrics(metrics, 0)
    yield metrics, server
    server.close()


def result(index, score, threshold=0.5, category=None):
    is_anomalous = None if threshold is None else score >= threshold
    if category is None:
        verdict = Verdict(image_score=score, is_anomalous=is_anomalous, threshold=threshold,
                          anomaly_map=np.zeros((2, 2), np.float32))
    else:  # issue 11's verdicts name the product
        verdict = types.SimpleNamespace(image_score=score, is_anomalous=is_anomalous, threshold=threshold,
                                        category=category)
    return InspectionResult(index=index, name=f"cam#{index}", captured_at="t", verdict=verdict, latency_ms=1.0)


def test_counters_latencies_and_verdicts_per_product(metrics_server):
    metrics, server = metrics_server
    stats = LoopStats(on_latency=metrics.observe_latency)
    metrics.bind(stats)
    stats.count("captured", 12)
    stats.count("inspected", 10)
    stats.count("dropped", 2)
    stats.count("blind", 3)
    stats.count("blind_frozen", 3)
    stats.count("reconnects")
    stats.update_sink("jsonl", written=10, errors=1)
    for latency_ms in (0.3, 4.0, 40.0, 400.0):
        stats.add_latency("inference", latency_ms)
    for index, (score, category) in enumerate([(0.9, "washer"), (0.1, "washer"), (0.2, "wood"), (0.7, None)]):
        metrics.write(result(index, score, category=category))
    metrics.write(result(9, 0.9, threshold=None))
    samples = scrape(server)
    assert value(samples, "reconad_frames_captured_total") == 12
    assert value(samples, "reconad_frames_inspected_total") == 10
    assert value(samples, "reconad_frames_dropped_total") == 2
    assert value(samples, "reconad_camera_blind_total", reason="frozen") == 3
    assert value(samples, "reconad_camera_blind_total", reason="black") == 0
    assert value(samples, "reconad_camera_reconnects_total") == 1
    assert value(samples, "reconad_sink_results_total", sink="jsonl", outcome="errors") == 1
    assert value(samples, "reconad_source_state", state="ok") == 1
    assert value(samples, "reconad_stage_latency_seconds_count", stage="inference") == 4
    assert value(samples, "reconad_stage_latency_seconds_bucket", stage="inference", le="0.005") == 2
    assert value(samples, "reconad_stage_latency_seconds_sum", stage="inference") == pytest.approx(0.4443)
    assert value(samples, "reconad_verdicts_total", category="washer", verdict="ng") == 1
    assert value(samples, "reconad_verdicts_total", category="washer", verdict="ok") == 1
    assert value(samples, "reconad_verdicts_total", category="wood", verdict="ok") == 1
    assert value(samples, "reconad_verdicts_total", category="all", verdict="ng") == 1
    assert value(samples, "reconad_verdicts_total", category="all", verdict="uncalibrated") == 1
    assert value(samples, "reconad_score_to_threshold_ratio_bucket", category="washer", le="1.0") == 1
    stats.count("inspected", 5)
    assert value(scrape(server), "reconad_fps") > 0  # 5 frames since the previous scrape
    # Scraping does not disturb the status line's rate: its snapshot still sees all 15 frames.
    assert stats.snapshot().fps > 0


def test_a_loop_run_feeds_the_endpoint(metrics_server):
    from reconad.runtime.line.config import InspectConfig
    from reconad.runtime.line.loop import run_inspection

    metrics, server = metrics_server
    script = [gray_frame(60 + n) for n in range(4)] + [SourceLostError("fake://camera stopped delivering frames.")]
    script += [gray_frame(200 + n) for n in range(6)]
    source = ScriptedSource(script)
    config = InspectConfig(stats_interval_s=0, reconnect_initial_s=0.01, queue_size=100)
    outcome = run_inspection(source, FakeInspector(), config, [metrics], report=lambda line: None, handle_signals=False,
                             metrics=metrics)
    assert outcome.stats.counters["inspected"] == 10
    samples = scrape(server)
    assert value(samples, "reconad_frames_inspected_total") == 10
    assert value(samples, "reconad_frames_anomalous_total") == 6
    assert value(samples, "reconad_source_lost_total") == value(samples, "reconad_camera_reconnects_total") == 1
    assert value(samples, "reconad_source_state", state="ended") == 1
    assert value(samples, "reconad_verdicts_total", category="all", verdict="ng") == 6
    assert value(samples, "reconad_verdicts_total", category="all", verdict="ok") == 4
    assert value(samples, "reconad_sink_results_total", sink="metrics", outcome="written") == 10
    for stage in ("capture", "preprocess", "queue", "inference", "capture_to_decision", "sink:metrics"):
        assert value(samples, "reconad_stage_latency_seconds_count", stage=stage) >= 1, stage


def test_mqtt_counters_are_exported(metrics_server):
    from reconad.runtime.line.mqtt import MqttCounters

    metrics, server = metrics_server
    sink = types.SimpleNamespace(connected=True, counters=lambda: MqttCounters(queued=5, sent=4, acknowledged=3,
                                                                               dropped=1, buffered=1, disconnects=2))
    metrics.watch_mqtt(sink)
    samples = scrape(server)
    assert value(samples, "reconad_mqtt_messages_total", outcome="dropped") == 1
    assert value(samples, "reconad_mqtt_buffered") == 1 and value(samples, "reconad_mqtt_connected") == 1
    assert value(samples, "reconad_mqtt_disconnects_total") == 2


def test_the_endpoint_listens_on_loopback_only_and_refuses_a_taken_port(metrics_server):
    metrics, server = metrics_server
    assert server.url.startswith("http://127.0.0.1:")
    address = _non_loopback_address()
    if address is not None:
        with pytest.raises(OSError):
            socket.create_connection((address, server.port), timeout=2).close()
    with pytest.raises(ReconadError, match=f"Cannot serve metrics on 127.0.0.1:{server.port}"):
        serve_metrics(LineMetrics(), server.port)
