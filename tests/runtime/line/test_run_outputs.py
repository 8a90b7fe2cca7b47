"""``recon-inspect run`` on a real RTSP stream with every output at once: an RTSP output and a video file
(read back and checked), MQTT (a real broker, subscribed), Prometheus (scraped), summary.json refreshed
while it runs; then SIGINT."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import cv2
import pytest

from reconad.runtime.line.render import VERDICT_COLOURS
from reconad.runtime.thresholds import Calibration, Threshold
from tests.runtime.line.services import (
    Subscriber,
    free_port,
    require_broker,
    require_ffmpeg_rtsp_client,
    require_gst_outputs,
    require_rtsp_server,
    wait_until,
)
from tests.runtime.line.test_outputs import _non_loopback_address, near, read_frames
from tests.runtime.onnx_graphs import write_artifact

pytest.importorskip("paho.mqtt.client", reason="needs paho-mqtt: pip install 'reconad[line]'")
pytest.importorskip("prometheus_client", reason="needs prometheus_client: pip install 'reconad[line]'")


def _json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_run_with_every_output_on_a_live_rtsp_stream(tmp_path):
    require_ffmpeg_rtsp_client()
    require_gst_outputs()
    camera = require_rtsp_server(tmp_path / "camera", fps=15)
    broker = require_broker(tmp_path / "broker")
    subscriber = Subscriber(broker.port, "line1/verdicts")
    calibration = Calibration(method="manual", n_images=0, date="2026-01-01", source="test")
    artifact = write_artifact(tmp_path / "model", image_threshold=Threshold(value=0.5, calibration=calibration))
    out = tmp_path / "out"
    output_port, metrics_port = free_port(), free_port()
    command = [
        sys.executable, "-c", "from reconad.runtime.cli import app; app()", "run", camera.url, "--model", str(artifact),
        "--out", str(out), "--backend", "ort-cpu", "--num-threads", "1", "--stats-interval-s", "1",
        "--summary-interval-s", "0.5", "--output", f"rtsp://@:{output_port}/inspect", "--output", str(tmp_path / "line.mp4"),
        "--mqtt", f"mqtt://127.0.0.1:{broker.port}/line1/verdicts", "--metrics-port", str(metrics_port),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        summary_path = out / "summary.json"
        assert wait_until(lambda: (_json(summary_path) or {}).get("counters", {}).get("inspected", 0) >= 10,
                          timeout_s=60), "no running summary"
        running = _json(summary_path)
        assert running["running"] is True and running["stop_reason"] is None

        frames = read_frames(f"rtsp://127.0.0.1:{output_port}/inspect", 5)
        assert frames[-1].shape == (396, 524, 3)  # 320x240 scaled to 360 rows, banner, colour bar
        assert near(frames[-1][4, 4], VERDICT_COLOURS["NG"])  # the ball scores 0.88 against 0.5

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert "reconad_frames_inspected_total" in metrics
        assert 'reconad_verdicts_total{category="red",verdict="ng"}' in metrics  # the test graph names the red ball
        assert 'reconad_stage_latency_seconds_count{stage="inference"}' in metrics

        address = _non_loopback_address()
        if address is not None:  # every socket we opened listens on loopback only
            for port in (output_port, metrics_port):
                with pytest.raises(OSError):
                    socket.create_connection((address, port), timeout=2).close()

        assert wait_until(lambda: len(subscriber.messages) >= 10, timeout_s=20)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        subscriber.close()
        camera.stop()
        broker.stop()
    assert process.returncode == 0, stderr[-3000:]
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in stderr
    assert (f"streaming to rtsp://127.0.0.1:{output_port}/inspect (reachable from this machine only; watch with "
            "ffplay or VLC)") in stderr
    summary = _json(out / "summary.json")
    assert summary["running"] is False and summary["stop_reason"] == "SIGINT"
    inspected = summary["counters"]["inspected"]
    assert summary["mqtt"]["queued"] == summary["mqtt"]["acknowledged"] == inspected
    assert summary["mqtt"]["dropped"] == 0
    messages = [json.loads(message.payload) for message in subscriber.messages]
    logged = [json.loads(line)["frame"] for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert len(logged) == inspected
    assert [m["frame"] for m in messages] == logged  # every verdict, in order (frames dropped unseen have none)
    assert all(m["event"] == "verdict" and m["is_anomalous"] for m in messages)
    rtsp_output = next(o for o in summary["outputs"] if o["uri"].startswith("rtsp://"))
    assert rtsp_output["url"] == f"rtsp://127.0.0.1:{output_port}/inspect"  # what a client opens
    file_output = next(o for o in summary["outputs"] if o["uri"].endswith("line.mp4"))
    video = cv2.VideoCapture(str(tmp_path / "line.mp4"))
    decoded = 0
    while video.read()[0]:
        decoded += 1
    assert decoded == file_output["frames_written"] > 0
