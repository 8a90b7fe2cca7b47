"""Anomaly-detection metrics in numpy: AUROC, average precision, F1-max and AU-PRO.

Exact (tied scores form one threshold, as in scikit-learn), never flipped: an AUROC below 0.5 is
reported as it is. AU-PRO follows MVTec AD's evaluation code (8-connected regions, integrated up to a
false-positive rate of 0.3 and divided by 0.3). Undefined values (one class only) are NaN. Torch-free.
"""

from bisect import bisect

import numpy as np

from reconad.runtime.errors import ReconadError

PRO_FPR_LIMIT = 0.3


def _check_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ReconadError(f"Got {labels.size} labels but {scores.size} scores.")
    if not np.isfinite(scores).all():
        raise ReconadError("Scores contain NaN or infinite values; the model output is broken.")
    return labels.astype(bool), scores


def _binary_clf_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct score, thresholds descending (``score >= threshold``)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    last_of_each = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    tps = np.cumsum(sorted_labels, dtype=np.int64)[last_of_each]
    fps = (last_of_each + 1) - tps
    return tps, fps, sorted_scores[last_of_each]


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` starting at (0, 0) with threshold +inf; NaN rates for a missing class."""
    labels, scores = _check_inputs(labels, scores)
    tps, fps, thresholds = _binary_clf_counts(labels, scores)
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    with np.errstate(invalid="ignore", divide="ignore"):
        return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def _area(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def auroc(labels, scores) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    fpr, tpr, _ = roc_curve(labels, scores)
    if not (np.isfinite(fpr[-1]) and np.isfinite(tpr[-1])):
        return float("nan")
    return _area(fpr, tpr)


def precision_recall(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` with thresholds descending; NaN recall without positives."""
    labels, scores = _check_inputs(labels, scores)
    tps, fps, thresholds = _binary_clf_counts(labels, scores)
    return _precision_recall_from_counts(tps, fps) + (thresholds,)


def _precision_recall_from_counts(tps: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    precision = tps / (tps + fps)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tps / tps[-1]
    return precision, recall


def _ap_from_pr(precision: np.ndarray, recall: np.ndarray) -> float:
    if not np.isfinite(recall[-1]):
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1_from_pr(precision: np.ndarray, recall: np.ndarray) -> tuple[float, int]:
    if not np.isfinite(recall[-1]):
        return float("nan"), -1
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), best


def average_precision(labels, scores) -> float:
    """Sum over thresholds of (recall step) x precision, as scikit-learn's; NaN without positives."""
    precision, recall, _ = precision_recall(labels, scores)
    return _ap_from_pr(precision, recall)


def f1_max(labels, scores) -> tuple[float, float]:
    """The best F1 over all thresholds and the threshold reaching it; (NaN, NaN) without positives."""
    precision, recall, thresholds = precision_recall(labels, scores)
    best_f1, best = _f1_from_pr(precision, recall)
    return best_f1, (float(thresholds[best]) if best >= 0 else float("nan"))


def ranking_metrics(labels, scores) -> dict[str, float]:
    """``auroc``, ``ap`` and ``f1_max`` from one sort (the pixel level has millions of scores)."""
    labels, scores = _check_inputs(labels, scores)
    tps, fps, _ = _binary_clf_counts(labels, scores)
    precision, recall = _precision_recall_from_counts(tps, fps)
    if tps[-1] == 0 or fps[-1] == 0:
        area = float("nan")
    else:
        area = _area(np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1])
    return {"auroc": area, "ap": _ap_from_pr(precision, recall), "f1_max": _f1_from_pr(precision, recall)[0]}


