"""Calibration: the quantile-plus-margin rule, thresholds written into the manifest, the calibrate CLI."""

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from reconad.runtime.calibration import CalibrationConfig, calibrate_artifact, normalization_for, threshold_at_fpr
from reconad.runtime.cli import app
from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Inspector
from reconad.runtime.manifest import Manifest, manifest_path_for, sha256_file
from reconad.runtime.thresholds import Calibration
from reconad.runtime.frames import list_images
from tests.runtime.onnx_graphs import write_artifact

runner = CliRunner()


def test_threshold_at_fpr_flags_at_most_max_fpr_of_the_good_values():
    values = np.random.default_rng(0).normal(1.0, 0.1, size=1000)
    for max_fpr in (0.0, 0.001, 0.01, 0.05, 0.2):
        for margin in (0.0, 0.05, 0.5):
            threshold = threshold_at_fpr(values, max_fpr, margin)
            assert np.mean(values >= threshold) <= max_fpr
    # margin 0: exactly floor(max_fpr * n) values are flagged (no ties here)
    assert np.sum(values >= threshold_at_fpr(values, 0.01, 0.0)) == 10
    ordered = np.sort(values)
    anchor, median = ordered[-11], np.median(values)
    assert threshold_at_fpr(values, 0.01, 0.05) == pytest.approx(anchor + 0.05 * (anchor - median))


def test_threshold_at_fpr_edge_cases():
    assert threshold_at_fpr(np.array([1.0, 2.0, 3.0]), 0.01, 0.0) == np.nextafter(3.0, np.inf)  # n < 1/max_fpr: above max
    assert threshold_at_fpr(np.array([2.0, 2.0, 2.0]), 0.1, 0.5) == np.nextafter(2.0, np.inf)  # no spread
    with pytest.raises(ReconadError, match="NaN or infinite"):
        threshold_at_fpr(np.array([1.0, np.nan]), 0.01, 0.0)


def test_normalization_puts_the_threshold_at_one_half():
    scores = np.array([0.2, 0.3, 0.35, 0.4, 0.45])
    calibration = Calibration(method="max_fpr", n_images=5, max_fpr=0.2, date="2026-01-01", source="x")
    for method in ("minmax", "quantile"):
        normalization = normalization_for(scores, 0.5, method, 0.2, calibration)
        assert normalization.apply(0.5) == pytest.approx(0.5)
        assert normalization.apply(10.0) == 1.0 and normalization.apply(-1.0) == 0.0
    assert normalization_for(scores, 0.5, "minmax", 0.2, calibration).low == 0.2
    assert normalization_for(scores, 0.5, "quantile", 0.2, calibration).low == pytest.approx(np.quantile(scores, 0.2))


