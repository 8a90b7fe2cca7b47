"""The MQTT sink against a real broker on loopback: delivery, order, outages, drops, auth and TLS."""

import json
import statistics
import time

import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.mqtt import (
    PASSWORD_ENV,
    MqttConfig,
    MqttSink,
    MqttTarget,
    parse_mqtt_uri,
    resolve_credentials,
)
from tests.runtime.line.services import Subscriber, require_broker, wait_until

pytest.importorskip("paho.mqtt.client", reason="needs paho-mqtt: pip install 'reconad[line]'")

from reconad.runtime.inspector import Verdict  # noqa: E402
from reconad.runtime.line.sinks import FrameFault, InspectionResult  # noqa: E402

TOPIC = "line1/verdicts"


def result(index, score=0.2, threshold=0.5):
    verdict = Verdict(image_score=score, is_anomalous=score >= threshold, threshold=threshold,
                      anomaly_map=np.zeros((4, 4), np.float32))
    return InspectionResult(index=index, name=f"rtsp://cam#{index}", captured_at="2026-01-01T00:00:00.000+00:00",
                            verdict=verdict, latency_ms=12.5)


def sink_for(broker, warnings=None, **options):
    options = {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5, **options}
    config = MqttConfig(uri=f"mqtt://127.0.0.1:{broker.port}/{TOPIC}", **options)
    sink = MqttSink(config, warn=(warnings.append if warnings is not None else lambda line: None))
    assert wait_until(lambda: sink.connected, timeout_s=10), "the sink never connected"
    return sink


def frames_of(payloads):
    return [json.loads(payload)["frame"] for payload in payloads]


@pytest.mark.parametrize(
    ("uri", "target"),
    [
        ("mqtt://broker/line1/verdicts", MqttTarget("broker", 1883, "line1/verdicts", False)),
        ("mqtts://plc@10.0.0.5:9883/a/b", MqttTarget("10.0.0.5", 9883, "a/b", True, "plc")),
        ("mqtts://[::1]/t", MqttTarget("::1", 8883, "t", True)),
    ],
)
def test_parse_mqtt_uri(uri, target):
    assert parse_mqtt_uri(uri) == target


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("mqtt://plc:secret@broker/t", "process list"),
        ("mqtt://broker", "names no topic"),
        ("mqtt://broker/line/#", "wildcard"),
        ("http://broker/t", "mqtt://host"),
        ("mqtt://broker:99999/t", "invalid port"),
    ],
)
def test_bad_mqtt_uris_are_one_sentence_errors(uri, words):
    with pytest.raises(ReconadError, match=words):
        parse_mqtt_uri(uri)


def test_credentials_come_from_a_private_file_or_the_environment(tmp_path):
    target = parse_mqtt_uri("mqtt://plc@broker/t")
    assert resolve_credentials(target, MqttConfig(uri="mqtt://broker/t"), environ={PASSWORD_ENV: "from-env"}) == ("plc", "from-env")
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    secret.chmod(0o600)
    config = MqttConfig(uri="mqtt://broker/t", password_file=secret)
    assert resolve_credentials(target, config, environ={PASSWORD_ENV: "ignored"}) == ("plc", "from-file")
    secret.chmod(0o644)
    with pytest.raises(ReconadError, match="readable by other users"):
        resolve_credentials(target, config, environ={})
    with pytest.raises(ReconadError, match="no user"):
        resolve_credentials(parse_mqtt_uri("mqtt://broker/t"), MqttConfig(uri="mqtt://broker/t"), environ={PASSWORD_ENV: "p"})


def test_bad_options_are_refused():
    with pytest.raises(ReconadError, match="QoS"):
        MqttConfig(uri="mqtt://b/t", qos=3)
    with pytest.raises(ReconadError, match="events"):
        MqttConfig(uri="mqtt://b/t", events="some")


