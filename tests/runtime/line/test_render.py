"""The renderer: verdict banner, heat only where high, outline only on NG at a pixel threshold, fitted text."""

import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Verdict
from reconad.runtime.line.render import (
    FONT,
    OUTLINE,
    TRUTH_OUTLINE,
    VERDICT_COLOURS,
    Annotation,
    fit_text,
    heat_overlay,
    map_scale,
    render_inspection,
    render_result,
    write_png,
)
from reconad.runtime.line.sinks import InspectionResult

cv2 = pytest.importorskip("cv2")


def part(hw=(480, 640)):
    """A gray textured frame (RGB)."""
    rng = np.random.default_rng(0)
    return np.clip(100 + rng.integers(-12, 13, (*hw, 3)), 0, 255).astype(np.uint8)


def defect_map(size=64, peak=1.0, background=0.1):
    anomaly_map = np.full((size, size), background, np.float32)
    anomaly_map[28:36, 28:36] = peak  # the defect, in the middle
    anomaly_map[:4, :4] = 0.45  # a corner artefact of a good part: below the pixel threshold
    return anomaly_map


def white(image):
    return np.all(image == OUTLINE, axis=2)


@pytest.mark.parametrize(
    ("annotation", "word"),
    [
        (Annotation(0.9, 0.5, True), "NG"),
        (Annotation(0.1, 0.5, False), "OK"),
        (Annotation(0.1, 0.5, False, category="washer", known_product=False), "UNKNOWN"),
        (Annotation(0.9, None, None), "NO THRESHOLD"),
    ],
)
def test_the_banner_shows_the_verdict_colour(annotation, word):
    assert annotation.word == word
    out = render_inspection(part(), defect_map(), annotation, low=0.0, high=1.0)
    assert tuple(out[3, 3]) == VERDICT_COLOURS[word]


def test_ng_is_outlined_at_the_pixel_threshold_and_ok_never_is():
    frame = part()
    ng = render_inspection(frame, defect_map(), Annotation(1.0, 0.5, True), low=0.0, high=1.0, pixel_threshold=0.6)
    ok = render_inspection(frame, defect_map(), Annotation(0.3, 0.5, False), low=0.0, high=1.0, pixel_threshold=0.6)
    banner = ng.shape[0] - frame.shape[0]
    ng_frame, ok_frame = ng[banner:, :640], ok[banner:, :640]
    outline = white(ng_frame)
    rows, columns = np.nonzero(outline)
    assert outline.sum() > 100
    # Around the defect (map 28..36 of 64 -> 210..270 of 480 rows, 280..360 of 640 columns), nowhere else.
    assert rows.min() > 180 and rows.max() < 300 and columns.min() > 250 and columns.max() < 390
    assert not white(ok_frame).any()
    no_threshold = render_inspection(frame, defect_map(), Annotation(1.0, 0.5, True), low=0.0, high=1.0)
    assert not white(no_threshold[banner:, :640]).any()  # no pixel threshold: nothing is outlined


def test_a_good_part_looks_like_itself():
    frame = part()
    good = np.full((64, 64), 0.1, np.float32)
    good[:4, :4] = 0.2  # below TRANSPARENT_BELOW of the scale
    out = render_inspection(frame, good, Annotation(0.2, 0.5, False), low=0.0, high=1.0, pixel_threshold=0.6)
    banner = out.shape[0] - frame.shape[0]
    assert np.array_equal(out[banner:, :640], frame)


def test_heat_is_drawn_over_the_defect_only():
    frame = part()
    out = heat_overlay(frame, defect_map(), low=0.0, high=1.0)
    changed = np.any(out != frame, axis=2)
    assert changed[240, 320] and tuple(out[240, 320]) != tuple(frame[240, 320])
    red, green, blue = out[240, 320].astype(int)
    assert red > green + 40 and red > blue + 40  # (dark) red on a gray part
    assert not changed[400:, :].any() and not changed[:, 500:].any()


