"""Sinks: the JSONL log (incl. a full disk), overlays (naming, rate limit, quota) and the webhook (local server)."""

import dataclasses
import errno
import http.server
import json
import os
import threading
import time

import cv2
import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Verdict
from reconad.runtime.line.config import InspectConfig
from reconad.runtime.line.loop import run_inspection
from reconad.runtime.line.session import build_sinks
from reconad.runtime.line.sinks import (
    CameraBlind,
    FrameFault,
    InspectionResult,
    JsonlSink,
    OverlaySink,
    describe_error,
)
from reconad.runtime.line.render import VERDICT_COLOURS
from reconad.runtime.line.webhook import WebhookSink, parse_headers
from tests.runtime.fakes import FakeInspector, ScriptedSource, gray_frame


def result(index=0, score=0.9, anomalous=True, overlay=None, name=None):
    anomaly_map = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    verdict = Verdict(image_score=score, is_anomalous=anomalous, threshold=0.5, anomaly_map=anomaly_map)
    return InspectionResult(
        index=index,
        name=name or f"cam#{index}",
        captured_at="2026-01-01T00:00:00.000+00:00",
        verdict=verdict,
        latency_ms=3.25,
        overlay=overlay,
        frame=gray_frame(100, (32, 48)),
        colour="BGR",
        roi=(8, 0, 32, 32),
    )


