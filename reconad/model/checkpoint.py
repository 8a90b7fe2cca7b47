"""Checkpoint files: weights + ModelConfig + provenance, read back without unpickling arbitrary objects.

Like nanoGPT's sample.py, the model is rebuilt from the config saved in the file; nobody retypes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from reconad.model.config import ModelConfig
from reconad.model.detector import AnomalyDetector, build_detector
from reconad.runtime.atomic import atomic_path
from reconad.runtime.errors import ReconadError

CHECKPOINT_FORMAT = "reconad-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(detector: AnomalyDetector, path: str | Path, **provenance: Any) -> Path:
    """Write ``detector`` atomically; ``provenance`` (JSON-able: categories, score statistics, run info…)
    travels with it into every exported manifest."""
    path = Path(path)
    try:
        # Round trip: plain JSON types only (str subclasses such as torch.__version__ would not unpickle
        # under weights_only loading).
        provenance = json.loads(json.dumps(provenance))
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint provenance must be JSON-serialisable: {error}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model_config": detector.config.to_dict(),
        "provenance": provenance,
        "state_dict": {k: v.detach().cpu() for k, v in detector.state_dict().items()},
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return path


def _read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ReconadError(f"checkpoint {path} does not exist.")
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ReconadError(f"{path} is not a readable reconad checkpoint ({type(error).__name__}).") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        hint = " (an official UniAD checkpoint? convert it with recon-train import-uniad)" if isinstance(payload, dict) and "state_dict" in payload else ""
        raise ReconadError(f"{path} is not a reconad checkpoint{hint}.")
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise ReconadError(
            f"{path} has checkpoint format version {payload.get('format_version')}, this reconad reads {CHECKPOINT_VERSION}."
        )
    return payload


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """``{"model_config": dict, "provenance": dict}`` of a checkpoint, without building the model."""
    payload = _read(path)
    return {"model_config": payload["model_config"], "provenance": payload.get("provenance", {})}


def load_detector(path: str | Path) -> AnomalyDetector:
    """Rebuild the detector a checkpoint describes, load its weights, return it in eval mode."""
    payload = _read(path)
    try:
        config = ModelConfig.from_dict(payload["model_config"])
    except (TypeError, ValueError) as error:
        raise ReconadError(f"{path} has an invalid model config: {error}.") from error
    detector = build_detector(config)
    state = dict(payload["state_dict"])
    # Checkpoints written before the category head have no centroids: the model names no category.
    centroids = state.setdefault("category_centroids", torch.zeros(0, config.channels))
    detector.category_centroids = torch.zeros_like(centroids)  # sized as saved, so the weights load
    try:
        detector.load_state_dict(state)
    except RuntimeError as error:
        raise ReconadError(f"{path} does not match its own model config: {str(error).splitlines()[0]}") from error
    detector.provenance = payload.get("provenance", {})
    names = category_names(detector)
    if len(names) != len(centroids):
        raise ReconadError(
            f"{path} has {len(centroids)} category centroids but names {len(names)} categories for them "
            "(provenance category_head.names)."
        )
    return detector.eval()


def category_names(detector: AnomalyDetector) -> tuple[str, ...]:
    """The names of the detector's category centroids, in row order (empty when it has none).

    They travel in the checkpoint's provenance as ``category_head = {"names": [...], "n_images": [...],
    "source": "..."}``, written by ``recon-train fit``.
    """
    if len(detector.category_centroids) == 0:
        return ()
    head = detector.provenance.get("category_head") or {}
    names = head.get("names") if isinstance(head, dict) else None
    return tuple(str(name) for name in names) if isinstance(names, list) else ()
