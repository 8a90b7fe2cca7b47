"""verify: report numbers on hand-made references, tolerances per precision, thresholds (per category) and NaN,
categories exact except near ties, the category distance."""

import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_NAME, IMAGE_SCORE_NAME, Manifest, manifest_path_for, reference_path_for
from reconad.runtime.thresholds import Calibration, OperatingPoint, Threshold
from reconad.runtime.verify import CATEGORY_MARGIN_KEY, TOLERANCES, compare_outputs, load_reference, proxy_threshold, reference_thresholds, render_report, verify_artifact
from tests.runtime.onnx_graphs import colour_images, expected_outputs, random_images, write_artifact


def reference_pair(count=4, seed=0):
    images = random_images(count, seed=seed)
    reference = {"images": images, **expected_outputs(images)}
    return reference, {key: value.copy() for key, value in expected_outputs(images).items()}


def test_identical_outputs_pass_with_zero_error():
    reference, outputs = reference_pair()
    report = compare_outputs(outputs, reference, precision="fp32", threshold=None)
    assert report.passed and report.failures == ()
    assert report.anomaly_map.max_abs == 0.0 and report.image_score.max_abs == 0.0
    assert report.decision_flips == 0 and report.threshold_source.startswith("reference median")
    assert "PASS" in render_report(report)


def test_error_statistics_are_exact():
    reference, outputs = reference_pair(count=2)
    error = np.zeros_like(outputs[ANOMALY_MAP_NAME])
    error.flat[:10] = np.arange(1, 11) * 1e-6  # 10 of 512 values off by 1e-6 .. 1e-5
    outputs[ANOMALY_MAP_NAME] = outputs[ANOMALY_MAP_NAME] + error
    report = compare_outputs(outputs, reference, precision="fp32", threshold=None)
    expected = np.abs(outputs[ANOMALY_MAP_NAME].astype(np.float64) - reference[ANOMALY_MAP_NAME])
    assert report.anomaly_map.max_abs == pytest.approx(expected.max())
    assert report.anomaly_map.mean_abs == pytest.approx(expected.mean())
    assert report.anomaly_map.p99_abs == pytest.approx(np.percentile(expected, 99))
    assert report.passed  # 1e-5 < 1e-4 x max(1, range)


def test_fp32_over_tolerance_fails():
    reference, outputs = reference_pair()
    outputs[ANOMALY_MAP_NAME][0, 0, 0, 0] += 2e-4
    report = compare_outputs(outputs, reference, precision="fp32", threshold=None)
    assert not report.passed
    assert report.failures == ("anomaly_map max abs error 0.0002 exceeds 0.0001",)
    assert "FAIL: anomaly_map max abs error" in render_report(report)


def test_fp16_uses_p99_relative_to_the_map_range():
    reference, outputs = reference_pair()
    scale = float(reference[ANOMALY_MAP_NAME].max() - reference[ANOMALY_MAP_NAME].min())
    outputs[ANOMALY_MAP_NAME][0, 0, 0, 0] += 0.5 * scale  # one big outlier: under p99, fine for fp16
    report = compare_outputs(outputs, reference, precision="fp16", threshold=None)
    assert report.passed and report.map_scale == pytest.approx(scale)
    outputs[ANOMALY_MAP_NAME] += 0.02 * scale  # everything 2% off: p99 and the score fail
    report = compare_outputs(outputs, reference, precision="fp16", threshold=None)
    assert not report.passed
    assert any(failure.startswith("anomaly_map p99 abs error") for failure in report.failures)
    assert TOLERANCES["fp16"].map_p99_abs == 0.01


def test_decision_flips_at_the_manifest_threshold():
    reference, outputs = reference_pair()
    scores = reference[IMAGE_SCORE_NAME]
    threshold = float(scores.max()) - 1e-5  # only the top image is anomalous
    outputs[IMAGE_SCORE_NAME] = scores - 5e-5  # within the fp32 score tolerance, but crosses the threshold
    report = compare_outputs(outputs, reference, precision="fp32", threshold=threshold)
    assert report.threshold_source == "manifest" and report.threshold == threshold
    assert report.decision_flips == 1
    assert report.failures == (f"1 decision flip(s) at threshold {threshold:.6g}",)


