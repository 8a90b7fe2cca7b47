"""Frame sources: URI parsing, GStreamer pipeline strings, flips, image folders and video files."""

import cv2
import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.pipelines import FLIP_METHODS, csi_pipeline, has_gstreamer, rtsp_pipeline, v4l2_pipeline
from reconad.runtime.line.sources import (
    CaptureSource,
    FrameReadError,
    ImageFolderSource,
    SourceConfig,
    apply_flip,
    open_source,
    parse_source_uri,
)
from tests.runtime.fakes import gray_frame, write_image_folder, write_video


def test_parse_source_uri(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    image = tmp_path / "one.png"
    image.write_bytes(b"")
    assert parse_source_uri("csi://0") == ("csi", "0")
    assert parse_source_uri("csi://1") == ("csi", "1")
    assert parse_source_uri("v4l2:///dev/video1") == ("v4l2", "/dev/video1")
    assert parse_source_uri("/dev/video0") == ("v4l2", "/dev/video0")
    assert parse_source_uri("rtsp://10.0.0.2:8554/line1") == ("rtsp", "rtsp://10.0.0.2:8554/line1")
    assert parse_source_uri("rtsps://cam/x") == ("rtsp", "rtsps://cam/x")
    assert parse_source_uri("file:///data/clip.MP4") == ("video", "/data/clip.MP4")
    assert parse_source_uri("clip.avi") == ("video", "clip.avi")
    assert parse_source_uri(str(folder)) == ("images", str(folder))
    assert parse_source_uri(f"file://{folder}") == ("images", str(folder))
    assert parse_source_uri(str(image)) == ("images", str(image))


@pytest.mark.parametrize(
    "uri, message",
    [
        ("csi://front", "A CSI camera URI is csi://N"),
        ("v4l2://", "A V4L2 camera URI is v4l2:///dev/videoN"),
        ("http://example.com/feed", "Unknown source"),
        ("/nowhere/at/all", "does not exist"),
    ],
)
def test_parse_source_uri_errors(uri, message):
    with pytest.raises(ReconadError, match=message):
        parse_source_uri(uri)


def test_csi_pipeline_string():
    assert csi_pipeline(0, 1920, 1080, 30, "rotate-180") == (
        "nvarguscamerasrc sensor-id=0 ! "
        "video/x-raw(memory:NVMM), width=1920, height=1080, framerate=30/1, format=NV12 ! "
        "nvvidconv flip-method=2 ! video/x-raw, format=BGRx ! "
        "videoconvert ! video/x-raw, format=BGR ! appsink drop=true max-buffers=1 sync=false"
    )
    assert "framerate=2997/100" in csi_pipeline(1, 1280, 720, 29.97)
    assert "sensor-id=1" in csi_pipeline(1, 1280, 720, 30)
    # nvvidconv's flip-method numbering is the order of FLIP_METHODS
    assert [f"flip-method={i}" in csi_pipeline(0, 640, 480, 30, flip) for i, flip in enumerate(FLIP_METHODS)] == [True] * 8


def test_v4l2_pipeline_strings():
    assert v4l2_pipeline("/dev/video0") == (
        "v4l2src device=/dev/video0 ! video/x-raw ! videoconvert ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )
    assert v4l2_pipeline("/dev/video1", 1280, 720, 30, codec="mjpeg", flip="horizontal") == (
        "v4l2src device=/dev/video1 ! image/jpeg, width=1280, height=720, framerate=30/1 ! jpegdec ! "
        "videoconvert ! videoflip method=horizontal-flip ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )
    with pytest.raises(ReconadError, match="Codec must be one of"):
        v4l2_pipeline("/dev/video0", codec="h264")


def test_rtsp_pipeline_strings():
    uri = "rtsp://10.0.0.2:8554/line1"
    assert rtsp_pipeline(uri) == (
        f"rtspsrc location={uri} latency=200 ! decodebin ! videoconvert ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )
    assert rtsp_pipeline(uri, 50, "vertical", 640, 480) == (
        f"rtspsrc location={uri} latency=50 ! decodebin ! videoconvert ! videoflip method=vertical-flip ! "
        "videoscale ! video/x-raw, width=640, height=480 ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )
    assert rtsp_pipeline(uri, flip="clockwise", jetson=True) == (
        f"rtspsrc location={uri} latency=200 ! decodebin ! nvvidconv flip-method=3 ! "
        "video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )


def test_apply_flip_matches_nvvidconv_semantics():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    expected = {
        "none": image,
        "counterclockwise": np.rot90(image, 1),
        "rotate-180": np.rot90(image, 2),
        "clockwise": np.rot90(image, -1),
        "horizontal": image[:, ::-1],
        "vertical": image[::-1],
        "upper-left-diagonal": image.transpose(1, 0, 2),
        "upper-right-diagonal": np.rot90(image, 2).transpose(1, 0, 2),
    }
    assert set(expected) == set(FLIP_METHODS)
    for flip, wanted in expected.items():
        np.testing.assert_array_equal(apply_flip(image, flip), wanted, err_msg=flip)


def test_source_config_validation():
    with pytest.raises(ReconadError, match="Flip must be one of"):
        SourceConfig(flip="mirror")
    with pytest.raises(ReconadError, match="both width and height"):
        SourceConfig(width=640)
    with pytest.raises(ReconadError, match="fps must be positive"):
        SourceConfig(fps=0)


def test_image_folder_in_sorted_order_with_names_and_loop(tmp_path):
    folder = tmp_path / "frames"
    write_image_folder(folder / "b", [30])
    write_image_folder(folder / "a", [10, 20])
    (folder / "notes.txt").write_text("not an image")
    with ImageFolderSource(folder) as source:
        frames = [source.read() for _ in range(3)]
        assert source.read() is None
    assert [frame.name for frame in frames] == ["a/0000.png", "a/0001.png", "b/0000.png"]
    assert frames[0].image.shape == (24, 32, 3) and source.colour == "RGB"
    assert [round(float(frame.image.mean())) for frame in frames] == [10, 20, 30]

    looping = open_source(str(folder), SourceConfig(loop=True))
    with looping:
        names = [looping.read().name for _ in range(7)]
    assert names == ["a/0000.png", "a/0001.png", "b/0000.png"] * 2 + ["a/0000.png"]


def test_image_folder_skips_corrupt_files_and_refuses_an_undecodable_loop(tmp_path):
    folder = tmp_path / "frames"
    write_image_folder(folder, [40, 50])
    (folder / "0001.png").write_bytes(b"\x89PNG truncated")
    with ImageFolderSource(folder) as source:
        assert source.read().name == "0000.png"
        with pytest.raises(FrameReadError, match="Cannot read image") as caught:
            source.read()
        assert caught.value.name == "0001.png"
        assert source.read() is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"junk")
    with ImageFolderSource(broken, SourceConfig(loop=True)) as source:
        with pytest.raises(FrameReadError):
            source.read()
        with pytest.raises(ReconadError, match="None of the 1 images"):
            source.read()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReconadError, match="No image files under"):
        ImageFolderSource(empty).open()


def test_image_folder_rescale_and_flip(tmp_path):
    folder = tmp_path / "frames"
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 200  # left half bright
    folder.mkdir()
    cv2.imwrite(str(folder / "x.png"), image)
    with open_source(str(folder), SourceConfig(width=10, height=8, flip="horizontal")) as source:
        frame = source.read().image
    assert frame.shape == (8, 10, 3)
    assert frame[:, :5].mean() < 5 and frame[:, 5:].mean() > 195  # now the right half is bright


def test_video_file_source_reads_every_frame_in_bgr_then_ends_or_loops(tmp_path):
    frames = []
    for level in (40, 90, 140, 190, 240):
        frame = gray_frame(level, (48, 64))
        frame[:, :, 0] = 250  # blue channel high: BGR order must survive
        frames.append(frame)
    video = write_video(tmp_path / "clip.avi", frames)
    source = open_source(str(video))
    assert isinstance(source, CaptureSource) and not source.live and source.colour == "BGR"
    with source:
        read = [source.read() for _ in range(5)]
        assert source.read() is None
    assert [frame.name for frame in read] == [f"{video}#{n}" for n in range(1, 6)]
    for frame, level in zip(read, (40, 90, 140, 190, 240)):
        assert frame.image.shape == (48, 64, 3)
        assert abs(float(frame.image[:, :, 1].mean()) - level) < 6  # MJPG is lossy
        assert frame.image[:, :, 0].mean() > 230
    with open_source(f"file://{video}", SourceConfig(loop=True, width=32, height=24)) as looping:
        names = [looping.read().name for _ in range(12)]
        assert looping.read().image.shape == (24, 32, 3)
    assert names[4:7] == [f"file://{video}#5", f"file://{video}#1", f"file://{video}#2"]


def test_video_file_that_cannot_be_decoded(tmp_path):
    fake = tmp_path / "clip.mp4"
    fake.write_bytes(b"this is not a video")
    with pytest.raises(ReconadError, match="Cannot open"):
        open_source(str(fake)).open()
    with pytest.raises(ReconadError, match="does not exist"):
        open_source(str(tmp_path / "absent.mp4"))


@pytest.mark.skipif(has_gstreamer(), reason="this OpenCV has GStreamer: cameras would open pipelines")
def test_cameras_without_gstreamer_use_v4l2_and_ffmpeg_backends():
    with pytest.raises(ReconadError, match="needs OpenCV built with GStreamer"):
        open_source("csi://0")
    usb = open_source("v4l2:///dev/video0", SourceConfig(width=1280, height=720, fps=30, codec="mjpeg"))
    assert usb.live and usb.api == cv2.CAP_V4L2 and usb.target == "/dev/video0"
    properties = dict(usb.properties)
    assert properties[cv2.CAP_PROP_FOURCC] == cv2.VideoWriter_fourcc(*"MJPG")
    assert properties[cv2.CAP_PROP_FRAME_WIDTH] == 1280 and properties[cv2.CAP_PROP_FPS] == 30
    stream = open_source("rtsp://127.0.0.1:1/none", SourceConfig(read_timeout_ms=1500))
    assert stream.live and stream.api == cv2.CAP_FFMPEG
    assert stream.params == (cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10_000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 1500)


def test_a_missing_camera_fails_to_open_with_one_sentence():
    source = open_source("v4l2:///dev/video99")
    with pytest.raises(ReconadError, match=r"Cannot open v4l2:///dev/video99"):
        source.open()
