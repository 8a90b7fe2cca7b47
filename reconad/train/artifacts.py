"""Evaluating an exported artifact (``.onnx`` / ``.engine``) like a checkpoint: through the runtime's Inspector.

``recon-train evaluate model-512x512-int8.onnx DATA`` runs the artifact on ``reconad.runtime``'s backend
(ONNX Runtime, or TensorRT for an engine) and takes what the report needs about the model (input size,
category names and separation, training categories) from its manifest instead of the checkpoint, so an
int8 or fp16 graph's AUROC is measured, not assumed. ``image_auroc_of_graphs`` is the same measurement
for graphs not yet written (``recon-export to-onnx --precision int8``'s AUROC check).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_NAME, IMAGE_SCORE_NAME, Manifest

ARTIFACT_SUFFIXES = (".onnx", ".engine")


@dataclass(frozen=True)
class Predictions:
    """The fused forward's outputs for a test set: maps float32 [N, H, W], scores float32 [N],
    categories int64 [N] (centroid indices) and category distances float32 [N]."""

    anomaly_maps: np.ndarray
    image_scores: np.ndarray
    categories: np.ndarray
    category_distances: np.ndarray


@dataclass(frozen=True)
class ModelFacts:
    """What evaluation needs to know of a model besides its outputs.

    Attributes:
        preset: the model preset, None for a custom config.
        input_hw: the input size (H, W) in pixels.
        category_names: the category head's names in centroid order; empty when it names none.
        separation: float64 [K], per centroid the cosine distance to the nearest other one.
        trained_categories: the training categories.
        normal_classes: CIFAR-10 normal classes of the training run, when known.
        bit_depth: the training run's bit depth of 16-bit images, when known.
    """

    preset: str | None
    input_hw: tuple[int, int]
    category_names: tuple[str, ...]
    separation: np.ndarray
    trained_categories: tuple[str, ...]
    normal_classes: tuple[int, ...] | None = None
    bit_depth: int | None = None


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` names an exported artifact rather than a checkpoint."""
    return Path(path).suffix.lower() in ARTIFACT_SUFFIXES


def facts_from_manifest(manifest: Manifest, unrelated_distance: float) -> ModelFacts:
    """``ModelFacts`` from an artifact's manifest; ``unrelated_distance`` stands in for the separation of
    a lone centroid (as ``evaluate`` does for a checkpoint)."""
    names = manifest.category_head.names if manifest.recognizes_categories else ()
    separation = np.asarray(manifest.category_head.separation or [unrelated_distance] * len(names), np.float64)
    return ModelFacts(
        preset=manifest.preset,
        input_hw=manifest.input_hw,
        category_names=tuple(names),
        separation=separation,
        trained_categories=tuple(manifest.categories),
    )


def predict_with_backend(backend, images: np.ndarray, batch_size: int) -> Predictions:
    """Run an open runtime backend (or ``Inspector``) on uint8 [N, H, W, 3] images in batches of ``batch_size``.

    A graph without category outputs (schema 1) gets category 0 and distance 0 for every image.
    """
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in (ANOMALY_MAP_NAME, IMAGE_SCORE_NAME, CATEGORY_NAME, CATEGORY_DISTANCE_NAME)}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        outputs = backend.infer(batch)
        pieces[ANOMALY_MAP_NAME].append(np.asarray(outputs[ANOMALY_MAP_NAME], np.float32)[:, 0])
        pieces[IMAGE_SCORE_NAME].append(np.asarray(outputs[IMAGE_SCORE_NAME], np.float32))
        pieces[CATEGORY_NAME].append(np.asarray(outputs.get(CATEGORY_NAME, np.zeros(len(batch))), np.int64))
        pieces[CATEGORY_DISTANCE_NAME].append(np.asarray(outputs.get(CATEGORY_DISTANCE_NAME, np.zeros(len(batch))), np.float32))
    return Predictions(*(np.concatenate(values) for values in pieces.values()))


def predict_artifact(artifact: str | Path, images: np.ndarray, batch_size: int, backend: str = "auto") -> tuple[Manifest, Predictions]:
    """Open ``artifact`` with the runtime's ``Inspector`` (manifest and hash checked) and run it on ``images``.

    Raises:
        ReconadError: the artifact, its manifest or the backend cannot be opened.
    """
    from reconad.runtime.inspector import Inspector

    with Inspector.open(artifact, backend, no_threshold=True) as inspector:
        return inspector.manifest, predict_with_backend(inspector, images, batch_size)


def mean_image_auroc(labels: np.ndarray, categories: list[str], scores: np.ndarray) -> float:
    """Image AUROC per category (scikit-learn), averaged over the categories where it is defined; NaN if none."""
    from sklearn.metrics import roc_auc_score

    values = []
    for category in dict.fromkeys(categories):
        keep = np.array([c == category for c in categories])
        if 0 < labels[keep].sum() < keep.sum():
            values.append(float(roc_auc_score(labels[keep], scores[keep])))
    return float(np.mean(values)) if values else math.nan


def image_auroc_of_graphs(
    graphs: Mapping[str, bytes],
    data_root: str | Path,
    input_hw: tuple[int, int],
    categories: tuple[str, ...] | None = None,
    batch_size: int = 8,
) -> tuple[dict[str, float], int]:
    """Mean image AUROC over categories of each serialized ONNX graph on the test split of ``data_root``
    (MVTec layout), run on the runtime's ONNX Runtime CPU backend.

    Returns:
        ``({graph name: mean image AUROC}, number of test images)``.

    Raises:
        ReconadError: the data cannot be read, or no category has both good and defective test images.
    """
    from reconad.runtime.backends.ort import OrtBackend
    from reconad.runtime.errors import ReconadError
    from reconad.train.data import load_dataset

    dataset = load_dataset(data_root, "test", input_hw, categories, "fail")
    results = {}
    for name, model in graphs.items():
        with OrtBackend(model, "ort-cpu", max_batch=batch_size, memory_arena=True) as backend:
            predictions = predict_with_backend(backend, dataset.images, batch_size)
        results[name] = mean_image_auroc(dataset.labels, list(dataset.categories), predictions.image_scores)
    if any(math.isnan(value) for value in results.values()):
        raise ReconadError(
            f"The test split of {data_root} has no category with both good and defective images, so image AUROC "
            "is undefined; give evaluation data with defects."
        )
    return results, len(dataset)
