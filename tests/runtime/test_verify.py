"""verify: report numbers on hand-made references, tolerances per precision, thresholds and NaN."""

import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import ANOMALY_MAP_NAME, IMAGE_SCORE_NAME, reference_path_for
from reconad.runtime.thresholds import Calibration, Threshold
from reconad.runtime.verify import TOLERANCES, compare_outputs, load_reference, proxy_threshold, render_report, verify_artifact
from tests.runtime.onnx_graphs import expected_outputs, random_images, write_artifact


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
    with pytest.raises(ReconadError, match="No tolerances for precision 'int8'"):
        compare_outputs(outputs, reference, precision="int8", threshold=None)
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
