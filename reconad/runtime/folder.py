"""Inspect a folder of images: one verdict per image to ``verdicts.jsonl``, heatmap overlays for anomalies.

The plain-function core of ``recon-inspect run IMAGE_FOLDER``; the camera loop (issue 6) reuses its sinks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Inspector, Verdict
from reconad.runtime.overlay import overlay_heatmap, write_png
from reconad.runtime.frames import Roi, list_images, prepare_image, read_image

OVERLAY_MODES = ("anomalies", "all", "none")
VERDICTS_FILE = "verdicts.jsonl"
OVERLAY_DIR = "overlays"


@dataclasses.dataclass(frozen=True)
class FolderSummary:
    """Counts of one folder run and where its outputs are."""

    n_images: int
    n_anomalous: int
    n_unreadable: int
    n_overlays: int
    verdicts_path: Path
    threshold: float | None
    backend: str


def parse_roi(text: str) -> Roi:
    """``"X,Y,W,H"`` (pixels) -> a ROI tuple; a one-sentence error otherwise."""
    parts = text.replace(" ", "").split(",")
    try:
        x, y, width, height = (int(part) for part in parts)
    except ValueError:
        raise ReconadError(f"ROI must be four integers X,Y,W,H, got {text!r}.") from None
    if x < 0 or y < 0 or width <= 0 or height <= 0:
        raise ReconadError(f"ROI needs X, Y >= 0 and W, H > 0, got {text!r}.")
    return (x, y, width, height)


def verdict_record(file: str, verdict: Verdict, overlay: str | None) -> dict[str, Any]:
    """The JSON line for one image (``anomaly_map`` itself is not written)."""
    return {
        "file": file,
        "image_score": verdict.image_score,
        "is_anomalous": verdict.is_anomalous,
        "threshold": verdict.threshold,
        "normalized_score": verdict.normalized_score,
        "overlay": overlay,
    }


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def _write_line(handle: IO[str], record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()  # a partial run still leaves every finished verdict on disk


def inspect_folder(
    folder: str | os.PathLike,
    artifact: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    backend: str = "auto",
    threshold: float | None = None,
    batch_size: int | None = None,
    roi: Roi | None = None,
    overlays: str = "anomalies",
    num_threads: int | None = None,
) -> FolderSummary:
    """Inspect every image under ``folder`` (recursively) with ``artifact``.

    Writes ``out_dir/verdicts.jsonl`` (one JSON object per image: file relative to ``folder``,
    image_score, is_anomalous, threshold, normalized_score, overlay; or file and error for an
    unreadable image) and ``out_dir/overlays/<file>.png`` per ``overlays`` mode.

    Args:
        backend: see ``reconad.runtime.backends.BACKEND_CHOICES``.
        threshold: overrides the manifest's image threshold.
        batch_size: images per inference call; defaults to the artifact's max batch (at most 16).
        roi: (x, y, width, height) crop of every image before inference.
        overlays: ``"anomalies"``, ``"all"`` or ``"none"``.
    """
    if overlays not in OVERLAY_MODES:
        raise ReconadError(f"Overlay mode must be one of {list(OVERLAY_MODES)}, got {overlays!r}.")
    folder, out_dir = Path(folder), Path(out_dir)
    paths = list_images(folder)
    if not paths:
        raise ReconadError(f"No image files under {folder}.")
    with Inspector.open(artifact, backend, threshold=threshold, num_threads=num_threads) as inspector:
        out_dir.mkdir(parents=True, exist_ok=True)
        verdicts_path = out_dir / VERDICTS_FILE
        size = batch_size or min(16, inspector.backend.max_batch)
        normalization = inspector.manifest.score_normalization
        pixel_threshold = inspector.manifest.pixel_threshold
        counts = {"images": 0, "anomalous": 0, "unreadable": 0, "overlays": 0}
        with open(verdicts_path, "w", encoding="utf-8") as handle:
            for batch_paths in _batches(paths, size):
                originals, images, names = [], [], []
                for path in batch_paths:
                    name = path.relative_to(folder).as_posix()
                    try:
                        original = read_image(path)
                        images.append(prepare_image(original, inspector.input_hw, roi=roi))
                    except ReconadError as error:
                        counts["unreadable"] += 1
                        _write_line(handle, {"file": name, "error": str(error)})
                        continue
                    originals.append(original)
                    names.append(name)
                if not images:
                    continue
                verdicts = inspector.verdicts_from_outputs(inspector.infer(np.stack(images)))  # [B, H, W, 3] in
                for name, original, verdict in zip(names, originals, verdicts):
                    counts["images"] += 1
                    counts["anomalous"] += bool(verdict.is_anomalous)
                    overlay = None
                    if overlays == "all" or (overlays == "anomalies" and verdict.is_anomalous):
                        # keep the source suffix (a.jpg -> a.jpg.png) so a.png and a.jpg cannot collide
                        overlay = f"{OVERLAY_DIR}/{name}" + ("" if name.lower().endswith(".png") else ".png")
                        (out_dir / overlay).parent.mkdir(parents=True, exist_ok=True)
                        image = overlay_heatmap(
                            original,
                            verdict.anomaly_map,
                            low=normalization.low if normalization else None,
                            high=normalization.high if normalization else None,
                            roi=roi,
                            pixel_threshold=pixel_threshold.value if pixel_threshold else None,
                            label=f"score {verdict.image_score:.4g}",
                        )
                        write_png(out_dir / overlay, image)
                        counts["overlays"] += 1
                    _write_line(handle, verdict_record(name, verdict, overlay))
        return FolderSummary(
            n_images=counts["images"],
            n_anomalous=counts["anomalous"],
            n_unreadable=counts["unreadable"],
            n_overlays=counts["overlays"],
            verdicts_path=verdicts_path,
            threshold=inspector.threshold,
            backend=inspector.backend.name,
        )