def test_jsonl_lines_are_written_at_once_and_appended(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    sink = JsonlSink(path, run_id="run-1")
    sink.write(result(0, 0.2, False))
    assert json.loads(path.read_text()) == {  # on disk before close
        "run": "run-1",
        "frame": 0,
        "time": "2026-01-01T00:00:00.000+00:00",
        "latency_ms": 3.25,
        "file": "cam#0",
        "decision": "good",
        "image_score": 0.2,
        "is_anomalous": False,
        "threshold": 0.5,
        "category": None,
        "recognized_category": None,
        "category_distance": None,
        "is_unknown": False,
        "normalized_score": None,
        "overlay": None,
    }
    sink.write(FrameFault(name="cam#1", captured_at="2026-01-01T00:00:01.000+00:00", error="cam#1 is blank."))
    sink.close()
    sink.close()
    again = JsonlSink(path)
    again.write(result(2))
    again.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[1] == {"run": "run-1", "time": "2026-01-01T00:00:01.000+00:00", "file": "cam#1", "error": "cam#1 is blank."}
    assert lines[2]["frame"] == 2 and "run" not in lines[2]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux /dev/full")
def test_jsonl_on_a_full_disk_raises_enospc_and_the_loop_goes_on(tmp_path):
    sink = JsonlSink("/dev/full")
    with pytest.raises(OSError) as caught:
        sink.write(result())
    assert caught.value.errno == errno.ENOSPC and describe_error(caught.value) == "disk full (No space left on device)"
    sink.close()

    out = tmp_path / "out"
    out.mkdir()
    (out / "verdicts.jsonl").symlink_to("/dev/full")
    config = InspectConfig(out=out, overlays="none", stats_interval_s=0, queue_size=100, blind_checks="never")
    messages = []
    loop_result = run_inspection(
        ScriptedSource([gray_frame(n) for n in range(30)]),
        FakeInspector(),
        config,
        build_sinks(config, None),
        report=messages.append,
        handle_signals=False,
    )
    assert loop_result.exit_code == 0 and loop_result.stats.counters["inspected"] == 30
    assert loop_result.stats.sinks["jsonl"].errors == 30
    assert [line for line in messages if "disk full" in line] == [
        "warning: sink jsonl failed: disk full (No space left on device); the loop goes on."
    ]
    assert "jsonl: 30 errors" in loop_result.stats.status_line()


class StoppedSink:
    """A sink whose every write fails with a sentence that ends in a period (as ReconadError's do)."""

    name, queue_size = "stopped", 100

    def accepts(self, result):
        return True

    def write(self, result):
        raise ReconadError("The output process ended (exit code -11); the outputs stopped.")

    def close(self):
        pass


def test_a_failing_sinks_warning_is_one_sentence_whatever_its_reason_ends_with(tmp_path):
    config = InspectConfig(out=tmp_path, overlays="none", stats_interval_s=0, queue_size=100, blind_checks="never")
    messages = []
    loop_result = run_inspection(ScriptedSource([gray_frame(n) for n in range(5)]), FakeInspector(), config,
                                 [StoppedSink()], report=messages.append, handle_signals=False)
    assert loop_result.exit_code == 0 and loop_result.stats.sinks["stopped"].errors == 5
    assert [line for line in messages if "sink stopped" in line] == [
        "warning: sink stopped failed: The output process ended (exit code -11); the outputs stopped; the loop goes on."
    ]
    assert not any(".;" in line or ".." in line for line in messages)


def test_overlay_plan_names_rate_limit_and_modes(tmp_path):
    by_index = OverlaySink(tmp_path, min_interval_s=3600)
    assert by_index.plan(7, "cam#7", False) is None
    assert by_index.plan(7, "cam#7", True) == "overlays/00000007.png"
    assert by_index.plan(8, "cam#8", True) is None  # within the interval
    by_file = OverlaySink(tmp_path, name_by_file=True, min_interval_s=0, mode="all")
    assert by_file.plan(0, "a/b.jpg", False) == "overlays/a/b.jpg.png"
    assert by_file.plan(1, "c.png", True) == "overlays/c.png"
    assert OverlaySink(tmp_path, mode="none").plan(0, "x", True) is None


def test_overlay_write_renders_the_roi_and_respects_the_quota(tmp_path):
    warnings = []
    sink = OverlaySink(tmp_path, min_interval_s=0, quota_mb=1e-6, warn=warnings.append)
    item = result(3, overlay=sink.plan(3, "cam#3", True))
    assert sink.accepts(item) and not sink.accepts(result(4)) and not sink.accepts(FrameFault("x", "t", "e"))
    assert sink.write(item) is True
    image = cv2.imread(str(tmp_path / item.overlay))  # BGR
    assert image.shape == (396, 584, 3)  # the renderer's: scaled up to 360 rows, a banner above, a colour bar
    assert tuple(image[3, 3][::-1]) == VERDICT_COLOURS["NG"]
    original = cv2.resize(gray_frame(100, (32, 48)), (540, 360), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(image[36:, :80], original[:, :80])  # outside the ROI: untouched (BGR in, BGR out)
    assert not np.array_equal(image[36 + 300 :, 90:450], original[300:, 90:450])  # inside, where the map is high
    assert sink.plan(4, "cam#4", True) is None  # the folder now holds more than the quota
    assert sink.write(result(5, overlay="overlays/00000005.png")) is False  # planned earlier: still refused
    assert len(warnings) == 1 and "overlay quota" in warnings[0]


class Recorder(http.server.BaseHTTPRequestHandler):
    bodies: list = []
    headers_seen: list = []
    status = 200
    statuses: list = []  # answered first, one per request, then ``status``
    retry_after: str | None = None
    delay_s = 0.0

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(type(self).delay_s)
        type(self).bodies.append((self.headers["Content-Type"], json.loads(body)))
        type(self).headers_seen.append(dict(self.headers))
        status = type(self).statuses.pop(0) if type(self).statuses else type(self).status
        self.send_response(status)
        if type(self).retry_after is not None and status != 200:
            self.send_header("Retry-After", type(self).retry_after)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Handler", (Recorder,), {"bodies": [], "headers_seen": [], "statuses": [], "status": 200,
                                            "retry_after": None, "delay_s": 0.0})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, handler, f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    httpd.shutdown()
    httpd.server_close()


