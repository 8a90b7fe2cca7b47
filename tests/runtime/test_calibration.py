"""Calibration: the quantile-plus-margin rule, the distance limit, where the good images come from (data
root, category folders, --category, plain folders; a test split refused), per-category and global
thresholds written into the manifest with what they replaced, the operating point on a test split, the CLI."""

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from reconad.runtime.calibration import CalibrationConfig, CalibrationSet, calibrate_artifact, distance_limit_for, normalization_for, plan_calibration, threshold_at_fpr
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


def test_the_distance_limit_sits_midway_between_the_good_images_and_the_next_category():
    distances = np.array([0.01, 0.02, 0.03, 0.04])
    assert distance_limit_for(distances, 0.6, 0.01, 0.05) == pytest.approx((0.04 + 0.3) / 2)
    # Overlapping categories: never below the good images' own quantile rule.
    assert distance_limit_for(distances, 0.02, 0.01, 0.05) == threshold_at_fpr(distances, 0.01, 0.05)


# A data root of two colours the contract graph tells apart (tests/runtime/onnx_graphs.py): red parts score
# about 0.4 (their mean over RGB), blue ones about 0.2; a defect is a brighter patch.
COLOURS = {"red": (200, 60, 60), "blue": (20, 20, 140)}
PATCH = {"red": (250, 250, 250), "blue": (80, 80, 140)}  # blue's defect scores ~0.39: below red's good parts


def write_part(path, colour, patch=None, seed=0, hw=(20, 20)):
    rng = np.random.default_rng(seed)
    image = np.clip(np.asarray(colour)[None, None] + rng.integers(-8, 9, size=(*hw, 3)), 0, 255).astype(np.uint8)
    if patch is not None:
        image[6:14, 6:14] = patch
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image[:, :, ::-1])  # RGB -> BGR on disk


def write_data_root(root, n_good=6, n_defect=3, categories=("red", "blue")):
    """MVTec layout: <colour>/train/good, <colour>/test/good and <colour>/test/patch."""
    for category in categories:
        for index in range(n_good):
            write_part(root / category / "train" / "good" / f"{index:03d}.png", COLOURS[category], seed=index)
            write_part(root / category / "test" / "good" / f"{index:03d}.png", COLOURS[category], seed=100 + index)
        for index in range(n_defect):
            write_part(root / category / "test" / "patch" / f"{index:03d}.png", COLOURS[category], PATCH[category], index)
    return root


def test_plan_calibration_reads_the_layout_of_each_folder(tmp_path):
    root = write_data_root(tmp_path / "data")
    sets = plan_calibration([root])
    assert [s.category for s in sets] == [None, "blue", "red"]
    assert sets[0].good_dirs == (root / "blue" / "test" / "good", root / "red" / "test" / "good")
    assert sets[2] == CalibrationSet("red", (root / "red" / "test" / "good",), root / "red" / "test")
    assert plan_calibration([root / "red"]) == [CalibrationSet("red", (root / "red" / "test" / "good",), root / "red" / "test")]
    assert plan_calibration([], [("red", root / "red" / "test" / "good")]) == [
        CalibrationSet("red", (root / "red" / "test" / "good",))
    ]
    plain = plan_calibration([root / "red" / "test" / "good", root / "blue" / "train" / "good"])
    assert plain == [CalibrationSet(None, (root / "red" / "test" / "good", root / "blue" / "train" / "good"))]


@pytest.mark.parametrize(
    "folders, pairs, message",
    [
        (["data/red/test"], [], "data/red/test is a test split: beside good/ it holds defect folders (patch), "
         "whose images are not good; calibrate on data/red/test/good, give --category red data/red/test/good, or give the data root"),
        ([], [("red", "data/red/test")], "holds defect folders beside good/; give data/red/test/good instead"),
        (["data/red/test/good", "data"], [], "is a folder of good images but the other folders are categories"),
        (["data"], [("red", "data/blue/test/good")], "Category 'red' is given twice"),
        (["data/none"], [], "data/none does not exist"),
        ([], [], "Nothing to calibrate on"),
    ],
)
def test_plan_calibration_refuses_what_is_not_a_set_of_good_images(tmp_path, monkeypatch, folders, pairs, message):
    write_data_root(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ReconadError) as caught:
        plan_calibration(folders, pairs)
    assert message in str(caught.value)


