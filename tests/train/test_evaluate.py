"""Evaluation: metrics per category and mean, the report files, and agreement with scikit-learn."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from reconad.model import load_detector
from reconad.train.data import load_mvtec
from reconad.train.evaluate import evaluate_checkpoint, evaluate_predictions, format_metrics_table, predict


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