def test_webhook_posts_anomalies_as_json(server):
    _, handler, url = server
    sink = WebhookSink(url, timeout_s=2)
    assert sink.accepts(result(anomalous=True)) and not sink.accepts(result(anomalous=False))
    assert not sink.accepts(FrameFault("x", "t", "e"))
    assert sink.write(result(5, 0.93)) is True
    content_type, body = handler.bodies[0]
    assert content_type == "application/json"
    assert body["event"] == "anomaly" and body["frame"] == 5 and body["image_score"] == 0.93 and body["is_anomalous"]


def test_webhook_posts_unknown_parts_as_their_own_event(server):
    _, handler, url = server
    sink = WebhookSink(url, timeout_s=2)
    unknown = result(6, 0.1, anomalous=None)
    unknown = dataclasses.replace(unknown, verdict=dataclasses.replace(unknown.verdict, is_unknown=True, category_distance=0.7))
    assert sink.accepts(unknown) and sink.write(unknown) is True
    body = handler.bodies[0][1]
    assert body["event"] == "unknown" and body["decision"] == "unknown" and body["is_anomalous"] is None
    assert body["category_distance"] == 0.7


def test_webhook_failures_are_one_line_errors(server):
    _, handler, url = server
    handler.status = 500
    with pytest.raises(ReconadError, match="answered HTTP 500"):
        WebhookSink(url, retries=0).write(result())
    handler.status, handler.delay_s = 200, 1.0
    started = time.monotonic()
    with pytest.raises(ReconadError, match="unreachable"):
        WebhookSink(url, timeout_s=0.2, retries=0).write(result())
    assert time.monotonic() - started < 0.9
    with pytest.raises(ReconadError, match="unreachable"):
        WebhookSink("http://127.0.0.1:9/none", timeout_s=1, retries=0).write(result())
    with pytest.raises(ReconadError, match="must be an http"):
        WebhookSink("ftp://example.com/hook")


def test_a_slow_webhook_never_blocks_inference(server):
    _, handler, url = server
    handler.delay_s = 0.1
    config = InspectConfig(webhook=url, webhook_timeout_s=2, stats_interval_s=0, queue_size=100)
    loop_result = run_inspection(
        ScriptedSource([gray_frame(200) for _ in range(40)]),  # every frame anomalous
        FakeInspector(),
        config,
        build_sinks(config, None),
        report=lambda line: None,
        handle_signals=False,
    )
    stats = loop_result.stats
    counters, webhook = stats.counters, stats.sinks["webhook"]
    assert counters["inspected"] == counters["anomalous"] == 40
    assert counters["inspected"] / stats.mean_fps < 40 * 0.1 / 4  # the last verdict came long before the posts
    assert webhook.dropped > 10 and webhook.written == len(handler.bodies) < 30


def test_webhook_retries_with_backoff_then_delivers(server):
    _, handler, url = server
    handler.statuses = [503, 502]
    sink = WebhookSink(url, retries=3, backoff_s=0.01)
    waits = []
    sink._sleep = waits.append
    assert sink.write(result(1)) is True
    assert sink.attempts == 3 and len(handler.bodies) == 3 and waits == [0.01, 0.02]
    handler.statuses, handler.retry_after = [429], "2"
    sink.attempts, waits[:] = 0, []
    assert sink.write(result(2)) is True and waits == [2.0]  # Retry-After obeyed (within backoff_max_s)
    handler.statuses = [500] * 10
    with pytest.raises(ReconadError, match="answered HTTP 500 after 4 attempts"):
        sink.write(result(3))
    handler.statuses = [400]
    sink.attempts = 0
    with pytest.raises(ReconadError, match="answered HTTP 400$"):
        sink.write(result(4))
    assert sink.attempts == 1  # a client error is not retried


