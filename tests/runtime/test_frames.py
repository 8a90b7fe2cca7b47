"""Preprocessing: every image kind (arrays and files) to uint8 [N, H, W, 3] RGB at the graph size."""

import cv2
import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import (
    crop_roi,
    list_images,
    prepare_batch,
    prepare_image,
    read_image,
    resize_image,
    to_rgb_uint8,
)

RGB = np.array([200, 100, 50], dtype=np.uint8)


def solid(height=6, width=8, colour=RGB):
    return np.broadcast_to(colour, (height, width, 3)).copy()


@pytest.mark.parametrize(
    ("image", "colour", "expected"),
    [
        (solid(), "RGB", RGB),
        (solid()[:, :, ::-1], "BGR", RGB),
        (np.full((6, 8), 77, np.uint8), "RGB", [77, 77, 77]),
        (np.full((6, 8, 1), 77, np.uint8), "BGR", [77, 77, 77]),
        (np.dstack([solid(), np.zeros((6, 8), np.uint8)]), "RGB", RGB),
        (np.dstack([solid()[:, :, ::-1], np.zeros((6, 8), np.uint8)]), "BGR", RGB),
        (solid().astype(np.uint16) * 257, "RGB", RGB),
        (np.full((6, 8), 65535, np.uint16), "RGB", [255, 255, 255]),
        (solid().astype(np.float32) / 255.0, "RGB", RGB),
        (np.full((6, 8), 2.0, np.float64), "RGB", [255, 255, 255]),
        (np.ones((6, 8), bool), "RGB", [255, 255, 255]),
        (np.dstack([np.full((6, 8), 77, np.uint8), np.zeros((6, 8), np.uint8)]), "RGB", [77, 77, 77]),  # gray + alpha
    ],
)
def test_to_rgb_uint8_every_kind(image, colour, expected):
    result = to_rgb_uint8(image, colour=colour)
    assert result.dtype == np.uint8 and result.shape == (6, 8, 3) and result.flags.c_contiguous
    assert (result == np.asarray(expected, np.uint8)).all()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 4, 5), np.uint8), "expected \\[H, W\\]"),
        (np.zeros((4,), np.uint8), "expected \\[H, W\\]"),
        (np.zeros((0, 4, 3), np.uint8), "expected \\[H, W\\]"),
        (np.zeros((4, 4, 3), np.int32), "dtype int32"),
    ],
)
def test_to_rgb_uint8_rejects(image, message):
    with pytest.raises(ReconadError, match=message):
        to_rgb_uint8(image)
    with pytest.raises(ReconadError, match="Colour order"):
        to_rgb_uint8(np.zeros((4, 4, 3), np.uint8), colour="YUV")


def test_read_image_files_of_every_kind(tmp_path):
    bgr = solid()[:, :, ::-1]
    cv2.imwrite(str(tmp_path / "colour.png"), bgr)
    cv2.imwrite(str(tmp_path / "gray.png"), np.full((6, 8), 77, np.uint8))
    cv2.imwrite(str(tmp_path / "alpha.png"), np.dstack([bgr, np.full((6, 8), 128, np.uint8)]))
    cv2.imwrite(str(tmp_path / "deep.png"), bgr.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "gray16.tif"), np.full((6, 8), 65535, np.uint16))
    cv2.imwrite(str(tmp_path / "lossy.jpg"), bgr)
    assert (read_image(tmp_path / "colour.png") == RGB).all()
    assert (read_image(tmp_path / "gray.png") == 77).all()
    assert (read_image(tmp_path / "alpha.png") == RGB).all()
    assert (read_image(tmp_path / "deep.png") == RGB).all()
    assert (read_image(tmp_path / "gray16.tif") == 255).all()
    assert np.abs(read_image(tmp_path / "lossy.jpg").astype(int) - RGB).max() <= 3
    assert read_image(tmp_path / "colour.png").shape == (6, 8, 3)
    assert [path.name for path in list_images(tmp_path)] == sorted(
        ["alpha.png", "colour.png", "deep.png", "gray.png", "gray16.tif", "lossy.jpg"]
    )


def test_unreadable_files_are_one_sentence(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("text.png", "empty.png"):
        with pytest.raises(ReconadError, match=f"Cannot read image .*{name}: it is empty, truncated or not a format"):
            read_image(tmp_path / name)
    with pytest.raises(ReconadError, match="Cannot read image .*missing.png: No such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ReconadError, match="does not exist or is not a folder"):
        list_images(tmp_path / "nowhere")


def test_resize_uses_area_when_shrinking_and_linear_when_growing():
    image = np.zeros((8, 8, 3), np.uint8)
    image[::2] = 255  # alternating rows: area averaging gives mid-gray, no aliasing
    shrunk = resize_image(image, (4, 4))
    assert shrunk.shape == (4, 4, 3) and np.all(np.abs(shrunk.astype(int) - 128) <= 1)
    grown = resize_image(image, (16, 12))
    assert grown.shape == (16, 12, 3)
    np.testing.assert_array_equal(grown, cv2.resize(image, (12, 16), interpolation=cv2.INTER_LINEAR))
    assert resize_image(image, (8, 8)) is image


def test_roi_crop_and_errors():
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    np.testing.assert_array_equal(crop_roi(image, (2, 1, 3, 4)), image[1:5, 2:5])
    assert crop_roi(image, None) is image
    with pytest.raises(ReconadError, match="does not fit inside frame of 8x6 pixels"):
        crop_roi(image, (6, 0, 4, 2))
    with pytest.raises(ReconadError, match="does not fit"):
        crop_roi(image, (0, 0, 0, 2))


def test_prepare_batch_mixes_kinds_and_sizes(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), solid(20, 30)[:, :, ::-1])
    frames = [tmp_path / "a.png", solid(3, 5), np.full((40, 40), 9, np.uint16) * 257, str(tmp_path / "a.png")]
    batch = prepare_batch(frames, (10, 12))
    assert batch.shape == (4, 10, 12, 3) and batch.dtype == np.uint8
    assert (batch[0] == RGB).all() and (batch[1] == RGB).all() and (batch[2] == 9).all() and (batch[3] == RGB).all()
    assert prepare_batch(solid(), (6, 8)).shape == (1, 6, 8, 3)
    assert prepare_batch(np.stack([solid(), solid()]), (6, 8)).shape == (2, 6, 8, 3)
    bgr_batch = prepare_batch(np.stack([solid()[:, :, ::-1]]), (6, 8), colour="BGR")
    assert (bgr_batch == RGB).all()
    roi_image = prepare_image(np.pad(solid(4, 4), ((2, 0), (3, 0), (0, 0))), (4, 4), roi=(3, 2, 4, 4))
    assert (roi_image == RGB).all()
    with pytest.raises(ReconadError, match="empty"):
        prepare_batch([], (4, 4))
    with pytest.raises(ReconadError, match="4-D array"):
        prepare_batch(np.zeros((1, 2, 4, 4, 3), np.uint8), (4, 4))
