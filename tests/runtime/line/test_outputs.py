"""Video outputs read back by real clients: a file by OpenCV, our RTSP server by OpenCV's FFmpeg and ffprobe,
a window on a virtual X screen (Xvfb) by ffmpeg's x11grab."""

import json
import os
import shutil
import socket
import subprocess
import threading
import time

import cv2
import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Verdict
from reconad.runtime.line.gst import choose_h264_encoder, h264_encoder, import_gst
from reconad.runtime.line.outputs import FileOutput, OutputTarget, open_output, open_outputs, parse_output_uri
from reconad.runtime.line.render import VERDICT_COLOURS
from reconad.runtime.line.video_sink import VideoOutputSink
from reconad.runtime.line.sinks import InspectionResult
from tests.runtime.line.services import (
    free_port,
    require_display,
    require_ffmpeg_rtsp_client,
    require_gst_outputs,
    wait_until,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(shape=(240, 320)):
    """RGB: left half red, right half blue."""
    frame = np.zeros((*shape, 3), np.uint8)
    frame[:, : shape[1] // 2] = RED
    frame[:, shape[1] // 2 :] = BLUE
    return frame


def near(pixel, colour, tolerance=40):
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(colour, int)) <= tolerance))


@pytest.mark.parametrize(
    ("uri", "target"),
    [
        ("display://0", OutputTarget("display", "display://0", screen=0)),
        ("rtsp://@:8554/inspect", OutputTarget("rtsp", "rtsp://@:8554/inspect", host="127.0.0.1", port=8554, mount="/inspect")),
        ("rtsp://:9000", OutputTarget("rtsp", "rtsp://:9000", host="127.0.0.1", port=9000, mount="/inspect")),
        ("rtsp://0.0.0.0:8554/line1", OutputTarget("rtsp", "rtsp://0.0.0.0:8554/line1", host="0.0.0.0", port=8554, mount="/line1")),
        ("rtsp://[::1]:8554/x", OutputTarget("rtsp", "rtsp://[::1]:8554/x", host="::1", port=8554, mount="/x")),
    ],
)
def test_parse_output_uri(uri, target):
    assert parse_output_uri(uri) == target


def test_parse_file_outputs(tmp_path):
    assert parse_output_uri(str(tmp_path / "a.mp4")).path == tmp_path / "a.mp4"
    assert parse_output_uri(f"file://{tmp_path}/b.AVI").kind == "file"


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("webrtc://@:8554/x", "Unknown output"),
        ("out.png", "must end in one of"),
        ("display://1", "Only display://0"),
        ("rtsp://camera.local:8554/x", "address of this machine"),
        ("rtsp://@:99999/x", "invalid port"),
    ],
)
def test_bad_outputs_are_one_sentence_errors(uri, words):
    with pytest.raises(ReconadError, match=words):
        parse_output_uri(uri)


@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".mkv"])
def test_a_file_output_is_complete_only_after_close(tmp_path, suffix):
    path = tmp_path / f"line{suffix}"
    output = open_output(str(path), fps=10)
    for _ in range(12):
        output.write(halves())
    output.write(halves((120, 160)))  # another size: resized to the first frame's
    assert not path.exists() and (tmp_path / f"line.partial{suffix}").exists()
    output.close()
    output.close()
    assert path.exists() and not (tmp_path / f"line.partial{suffix}").exists()
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[:, :, ::-1])
    assert len(frames) == 13 and frames[0].shape == (240, 320, 3)
    assert near(frames[-1][120, 60], RED) and near(frames[-1][120, 260], BLUE)


def test_a_file_output_in_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(ReconadError, match="does not exist"):
        FileOutput(parse_output_uri(str(tmp_path / "nope" / "a.mp4")))