def test_every_verdict_and_fault_arrives_in_order_as_json(mqtt_broker):
    subscriber = Subscriber(mqtt_broker.port, f"{TOPIC}/#")
    sink = sink_for(mqtt_broker)
    try:
        for index in range(50):
            sink.write(result(index, score=0.9 if index % 10 == 0 else 0.1))
        sink.write(FrameFault(name="rtsp://cam#51", captured_at="2026-01-01T00:00:01.000+00:00", error="corrupt"))
        assert wait_until(lambda: len([m for m in subscriber.messages if m.topic == TOPIC]) == 51)
    finally:
        sink.close()
    verdicts = [json.loads(m.payload) for m in subscriber.messages if m.topic == TOPIC]
    assert [v["frame"] for v in verdicts[:50]] == list(range(50))
    assert verdicts[10] == {"event": "verdict", "frame": 10, "time": "2026-01-01T00:00:00.000+00:00",
                            "latency_ms": 12.5, "file": "rtsp://cam#10", "decision": "anomalous", "image_score": 0.9,
                            "is_anomalous": True, "threshold": 0.5, "normalized_score": None, "category": None,
                            "recognized_category": None, "category_distance": None, "is_unknown": False, "overlay": None}
    assert verdicts[50]["event"] == "fault" and verdicts[50]["error"] == "corrupt"
    assert wait_until(lambda: [m.payload for m in subscriber.messages if m.topic == f"{TOPIC}/status"][-1:] == [b"offline"])
    counters = sink.counters()
    assert counters.queued == counters.sent == counters.acknowledged == 51
    assert counters.dropped == counters.unsent == 0 and counters.connects == 1
    subscriber.close()


def test_anomalies_only(mqtt_broker):
    subscriber = Subscriber(mqtt_broker.port, TOPIC)
    sink = sink_for(mqtt_broker, events="anomalies")
    try:
        for index in range(20):
            item = result(index, score=0.9 if index % 5 == 0 else 0.1)
            if sink.accepts(item):
                sink.write(item)
        assert not sink.accepts(FrameFault(name="x", captured_at="t", error="blank"))
        assert wait_until(lambda: len(subscriber.messages) == 4)
    finally:
        sink.close()
        subscriber.close()
    assert frames_of(subscriber.payloads()) == [0, 5, 10, 15]


def _outage(broker, subscriber, sink, count):
    """Kill the broker, write ``count`` results while it is gone (timing each write), bring it back."""
    broker.kill()
    assert wait_until(lambda: not sink.connected, timeout_s=10)
    durations = []
    for index in range(100, 100 + count):
        started = time.perf_counter()
        sink.write(result(index))
        durations.append(time.perf_counter() - started)
    broker.start()
    assert subscriber.resubscribed(timeout_s=10)
    return durations


@pytest.mark.parametrize("qos", [1, 0])
def test_messages_written_while_the_broker_is_down_are_delivered_when_it_is_back(tmp_path, qos):
    broker = require_broker(tmp_path / "broker")
    subscriber = Subscriber(broker.port, TOPIC)
    subscriber.client.reconnect_delay_set(0.05, 0.1)
    warnings = []
    # The sink retries after 2 s, the subscriber after 0.1 s: it is subscribed again before anything is sent.
    sink = sink_for(broker, warnings, qos=qos, reconnect_min_s=2.0, reconnect_max_s=2.0)
    try:
        for index in range(10):
            sink.write(result(index))
        assert wait_until(lambda: len(subscriber.messages) == 10)
        durations = _outage(broker, subscriber, sink, 200)
        # Never waiting for the network: microseconds each (a loaded 2-core machine may preempt one).
        assert statistics.median(durations) < 0.005 and max(durations) < 1.0, "write() waited for the network"
        assert wait_until(lambda: len(subscriber.messages) == 210, timeout_s=15), len(subscriber.messages)
    finally:
        sink.close()
        subscriber.close()
        broker.stop()
    assert frames_of(subscriber.payloads()) == list(range(10)) + list(range(100, 300))
    counters = sink.counters()
    assert counters.dropped == 0 and counters.connects == 2 and counters.disconnects == 1
    assert any("lost the MQTT broker" in line for line in warnings)
    assert any("is back; 200 buffered message(s)" in line for line in warnings)


def test_a_full_buffer_drops_the_oldest_and_counts_them(tmp_path):
    broker = require_broker(tmp_path / "broker")
    subscriber = Subscriber(broker.port, TOPIC)
    subscriber.client.reconnect_delay_set(0.05, 0.1)
    sink = sink_for(broker, buffer_size=25, reconnect_min_s=2.0, reconnect_max_s=2.0)
    try:
        _outage(broker, subscriber, sink, 100)
        assert sink.counters().dropped == 75 and sink.counters().buffered == 25
        assert wait_until(lambda: len(subscriber.messages) == 25, timeout_s=15)
    finally:
        sink.close()
        subscriber.close()
        broker.stop()
    assert frames_of(subscriber.payloads()) == list(range(175, 200))  # the newest survive


