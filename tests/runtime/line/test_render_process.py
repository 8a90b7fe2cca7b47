"""Video outputs rendered in a child process (line/render_process.py): files and an RTSP stream read back
by real clients, the child's priority and signals, and what happens when either side dies."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import cv2
import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.render import VERDICT_COLOURS
from reconad.runtime.line.priority import BACKGROUND_NICENESS as CHILD_NICENESS
from reconad.runtime.line.render_process import RenderProcessSink
from tests.runtime.fakes import write_video
from tests.runtime.line.services import (
    free_port,
    require_ffmpeg_rtsp_client,
    require_gst_outputs,
    require_xvfb,
    unused_display,
    wait_until,
)
from tests.runtime.line.test_outputs import inspection, near, read_frames
from tests.runtime.onnx_graphs import write_artifact


def decoded(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame[:, :, ::-1])


def test_the_child_renders_every_frame_into_every_file(tmp_path):
    sink = RenderProcessSink([str(tmp_path / "a.mp4"), str(tmp_path / "b.avi")], fps=10, pixel_threshold=0.6)
    try:
        child = sink._process.pid
        assert child != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, child) == CHILD_NICENESS  # renders with what inference leaves
        assert wait_until(lambda: os.sched_getscheduler(child) == os.SCHED_IDLE, timeout_s=5)
        assert not RenderProcessSink.heavy  # the parent's hand-over thread keeps inference's priority
        for index in range(6):
            assert sink.accepts(inspection(index, 0.9 if index % 2 else 0.1))
            assert sink.write(inspection(index, 0.9 if index % 2 else 0.1)) is True
        assert sink.render_ms > 0
        assert not (tmp_path / "a.mp4").exists()  # still being written: named partial
    finally:
        sink.close()
    assert [state.frames_written for state in sink.outputs] == [6, 6]
    for name in ("a.mp4", "b.avi"):
        frames = decoded(tmp_path / name)
        assert len(frames) == 6
        assert near(frames[0][5, 5], VERDICT_COLOURS["OK"]) and near(frames[1][5, 5], VERDICT_COLOURS["NG"])
    assert not os.path.exists(f"/proc/{child}")  # ended and reaped


def test_an_output_the_child_cannot_open_is_one_sentence(tmp_path):
    with pytest.raises(ReconadError, match=r"^Cannot write .*nope/a\.mp4: the folder .* does not exist\.$"):
        RenderProcessSink([str(tmp_path / "a.avi"), str(tmp_path / "nope" / "a.mp4")])


def test_a_display_no_x_server_answers_is_refused_at_start_in_one_sentence(monkeypatch):
    display = unused_display()
    monkeypatch.setenv("DISPLAY", display)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(ReconadError, match=rf"^display://0 needs a desktop, but no X server answers on DISPLAY={display}: "
                                           r"start the X server .* --output rtsp://0\.0\.0\.0:8554/inspect\.$"):
        RenderProcessSink(["display://0"])  # the child opens it, refuses, and ends cleanly (no SIGSEGV)


def test_a_run_whose_display_does_not_answer_exits_2_before_inspecting(tmp_path):
    """Before: the render child crashed (SIGSEGV in autovideosink's dfbvideosink), every frame counted a
    sink error and the run exited 0."""
    display = unused_display()
    artifact = write_artifact(tmp_path / "model")
    video = write_video(tmp_path / "clip.avi", [np.full((48, 64, 3), 40 * n, np.uint8) for n in range(4)])
    environment = {**{k: v for k, v in os.environ.items() if k != "WAYLAND_DISPLAY"}, "DISPLAY": display}
    command = [sys.executable, "-c", "from reconad.runtime.cli import app; app()", "run", str(video),
               "--model", str(artifact), "--no-threshold", "--backend", "ort-cpu", "--out", str(tmp_path / "out"),
               "--output", "display://0", "--max-frames", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"display://0 needs a desktop, but no X server answers on DISPLAY={display}: start the X server or log in to "
        "the desktop, or watch from another machine with --output rtsp://0.0.0.0:8554/inspect.")
    assert "warning" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "verdicts.jsonl").read_text() == ""  # nothing was inspected


def test_a_wayland_desktop_that_hangs_up_fails_in_one_sentence_without_a_crash(tmp_path, monkeypatch):
    """On Wayland alone the window is waylandsink's: autovideosink would try DirectFB's dfbvideosink
    first, which crashes (SIGSEGV) where it cannot start. The socket here accepts and hangs up at once,
    as a compositor that is going away."""
    import socket

    from reconad.runtime.line.gst import import_gst

    require_gst_outputs()
    Gst, _, _ = import_gst("this test")
    if Gst.ElementFactory.find("waylandsink") is None:
        pytest.skip("needs GStreamer's waylandsink: apt install gstreamer1.0-plugins-bad")
    compositor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    compositor.bind(str(tmp_path / "wayland-0"))
    compositor.listen(8)

    def hang_up():
        while True:
            try:
                connection, _ = compositor.accept()
            except OSError:  # closed: the test is over
                return
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setenv("WAYLAND_DISPLAY", str(tmp_path / "wayland-0"))
    try:
        sink = RenderProcessSink(["display://0"], fps=10)  # the socket accepts: the desktop answers
        try:
            with pytest.raises(ReconadError, match=r"^Cannot open a window for display://0: "):
                sink.write(inspection(0, 0.9))
            assert sink._process.is_alive()  # refused in a sentence, not crashed
        finally:
            sink.close()
    finally:
        compositor.close()


def test_an_x_server_that_goes_away_mid_run_stops_the_window_with_one_failure(tmp_path, monkeypatch):
    """Xlib ends the process that loses its X server (its fatal I/O error handler exits): the outputs
    stop as for any child that dies, the parent goes on."""
    require_gst_outputs()
    screen = require_xvfb(tmp_path / "x")
    monkeypatch.setenv("DISPLAY", screen.display)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    try:
        sink = RenderProcessSink(["display://0"], fps=10)
        for index in range(3):
            assert sink.write(inspection(index, 0.9)) is True
    finally:
        screen.stop()
    try:
        assert wait_until(lambda: not sink._process.is_alive(), timeout_s=10)
        with pytest.raises(ReconadError, match=r"^The video output process ended unexpectedly \(exit code "):
            sink.write(inspection(3, 0.9))
        assert sink.outputs[0].failed.startswith("the video output process ended unexpectedly")
    finally:
        with pytest.raises(ReconadError, match="ended early"):
            sink.close()


def test_without_idle_the_child_runs_at_nice_19_under_the_normal_policy(tmp_path):
    sink = RenderProcessSink([str(tmp_path / "a.avi")], fps=10, idle=False)
    try:
        child = sink._process.pid
        assert os.sched_getscheduler(child) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, child) == CHILD_NICENESS
    finally:
        sink.close()


def test_the_child_ignores_ctrl_c_and_is_stopped_by_the_run(tmp_path):
    sink = RenderProcessSink([str(tmp_path / "a.avi")], fps=10)
    try:
        os.kill(sink._process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
        time.sleep(0.3)
        assert sink.write(inspection(0, 0.9)) is True
    finally:
        sink.close()
    assert len(decoded(tmp_path / "a.avi")) == 1


def test_a_child_that_dies_fails_the_writes_in_one_sentence(tmp_path):
    sink = RenderProcessSink([str(tmp_path / "a.avi")], fps=10)
    sink.write(inspection(0, 0.9))
    sink._process.kill()
    sink._process.join(5)
    with pytest.raises(ReconadError, match=r"^The video output process ended unexpectedly \(exit code -9\); the video outputs stopped\.$"):
        sink.write(inspection(1, 0.9))
    with pytest.raises(ReconadError, match="ended early"):
        sink.close()


def test_a_killed_run_leaves_its_file_named_partial(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.runtime.line.test_outputs import inspection
        from reconad.runtime.line.render_process import RenderProcessSink
        if __name__ == "__main__":
            sink = RenderProcessSink([{str(tmp_path / "line.avi")!r}], fps=10)
            sink.write(inspection(0, 0.9))
            print(sink._process.pid, flush=True)
            os._exit(9)  # killed: no close
    """)
    (tmp_path / "run.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, timeout=60)
    child = int(done.stdout.split()[0])
    assert wait_until(lambda: not os.path.exists(f"/proc/{child}"), timeout_s=10)  # the child followed its parent
    assert (tmp_path / "line.partial.avi").exists() and not (tmp_path / "line.avi").exists()


def test_an_rtsp_output_in_the_child_renders_only_while_watched():
    require_gst_outputs()
    require_ffmpeg_rtsp_client()
    port = free_port()
    sink = RenderProcessSink([f"rtsp://@:{port}/inspect"], fps=15)
    try:
        assert sink.write(inspection(0, 0.1)) is True  # the first frame mounts the stream
        assert sink.outputs[0].url == f"rtsp://127.0.0.1:{port}/inspect"
        assert sink.write(inspection(1, 0.1)) is False  # nobody watches: not rendered
        stop = threading.Event()

        def feed():
            while not stop.is_set():
                sink.write(inspection(2, 0.9))
                time.sleep(1 / 15)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            frames = read_frames(sink.outputs[0].url, 3)  # a client comes: frames are rendered again
        finally:
            stop.set()
            feeder.join()
        assert near(frames[-1][4, 4], VERDICT_COLOURS["NG"])
    finally:
        sink.close()


def test_the_child_is_spawned_with_ctrl_c_ignored_from_its_first_instruction():
    """An ignored SIGINT survives exec and Python then installs no KeyboardInterrupt handler, so a Ctrl-C
    while the child still imports cannot print its traceback (found by a newcomer: 3 of 8 early Ctrl-Cs)."""
    from reconad.runtime.line.render_process import _ctrl_c_ignored

    probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"]
    with _ctrl_c_ignored():
        inside = subprocess.run(probe, capture_output=True, text=True, timeout=30).stdout
    outside = subprocess.run(probe, capture_output=True, text=True, timeout=30).stdout
    assert inside.strip() == "True" and outside.strip() == "False"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_camera_blind_frames_reach_the_video_with_their_banner(tmp_path):
    from reconad.runtime.line.sinks import CameraBlind

    blind = CameraBlind(name="cam#1", captured_at="2026-01-01T08:00:00.000+00:00", reason="black",
                        detail="99% of pixels at or below 10", frame=np.zeros((180, 320, 3), np.uint8))
    sink = RenderProcessSink([str(tmp_path / "a.avi")], fps=10)
    try:
        assert sink.accepts(blind) and sink.write(blind) is True
    finally:
        sink.close()
    frames = decoded(tmp_path / "a.avi")
    assert len(frames) == 1 and near(frames[0][5, 5], VERDICT_COLOURS["CAMERA BLIND"])


def test_each_product_is_drawn_at_its_own_scale_as_its_overlays_are():
    from reconad.runtime.line.render import render_result
    from reconad.runtime.line.video_sink import VideoOutputSink

    class Keep:
        uri, frames_written = "memory://", 0

        def write(self, frame):
            self.frame = frame

        def close(self):
            pass

    output = Keep()
    sink = VideoOutputSink([output], low=0.0, high=1.0, pixel_threshold=0.6, scales={"washer": (0.5, 2.0, 0.95)})
    def of(category):
        result = inspection(0, 0.9)
        return dataclasses.replace(result, verdict=dataclasses.replace(result.verdict, category=category))

    for category, scale in (("washer", (0.5, 2.0, 0.95)), ("pill", (0.0, 1.0, 0.6)), (None, (0.0, 1.0, 0.6))):
        sink.write(of(category))
        expected = render_result(of(category), low=scale[0], high=scale[1], pixel_threshold=scale[2])
        assert np.array_equal(output.frame, expected), category
    assert not np.array_equal(render_result(of("washer"), low=0.0, high=1.0, pixel_threshold=0.6), output.frame)