def test_display_without_a_desktop_is_a_one_sentence_error(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(ReconadError, match="neither DISPLAY nor WAYLAND_DISPLAY"):
        open_output("display://0")


@pytest.mark.parametrize(
    ("elements", "encoder"),
    [
        ({"nvv4l2h264enc", "nvvidconv", "x264enc", "openh264enc"}, "nvv4l2h264enc"),
        ({"nvv4l2h264enc", "x264enc"}, "x264enc"),  # no nvvidconv: the hardware encoder cannot be fed
        ({"openh264enc", "x264enc"}, "x264enc"),
        ({"openh264enc", "rtph264pay"}, "openh264enc"),
        ({"rtph264pay", "videoconvert"}, None),
    ],
)
def test_the_h264_encoder_is_chosen_from_the_elements_present(elements, encoder):
    assert choose_h264_encoder(elements) == encoder


def test_the_pipeline_section_follows_the_encoder_chosen():
    require_gst_outputs()
    Gst, _, _ = import_gst("this test")
    present = [name for name in ("nvv4l2h264enc", "nvvidconv", "x264enc", "openh264enc") if Gst.ElementFactory.find(name)]
    encoder = choose_h264_encoder(present)
    if encoder is None:
        with pytest.raises(ReconadError, match="needs an H.264 encoder"):
            h264_encoder(Gst, 30, 4000)
    else:
        section = h264_encoder(Gst, 30, 4000)
        assert f"! {encoder} " in section and section.startswith("nvvidconv" if encoder == "nvv4l2h264enc" else "videoconvert")


class Feeder:
    """Writes ``frame`` to ``output`` at ``fps`` on a thread, as the sink worker would."""

    def __init__(self, output, frame, fps=15):
        self.output, self.frame, self.interval = output, frame, 1.0 / fps
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.output.write(self.frame)
            time.sleep(self.interval)

    def stop(self):
        self._stop.set()
        self.thread.join()


def read_frames(url, count):
    capture = cv2.VideoCapture(url, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 10000])
    assert capture.isOpened(), f"cannot open {url}"
    frames = []
    try:
        while len(frames) < count:
            ok, frame = capture.read()
            assert ok, f"{url} stopped after {len(frames)} frames"
            frames.append(frame[:, :, ::-1])
    finally:
        capture.release()
    return frames


@pytest.fixture
def rtsp_output():
    require_gst_outputs()
    require_ffmpeg_rtsp_client()
    output = open_output(f"rtsp://@:{free_port()}/inspect", fps=15)
    yield output
    output.close()


def test_the_rtsp_output_is_read_back_by_opencv_and_ffprobe(rtsp_output):
    assert rtsp_output.url.startswith("rtsp://127.0.0.1:")
    frame = halves()
    rtsp_output.write(frame)  # mounts the stream; nobody watches yet
    assert rtsp_output.frames_unwatched == 1 and rtsp_output.clients == 0
    feeder = Feeder(rtsp_output, frame)
    try:
        frames = read_frames(rtsp_output.url, 10)
        assert all(f.shape == (240, 320, 3) for f in frames)
        assert all(near(f[120, 60], RED) and near(f[120, 260], BLUE) for f in frames)
        assert wait_until(lambda: rtsp_output.clients == 0, timeout_s=10)  # the client left: no more encoding
        unwatched = rtsp_output.frames_unwatched
        assert wait_until(lambda: rtsp_output.frames_unwatched > unwatched)
        if shutil.which("ffprobe"):
            probe = subprocess.run(["ffprobe", "-v", "error", "-rtsp_transport", "tcp", "-show_streams", "-of", "json",
                                    rtsp_output.url], capture_output=True, text=True, timeout=30)
            stream = json.loads(probe.stdout)["streams"][0]
            assert (stream["codec_name"], stream["width"], stream["height"]) == ("h264", 320, 240)
        frames = read_frames(rtsp_output.url, 3)  # a second client later gets the stream again
        assert near(frames[-1][120, 60], RED)
    finally:
        feeder.stop()


def test_the_rtsp_output_serves_two_clients_at_once(rtsp_output):
    feeder = Feeder(rtsp_output, halves())
    results = {}
    try:
        readers = [threading.Thread(target=lambda n=n: results.__setitem__(n, read_frames(rtsp_output.url, 8)))
                   for n in range(2)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=60)
    finally:
        feeder.stop()
    assert sorted(results) == [0, 1] and all(len(frames) == 8 for frames in results.values())