def write_good_images(folder, count, seed=0, hw=(20, 20)):
    """Defect-free images: dim noise (the contract graph scores the brightest pixel's mean over RGB)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        cv2.imwrite(str(folder / f"{index:03d}.png"), rng.integers(20, 60 + index, size=(*hw, 3), dtype=np.uint8))
    return folder


def test_calibrate_writes_thresholds_and_provenance_into_the_manifest(tmp_path):
    artifact = write_artifact(tmp_path / "model")
    onnx_hash = sha256_file(artifact)
    good = write_good_images(tmp_path / "good", 40)
    config = CalibrationConfig(max_fpr=0.05, margin=0.1)
    result = calibrate_artifact(artifact, good, config, backend="ort-cpu", report=lambda line: None)
    manifest = Manifest.load(manifest_path_for(artifact))
    assert manifest == result.manifest and manifest.onnx_sha256 == onnx_hash == sha256_file(artifact)
    assert result.n_images == 40 and result.false_positive_rate <= 0.05
    threshold = manifest.image_threshold
    assert threshold.value == pytest.approx(threshold_at_fpr(result.scores, 0.05, 0.1))
    provenance = threshold.calibration
    assert (provenance.method, provenance.n_images, provenance.max_fpr, provenance.margin) == ("max_fpr", 40, 0.05, 0.1)
    assert provenance.source == str(good.resolve()) and provenance.date.startswith("20")
    assert manifest.pixel_threshold.value > 0 and manifest.pixel_threshold.calibration.max_fpr == 0.05
    assert manifest.score_normalization.method == "quantile"
    assert manifest.score_normalization.apply(threshold.value) == pytest.approx(0.5)

    with Inspector.open(artifact, "ort-cpu") as inspector:  # the hash still matches; verdicts use the new threshold
        bright = np.full((1, 16, 16, 3), 250, np.uint8)
        verdict = inspector.inspect(bright)[0]
        assert verdict.is_anomalous and verdict.normalized_score == 1.0
        goods = [cv2.imread(str(path))[:, :, ::-1] for path in list_images(good)]
        assert sum(v.is_anomalous for v in inspector.inspect(goods)) <= 2

    calibrate_artifact(artifact, good, CalibrationConfig(normalize="none"), backend="ort-cpu", report=lambda line: None)
    assert Manifest.load(manifest_path_for(artifact)).score_normalization is None


def test_calibrate_creates_the_sidecar_from_the_embedded_manifest(tmp_path):
    artifact = write_artifact(tmp_path / "model", sidecar=False)
    notes = []
    result = calibrate_artifact(artifact, write_good_images(tmp_path / "good", 5), backend="ort-cpu", report=notes.append)
    manifest = Manifest.load(manifest_path_for(artifact))
    assert manifest.onnx_sha256 == sha256_file(artifact) and manifest.image_threshold is not None
    assert result.false_positive_rate == 0.0  # 5 images cannot resolve 1 %: above the highest good score
    assert any("cannot resolve max_fpr=0.01" in note for note in notes)


def test_calibration_on_the_sample_data_of_every_category(tmp_path, sample_data_root):
    artifact = write_artifact(tmp_path / "model", input_hw=(64, 64))
    goods = sorted(sample_data_root.glob("*/train/good"))
    assert len(goods) == 2
    result = calibrate_artifact(artifact, goods, CalibrationConfig(max_fpr=0.2), backend="ort-cpu")
    assert result.n_images == 12
    assert result.false_positive_rate <= 0.2
    assert result.scores.min() <= result.manifest.image_threshold.value
    assert result.manifest.image_threshold.calibration.source == ", ".join(str(g.resolve()) for g in goods)


def test_calibrate_cli(tmp_path):
    artifact = write_artifact(tmp_path / "model")
    good = write_good_images(tmp_path / "good", 30)
    (good / "broken.png").write_bytes(b"junk")
    other = write_good_images(tmp_path / "other", 5, seed=1)
    arguments = ["calibrate", str(artifact), str(good), str(other), "--max-fpr", "0.05", "--normalize", "minmax"]
    result = runner.invoke(app, [*arguments, "--roi", "0,0,16,16"])
    assert result.exit_code == 0, result.output
    assert "35 good images (1 unreadable)" in result.stdout
    assert "image threshold" in result.stdout and "score normalisation minmax" in result.stdout
    assert "skipped" in result.stderr and "broken.png" in result.stderr
    manifest = json.loads(manifest_path_for(artifact).read_text())
    assert manifest["image_threshold"]["calibration"]["max_fpr"] == 0.05
    assert manifest["score_normalization"]["method"] == "minmax"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--max-fpr", "1.5"], "max_fpr must be in [0, 1)"),
        (["--normalize", "zscore"], "normalize must be one of"),
        (["--roi", "0,0"], "ROI must be four integers"),
    ],
)
def test_calibrate_cli_bad_options(tmp_path, arguments, message):
    artifact = write_artifact(tmp_path / "model")
    good = write_good_images(tmp_path / "good", 3)
    result = runner.invoke(app, ["calibrate", str(artifact), str(good), *arguments])
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_calibrate_cli_needs_good_images(tmp_path):
    artifact = write_artifact(tmp_path / "model")
    good = write_good_images(tmp_path / "good", 1)
    result = runner.invoke(app, ["calibrate", str(artifact), str(good)])
    assert result.exit_code == 2 and "needs at least 2 defect-free images" in result.stderr