def _label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool [H, W] mask: int labels (0 = background) and their count."""
    try:
        from scipy import ndimage
    except ImportError:
        ndimage = None
    if ndimage is not None:
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), int))
        return labelled, int(count)
    try:
        import cv2
    except ImportError as error:
        raise ReconadError("AU-PRO needs scipy or OpenCV to find defect regions.") from error
    count, labelled = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return labelled, int(count) - 1


def pro_curve(masks, anomaly_maps) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve ``(fpr, pro)``, as MVTec AD's ``compute_pro``.

    Args:
        masks: bool-like [N, H, W] ground truth; every 8-connected region counts once.
        anomaly_maps: float [N, H, W] (or [N, 1, H, W]), larger = more anomalous.

    Returns:
        fpr and mean per-region overlap at each distinct threshold, descending, starting at (0, 0).
    """
    masks = np.asarray(masks).astype(bool)
    anomaly_maps = np.asarray(anomaly_maps)
    anomaly_maps = anomaly_maps.reshape(anomaly_maps.shape[0], *anomaly_maps.shape[-2:])
    masks = masks.reshape(masks.shape[0], *masks.shape[-2:])
    if masks.shape != anomaly_maps.shape:
        raise ReconadError(f"Masks {masks.shape} and anomaly maps {anomaly_maps.shape} differ in shape.")
    pro_weights = np.zeros(masks.shape, np.float64)  # 1 / region size on each region's pixels
    num_regions = 0
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        labelled, count = _label_regions(mask)
        sizes = np.bincount(labelled.ravel(), minlength=count + 1).astype(np.float64)
        inverse = np.zeros_like(sizes)
        inverse[1:] = 1.0 / sizes[1:]
        pro_weights[i] = inverse[labelled]
        num_regions += count
    num_ok = int((~masks).sum())
    if num_regions == 0 or num_ok == 0:
        return np.array([0.0]), np.array([np.nan])
    scores = anomaly_maps.ravel()
    if not np.isfinite(scores).all():
        raise ReconadError("Anomaly maps contain NaN or infinite values; the model output is broken.")
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores = scores[order]
    fpr = np.cumsum(~masks.ravel()[order], dtype=np.int64) / num_ok
    pro = np.cumsum(pro_weights.ravel()[order]) / num_regions
    last_of_each = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    fpr = np.minimum(fpr[last_of_each], 1.0)
    pro = np.minimum(pro[last_of_each], 1.0)
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under y(x) from x[0] to ``x_max``, interpolating linearly at ``x_max`` (MVTec's ``trapezoid``)."""
    correction = 0.0
    if x_max not in x:
        right = bisect(x.tolist(), x_max)
        if not 0 < right < len(x):
            raise ReconadError(f"Cannot integrate to {x_max}: the curve spans {x[0]}..{x[-1]}.")
        y_at = y[right - 1] + (y[right] - y[right - 1]) * (x_max - x[right - 1]) / (x[right] - x[right - 1])
        correction = 0.5 * (y_at + y[right - 1]) * (x_max - x[right - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def au_pro(masks, anomaly_maps, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (1.0 = perfect).

    NaN when there is no defect region or no defect-free pixel.
    """
    fpr, pro = pro_curve(masks, anomaly_maps)
    if not np.isfinite(pro[-1]):
        return float("nan")
    return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


def compute_detection_metrics(labels, image_scores, masks=None, anomaly_maps=None) -> dict[str, float]:
    """Image metrics, plus pixel metrics and AU-PRO when ``masks`` and ``anomaly_maps`` are given.

    Args:
        labels: [N], 1 = anomalous image.
        image_scores: float [N].
        masks: optional bool-like [N, H, W] pixel ground truth.
        anomaly_maps: optional float [N, H, W] or [N, 1, H, W].

    Returns:
        ``image_auroc``, ``image_ap``, ``image_f1_max`` and, with masks, ``pixel_auroc``, ``pixel_ap``,
        ``pixel_f1_max``, ``au_pro``. NaN where undefined.
    """
    image = ranking_metrics(labels, image_scores)
    metrics = {f"image_{name}": value for name, value in image.items()}
    if masks is not None and anomaly_maps is not None:
        anomaly_maps = np.asarray(anomaly_maps)
        masks = np.asarray(masks)
        pixel = ranking_metrics(masks.reshape(-1), anomaly_maps.reshape(-1))
        metrics.update({f"pixel_{name}": value for name, value in pixel.items()})
        metrics["au_pro"] = au_pro(masks, anomaly_maps)
    return metrics