def _non_loopback_address():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, the kernel just picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_rtsp_output_listens_on_loopback_only_and_refuses_a_taken_port(rtsp_output):
    rtsp_output.write(halves())
    port = int(rtsp_output.url.split(":")[2].split("/")[0])
    address = _non_loopback_address()
    if address is not None:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()
    with pytest.raises(ReconadError, match="in use"):
        open_output(f"rtsp://@:{port}/other")


def test_display_shows_the_frames_on_a_screen(tmp_path, monkeypatch):
    require_gst_outputs()
    screen = require_display(tmp_path / "x")
    monkeypatch.setenv("DISPLAY", screen.display)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    output = open_output("display://0", fps=15)
    try:
        for _ in range(10):
            output.write(halves())
            time.sleep(0.03)
        assert wait_until(lambda: np.all(screen.grab(tmp_path / "screen.png") == RED, axis=2).sum() == 160 * 240,
                          timeout_s=10, interval_s=0.2)
        grabbed = screen.grab(tmp_path / "screen.png")
        assert np.all(grabbed == BLUE, axis=2).sum() == 160 * 240
    finally:
        output.close()
        screen.stop()


def inspection(index, score, threshold=0.5, hw=(180, 320)):
    frame = np.full((*hw, 3), 90, np.uint8)  # BGR, as a camera delivers it
    anomaly_map = np.zeros((32, 32), np.float32)
    anomaly_map[12:20, 12:20] = score
    verdict = Verdict(image_score=score, is_anomalous=score >= threshold, threshold=threshold, anomaly_map=anomaly_map)
    return InspectionResult(index=index, name=f"cam#{index}", captured_at="2026-01-01T08:00:00.000+00:00",
                            verdict=verdict, latency_ms=5.0, frame=frame, colour="BGR")


def test_the_sink_renders_once_and_feeds_every_output(tmp_path, rtsp_output):
    files = [FileOutput(parse_output_uri(str(tmp_path / name)), fps=10) for name in ("a.mp4", "b.avi")]
    sink = VideoOutputSink([*files, rtsp_output], pixel_threshold=0.6)
    assert not sink.accepts(InspectionResult(index=0, name="x", captured_at="t", latency_ms=1.0,
                                             verdict=inspection(0, 0.1).verdict))  # no frame kept: not for us
    frames = [inspection(index, 0.9 if index % 2 else 0.1) for index in range(20)]
    read = {}
    reader = threading.Thread(target=lambda: read.setdefault("frames", read_frames(rtsp_output.url, 5)))
    for result in frames[:2]:
        sink.write(result)  # mounts the RTSP stream
    reader.start()
    written, deadline = 2, time.monotonic() + 60
    while (reader.is_alive() or written < 20) and time.monotonic() < deadline:  # a live stream until it is read
        sink.write(frames[written % 20])
        written += 1
        time.sleep(0.03)
    reader.join(timeout=1)
    sink.close()
    for name in ("a.mp4", "b.avi"):
        capture = cv2.VideoCapture(str(tmp_path / name))
        decoded = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            decoded.append(frame[:, :, ::-1])
        assert len(decoded) == written
        assert near(decoded[0][5, 5], VERDICT_COLOURS["OK"]) and near(decoded[1][5, 5], VERDICT_COLOURS["NG"])
        assert decoded[0].shape[0] > 360  # scaled up to stay legible, plus the banner
    assert len(read["frames"]) == 5 and read["frames"][0].shape == decoded[0].shape


def test_a_failing_output_does_not_starve_the_others(tmp_path):
    class Broken:
        uri = "broken://"

        def write(self, frame):
            raise ReconadError("the window was closed")

        def close(self):
            pass

    good = FileOutput(parse_output_uri(str(tmp_path / "a.avi")), fps=10)
    sink = VideoOutputSink([Broken(), good])
    with pytest.raises(ReconadError, match="window was closed"):
        sink.write(inspection(0, 0.9))
    sink.close()
    assert good.frames_written == 1


