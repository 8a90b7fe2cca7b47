"""Ranking metrics (scikit-learn underneath) on hand-computed cases and their NaN rules; AU-PRO by hand and
against MVTec's reference on random maps."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from reconad.train import metrics
from reconad.runtime.errors import ReconadError


def _sklearn_f1_max(labels, scores):
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0)
    return f1.max()


@pytest.mark.parametrize(
    "labels,scores,expected",
    [
        # by hand: ranks 0.8(+) 0.4(-) 0.35(+) 0.1(-); AP = 0.5 * 1 + 0.5 * 2/3; best F1 at 0.35: p 2/3, r 1
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], {"auroc": 0.75, "ap": 5 / 6, "f1_max": 0.8}),
        # ties form one threshold: at 1 (p 1/2, r 1/2), at 0 (p 1/2, r 1)
        ([0, 1, 0, 1], [1.0, 1.0, 0.0, 0.0], {"auroc": 0.5, "ap": 0.5, "f1_max": 2 / 3}),
    ],
)
def test_ranking_metrics_by_hand(labels, scores, expected):
    assert metrics.ranking_metrics(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert metrics.auroc(labels, scores) == pytest.approx(expected["auroc"], abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(expected["ap"], abs=1e-12)
    assert metrics.f1_max(labels, scores)[0] == pytest.approx(expected["f1_max"], abs=1e-12)


def test_roc_curve_matches_sklearn_without_dropping_points():
    rng = np.random.default_rng(1)
    labels, scores = rng.integers(0, 2, 200), rng.integers(0, 30, 200).astype(float)
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thresholds[1:], sk_thresholds[1:])


def test_f1_max_threshold_reaches_the_best_f1():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 300)
    scores = labels + rng.normal(size=300)
    best, threshold = metrics.f1_max(labels, scores)
    assert skm.f1_score(labels, scores >= threshold) == pytest.approx(best, abs=1e-9)


def test_auroc_below_half_is_not_flipped():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert metrics.auroc(labels, scores) == 0.0
    assert metrics.auroc(labels, scores[[0, 3, 2, 1, 4, 5]]) == pytest.approx(
        skm.roc_auc_score(labels, scores[[0, 3, 2, 1, 4, 5]])
    )


def test_single_class_gives_nan_and_bad_scores_raise():
    assert math.isnan(metrics.auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(metrics.average_precision([0, 0], [0.1, 0.2]))
    assert math.isnan(metrics.f1_max([0, 0], [0.1, 0.2])[0])
    with pytest.raises(ReconadError, match="NaN"):
        metrics.auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ReconadError, match="labels"):
        metrics.auroc([0, 1, 1], [0.1, 0.2])


def test_pixel_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 32, 32), bool)
    masks[1, 4:12, 5:15] = True
    masks[3, 20:30, 2:6] = True
    maps = rng.random((6, 1, 32, 32)).astype(np.float32) + masks[:, None] * 0.5
    labels = masks.reshape(6, -1).any(1).astype(int)
    image_scores = maps.reshape(6, -1).max(1)
    result = metrics.compute_detection_metrics(labels, image_scores, masks, maps)
    flat_labels, flat_scores = masks.ravel(), maps.ravel()
    assert result["pixel_auroc"] == pytest.approx(skm.roc_auc_score(flat_labels, flat_scores), abs=1e-6)
    assert result["pixel_ap"] == pytest.approx(skm.average_precision_score(flat_labels, flat_scores), abs=1e-6)
    assert result["pixel_f1_max"] == pytest.approx(_sklearn_f1_max(flat_labels, flat_scores), abs=1e-6)
    assert result["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, image_scores), abs=1e-6)
    assert set(result) == {
        "image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "au_pro"
    }


def test_au_pro_perfect_map_is_one():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1:3, 1:3] = True
    assert metrics.au_pro(masks, masks.astype(np.float32)) == pytest.approx(1.0)


def test_au_pro_two_regions_by_hand():
    # Region A = 1 pixel (score 3), region B = 2 pixels (score 1), one defect-free pixel at 2, six at 0.
    # Curve: (0,0) (0,.5) (1/7,.5) (1/7,1) (1,1); area to 0.3 = .5/7 + (.3 - 1/7); / 0.3 = 16/21.
    masks = np.zeros((1, 2, 5), bool)
    masks[0, 0, 0] = True
    masks[0, 1, 3:5] = True
    maps = np.zeros((1, 2, 5))
    maps[0, 0, 0] = 3
    maps[0, 0, 2] = 2
    maps[0, 1, 3:5] = 1
    fpr, pro = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 7, 1 / 7, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    assert metrics.au_pro(masks, maps) == pytest.approx(16 / 21, abs=1e-12)


def test_au_pro_interpolates_at_the_limit():
    # One defect pixel tied with three of four defect-free pixels: curve (0,0) (.25,0) (1,1).
    # At fpr 0.3 the PRO is 0.05/0.75 = 1/15; area = 0.5 * 1/15 * 0.05 = 1/600; / 0.3 = 1/180.
    masks = np.array([[[True, False, False, False, False]]])
    maps = np.array([[[0.0, 3.0, 0.0, 0.0, 0.0]]])
    assert metrics.au_pro(masks, maps) == pytest.approx(1 / 180, abs=1e-12)


def test_au_pro_regions_are_eight_connected_and_span_images():
    # Image 0: diagonal pixels (0,0),(1,1) are ONE region, (3,3) another; image 1 is defect-free, so
    # there are 13 + 16 = 29 negatives. Only (0,0) is found before the first false positive:
    # PRO = (1/2 + 0) / 2 = 0.25 up to fpr 1/29, then 1. (4-connectivity: three regions, PRO 1/3.)
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps = np.full((2, 4, 4), -1.0)
    maps[0, 0, 0] = 2
    maps[0, 0, 3] = 1
    maps[0, 1, 1] = maps[0, 3, 3] = 0
    eight_connected = (0.25 / 29 + (0.3 - 1 / 29)) / 0.3
    four_connected = ((1 / 3) / 29 + (0.3 - 1 / 29)) / 0.3
    result = metrics.au_pro(masks, maps)
    assert result == pytest.approx(eight_connected, abs=1e-12)
    assert result != pytest.approx(four_connected, abs=1e-6)


def _mvtec_reference_au_pro(masks, maps, limit=0.3):
    """MVTec AD's compute_pro + trapezoid, written as loops over regions (independent of the vectorised code)."""
    from scipy.ndimage import label

    fp_changes = np.zeros(maps.shape, np.float64)
    pro_changes = np.zeros(maps.shape, np.float64)
    num_ok = num_regions = 0
    for i, gt in enumerate(masks):
        labelled, n = label(gt, np.ones((3, 3), int))
        num_regions += n
        fp_changes[i][labelled == 0] = 1
        num_ok += int((labelled == 0).sum())
        for k in range(1, n + 1):
            region = labelled == k
            pro_changes[i][region] = 1.0 / region.sum()
    scores = maps.ravel()
    order = np.argsort(scores)[::-1]
    fprs = np.cumsum(fp_changes.ravel()[order]) / num_ok
    pros = np.cumsum(pro_changes.ravel()[order]) / num_regions
    keep = np.append(np.diff(scores[order]) != 0, True)
    fprs = np.r_[0, np.clip(fprs[keep], None, 1)]
    pros = np.r_[0, np.clip(pros[keep], None, 1)]
    area = 0.0
    for j in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[j - 1], fprs[j], pros[j - 1], pros[j]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


def test_au_pro_matches_mvtec_reference_on_random_maps():
    rng = np.random.default_rng(4)
    masks = rng.random((5, 24, 24)) > 0.93  # many small, irregular regions
    masks[0] = False
    maps = rng.random((5, 24, 24)) + masks * rng.uniform(0, 1.0, (5, 24, 24))
    maps = np.round(maps, 2)  # ties across regions and background
    assert metrics.au_pro(masks, maps) == pytest.approx(_mvtec_reference_au_pro(masks, maps), abs=1e-9)


def test_au_pro_undefined_without_regions():
    assert math.isnan(metrics.au_pro(np.zeros((2, 4, 4), bool), np.random.default_rng(5).random((2, 4, 4))))


def test_au_pro_opencv_fallback_matches_scipy(monkeypatch):
    rng = np.random.default_rng(6)
    masks = rng.random((3, 20, 20)) > 0.9
    maps = rng.random((3, 20, 20)) + masks * 0.3
    with_scipy = metrics.au_pro(masks, maps)
    monkeypatch.setitem(__import__("sys").modules, "scipy", None)  # `from scipy import ndimage` now fails
    assert metrics.au_pro(masks, maps) == pytest.approx(with_scipy, abs=1e-12)
