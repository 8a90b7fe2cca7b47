"""Evaluation: metrics per category and mean, the report files, agreement with scikit-learn, and the operating
points (per category and global, from the calibration rule or a calibrated manifest)."""

import dataclasses
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from reconad.model import load_detector
from reconad.train.data import load_mvtec
from reconad.runtime.calibration import threshold_at_fpr
from reconad.train.evaluate import evaluate_checkpoint, evaluate_predictions, format_metrics_table, predict, predict_outputs


@pytest.fixture(scope="module")
def test_set(sample_data_root):
    return load_mvtec(sample_data_root, "test", (64, 64))


def test_perfect_predictions_score_one(test_set):
    maps = test_set.masks.astype(np.float32)
    scores = test_set.labels.astype(np.float32)
    result = evaluate_predictions(test_set, maps, scores)
    for metrics in result["categories"].values():
        for name in ("image_auroc", "pixel_auroc", "au_pro", "image_ap", "image_f1_max", "pixel_ap", "pixel_f1_max"):
            assert metrics[name] == pytest.approx(1.0), name
    assert result["mean"]["image_auroc"] == pytest.approx(1.0)
    assert result["categories"]["pill"]["num_images"] == 6 and result["categories"]["pill"]["num_anomalous"] == 4


def test_inverted_scores_are_reported_below_chance(test_set):
    result = evaluate_predictions(test_set, -test_set.masks.astype(np.float32), -test_set.labels.astype(np.float32))
    assert result["mean"]["image_auroc"] == 0.0 and result["mean"]["pixel_auroc"] == 0.0
    table = format_metrics_table(result)
    assert "| **mean** | 0.0000 | 0.0000 |" in table


def test_evaluate_checkpoint_writes_the_report_and_agrees_with_sklearn(tiny_run, sample_data_root, tmp_path):
    report = evaluate_checkpoint(tiny_run.checkpoint, sample_data_root, tmp_path / "report", num_heatmaps=3, device="cpu")
    out = tmp_path / "report"
    payload = json.loads((out / "metrics.json").read_text())
    assert set(payload["categories"]) == {"pill", "weave"} and payload["preset"] == "tiny"
    assert "| **mean** |" in (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "roc").iterdir()) == ["pill.png", "weave.png"]
    for category in ("pill", "weave"):
        assert len(list((out / "heatmaps" / category).glob("*.png"))) == 3
    # Cross-check: the same predictions through scikit-learn.
    test_set = load_mvtec(sample_data_root, "test", (64, 64))
    maps, scores = predict(load_detector(tiny_run.checkpoint), test_set.images, 8, "cpu")
    for category, metrics in payload["categories"].items():
        keep = np.array([c == category for c in test_set.categories])
        assert metrics["image_auroc"] == pytest.approx(skm.roc_auc_score(test_set.labels[keep], scores[keep]), abs=1e-6)
        assert metrics["image_ap"] == pytest.approx(
            skm.average_precision_score(test_set.labels[keep], scores[keep]), abs=1e-6
        )
        pixels, pixel_scores = test_set.masks[keep].ravel(), maps[keep].ravel()
        assert metrics["pixel_auroc"] == pytest.approx(skm.roc_auc_score(pixels, pixel_scores), abs=1e-6)
        assert metrics["pixel_ap"] == pytest.approx(skm.average_precision_score(pixels, pixel_scores), abs=1e-6)
    assert report.result["mean"]["image_auroc"] == pytest.approx(
        np.mean([m["image_auroc"] for m in payload["categories"].values()])
    )