def test_open_outputs_closes_what_it_opened_when_one_fails(tmp_path):
    with pytest.raises(ReconadError):
        open_outputs([str(tmp_path / "a.avi"), "webrtc://x"])


def test_nothing_is_rendered_for_an_rtsp_output_nobody_watches(rtsp_output):
    sink = VideoOutputSink([rtsp_output])
    assert sink.write(inspection(0, 0.1)) is True  # the first frame mounts the stream
    assert not rtsp_output.wants_frames
    sink.render_ms = 0.0
    assert sink.write(inspection(1, 0.1)) is False and sink.render_ms == 0.0  # skipped, not rendered
    feeder = Feeder(sink, inspection(2, 0.9))
    try:
        frames = read_frames(rtsp_output.url, 3)  # a client comes: frames are rendered again
    finally:
        feeder.stop()
    assert near(frames[-1][4, 4], VERDICT_COLOURS["NG"]) and sink.render_ms > 0


def test_a_live_source_renders_at_most_at_the_outputs_frame_rate(monkeypatch):
    """Frames arriving faster than the output's rate are not rendered (counted); at the rate, none is lost
    to jitter; without max_fps (a file source) every frame is rendered."""
    from reconad.runtime.line import video_sink as outputs_module

    clock = [0.0]
    monkeypatch.setattr(outputs_module.time, "monotonic", lambda: clock[0])

    def accepted(sink, arrivals):
        kept = 0
        for t in arrivals:
            clock[0] = t
            kept += sink.accepts(inspection(0, 0.9))
        return kept

    fast = [k / 60 for k in range(120)]  # 2 s of a 60 fps camera
    capped = VideoOutputSink([], max_fps=30)
    kept = accepted(capped, fast)
    assert 58 <= kept <= 62 and capped.frames_over_rate == 120 - kept
    jittery = [k / 30 + (0.004 if k % 2 else -0.004) for k in range(60)]  # a 30 fps camera, +-4 ms
    assert accepted(VideoOutputSink([], max_fps=30), jittery) == 60
    assert accepted(VideoOutputSink([]), fast) == 120
    with pytest.raises(ReconadError, match="max_fps"):
        VideoOutputSink([], max_fps=0)


def test_a_video_that_did_not_come_out_readable_keeps_its_partial_name(tmp_path):
    """OpenCV's writer reports no write error, a full disk included (a newcomer got an unplayable mp4 under
    the final name and 0 errors): the file is read back before it is renamed."""
    output = FileOutput(parse_output_uri(str(tmp_path / "line.mp4")), fps=10)
    for _ in range(3):
        output.write(halves())
    os.truncate(output.partial, 0)  # what a full disk leaves: the writer's bytes never reached the file
    with pytest.raises(ReconadError, match=r"line\.partial\.mp4 did not come out readable; it keeps its partial name\.$"):
        output.close()
    assert output.partial.exists() and not (tmp_path / "line.mp4").exists()