def test_the_8_bit_blend_matches_the_float_formula():
    """heat_overlay blends in 8-bit steps (fast): within a few levels of frame * (1 - a) + jet(level) * a in floats."""
    from reconad.runtime.line.render import TRANSPARENT_BELOW, _jet_rgb

    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    rows, columns = np.mgrid[0:64, 0:64]
    anomaly_map = (np.exp(-((rows - 30) ** 2 + (columns - 20) ** 2) / 80.0) + rng.normal(0, 0.05, (64, 64))).astype(np.float32)
    out = heat_overlay(frame, anomaly_map, low=0.0, high=1.0)
    level = np.clip(cv2.resize(anomaly_map, (320, 240), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    heat = _jet_rgb()[np.round(level * 255).astype(np.uint8)][:, :, 0].astype(np.float64)  # [H, W, 3]
    alpha = (np.clip((level - TRANSPARENT_BELOW) / (1 - TRANSPARENT_BELOW), 0, 1) * 0.65)[:, :, None]
    expected = frame * (1 - alpha) + heat * alpha
    difference = np.abs(out.astype(np.float64) - expected)
    assert difference.max() <= 4 and difference.mean() < 0.1
    assert (out != frame).any(axis=2).mean() > 0.01  # the heat was drawn at all


def test_the_map_covers_the_roi_only_and_the_truth_mask_is_green():
    frame = part()
    truth = np.zeros((64, 64), np.uint8)
    truth[28:36, 28:36] = 1
    out = heat_overlay(frame, defect_map(), low=0.0, high=1.0, roi=(100, 50, 200, 200), truth_mask=truth)
    changed = np.any(out != frame, axis=2)
    assert not changed[:50].any() and not changed[:, :100].any() and not changed[250:].any() and not changed[:, 300:].any()
    assert np.all(out == TRUTH_OUTLINE, axis=2).sum() > 50


def test_map_scale_keeps_a_good_part_away_from_red():
    anomaly_map = np.array([[0.1, 0.3]], np.float32)
    assert map_scale(anomaly_map, None, None, threshold=0.6) == pytest.approx((0.1, 0.6))
    assert map_scale(anomaly_map, 0.0, 2.0, threshold=0.6) == (0.0, 2.0)
    assert map_scale(np.zeros((2, 2), np.float32), None, None, None) == (0.0, 1.0)


@pytest.mark.parametrize("text", ["OK", "score 0.731 / threshold 0.512 (143%)", "x" * 300])
@pytest.mark.parametrize(("width", "height"), [(40, 10), (200, 20), (1200, 60)])
def test_fitted_text_is_never_clipped(text, width, height):
    fitted, scale = fit_text(text, width, height)
    (text_width, text_height), baseline = cv2.getTextSize(fitted, FONT, scale, 1)
    assert text_width <= width and (text_height + baseline <= height or scale <= 0.35)
    assert fitted == text or fitted.endswith("...") or fitted == ""


def test_long_product_names_and_tiny_frames_stay_inside_the_banner():
    annotation = Annotation(123456.0, 0.000123, True, category="product-" * 30, caption="rtsp://10.0.0.1/stream#99999")
    out = render_inspection(part((24, 32)), defect_map(), annotation, pixel_threshold=0.6)
    assert out.shape[0] >= 360  # scaled up to stay legible
    assert out.shape == render_inspection(part((24, 32)), defect_map(), Annotation(0.1, 0.5, False)).shape


def test_the_output_size_depends_only_on_the_frame_size():
    shapes = {render_inspection(part((720, 1280)), defect_map(peak=peak), Annotation(peak, 0.5, peak > 0.5)).shape
              for peak in (0.1, 2.0)}
    assert len(shapes) == 1
    height, width, _ = shapes.pop()
    assert height > 720 and width > 1280


def test_render_result_reads_a_loop_result_in_bgr():
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[:, :, 0] = 255  # BGR blue
    verdict = Verdict(image_score=0.1, is_anomalous=False, threshold=0.5, anomaly_map=np.zeros((8, 8), np.float32))
    result = InspectionResult(index=3, name="cam#3", captured_at="2026-01-01T08:00:00.123+00:00", verdict=verdict,
                              latency_ms=1.0, frame=frame, colour="BGR")
    out = render_result(result)
    assert tuple(out[-5, 5]) == (0, 0, 255)  # blue in RGB
    assert tuple(out[3, 3]) == VERDICT_COLOURS["OK"]


def test_a_non_rgb_frame_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        render_inspection(np.zeros((8, 8), np.float32), None, Annotation(0.1, 0.5, False))


def test_a_camera_blind_frame_keeps_the_size_and_says_so():
    frame = part()
    blind = render_inspection(frame, None, Annotation(0.0, None, None, blind="black: 99% of pixels <= 3 (black <= 30)"))
    judged = render_inspection(frame, defect_map(), Annotation(0.1, 0.5, False))
    assert blind.shape == judged.shape
    assert tuple(blind[3, 3]) == VERDICT_COLOURS["CAMERA BLIND"]


def test_write_png_round_trip(tmp_path):
    image = np.zeros((8, 6, 3), np.uint8)
    image[..., 0] = 200  # red in RGB
    write_png(tmp_path / "x.png", image)
    assert np.array_equal(cv2.imread(str(tmp_path / "x.png"))[:, :, ::-1], image)
    with pytest.raises(ReconadError, match="Cannot write"):
        write_png(tmp_path / "missing" / "x.png", image)


def test_score_wordings_tell_apart_what_differs_and_never_round_over_the_threshold():
    from reconad.runtime.line.render import score_wordings

    assert score_wordings(147.0, 122.0)[0] == "score 147 / threshold 122 (120%)"
    # an OK part just under its threshold: not "122 / 122 (100%)" (a newcomer read that as a contradiction)
    assert score_wordings(121.8, 122.0)[0] == "score 121.8 / threshold 122 (99%)"
    assert score_wordings(122.0, 122.0)[0] == "score 122 / threshold 122 (100%)"
    assert score_wordings(0.5, 0.0)[0].endswith("(n/a)")


def test_a_narrow_box_draws_the_first_wording_that_fits_whole():
    from reconad.runtime.line.render import TEXT, _put, fit_text, score_wordings

    wordings = score_wordings(147.0, 122.0)
    box = (0, 0, 110, 14)
    whole = [w for w in wordings if fit_text(w, box[2], box[3])[0] == w]
    assert whole and whole[0] != wordings[0]  # too narrow for the long form, wide enough for a short one
    drawn, expected = np.zeros((14, 110, 3), np.uint8), np.zeros((14, 110, 3), np.uint8)
    _put(drawn, wordings, box, TEXT)
    _put(expected, whole[0], box, TEXT)
    assert np.array_equal(drawn, expected) and drawn.any()
    cut = np.zeros((14, 110, 3), np.uint8)
    _put(cut, wordings[0], box, TEXT)  # the old single wording: cut with '...'
    assert not np.array_equal(cut, drawn)
