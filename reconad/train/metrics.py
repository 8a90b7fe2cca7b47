"""Anomaly-detection metrics: AUROC, average precision and F1-max on scikit-learn, AU-PRO after MVTec AD.

The ranking metrics are scikit-learn's (tied scores form one threshold; an AUROC below 0.5 is reported
as it is, never flipped); undefined values (one class only) are NaN instead of scikit-learn's warning
or error. AU-PRO has no well-kept implementation, so it is written here after MVTec AD's evaluation code
(8-connected regions, integrated up to a false-positive rate of 0.3 and divided by 0.3).
"""

from bisect import bisect

import numpy as np
from sklearn import metrics as skm

from reconad.runtime.errors import ReconadError

PRO_FPR_LIMIT = 0.3


def _check_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ReconadError(f"Got {labels.size} labels but {scores.size} scores.")
    if not np.isfinite(scores).all():
        raise ReconadError("Scores contain NaN or infinite values; the model output is broken.")
    return labels.astype(bool), scores


def _both_classes(labels: np.ndarray) -> bool:
    return bool(labels.any()) and not bool(labels.all())


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct score, from (0, 0) at +inf; NaN rates for a missing class."""
    labels, scores = _check_inputs(labels, scores)
    if not _both_classes(labels):
        thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
        return np.full(thresholds.size, np.nan), np.full(thresholds.size, np.nan), thresholds
    return skm.roc_curve(labels, scores, drop_intermediate=False)


def auroc(labels, scores) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels, scores = _check_inputs(labels, scores)
    return float(skm.roc_auc_score(labels, scores)) if _both_classes(labels) else float("nan")


def average_precision(labels, scores) -> float:
    """scikit-learn's average precision (sum of recall steps x precision); NaN without both classes."""
    labels, scores = _check_inputs(labels, scores)
    return float(skm.average_precision_score(labels, scores)) if _both_classes(labels) else float("nan")


def f1_max(labels, scores) -> tuple[float, float]:
    """The best F1 over all thresholds and the threshold reaching it (rule ``score >= threshold``);
    (NaN, NaN) without both classes."""
    labels, scores = _check_inputs(labels, scores)
    if not _both_classes(labels):
        return float("nan"), float("nan")
    precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
    f1 = _f1(precision[:-1], recall[:-1])  # the last point (recall 0) has no threshold
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    denominator = precision + recall
    return np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)


def ranking_metrics(labels, scores) -> dict[str, float]:
    """``auroc``, ``ap`` and ``f1_max`` of one set of labels and scores (NaN without both classes)."""
    labels, scores = _check_inputs(labels, scores)
    if not _both_classes(labels):
        return dict.fromkeys(("auroc", "ap", "f1_max"), float("nan"))
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    return {
        "auroc": float(skm.roc_auc_score(labels, scores)),
        "ap": float(skm.average_precision_score(labels, scores)),
        "f1_max": float(_f1(precision, recall).max()),
    }


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