@pytest.mark.parametrize("suffix", [".mkv", ".avi"])
def test_a_video_cut_short_by_a_full_disk_keeps_its_partial_name(tmp_path, monkeypatch, suffix):
    """A newcomer's mkv/avi on a full 300 kB file system opened and held 18 of 80 frames, yet got its final
    name with 0 errors (only the first frame was read back). On a full disk the file is read to its end."""
    import shutil
    from collections import namedtuple

    import reconad.runtime.line.outputs as outputs_module

    output = FileOutput(parse_output_uri(str(tmp_path / f"line{suffix}")), fps=10)
    rng = np.random.default_rng(0)
    for _ in range(30):
        output.write(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))  # noise: every frame is large
    writer = output._writer

    class CutShort:  # what a full disk leaves: the writer's last bytes never reached the file
        def release(self):
            writer.release()
            os.truncate(output.partial, output.partial.stat().st_size // 3)

    output._writer = CutShort()
    usage = namedtuple("usage", "total used free")
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(outputs_module.shutil, "disk_usage", lambda path: usage(1 << 20, 1 << 20, 0))
    with pytest.raises(ReconadError, match=r"did not come out readable \(the disk is full\); it keeps its partial name\.$"):
        output.close()
    assert output.partial.exists() and not (tmp_path / f"line{suffix}").exists()
    capture = cv2.VideoCapture(str(output.partial))
    assert capture.read()[0]  # it opens and shows its first frame: the old check passed it
    capture.release()

    monkeypatch.setattr(outputs_module.shutil, "disk_usage", real_disk_usage)
    whole = FileOutput(parse_output_uri(str(tmp_path / f"whole{suffix}")), fps=10)
    for _ in range(30):
        whole.write(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    monkeypatch.setattr(outputs_module.shutil, "disk_usage", lambda path: usage(1 << 20, 1 << 20, 0))
    whole.close()  # complete, on a disk that is full now: read to its end, and named
    assert (tmp_path / f"whole{suffix}").exists() and not whole.partial.exists()


def test_an_output_file_that_cannot_be_written_is_refused_before_the_run(tmp_path):
    from reconad.runtime.line.outputs import check_output_files

    with pytest.raises(ReconadError, match=r"the folder .*nowhere does not exist\.$"):
        check_output_files([str(tmp_path / "nowhere" / "line.mp4")])
    (tmp_path / "isdir.mp4").mkdir()
    with pytest.raises(ReconadError, match=r"isdir\.mp4: it is a folder; name a video file\.$"):
        check_output_files([str(tmp_path / "isdir.mp4")])
    if os.geteuid() != 0:  # root writes through permission bits (a read-only mount refuses it too)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ReconadError, match="is not writable here"):
            check_output_files([str(locked / "line.mp4")])
    check_output_files([str(tmp_path / "line.mp4"), "rtsp://@:8554/x", "display://0"])


def test_an_output_that_is_the_source_or_named_twice_is_refused(tmp_path):
    from reconad.runtime.line.outputs import check_output_files

    source = tmp_path / "line.avi"
    with pytest.raises(ReconadError, match="is the source itself"):
        check_output_files([str(tmp_path / "." / "line.avi")], source=str(source))
    with pytest.raises(ReconadError, match="is named twice"):
        check_output_files([str(tmp_path / "a.mp4"), "rtsp://@:8554/x", f"file://{tmp_path}/a.mp4"])
    check_output_files([str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")], source=str(source))


def test_a_video_file_source_reports_its_frame_rate(tmp_path):
    from reconad.runtime.line.sources import open_source

    writer = cv2.VideoWriter(str(tmp_path / "five.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (64, 48))
    for _ in range(3):
        writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    source = open_source(str(tmp_path / "five.avi"))
    assert source.frame_rate is None  # not open yet
    source.open()
    try:
        assert source.frame_rate == pytest.approx(5.0)
    finally:
        source.close()


def test_the_roi_the_model_sees_is_boxed_on_the_frame():
    from reconad.runtime.line.render import ROI_OUTLINE, Annotation, render_inspection

    image = np.full((360, 480, 3), 90, np.uint8)
    annotation = Annotation(0.2, 0.5, False, category="pill")
    plain = render_inspection(image, np.zeros((16, 16), np.float32), annotation)
    boxed = render_inspection(image, np.zeros((16, 16), np.float32), annotation, roi=(100, 50, 200, 150))
    banner = plain.shape[0] - 360
    assert near(boxed[banner + 50, 200], ROI_OUTLINE) and near(plain[banner + 50, 200], (90, 90, 90))
    assert np.array_equal(boxed[banner + 250 :], plain[banner + 250 :])  # nothing else changes below the box


def test_a_frame_of_another_size_is_letterboxed_not_stretched():
    from reconad.runtime.line.outputs import _fit

    tall = halves((400, 100))  # red left, blue right, 1:4
    fitted = _fit(tall, (200, 400, 3))
    assert fitted.shape == (200, 400, 3)
    assert not fitted[:, :175].any() and not fitted[:, 225:].any()  # black bars either side
    assert near(fitted[100, 185], RED) and near(fitted[100, 215], BLUE)  # the frame, 50 x 200, centred