def test_proxy_threshold_sits_between_scores():
    assert proxy_threshold(np.array([4.0, 1.0, 3.0, 2.0])) == 2.5
    assert proxy_threshold(np.array([5.0, 1.0, 3.0])) == 2.0
    assert proxy_threshold(np.array([7.0])) == 7.0


def test_nan_and_inf_are_counted_and_fail():
    reference, outputs = reference_pair()
    outputs[ANOMALY_MAP_NAME][0, 0, :2, 0] = np.nan
    outputs[ANOMALY_MAP_NAME][1, 0, 0, 0] = np.inf
    outputs[IMAGE_SCORE_NAME][0] = np.nan
    report = compare_outputs(outputs, reference, precision="fp16", threshold=None)
    assert (report.anomaly_map.nan_count, report.anomaly_map.inf_count) == (2, 1)
    assert report.image_score.nan_count == 1
    assert report.anomaly_map.max_abs == 0.0  # statistics over the finite values only
    assert "anomaly_map has 2 NaN and 1 Inf values" in report.failures
    assert "image_score has 1 NaN and 0 Inf values" in report.failures


def test_shape_mismatch_and_unknown_precision_are_bad_input():
    reference, outputs = reference_pair()
    with pytest.raises(ReconadError, match="No tolerances for precision 'int4'"):
        compare_outputs(outputs, reference, precision="int4", threshold=None)
    outputs[IMAGE_SCORE_NAME] = outputs[IMAGE_SCORE_NAME][:2]
    with pytest.raises(ReconadError, match="image_score has shape \\[2\\] but the reference has \\[4\\]"):
        compare_outputs(outputs, reference, precision="fp32", threshold=None)


def test_verify_artifact_end_to_end(tmp_path):
    calibration = Calibration(method="manual", n_images=0, date="2026-01-01", source="test")
    artifact = write_artifact(
        tmp_path, reference_images=random_images(6), max_batch=4, image_threshold=Threshold(value=0.5, calibration=calibration)
    )
    report = verify_artifact(artifact, backend="ort-cpu")
    assert report.passed and report.n_images == 6 and report.backend == "ort-cpu"
    assert report.threshold == 0.5 and report.threshold_source == "manifest"
    assert report.anomaly_map.max_abs < 1e-6
    assert report.to_dict()["passed"] is True


def test_load_reference_validation(tmp_path):
    path = tmp_path / "r.npz"
    images = random_images(2)
    np.savez(path, images=images, **expected_outputs(images, with_category=False))
    assert set(load_reference(path, (16, 16))) == {"images", ANOMALY_MAP_NAME, IMAGE_SCORE_NAME}
    with pytest.raises(ReconadError, match="lacks category, category_distance, category_margin; re-run"):
        load_reference(path, (16, 16), with_category=True)
    np.savez(path, images=images, **expected_outputs(images))
    assert len(load_reference(path, (16, 16), with_category=True)) == 6
    with pytest.raises(ReconadError, match="images has shape \\[2, 16, 16, 3\\]; the artifact needs \\[2, 8, 8, 3\\]"):
        load_reference(path, (8, 8))
    np.savez(path, images=images)
    with pytest.raises(ReconadError, match="lacks anomaly_map, image_score"):
        load_reference(path, (16, 16))
    outputs = expected_outputs(images)
    outputs[IMAGE_SCORE_NAME][0] = np.nan
    np.savez(path, images=images, **outputs)
    with pytest.raises(ReconadError, match="contains NaN or Inf"):
        load_reference(path, (16, 16))
    path.write_bytes(b"junk")
    with pytest.raises(ReconadError, match="Cannot read reference"):
        load_reference(path, (16, 16))
    with pytest.raises(ReconadError, match="Cannot read reference"):
        load_reference(tmp_path / "absent.npz", (16, 16))
    assert reference_path_for(tmp_path / "m.onnx").name == "m.reference.npz"