def test_calibrate_a_data_root_per_category_with_its_operating_points(tmp_path):
    root = write_data_root(tmp_path / "data")
    artifact = write_artifact(tmp_path / "model", input_hw=(20, 20))
    onnx_hash = sha256_file(artifact)
    result = calibrate_artifact(artifact, root, CalibrationConfig(max_fpr=0.01), backend="ort-cpu", report=lambda line: None)
    manifest = Manifest.load(manifest_path_for(artifact))
    assert manifest == result.manifest and manifest.onnx_sha256 == onnx_hash
    assert sorted(manifest.category_thresholds) == ["blue", "red"] and manifest.image_threshold is not None
    red, blue = manifest.category_thresholds["red"], manifest.category_thresholds["blue"]
    assert blue.image_threshold.value < red.image_threshold.value <= manifest.image_threshold.value
    assert blue.image_threshold.calibration.source == str((root / "blue" / "test" / "good").resolve())
    assert blue.image_threshold.calibration.n_images == 6 and blue.pixel_threshold is not None
    assert blue.score_normalization.apply(blue.image_threshold.value) == pytest.approx(0.5)
    assert 0 < blue.distance_limit.value < 0.5 and blue.distance_limit.calibration.method == "max_fpr_separation"
    for name in ("red", "blue"):
        point = result.point(name)
        assert point.recognized == 1.0 and point.recognition_accuracy == 1.0 and point.replaced is None
        counts = point.counts
        assert (counts.true_positives, counts.false_negatives, counts.false_positives, counts.true_negatives) == (3, 0, 0, 6)
        assert counts.unknown == 0 and counts.recall == 1.0 and counts.false_alarm_rate == 0.0
    assert result.point(None).counts is None  # the global set has no test split of its own
    # The global threshold alone would miss every blue defect: they score below the red good parts.
    blue_scores = calibrate_artifact(artifact, [], backend="ort-cpu", categories=[("blue", root / "blue" / "test" / "patch")],
                                     report=lambda line: None).point("blue").scores
    assert (blue_scores < manifest.image_threshold.value).all() and (blue_scores >= blue.image_threshold.value).all()


def test_calibrating_again_says_what_it_replaced_and_keeps_the_rest(tmp_path):
    root = write_data_root(tmp_path / "data")
    artifact = write_artifact(tmp_path / "model", input_hw=(20, 20))
    first = calibrate_artifact(artifact, root, backend="ort-cpu", report=lambda line: None).manifest
    again = calibrate_artifact(artifact, [], backend="ort-cpu", categories=[("red", root / "red" / "train" / "good")],
                               report=lambda line: None)
    (point,) = again.points
    assert point.replaced == first.category_thresholds["red"]
    assert "image threshold" in point.replaced.describe() and "6 images of" in point.replaced.describe()
    manifest = again.manifest
    assert manifest.category_thresholds["blue"] == first.category_thresholds["blue"]  # untouched
    assert manifest.image_threshold == first.image_threshold
    assert manifest.category_thresholds["red"].image_threshold.calibration.source.endswith("red/train/good")


def test_a_category_the_model_does_not_know_is_refused(tmp_path):
    root = write_data_root(tmp_path / "data")
    artifact = write_artifact(tmp_path / "model", input_hw=(20, 20))
    with pytest.raises(ReconadError, match=r"was not trained on purple; its categories are red, green, blue"):
        calibrate_artifact(artifact, [], backend="ort-cpu", categories=[("purple", root / "red" / "test" / "good")])


def test_per_category_thresholds_of_a_model_that_names_no_category_need_run_category(tmp_path):
    root = write_data_root(tmp_path / "data")
    artifact = write_artifact(tmp_path / "model", input_hw=(20, 20), with_category=False)
    notes = []
    result = calibrate_artifact(artifact, root, backend="ort-cpu", report=notes.append)
    assert sorted(result.manifest.category_thresholds) == ["blue", "red"]
    assert all(point.point.distance_limit is None and point.recognized is None for point in result.points)
    assert any("uses a category's thresholds only with --category NAME" in note for note in notes)


def test_calibrate_writes_thresholds_and_provenance_into_the_manifest(tmp_path):
    artifact = write_artifact(tmp_path / "model")
    onnx_hash = sha256_file(artifact)
    good = write_good_images(tmp_path / "good", 40)
    config = CalibrationConfig(max_fpr=0.05, margin=0.1)
    result = calibrate_artifact(artifact, good, config, backend="ort-cpu", report=lambda line: None)
    manifest = Manifest.load(manifest_path_for(artifact))
    assert manifest == result.manifest and manifest.onnx_sha256 == onnx_hash == sha256_file(artifact)
    (point,) = result.points
    assert point.category is None and point.n_images == 40 and point.false_positive_rate <= 0.05
    assert manifest.category_thresholds == {} and manifest.distance_limit is not None
    threshold = manifest.image_threshold
    assert threshold.value == pytest.approx(threshold_at_fpr(point.scores, 0.05, 0.1))
    provenance = threshold.calibration
    assert (provenance.method, provenance.n_images, provenance.max_fpr, provenance.margin) == ("max_fpr", 40, 0.05, 0.1)
    assert provenance.source == str(good.resolve()) and provenance.date.startswith("20")
    assert manifest.pixel_threshold.value > 0 and manifest.pixel_threshold.calibration.max_fpr == 0.05
    assert manifest.score_normalization.method == "quantile"
    assert manifest.score_normalization.apply(threshold.value) == pytest.approx(0.5)

    with Inspector.open(artifact, "ort-cpu") as inspector:  # the hash still matches; verdicts use the new threshold
        inspector.require_calibration()
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
    assert result.points[0].false_positive_rate == 0.0  # 5 images cannot resolve 1 %: above the highest good score
    assert any("5 good images cannot resolve max_fpr=0.01" in note for note in notes)


