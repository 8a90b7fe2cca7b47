"""Backbone features, cached once per fit, and what is computed from them: category centroids, anomaly maps
and image scores in eval mode, and the validation metrics per category."""

import math
import os
from pathlib import Path

import numpy as np
import torch

from reconad.model import AnomalyDetector
from reconad.runtime.progress import Progress
from reconad.train.config import VAL_METRICS
from reconad.train.data import ImageDataset
from reconad.train.metrics import ranking_metrics


@torch.no_grad()
def extract_all_features(
    detector: AnomalyDetector, images: np.ndarray, batch_size: int, device: torch.device,
    description: str = "caching features", show: bool = True,
) -> torch.Tensor:
    """Backbone features of uint8 [N, H, W, 3] images -> float32 [N, C, h, w] on the CPU (progress shown)."""
    chunks = []
    with Progress(description, len(images), unit="images", rate_unit="img/s", enabled=show) as progress:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)
            chunks.append(detector.extract_features(batch).cpu())
            progress.advance(len(batch))
    return torch.cat(chunks)


@torch.no_grad()
def fit_category_head(
    detector: AnomalyDetector,
    train_set: ImageDataset,
    features: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
    data_root: str | os.PathLike,
) -> dict:
    """Fit the detector's category centroids on the training images (``AnomalyDetector.fit_category_centroids``).

    Args:
        features: the cached backbone features of ``train_set`` [N, C, h, w], or None to extract them
            (one more backbone pass over the training images).

    Returns:
        The checkpoint provenance entry ``category_head``: ``names`` (centroid order), ``n_images``, ``source``.
    """
    pooled = []
    for start in range(0, len(train_set), batch_size):
        if features is not None:
            batch = features[start : start + batch_size].to(device)
        else:
            batch = detector.extract_features(torch.from_numpy(train_set.images[start : start + batch_size]).to(device))
        pooled.append(detector.pooled_features(batch).cpu())
    names = train_set.category_names
    detector.fit_category_centroids(torch.cat(pooled), train_set.categories, names)
    return {
        "names": list(names),
        "n_images": [train_set.categories.count(name) for name in names],
        "source": f"{len(train_set)} training images of {Path(data_root).resolve()}",
    }


@torch.no_grad()
def predict_from_features(
    detector: AnomalyDetector, features: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps float32 [N, H, W] and image scores [N] from cached features, in eval mode."""
    was_training = detector.training
    detector.eval()
    maps, scores = [], []
    for start in range(0, len(features), batch_size):
        batch = features[start : start + batch_size].to(device)
        anomaly_map, image_score = detector.score(batch, detector.reconstructor(batch))
        maps.append(anomaly_map[:, 0].cpu().numpy())
        scores.append(image_score.cpu().numpy())
    detector.train(was_training)
    return np.concatenate(maps), np.concatenate(scores)


def validate(dataset: ImageDataset, anomaly_maps: np.ndarray, image_scores: np.ndarray) -> dict:
    """Image AUROC (and pixel AUROC where there are masks) per category and their means."""
    result = {"categories": {}}
    for category in dataset.category_names:
        keep = np.array([c == category for c in dataset.categories])
        metrics = {"image_auroc": ranking_metrics(dataset.labels[keep], image_scores[keep])["auroc"]}
        if dataset.has_masks:
            metrics["pixel_auroc"] = ranking_metrics(dataset.masks[keep].ravel(), anomaly_maps[keep].ravel())["auroc"]
        result["categories"][category] = metrics
    for name in VAL_METRICS:
        values = [m[name] for m in result["categories"].values() if name in m and math.isfinite(m[name])]
        result[name] = float(np.mean(values)) if values else float("nan")
    return result