def category_pair(margins):
    """A reference of len(margins) images whose two nearest centroids are ``margins`` apart."""
    images = colour_images([(200, 20, 20)] * len(margins))
    reference = {"images": images, **expected_outputs(images)}
    reference[CATEGORY_MARGIN_KEY] = np.asarray(margins, np.float32)
    return reference, {key: value.copy() for key, value in reference.items() if key != "images"}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_another_category_is_forgiven_only_on_a_near_tie(precision):
    tolerance = TOLERANCES[precision]
    reference, outputs = category_pair([0.5, tolerance.near_tie * 0.9, tolerance.near_tie * 1.1])
    outputs[CATEGORY_NAME] = outputs[CATEGORY_NAME].astype(np.int32)  # as a TensorRT 8.x engine returns it
    assert compare_outputs(outputs, reference, precision=precision, threshold=None).passed
    outputs[CATEGORY_NAME][1] = 2  # a near tie: either answer is right
    report = compare_outputs(outputs, reference, precision=precision, threshold=None)
    assert report.passed and (report.category_mismatches, report.category_near_ties) == (1, 1)
    outputs[CATEGORY_NAME][2] = 1  # just beyond a near tie
    report = compare_outputs(outputs, reference, precision=precision, threshold=None)
    assert not report.passed and (report.category_mismatches, report.category_near_ties) == (2, 1)
    assert report.failures == (
        f"1 image(s) named another category than the reference (not near ties: their two nearest centroids are "
        f"more than {tolerance.near_tie:.3g} apart)",
    )
    assert "1 of them near ties" in render_report(report)


def test_category_distance_tolerance_is_absolute():
    reference, outputs = category_pair([0.5, 0.5])
    outputs[CATEGORY_DISTANCE_NAME] = outputs[CATEGORY_DISTANCE_NAME] + 1.5e-3  # fp16 allows 2e-3, fp32 1e-4
    assert compare_outputs(outputs, reference, precision="fp16", threshold=None).passed
    report = compare_outputs(outputs, reference, precision="fp32", threshold=None)
    assert report.failures == ("category_distance max abs error 0.0015 exceeds 0.0001",)
    outputs[CATEGORY_DISTANCE_NAME][0] = np.nan
    assert "category_distance has 1 NaN and 0 Inf values" in compare_outputs(outputs, reference, precision="fp16", threshold=None).failures
    del reference[CATEGORY_MARGIN_KEY]
    with pytest.raises(ReconadError, match="reference lacks category_margin, which the artifact's category outputs"):
        compare_outputs(outputs, reference, precision="fp16", threshold=None)


def test_verify_flips_at_each_images_category_threshold(tmp_path):
    images = colour_images([(200, 40, 40), (30, 30, 150), (200, 40, 40)])  # scores 0.37, 0.27, 0.37
    artifact = write_artifact(tmp_path, reference_images=images, image_threshold=Threshold.manual(0.3))
    manifest = Manifest.load(manifest_path_for(artifact))
    manifest = manifest.with_operating_point("blue", OperatingPoint(image_threshold=Threshold.manual(0.1)))
    manifest.save(manifest_path_for(artifact))
    report = verify_artifact(artifact, backend="ort-cpu")
    assert report.passed and report.threshold is None and report.threshold_source == "manifest, per category"
    assert report.category_mismatches == 0 and report.category_distance.max_abs < 1e-6
    assert "at each image's category threshold" in render_report(report)
    reference = dict(np.load(reference_path_for(artifact)))
    outputs = {key: value.copy() for key, value in reference.items() if key != "images"}
    outputs[IMAGE_SCORE_NAME][1] = 0.09  # crosses blue's threshold, far from the global one
    flipped = compare_outputs(outputs, reference, precision="fp16", threshold=reference_thresholds(manifest, reference))
    assert flipped.decision_flips == 1 and flipped.failures[-1] == "1 decision flip(s) at the per-category thresholds"