def test_a_broker_that_never_comes_reports_what_was_not_delivered(tmp_path):
    from tests.runtime.line.services import free_port

    warnings = []
    config = MqttConfig(uri=f"mqtt://127.0.0.1:{free_port()}/{TOPIC}", reconnect_min_s=0.1, reconnect_max_s=0.2,
                        close_timeout_s=0.5)
    sink = MqttSink(config, warn=warnings.append)
    started = time.perf_counter()
    for index in range(30):
        sink.write(result(index))
    assert time.perf_counter() - started < 2.0  # no connect timeout per message
    time.sleep(0.3)
    sink.close()
    assert sink.counters().unsent == 30 and sink.counters().connects == 0
    assert any("cannot reach the MQTT broker" in line and "Connection refused" in line for line in warnings), warnings
    assert any("30 MQTT message(s)" in line and "never delivered" in line for line in warnings)


def test_username_password_and_tls(tmp_path):
    broker = require_broker(tmp_path / "broker", users={"plc": "s3cret"}, tls=True)
    try:
        subscriber = Subscriber(broker.port, TOPIC, tls=broker.tls, username="plc", password="s3cret")
        password_file = tmp_path / "mqtt-password"
        password_file.write_text("s3cret\n")
        password_file.chmod(0o600)
        config = MqttConfig(uri=f"mqtts://plc@localhost:{broker.port}/{TOPIC}", ca_file=broker.tls.ca_cert,
                            password_file=password_file, reconnect_min_s=0.1)
        sink = MqttSink(config, warn=lambda line: None)
        try:
            assert wait_until(lambda: sink.connected)
            sink.write(result(7))
            assert wait_until(lambda: len(subscriber.messages) == 1)
        finally:
            sink.close()
            subscriber.close()
        assert frames_of(subscriber.payloads()) == [7]

        warnings = []
        wrong = MqttSink(MqttConfig(uri=f"mqtts://plc@localhost:{broker.port}/{TOPIC}", ca_file=broker.tls.ca_cert,
                                    reconnect_min_s=0.1, close_timeout_s=0.2),
                         warn=warnings.append, environ={PASSWORD_ENV: "wrong"})
        assert wait_until(lambda: any("refused the connection" in line for line in warnings))
        wrong.close()
        untrusted = []
        plain = MqttSink(MqttConfig(uri=f"mqtts://plc@localhost:{broker.port}/{TOPIC}", reconnect_min_s=0.1,
                                    close_timeout_s=0.2), warn=untrusted.append, environ={PASSWORD_ENV: "s3cret"})
        time.sleep(0.5)
        assert not plain.connected  # the test CA is not in the system's bundle: the broker is not trusted
        assert any("TLS: " in line and "certificate" in line for line in untrusted), untrusted
        plain.close()
    finally:
        broker.stop()


def test_the_loop_publishes_one_message_per_frame(mqtt_broker, tmp_path):
    from reconad.runtime.line.config import InspectConfig
    from reconad.runtime.line.loop import run_inspection
    from tests.runtime.fakes import FakeInspector, ScriptedSource, gray_frame

    subscriber = Subscriber(mqtt_broker.port, TOPIC)
    sink = MqttSink(MqttConfig(uri=f"mqtt://127.0.0.1:{mqtt_broker.port}/{TOPIC}"), warn=lambda line: None)
    assert wait_until(lambda: sink.connected)
    levels = [40, 200, 60, 220, 80]
    source = ScriptedSource([gray_frame(level) for level in levels], live=False)
    result_ = run_inspection(source, FakeInspector(), InspectConfig(stats_interval_s=0), [sink], handle_signals=False)
    assert result_.stats.counters["inspected"] == 5
    assert wait_until(lambda: len(subscriber.messages) == 5)  # close() drained the buffer before returning
    subscriber.close()
    messages = [json.loads(payload) for payload in subscriber.payloads()]
    assert [m["frame"] for m in messages] == list(range(5))
    assert [m["is_anomalous"] for m in messages] == [False, True, False, True, False]