def test_webhook_headers_and_authorization(server, tmp_path, monkeypatch):
    _, handler, url = server
    sink = WebhookSink(url, headers=parse_headers(["X-Line: 7", "X-Site:plant-2"]), authorization="Bearer t0k3n")
    sink.write(result())
    seen = handler.headers_seen[-1]
    assert seen["X-Line"] == "7" and seen["X-Site"] == "plant-2" and seen["Authorization"] == "Bearer t0k3n"
    with pytest.raises(ReconadError, match="Authorization header on the command line"):
        parse_headers(["Authorization: Bearer leaked"])
    with pytest.raises(ReconadError, match="'Name: value'"):
        parse_headers(["no colon"])
    monkeypatch.setenv("RECONAD_WEBHOOK_AUTHORIZATION", "Bearer from-env")
    config = InspectConfig(webhook=url, webhook_headers=("X-Line: 8",))
    (webhook,) = build_sinks(config, None)
    assert webhook.headers["Authorization"] == "Bearer from-env" and webhook.headers["X-Line"] == "8"


def test_webhook_posts_the_start_of_a_camera_blind_episode(server):
    _, handler, url = server
    sink = WebhookSink(url)
    start = CameraBlind(name="cam#9", captured_at="2026-01-01T00:00:09.000+00:00", reason="black",
                        detail="99% of pixels <= 3 (black <= 30)", episode_start=True)
    assert sink.accepts(start) and not sink.accepts(CameraBlind("cam#10", "t", "black", "d", episode_start=False))
    sink.write(start)
    body = handler.bodies[-1][1]
    assert body["event"] == "camera_blind" and body["camera_blind"] == "black" and body["file"] == "cam#9"


def test_jsonl_rotates_by_size_and_keeps_the_newest(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    line_bytes = len(json.dumps(result(0).record())) + 1
    sink = JsonlSink(path, max_bytes=3 * line_bytes + 10, keep=2)
    for index in range(20):
        sink.write(result(index))
    sink.close()
    files = [path, tmp_path / "verdicts.jsonl.1", tmp_path / "verdicts.jsonl.2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)
    frames = [[json.loads(line)["frame"] for line in p.read_text().splitlines()] for p in files]
    assert frames == [[18, 19], [15, 16, 17], [12, 13, 14]]  # whole lines, newest first, older ones deleted
    assert all(p.stat().st_size <= 3 * line_bytes + 10 for p in files)
    assert sink.rotations == 6
    # No retention: the log is cut, nothing is kept.
    bare = JsonlSink(tmp_path / "b.jsonl", max_bytes=line_bytes, keep=0)
    for index in range(3):
        bare.write(result(index))
    bare.close()
    assert [json.loads(line)["frame"] for line in (tmp_path / "b.jsonl").read_text().splitlines()] == [2]
    assert not (tmp_path / "b.jsonl.1").exists()


def test_heavy_sink_threads_run_below_the_inference_threads_and_light_ones_do_not():
    """Rendering and encoding take what inference leaves (Linux: a nice value per thread); verdict
    messages and counters keep the inference threads' priority, so they do not wait behind an encoder."""
    import os
    import threading

    from reconad.runtime.line.video_sink import VideoOutputSink
    from reconad.runtime.line.prometheus import LineMetrics
    from reconad.runtime.line.report import RateLimitedReporter
    from reconad.runtime.line.priority import SINK_NICENESS
    from reconad.runtime.line.sinks import JsonlSink, OverlaySink, SinkWorker
    from reconad.runtime.line.stats import LoopStats

    assert OverlaySink.heavy and VideoOutputSink.heavy
    assert not getattr(JsonlSink, "heavy", False) and not getattr(LineMetrics, "heavy", False)

    def priority_seen(heavy: bool) -> int:
        seen = []

        class Probe:
            name, queue_size = "probe", 4

            def accepts(self, result):
                return True

            def write(self, result):
                seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
                return True

            def close(self):
                pass

        Probe.heavy = heavy
        worker = SinkWorker(Probe(), LoopStats(), RateLimitedReporter(lambda line: None), threading.Event())
        worker.thread.start()
        worker.submit("result", wait=True)
        worker.queue.close()
        worker.thread.join(timeout=5)
        assert len(seen) == 1
        return seen[0]

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert priority_seen(heavy=True) == min(19, main + SINK_NICENESS)
    assert priority_seen(heavy=False) == main
