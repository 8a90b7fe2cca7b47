"""The session around the loop: summary.json while running, sinks made all-or-nothing, CLI option rules."""

import json
import time

import pytest
from typer.testing import CliRunner

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.config import InspectConfig
from reconad.runtime.line.loop import run_inspection
from reconad.runtime.line.mqtt import MqttConfig
from reconad.runtime.line.session import build_sinks, inspect_stream
from reconad.runtime.thresholds import Calibration, Threshold
from tests.runtime.fakes import FakeInspector, ScriptedSource, gray_frame, write_image_folder
from tests.runtime.line.services import free_port
from tests.runtime.onnx_graphs import write_artifact


def test_progress_is_reported_while_the_loop_runs():
    snapshots = []
    source = ScriptedSource([gray_frame(100 + n % 50) for n in range(60)], interval_s=0.01)
    config = InspectConfig(stats_interval_s=0, summary_interval_s=0.1, queue_size=100)
    run_inspection(source, FakeInspector(), config, report=lambda line: None, handle_signals=False,
                   on_progress=snapshots.append)
    inspected = [snapshot.counters["inspected"] for snapshot in snapshots]
    assert len(inspected) >= 3 and inspected == sorted(inspected) and 0 < inspected[-1] <= 60


def test_summary_json_says_running_then_how_it_ended(tmp_path):
    folder = tmp_path / "frames"
    write_image_folder(folder, [60, 200, 80])
    calibration = Calibration(method="manual", n_images=0, date="2026-01-01", source="test")
    artifact = write_artifact(tmp_path / "model", image_threshold=Threshold(value=0.5, calibration=calibration))
    seen = []

    class Watcher:
        name, queue_size = "watcher", 1000

        def accepts(self, result):
            return True

        def write(self, result):  # slow: a folder waits for its sinks, so the run lasts about 2 s
            time.sleep(0.005)
            summary = tmp_path / "out" / "summary.json"
            if summary.exists():
                seen.append(json.loads(summary.read_text())["running"])
            return True

        def close(self):
            pass

    import reconad.runtime.line.session as session

    original = session.build_sinks
    session.build_sinks = lambda *args, **kwargs: [*original(*args, **kwargs), Watcher()]
    try:
        from reconad.runtime.line.sources import SourceConfig

        config = InspectConfig(out=tmp_path / "out", max_frames=400, summary_interval_s=0.05, stats_interval_s=0)
        result = inspect_stream(str(folder), artifact, config, SourceConfig(loop=True), backend="ort-cpu",
                                num_threads=1, report=lambda line: None)
    finally:
        session.build_sinks = original
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["running"] is False and summary["stop_reason"] == "max frames" == result.stop_reason
    assert summary["counters"]["inspected"] == 400
    assert True in seen  # refreshed while running


def test_sinks_are_made_all_or_nothing(tmp_path, monkeypatch):
    import gc
    import os

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(ReconadError, match="Unknown output"):
        InspectConfig(outputs=("webrtc://nowhere",))
    with pytest.raises(ReconadError, match=r"render must be one of \['idle-process', 'low-priority-process', 'thread'\]"):
        InspectConfig(render="gpu")
    config = InspectConfig(out=tmp_path / "out", mqtt=MqttConfig(uri=f"mqtt://127.0.0.1:{free_port()}/t"),
                           outputs=("display://0",))  # no desktop: it fails in the render child, after the others
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # the video outputs' child is spawned; its tracker is once per process
    descriptors = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ReconadError, match="needs a desktop"):
        build_sinks(config, None, warn=lambda line: None)
    gc.collect()  # paho closes its wake-up socket pair when the client is collected
    assert len(os.listdir("/proc/self/fd")) <= descriptors  # the JSONL log and the MQTT client were closed


def test_mqtt_options_need_mqtt_and_a_password_in_the_url_is_refused(tmp_path):
    from reconad.runtime.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["run", str(tmp_path), "--model", str(tmp_path / "m.onnx"), "--mqtt-qos", "2"])
    assert result.exit_code == 2 and "The --mqtt-* options need --mqtt URI." in result.output
    result = runner.invoke(app, ["run", str(tmp_path), "--model", str(tmp_path / "m.onnx"), "--mqtt",
                                 "mqtt://plc:secret@broker/t"])
    assert result.exit_code == 2 and "process list" in result.output
