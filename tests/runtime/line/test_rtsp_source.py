"""An rtsp:// source that drops mid-run and comes back, served by GStreamer's RTSP server in its own process.

The loop (``inspect_stream``) runs in a child process so that SIGINT reaches its main thread as it does
for ``recon-inspect run``; the test kills the server with SIGKILL (a camera losing power), starts it
again on the same port, and checks that the loop reopened the stream, counted the loss, kept a verdict
line for every inspected frame and stopped cleanly on SIGINT. The measured timeline is printed (-s).
"""

import datetime
import json
import signal
import subprocess
import sys
import time


from reconad.runtime.thresholds import Calibration, Threshold
from tests.runtime.line.services import require_ffmpeg_rtsp_client, require_rtsp_server, wait_until
from tests.runtime.onnx_graphs import write_artifact

SESSION_MODULE = "reconad.runtime.line.session"  # inspect_stream
CONFIG_MODULE = "reconad.runtime.line.config"  # InspectConfig
SOURCES_MODULE = "reconad.runtime.line.sources"  # SourceConfig

DRIVER = f"""
import json, sys
from pathlib import Path
from {SESSION_MODULE} import inspect_stream
from {CONFIG_MODULE} import InspectConfig
from {SOURCES_MODULE} import SourceConfig
uri, artifact, out = sys.argv[1:4]
config = InspectConfig(out=Path(out), overlays="none", stats_interval_s=1.0, reconnect_initial_s=0.25,
                       reconnect_max_s=2.0)
source = SourceConfig(open_timeout_ms=3000, read_timeout_ms=3000)
result = inspect_stream(uri, artifact, config, source, backend="ort-cpu", num_threads=1)
print("RESULT " + json.dumps({{"stop_reason": result.stop_reason, "exit_code": result.exit_code,
                              "counters": result.stats.counters}}), flush=True)
sys.exit(result.exit_code)
"""

FPS = 15
DOWN_S = 2.0


def _lines(path):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line must be whole JSON


def _seconds(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def test_the_loop_reconnects_to_an_rtsp_stream_that_drops_and_comes_back(tmp_path):
    require_ffmpeg_rtsp_client()
    server = require_rtsp_server(tmp_path / "rtsp", fps=FPS)
    calibration = Calibration(method="manual", n_images=0, date="2026-01-01", source="test")
    artifact = write_artifact(tmp_path / "model", image_threshold=Threshold(value=0.5, calibration=calibration))
    out = tmp_path / "out"
    log = out / "verdicts.jsonl"
    process = subprocess.Popen([sys.executable, "-c", DRIVER, server.url, str(artifact), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: len(_lines(log)) >= 2 * FPS, timeout_s=60), "no verdicts from the stream"
        killed_at = time.time()
        server.kill()
        time.sleep(DOWN_S)
        server.start()
        back_at = time.time()
        assert wait_until(lambda: sum(_seconds(r["time"]) > back_at for r in _lines(log)) >= 2 * FPS, timeout_s=60), \
            "no verdicts after the server came back"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        server.stop()
    assert process.returncode == 0, stderr[-3000:]
    outcome = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    counters = outcome["counters"]
    assert outcome["stop_reason"] == "SIGINT"
    assert counters["source_lost"] >= 1 and counters["reconnects"] >= 1, counters
    assert "reopened after" in stderr and "SIGINT: stopping" in stderr

    records = _lines(log)
    assert [record["frame"] for record in records] == list(range(len(records)))  # no verdict line lost
    assert len(records) == counters["inspected"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "SIGINT" and summary["counters"] == counters

    times = [_seconds(record["time"]) for record in records]
    gaps = [(later - earlier, index) for index, (earlier, later) in enumerate(zip(times, times[1:]))]
    gap_s, last_before = max(gaps)
    first_after = times[last_before + 1]
    assert times[last_before] <= killed_at + 1.0 and first_after >= back_at  # the gap is the outage
    timeline = {
        "fps": FPS,
        "server_down_s": round(back_at - killed_at, 3),
        "gap_in_verdicts_s": round(gap_s, 3),
        "last_frame_before_kill_s": round(times[last_before] - killed_at, 3),
        "first_frame_after_restart_s": round(first_after - back_at, 3),
        "frames_not_seen": round(gap_s * FPS) - 1,
        "frames_missed_after_the_server_was_back": round((first_after - back_at) * FPS),
        "verdict_lines": len(records),
        "inspected": counters["inspected"],
        "captured": counters["captured"],
        "dropped": counters["dropped"],
        "source_lost": counters["source_lost"],
        "reconnects": counters["reconnects"],
    }
    print("RTSP reconnect timeline:", json.dumps(timeline))
    assert counters["captured"] == counters["inspected"] + counters["dropped"]


def test_ffmpeg_options_are_set_for_the_open_only_and_the_users_win(monkeypatch):
    import os

    from reconad.runtime.line.sources import FFMPEG_OPTIONS_VARIABLE, _ffmpeg_capture_options

    monkeypatch.delenv(FFMPEG_OPTIONS_VARIABLE, raising=False)
    with _ffmpeg_capture_options("analyzeduration;500000"):
        assert os.environ[FFMPEG_OPTIONS_VARIABLE] == "analyzeduration;500000"
    assert FFMPEG_OPTIONS_VARIABLE not in os.environ
    monkeypatch.setenv(FFMPEG_OPTIONS_VARIABLE, "rtsp_transport;tcp")
    with _ffmpeg_capture_options("analyzeduration;500000"):
        assert os.environ[FFMPEG_OPTIONS_VARIABLE] == "rtsp_transport;tcp"
    assert os.environ[FFMPEG_OPTIONS_VARIABLE] == "rtsp_transport;tcp"
