"""The inspection loop: queues, drop policy, faults, camera loss, failures, signals and a soak run."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import check_frame
from reconad.runtime.line.config import EXIT_INFERENCE_FAILED, InspectConfig
from reconad.runtime.line.loop import run_inspection
from reconad.runtime.line.queues import DropOldestQueue
from reconad.runtime.line.session import build_sinks
from reconad.runtime.thresholds import Calibration, Threshold
from reconad.runtime.line.sinks import CameraBlind, FrameFault, InspectionResult
from reconad.runtime.line.sources import FrameReadError, ImageFolderSource, SourceConfig, SourceLostError, open_source
from tests.runtime.fakes import Collector, FakeInspector, ScriptedSource, gray_frame, wait_for, write_image_folder
from tests.runtime.onnx_graphs import write_artifact

QUIET = dict(stats_interval_s=0, blind_checks="never")  # dark test frames would be camera-blind (tests/runtime/line/test_blind.py)


def run(source, inspector=None, sinks=(), messages=None, **config):
    report = messages.append if messages is not None else (lambda line: None)
    config = InspectConfig(**{**QUIET, **config})
    return run_inspection(source, inspector or FakeInspector(), config, sinks, report=report, handle_signals=False)


def test_drop_oldest_queue():
    queue = DropOldestQueue(2)
    assert queue.put(1) == 0 and queue.put(2) == 0 and queue.put(3) == 1
    assert queue.get_batch(5, timeout_s=0) == [2, 3]
    assert queue.get_batch(1, timeout_s=0.01) == []
    stop = threading.Event()
    queue.put(4)
    queue.put(5)
    waiter = threading.Thread(target=lambda: queue.put_wait(6, stop))
    waiter.start()
    time.sleep(0.1)
    assert waiter.is_alive() and len(queue) == 2  # waits for room instead of dropping
    assert queue.get_batch(1, timeout_s=0) == [4]
    waiter.join(timeout=2)
    assert queue.get_batch(5, timeout_s=0) == [5, 6]
    queue.put(7)
    queue.put(8)
    stop.set()
    assert queue.put_wait(9, stop) is False
    queue.close()
    assert queue.get_batch(1, timeout_s=0) == [7]
    assert queue.get_batch(5, timeout_s=1) == [8]
    assert queue.get_batch(5, timeout_s=1) is None


def test_check_frame():
    assert check_frame(gray_frame(100)) is None
    assert check_frame(np.full((8, 8, 3), 7, np.uint8)) is None  # flat, but well formed: for the blind checks
    assert check_frame(np.zeros((0, 8, 3), np.uint8)) == "corrupt"
    assert check_frame(np.zeros((8, 8, 2), np.uint8)) == "corrupt"
    assert check_frame(None) == "corrupt"


def test_prepare_image_fast_path_equals_convert_then_crop_and_resize():
    """uint8 colour frames are resized before their channels are reordered: the result must not change."""
    from reconad.runtime.frames import crop_roi, prepare_image, resize_image, to_rgb_uint8

    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), rng.integers(0, 65536, (30, 50), dtype=np.uint16)]
    for frame in frames:
        for roi in (None, (5, 3, 40, 20)):
            for colour in ("RGB", "BGR"):
                expected = resize_image(crop_roi(to_rgb_uint8(frame, colour=colour), roi), (16, 16))
                np.testing.assert_array_equal(prepare_image(frame, (16, 16), colour=colour, roi=roi), expected)


def test_folder_end_to_end_in_order_with_jsonl(tmp_path):
    folder = tmp_path / "frames"
    write_image_folder(folder, [30, 200, 60, 220, 90])
    out = tmp_path / "out"
    config = InspectConfig(out=out, batch_size=2, **QUIET)
    sinks = build_sinks(config, None, live=False, name_by_file=True)
    inspector = FakeInspector()
    result = run_inspection(ImageFolderSource(folder), inspector, config, sinks, handle_signals=False)
    assert result.stop_reason == "end of stream" and result.exit_code == 0 and result.failure is None
    counters = result.stats.counters
    assert counters["inspected"] == counters["captured"] == 5 and counters["anomalous"] == 2
    assert counters["dropped"] == 0
    lines = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == [f"{n:04d}.png" for n in range(5)]
    assert [line["frame"] for line in lines] == list(range(5))
    assert [line["is_anomalous"] for line in lines] == [False, True, False, True, False]
    assert all(line["latency_ms"] >= 0 and line["time"].endswith("+00:00") for line in lines)
    assert lines[1]["overlay"] == "overlays/0001.png" and (out / "overlays" / "0001.png").is_file()
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["0001.png", "0003.png"]
    assert max(inspector.batch_sizes) <= 2
    latency = result.stats.latency_ms
    assert {"capture", "preprocess", "queue", "inference", "capture_to_decision", "sink:jsonl"} <= set(latency)
    assert latency["capture_to_decision"]["p99"] >= latency["capture_to_decision"]["p50"] > 0


def test_unknown_parts_are_counted_logged_and_get_an_overlay(tmp_path):
    folder = tmp_path / "frames"
    write_image_folder(folder, [30, 200, 250, 90])
    out = tmp_path / "out"
    config = InspectConfig(out=out, **QUIET)
    sinks = build_sinks(config, None, live=False, name_by_file=True)
    result = run_inspection(ImageFolderSource(folder), FakeInspector(unknown_above=0.9), config, sinks, handle_signals=False)
    counters = result.stats.counters
    assert (counters["inspected"], counters["anomalous"], counters["unknown"]) == (4, 1, 1)
    assert "1 anomalous, 1 unknown" in result.headline() and "1 unknown" in result.stats.summary_lines()[0]
    lines = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [line["decision"] for line in lines] == ["good", "anomalous", "unknown", "good"]
    assert lines[2]["is_anomalous"] is None and lines[2]["overlay"] == "overlays/0002.png"
    assert (out / "overlays" / "0002.png").is_file()


def test_max_frames_on_a_looping_folder_and_roi(tmp_path):
    folder = tmp_path / "frames"
    write_image_folder(folder, [10, 250])  # ROI below picks a region of each
    collector = Collector(queue_size=100)
    source = open_source(str(folder), SourceConfig(loop=True))
    result = run(source, sinks=[collector], max_frames=7, roi=(2, 2, 20, 16), preprocess_threads=3)
    assert result.stop_reason == "max frames"
    assert result.stats.counters["inspected"] == 7 and len(collector.items) == 7
    assert [item.verdict.is_anomalous for item in collector.items] == [False, True] * 3 + [False]
    assert collector.closed.is_set()


def test_roi_outside_the_first_frame_is_a_configuration_error(tmp_path):
    folder = tmp_path / "frames"
    write_image_folder(folder, [10, 20])
    result = run(ImageFolderSource(folder), roi=(0, 0, 100, 100))
    assert result.exit_code == 2 and result.stop_reason == "failure"
    assert "does not fit inside" in result.failure


def test_corrupt_and_camera_blind_frames_are_counted_and_skipped(tmp_path):
    script = [
        gray_frame(100),
        FrameReadError("fake://camera#2 could not be decoded.", "fake://camera#2"),
        np.zeros((0, 4, 3), np.uint8),  # empty
        np.zeros((4, 4, 5), np.uint8),  # five channels
        np.full((24, 32, 3), 0, np.uint8),  # lens cap
        gray_frame(120),
    ]
    collector = Collector(queue_size=100)
    messages = []
    result = run(ScriptedSource(script), sinks=[collector], messages=messages, queue_size=100, blind_checks="live")
    counters = result.stats.counters
    assert result.exit_code == 0
    assert counters["inspected"] == 2 and counters["corrupt"] == 3
    assert counters["blind"] == counters["blind_black"] == 1
    faults = [item for item in collector.items if isinstance(item, FrameFault)]
    blind = [item for item in collector.items if isinstance(item, CameraBlind)]
    assert len(faults) == 3 and faults[0].name == "fake://camera#2"
    assert len(blind) == 1 and blind[0].reason == "black" and blind[0].episode_start
    assert any("skipped a corrupt frame" in line for line in messages)
    assert any("is camera-blind (black)" in line for line in messages)


def test_a_lost_camera_is_reopened_with_backoff_while_the_loop_goes_on():
    script = [gray_frame(50 + n) for n in range(5)] + [SourceLostError("fake://camera stopped delivering frames.")]
    script += [gray_frame(100 + n) for n in range(5)]
    source = ScriptedSource(script, open_failures=2)
    messages = []
    started = time.monotonic()
    result = run(source, messages=messages, reconnect_initial_s=0.05, reconnect_max_s=0.1, queue_size=100)
    counters = result.stats.counters
    assert counters["inspected"] == 10 and counters["source_lost"] == 1 and counters["reconnects"] == 1
    assert source.opens == 4  # the first open, two failed reopens, one that works
    assert time.monotonic() - started >= 0.15  # backed off 0.05 s then 0.1 s
    assert any("reopening fake://camera failed (attempt 1)" in line for line in messages)
    assert any("reopened after 3 attempt(s)" in line for line in messages)


def test_a_live_source_faster_than_inference_drops_the_oldest_frames(monkeypatch):
    import reconad.runtime.line.preprocess as loop_module

    prepared = []
    original = loop_module.prepare_image

    def slow_prepare(*args, **kwargs):
        time.sleep(0.005)
        prepared.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop_module, "prepare_image", slow_prepare)
    collector = Collector(queue_size=1000)
    source = ScriptedSource([gray_frame(n) for n in range(60)], interval_s=0.001)
    result = run(source, FakeInspector(delay_s=0.02), sinks=[collector], queue_size=2, preprocess_threads=1)
    counters = result.stats.counters
    assert counters["dropped"] > 10
    assert counters["inspected"] + counters["dropped"] == counters["captured"] == 60
    indices = [item.index for item in collector.items]
    assert indices == sorted(indices) and indices[-1] == 59  # newest frames win
    assert len(prepared) < 60 - 10  # dropped frames were not preprocessed


def test_a_slow_sink_never_stalls_inference():
    slow = Collector("slow", queue_size=2, delay_s=0.05)
    fast = Collector("fast", queue_size=1000)
    source = ScriptedSource([gray_frame(n) for n in range(100)], interval_s=0.001)
    started = time.monotonic()
    result = run(source, sinks=[slow, fast], drain_timeout_s=5, queue_size=200)  # no capture drops here
    elapsed = time.monotonic() - started
    counters, sinks = result.stats.counters, result.stats.sinks
    assert counters["inspected"] == 100 and counters["dropped"] == 0
    assert len(fast.items) == 100  # the other sink saw everything
    assert sinks["slow"].dropped > 50 and sinks["slow"].written == len(slow.items) < 50
    assert elapsed < 100 * 0.05 / 2  # far less than the slow sink would need for every frame


def test_a_failing_sink_is_reported_and_the_loop_goes_on():
    class Broken(Collector):
        def write(self, result):
            raise OSError(28, "No space left on device")

    messages = []
    source = ScriptedSource([gray_frame(n) for n in range(20)])
    result = run(source, sinks=[Broken("disk", queue_size=100)], messages=messages, queue_size=100)
    assert result.exit_code == 0 and result.stats.counters["inspected"] == 20
    assert result.stats.sinks["disk"].errors == 20
    assert result.stats.sinks["disk"].last_error == "disk full (No space left on device)"
    warnings = [line for line in messages if "sink disk failed" in line]
    assert len(warnings) == 1  # rate-limited


def test_a_dead_inference_thread_ends_the_run_with_exit_code_3(tmp_path):
    out = tmp_path / "out"
    config = InspectConfig(out=out, **QUIET)
    source = open_source(str(write_image_folder(tmp_path / "frames", range(10, 250, 20))[0].parent), SourceConfig(loop=True))
    started = time.monotonic()
    result = run_inspection(source, FakeInspector(fail_on_call=5), config, build_sinks(config, None, live=False), handle_signals=False)
    assert time.monotonic() - started < 10
    assert result.exit_code == EXIT_INFERENCE_FAILED and result.stop_reason == "failure"
    assert result.failure == "Inference failed: CUDA error: an illegal memory access was encountered."
    lines = (out / "verdicts.jsonl").read_text().splitlines()
    assert len(lines) == result.stats.counters["inspected"] == 3  # calls 2-4 after the warm-up, all flushed


def test_a_hung_inference_call_ends_the_run_with_exit_code_3():
    release = threading.Event()
    try:
        started = time.monotonic()
        result = run(ScriptedSource([gray_frame(n) for n in range(5)]), FakeInspector(hang=release), inference_timeout_s=0.3)
        assert time.monotonic() - started < 5
        assert result.exit_code == EXIT_INFERENCE_FAILED and "has not returned for 0.3 s" in result.failure
    finally:
        release.set()


def test_a_failing_warm_up_is_a_one_sentence_error():
    with pytest.raises(ReconadError, match="Inference failed on a warm-up frame: CUDA error"):
        run(ScriptedSource([]), FakeInspector(fail_on_call=1))


def test_a_stalled_camera_is_reported():
    script = [gray_frame(1)] + [lambda: (time.sleep(0.5), None)[1]]
    messages = []
    run(ScriptedSource(script), messages=messages, stall_s=0.2, stats_interval_s=0.1)
    assert any("source stalled" in line for line in messages)


def _contract_artifact(tmp_path, threshold=0.5):
    calibration = Calibration(method="manual", n_images=0, date="2026-01-01", source="test")
    return write_artifact(tmp_path / "model", image_threshold=Threshold(value=threshold, calibration=calibration))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_stops_cleanly_with_the_log_flushed(tmp_path, signum):
    folder = tmp_path / "frames"
    write_image_folder(folder, range(20, 240, 40))
    artifact, out = _contract_artifact(tmp_path), tmp_path / "out"
    command = [sys.executable, "-c", "from reconad.runtime.cli import app; app()", "run", str(folder), "--model",
               str(artifact), "--out", str(out), "--loop", "--stats-interval-s", "0.2", "--num-threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = out / "verdicts.jsonl"
        assert wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 20, timeout_s=60)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    name = signal.Signals(signum).name
    assert f"stopped: {name}" in stdout and f"{name}: stopping" in stderr
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == name and summary["counters"]["inspected"] == len(records)
    assert [record["frame"] for record in records] == list(range(len(records)))


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


class Probe(Collector):
    """Samples RSS and open descriptors every ``every`` results (from inside the run)."""

    def __init__(self, every=100):
        super().__init__("probe", queue_size=16, accept=lambda result: isinstance(result, InspectionResult))
        self.every = every
        self.samples = []
        self.count = 0

    def write(self, result):
        self.count += 1
        if self.count % self.every == 0:
            self.samples.append((self.count, _rss_kib(), len(os.listdir("/proc/self/fd"))))
        return True


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_soak_2000_frames_keeps_memory_and_open_files_flat(tmp_path):
    from reconad.runtime.inspector import Inspector

    folder = tmp_path / "frames"
    write_image_folder(folder, range(5, 255, 10), hw=(48, 64))  # half of them anomalous
    out = tmp_path / "out"
    config = InspectConfig(out=out, max_frames=2000, batch_size=4, overlay_quota_mb=0.05, **QUIET)
    probe = Probe()
    with Inspector.open(_contract_artifact(tmp_path), "ort-cpu", num_threads=1) as inspector:
        descriptors_before = len(os.listdir("/proc/self/fd"))
        sinks = [*build_sinks(config, inspector.manifest, live=False, warn=lambda line: None), probe]
        result = run_inspection(open_source(str(folder), SourceConfig(loop=True)), inspector, config, sinks, handle_signals=False)
        assert len(os.listdir("/proc/self/fd")) == descriptors_before  # nothing left open
    assert result.stats.counters["inspected"] == 2000 and result.exit_code == 0
    assert len((out / "verdicts.jsonl").read_text().splitlines()) == 2000
    sizes = [path.stat().st_size for path in (out / "overlays").iterdir()]
    assert sum(sizes) - max(sizes) < 0.05e6 <= sum(sizes)  # filled, and overshot by at most one file
    samples = probe.samples[4:]  # after 500 frames of warm-up
    rss = [kib for _, kib, _ in samples]
    descriptors = [count for _, _, count in samples]
    assert max(rss) - min(rss) < 8 * 1024, probe.samples  # flat within 8 MiB
    assert max(descriptors) - min(descriptors) <= 2, probe.samples  # at most a file being written meanwhile


def test_cli_run_on_a_video_file_with_the_onnx_contract_graph(tmp_path):
    from typer.testing import CliRunner

    from reconad.runtime.cli import app
    from tests.runtime.fakes import write_video

    video = write_video(tmp_path / "line.avi", [gray_frame(level, (48, 64)) for level in (30, 220, 40, 230, 50, 60)])
    artifact, out = _contract_artifact(tmp_path), tmp_path / "out"
    arguments = ["run", str(video), "--model", str(artifact), "--out", str(out), "--roi", "8,8,32,32", "--max-frames", "5"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "5 frames inspected on ort-cpu: 2 anomalous, 0 unknown, 0 unreadable" in result.stdout
    assert "stopped: max frames" in result.stdout
    records = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [record["is_anomalous"] for record in records] == [False, True, False, True, False]
    assert records[1]["overlay"] == "overlays/00000001.png" and (out / records[1]["overlay"]).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max frames" and summary["backend"] == "ort-cpu"
    assert summary["counters"]["inspected"] == 5 and summary["latency_ms"]["capture_to_decision"]["p99"] > 0
    assert summary["counters"]["unknown"] == 0
    assert summary["judged"] == {"category": None, "threshold": None, "no_threshold": False}