def test_the_operating_points_per_category_and_global(tiny_run, sample_data_root, tmp_path):
    report = evaluate_checkpoint(tiny_run.checkpoint, sample_data_root, tmp_path / "r", num_heatmaps=0, device="cpu")
    points = report.result["operating_points"]
    test_set = load_mvtec(sample_data_root, "test", (64, 64))
    detector = load_detector(tiny_run.checkpoint)
    predictions = predict_outputs(detector, test_set.images, 8, "cpu")
    goods = test_set.labels == 0
    global_threshold = threshold_at_fpr(predictions.image_scores[goods], 0.01, 0.05)
    for category in ("pill", "weave"):
        keep = np.array([c == category for c in test_set.categories])
        own = threshold_at_fpr(predictions.image_scores[keep & goods], 0.01, 0.05)  # the rule on its goods only
        point, shared = points["per_category"][category], points["global"][category]
        assert point["threshold"] == pytest.approx(own) and shared["threshold"] == pytest.approx(global_threshold)
        flagged = predictions.image_scores[keep] >= own
        labels = test_set.labels[keep].astype(bool)
        judged = point["unknown"] == 0
        assert judged and point["true_positives"] == int((flagged & labels).sum())
        assert point["false_positives"] == int((flagged & ~labels).sum()) == 0  # in-sample: the goods set it
        assert point["recall"] == pytest.approx(point["true_positives"] / labels.sum())
        assert point["recognition_accuracy"] == pytest.approx(
            np.mean(predictions.categories[keep] == ["pill", "weave"].index(category))
        )
    assert points["recognition_accuracy"] is not None
    text = (tmp_path / "r" / "report.md").read_text()
    assert "## Operating points" in text and "never set a threshold" in text
    assert "| pill |" in report.points_table
    payload = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert payload["operating_points"]["per_category"]["pill"]["threshold"] == pytest.approx(points["per_category"]["pill"]["threshold"])
    assert "recognized_category,category_distance" in (tmp_path / "r" / "scores.csv").read_text().splitlines()[0]


def test_operating_points_from_a_calibrated_manifest(tiny_run, sample_data_root, tmp_path):
    from reconad.runtime.manifest import manifest_path_for
    from reconad.runtime.thresholds import OperatingPoint, Threshold
    from tests.runtime.onnx_graphs import make_manifest

    manifest = make_manifest("m.onnx", category_head=None, image_threshold=Threshold.manual(1e9))
    manifest = dataclasses.replace(manifest, categories=("pill", "weave"))
    manifest = manifest.with_operating_point("pill", OperatingPoint(image_threshold=Threshold.manual(-1.0)))
    path = manifest_path_for(tmp_path / "m.onnx")
    manifest.save(path)
    report = evaluate_checkpoint(tiny_run.checkpoint, sample_data_root, tmp_path / "r", num_heatmaps=0, device="cpu",
                                 manifest=path)
    pill, weave = (report.result["operating_points"]["per_category"][c] for c in ("pill", "weave"))
    assert pill["threshold"] == -1.0 and pill["recall"] == 1.0 and pill["false_alarm_rate"] == 1.0
    assert pill["threshold_source"] == "manifest (its own threshold)"
    assert weave["threshold"] == 1e9 and weave["recall"] == 0.0 and weave["threshold_source"] == "manifest (the global threshold)"
    assert "calibrated manifest" in (tmp_path / "r" / "report.md").read_text()


def test_the_report_shows_the_learning_curve_and_which_split_chose_the_epoch(sample_data_root, tmp_path):
    from reconad.train.fit import fit
    from tests.train.conftest import tiny_train_config

    config = tiny_train_config(epochs=3, holdout_fraction=0.25, select_on="held-out", val_every_epochs=1)
    result = fit(sample_data_root, tmp_path / "run", config)
    evaluate_checkpoint(result.checkpoint, sample_data_root, tmp_path / "r", num_heatmaps=0, device="cpu")
    text = (tmp_path / "r" / "report.md").read_text()
    assert f"Saved epoch {result.best_epoch}, chosen by lowest reconstruction error on 4 held-out good training" in text
    assert "| epoch | minutes | lr | train loss | held-out error |" in text and f"| {result.best_epoch} (saved) |" in text
    assert (tmp_path / "r" / "learning_curve.png").stat().st_size > 0
    training = json.loads((tmp_path / "r" / "metrics.json").read_text())["training"]
    assert [r["epoch"] for r in training["curve"]] == [1, 2, 3] and "held-out" in training["selected_by"]


def test_the_report_says_last_epoch_no_selection(tiny_run, sample_data_root, tmp_path):
    evaluate_checkpoint(tiny_run.checkpoint, sample_data_root, tmp_path / "r", num_heatmaps=0, device="cpu")
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Saved epoch 1: the last epoch, no selection." in text and "| 1 (saved) |" in text
