"""Overlays: JET colour scale ends, blending inside the ROI only, threshold contours, PNG writing."""

import cv2
import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.overlay import colorize_map, overlay_heatmap, write_png


def test_colorize_map_ends_are_blue_and_red():
    colours = colorize_map(np.array([[0.0, 1.0, 5.0, np.nan]]), low=0.0, high=1.0)
    assert colours.shape == (1, 4, 3) and colours.dtype == np.uint8
    blue, red, clipped, missing = colours[0].astype(int)
    assert blue[2] > 100 and blue[0] == 0  # RGB order: blue channel last
    assert red[0] > 100 and red[2] == 0
    assert (clipped == red).all() and (missing == red).all()  # NaN drawn as the worst level


def test_overlay_blends_only_inside_the_roi_and_outlines():
    image = np.full((60, 80, 3), 100, np.uint8)
    anomaly_map = np.zeros((16, 16), np.float32)
    anomaly_map[4:12, 4:12] = 1.0
    out = overlay_heatmap(image, anomaly_map, low=0.0, high=1.0, roi=(10, 5, 40, 40), pixel_threshold=0.5)
    assert out.shape == image.shape and out is not image
    assert (out[:5] == 100).all() and (out[:, :10] == 100).all() and (out[:, 50:] == 100).all()
    assert not (out[5:45, 10:50] == 100).all()
    assert (out[5:45, 10:50] == 255).all(axis=2).any()  # the white contour
    np.testing.assert_array_equal(image, 100)  # input untouched
    labelled = overlay_heatmap(image, anomaly_map, label="score 1")
    assert labelled.shape == image.shape


def test_write_png_round_trip(tmp_path):
    image = np.zeros((4, 5, 3), np.uint8)
    image[..., 0] = 200  # red in RGB
    write_png(tmp_path / "x.png", image)
    assert (cv2.imread(str(tmp_path / "x.png"))[..., 2] == 200).all()
    assert [path.name for path in tmp_path.iterdir()] == ["x.png"]
    with pytest.raises(ReconadError, match="Cannot write"):
        write_png(tmp_path / "missing" / "x.png", image)
