"""The one image path (runtime/frames): the files that once made training, evaluation and the line disagree.

Each case has its right value: EXIF orientation (all eight), resize rule (wide, tall, mixed), 16-bit
depth (sBIT, option, warning), masks in every encoding annotation tools write, upper-case suffixes.
"""

import logging

import cv2
import numpy as np
import pytest

from reconad.runtime import frames
from reconad.runtime.errors import ReconadError
from tests.image_files import (
    pil_upright,
    with_exif_orientation,
    write_16bit_png,
    write_palette_png,
    write_rgb,
)


def patterned(height=10, width=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reads_as_viewers_show_it(tmp_path, orientation):
    stored = patterned()
    path = with_exif_orientation(tmp_path / f"o{orientation}.png", stored, orientation)
    np.testing.assert_array_equal(frames.read_image(path), pil_upright(path))
    if orientation in (5, 6, 7, 8):
        assert frames.read_image(path).shape == (16, 10, 3)  # sides swapped: upright


def test_a_tablet_jpeg_with_orientation_6_is_upright_and_its_mask_lines_up(tmp_path):
    """The case file: a 48x80 picture stored rotated, a red patch at the right once upright."""
    upright = np.full((48, 80, 3), 60, np.uint8)
    upright[16:32, 60:76] = (230, 20, 20)  # red patch at the right
    stored = np.rot90(upright, k=1)  # what the camera stored: turned 90 degrees counter-clockwise
    path = with_exif_orientation(tmp_path / "tablet.jpg", np.ascontiguousarray(stored), 6)
    image = frames.read_image(path)
    assert image.shape == (48, 80, 3)
    mask = np.zeros((48, 80), np.uint8)
    mask[16:32, 60:76] = 255  # drawn on the upright picture, as an annotation tool shows it
    mask_path = write_rgb(tmp_path / "tablet_mask.png", mask)
    region = frames.read_mask(mask_path)
    assert region.shape == image.shape[:2]
    assert image[region].mean(axis=0)[0] > 200 and image[~region][:, 0].mean() < 80  # the patch is under the mask


@pytest.mark.parametrize(
    ("source_hw", "target_hw"),
    [((400, 1024), (512, 512)), ((1024, 400), (512, 512)), ((600, 800), (256, 256)), ((100, 120), (256, 256))],
)
def test_one_resize_rule_shrinks_by_area_and_grows_by_interpolation_per_axis(source_hw, target_hw):
    image = np.random.default_rng(1).integers(0, 256, (*source_hw, 3), dtype=np.uint8)
    (height, width), (out_height, out_width) = source_hw, target_hw
    resized = frames.resize_image(image, target_hw)
    assert resized.shape == (*target_hw, 3)
    # the reference: each axis with the filter its direction calls for, the shrinking one first
    if out_height <= height and out_width <= width:
        expected = cv2.resize(image, (out_width, out_height), interpolation=cv2.INTER_AREA)
    elif out_height >= height and out_width >= width:
        expected = cv2.resize(image, (out_width, out_height), interpolation=cv2.INTER_LINEAR)
    else:
        shrunk = (width, out_height) if out_height < height else (out_width, height)
        expected = cv2.resize(cv2.resize(image, shrunk, interpolation=cv2.INTER_AREA), (out_width, out_height),
                              interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resized, expected)


def test_a_wide_image_is_averaged_along_its_shrinking_axis():
    """1-pixel stripes across the 1024-px axis: averaging gives flat grey, point sampling would alias."""
    stripes = np.zeros((400, 1024, 3), np.uint8)
    stripes[:, ::2] = 255
    resized = frames.resize_image(stripes, (512, 512))
    assert abs(float(resized.mean()) - 127.5) < 1 and int(resized.max()) - int(resized.min()) <= 2


def test_training_reads_and_resizes_with_the_same_functions():
    from reconad.train import data

    assert data.resize_image is frames.resize_image and data.resize_mask is frames.resize_mask
    assert data.read_image is frames.read_image


def test_twelve_bit_samples_with_an_sbit_chunk_are_scaled_by_twelve_bits(tmp_path):
    gray = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = write_16bit_png(tmp_path / "mono12-sbit.png", gray, significant_bits=12)
    image = frames.read_image(path)
    assert image[..., 0].max() == 255 and image[0, 0, 0] == 0
    np.testing.assert_array_equal(image[..., 0], ((gray.astype(np.uint32) * 255 + 2047) // 4095).astype(np.uint8))


def test_twelve_bit_samples_without_sbit_warn_and_a_bit_depth_option_scales_them(tmp_path, caplog):
    gray = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = write_16bit_png(tmp_path / "mono12.png", gray)
    with caplog.at_level(logging.WARNING, logger="reconad.runtime.frames"):
        dark = frames.read_image(path)
    assert dark.max() <= 16  # read as 16-bit, as the file says: near black ...
    assert "uses only values up to 4095 of its 16-bit range" in caplog.text and "--bit-depth 12" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reconad.runtime.frames"):
        scaled = frames.read_image(path, bit_depth=12)
    assert scaled.max() == 255 and not caplog.text  # ... and right once the depth is given
    prepared = frames.prepare_image(gray, (64, 64), bit_depth=12)  # a camera frame as an array
    np.testing.assert_array_equal(prepared, scaled)


def test_full_range_sixteen_bit_images_read_without_a_warning(tmp_path, caplog):
    path = write_16bit_png(tmp_path / "full.png", np.full((8, 8), 65535, np.uint16))
    with caplog.at_level(logging.WARNING, logger="reconad.runtime.frames"):
        assert (frames.read_image(path) == 255).all()
    assert not caplog.text


def test_palette_gray_gray_alpha_and_rgba_images_read_as_rgb(tmp_path):
    rgb = patterned(12, 20)
    palette = write_palette_png(tmp_path / "palette.png", np.repeat(np.repeat(rgb[:3, :4], 4, 0), 5, 1))
    assert frames.read_image(palette).shape == (12, 20, 3)
    np.testing.assert_array_equal(frames.read_image(palette), pil_upright(palette))
    gray = write_rgb(tmp_path / "gray.png", rgb[..., 0])
    assert (frames.read_image(gray) == rgb[..., :1]).all()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    np.testing.assert_array_equal(frames.read_image(write_rgb(tmp_path / "rgba.png", rgba)), rgb)
    from PIL import Image

    Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(frames.read_image(tmp_path / "la.png"), np.repeat(rgb[..., :1], 3, axis=2))


def square_mask(value=255, hw=(32, 32)):
    mask = np.zeros(hw, np.uint8)
    mask[8:18, 10:20] = value
    return mask


def expected_square(hw=(32, 32)):
    return square_mask(1, hw).astype(bool)


def test_an_rgba_mask_with_an_opaque_alpha_marks_the_painted_square_not_the_whole_image(tmp_path):
    mask = square_mask()
    rgba = np.dstack([mask, mask, mask, np.full_like(mask, 255)])  # what paint tools save
    np.testing.assert_array_equal(frames.read_mask(write_rgb(tmp_path / "rgba_mask.png", rgba)), expected_square())


@pytest.mark.parametrize(
    "encoding",
    ["gray 0/255", "rgb white", "rgb red", "label 1", "label 3", "layer on transparent", "palette", "16-bit",
     "anti-aliased", "jpeg"],
)
def test_every_common_mask_encoding_gives_the_intended_region(tmp_path, encoding):
    mask = square_mask()
    path = tmp_path / "mask.png"
    if encoding == "gray 0/255":
        write_rgb(path, mask)
    elif encoding == "rgb white":
        write_rgb(path, np.dstack([mask] * 3))
    elif encoding == "rgb red":
        write_rgb(path, np.dstack([mask, np.zeros_like(mask), np.zeros_like(mask)]))
    elif encoding == "label 1":
        write_rgb(path, square_mask(1))
    elif encoding == "label 3":
        write_rgb(path, square_mask(3))
    elif encoding == "layer on transparent":  # defect painted on an empty, transparent layer; colour everywhere
        write_rgb(path, np.dstack([np.full_like(mask, 255)] * 3 + [mask]))
    elif encoding == "palette":
        write_palette_png(path, np.dstack([mask] * 3))
    elif encoding == "16-bit":
        write_16bit_png(path, mask.astype(np.uint16) * 257)
    elif encoding == "anti-aliased":
        soft = cv2.GaussianBlur(mask, (3, 3), 0.6)
        write_rgb(path, soft)
    elif encoding == "jpeg":
        path = write_rgb(tmp_path / "mask.jpg", mask)
    region = frames.read_mask(path)
    if encoding in ("anti-aliased", "jpeg"):  # the edge may move by a pixel, never more
        assert abs(int(region.sum()) - 100) <= 40 and region[10:16, 12:18].all() and not region[:4].any()
    else:
        np.testing.assert_array_equal(region, expected_square())


def test_upper_case_suffixes_are_found_for_images_and_masks(tmp_path):
    from reconad.train import data

    root = tmp_path / "set"
    image = patterned(32, 32)
    for name in ("000", "001"):
        write_rgb(root / "part" / "train" / "good" / f"{name}.PNG", image)
    write_rgb(root / "part" / "test" / "good" / "000.PNG", image)
    write_rgb(root / "part" / "test" / "dent" / "000.PNG", image)
    write_rgb(root / "part" / "ground_truth" / "dent" / "000_mask.PNG", square_mask())
    assert len(frames.list_images(root / "part" / "train")) == 2
    test = data.load_mvtec(root, "test", (32, 32))
    assert len(test) == 2 and test.masks[test.labels == 1].sum() == 100 and test.category_has_masks("part")


def test_a_mask_covering_every_pixel_is_reported(tmp_path):
    from reconad.train import data

    root = tmp_path / "set"
    image = patterned(32, 32)
    write_rgb(root / "part" / "train" / "good" / "000.png", image)
    write_rgb(root / "part" / "test" / "good" / "000.png", image)
    write_rgb(root / "part" / "test" / "dent" / "000.png", image)
    write_rgb(root / "part" / "ground_truth" / "dent" / "000_mask.png", np.full((32, 32), 255, np.uint8))
    test = data.load_mvtec(root, "test", (32, 32))
    assert any("marks every pixel" in note and "000_mask.png" in note for note in test.notes)


def test_a_truncated_jpeg_is_refused_everywhere(tmp_path):
    ok, encoded = cv2.imencode(".jpg", patterned(32, 32))
    path = tmp_path / "cut.jpg"
    path.write_bytes(encoded.tobytes()[:-10])
    with pytest.raises(ReconadError, match="truncated"):
        frames.read_image(path)


def test_a_graph_ready_batch_is_not_prepared_a_second_time():
    batch = np.zeros((2, 16, 16, 3), np.uint8)
    assert frames.prepare_batch(batch, (16, 16)) is batch
    assert frames.prepare_batch(batch, (16, 16), colour="BGR") is not batch


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("colour", ["BGR", "RGB"])
def test_channel_order_conversion_is_a_pure_channel_copy(colour, channels):
    """OpenCV's cvtColor (the fast path) gives the bytes of numpy's channel reversal, also on strided views."""
    from reconad.runtime.frames import rgb_to_bgr, to_rgb_uint8

    image = np.random.default_rng(3).integers(0, 256, size=(37, 53, channels), dtype=np.uint8)
    for view in (image, image[::2, 1::3]):
        expected = view[:, :, 2::-1] if colour == "BGR" else view[:, :, :3]
        converted = to_rgb_uint8(view, colour=colour)
        assert converted.flags["C_CONTIGUOUS"] and np.array_equal(converted, expected)
    assert np.array_equal(rgb_to_bgr(image[:, :, :3]), image[:, :, 2::-1])