def test_calibration_on_the_sample_data_of_every_category(tmp_path, sample_data_root):
    artifact = write_artifact(tmp_path / "model", input_hw=(64, 64))
    goods = sorted(sample_data_root.glob("*/train/good"))
    assert len(goods) == 2
    result = calibrate_artifact(artifact, goods, CalibrationConfig(max_fpr=0.2), backend="ort-cpu")
    (point,) = result.points
    assert point.n_images == 12 and point.false_positive_rate <= 0.2
    assert point.scores.min() <= result.manifest.image_threshold.value
    assert result.manifest.image_threshold.calibration.source == ", ".join(str(g.resolve()) for g in goods)
    with pytest.raises(ReconadError, match="is a test split"):  # the example: defects taken as good
        calibrate_artifact(artifact, sample_data_root / "weave" / "test", backend="ort-cpu")


def test_calibrate_cli(tmp_path):
    artifact = write_artifact(tmp_path / "model")
    good = write_good_images(tmp_path / "good", 30)
    (good / "broken.png").write_bytes(b"junk")
    other = write_good_images(tmp_path / "other", 5, seed=1)
    arguments = ["calibrate", str(artifact), str(good), str(other), "--max-fpr", "0.05", "--normalize", "minmax"]
    result = runner.invoke(app, [*arguments, "--roi", "0,0,16,16"])
    assert result.exit_code == 0, result.output
    assert "global: 35 good images (1 unreadable)" in result.stdout and "image threshold" in result.stdout
    assert "skipped" in result.stderr and "broken.png" in result.stderr
    manifest = json.loads(manifest_path_for(artifact).read_text())
    assert manifest["image_threshold"]["calibration"]["max_fpr"] == 0.05
    assert manifest["score_normalization"]["method"] == "minmax"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--max-fpr", "1.5"], "max_fpr must be in [0, 1)"),
        (["--roi", "0,0"], "ROI must be four integers"),
    ],
)
def test_calibrate_cli_bad_options(tmp_path, arguments, message):
    artifact = write_artifact(tmp_path / "model")
    good = write_good_images(tmp_path / "good", 3)
    result = runner.invoke(app, ["calibrate", str(artifact), str(good), *arguments])
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_calibrate_cli_refuses_an_unknown_normalisation_while_parsing(tmp_path):
    result = runner.invoke(app, ["calibrate", str(tmp_path / "m.onnx"), str(tmp_path), "--normalize", "zscore"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].endswith("'zscore' is not one of 'quantile', 'minmax', 'none'.")


def test_calibrate_cli_on_a_data_root_and_with_category_pairs(tmp_path):
    root = write_data_root(tmp_path / "data")
    artifact = write_artifact(tmp_path / "model", input_hw=(20, 20))
    result = runner.invoke(app, ["calibrate", str(artifact), str(root)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("global: 12 good images") and lines[1].startswith("blue: 6 good images")
    assert "100.0% of them recognised as blue" in lines[1]
    assert lines[2] == (
        "  blue operating point on its test split: recall 100.0%, false-alarm rate 0.0% (on the good images it was "
        "calibrated on); TP 3 FN 0 FP 0 TN 6, 0 unknown; recognition 100.0%"
    )
    assert lines[-1] == f"wrote {manifest_path_for(artifact)}"
    pairs = ["--category", "red", str(root / "red" / "train" / "good"), "--category", "blue", str(root / "blue" / "train" / "good")]
    again = runner.invoke(app, ["calibrate", str(artifact), *pairs])
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("red: 6 good images") and "  replaced red: image threshold" in again.stdout
    assert "  replaced blue: image threshold" in again.stdout
    refused = runner.invoke(app, ["calibrate", str(artifact), str(root / "blue" / "test")])
    assert refused.exit_code == 2 and "is a test split" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_calibrate_cli_needs_good_images(tmp_path):
    artifact = write_artifact(tmp_path / "model")
    good = write_good_images(tmp_path / "good", 1)
    result = runner.invoke(app, ["calibrate", str(artifact), str(good)])
    assert result.exit_code == 2 and "needs at least 2 defect-free images" in result.stderr
