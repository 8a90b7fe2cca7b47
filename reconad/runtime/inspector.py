"""The Inspector: an artifact and its manifest -> verdicts for frames; the runtime's public entry point.

Opening an artifact happens here (which backend runs it, which manifest describes it, whether the two
agree), and so does the verdict: the manifest's one decision rule, ``Threshold.is_exceeded_by``.
``Inspector.open`` refuses, in one sentence, a model file whose hash or I/O disagrees with its manifest.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reconad.runtime.backends.base import Backend, TensorInfo
from reconad.runtime.backends.ort import OrtBackend
from reconad.runtime.backends.trt import TrtBackend
from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import Frame, Roi, prepare_batch
from reconad.runtime.manifest import ANOMALY_MAP_NAME, IMAGE_SCORE_NAME, METADATA_KEY, Manifest, check_artifact_sha256, manifest_path_for
from reconad.runtime.thresholds import Threshold

BACKEND_CHOICES = ("auto", "ort", "ort-cpu", "ort-cuda", "ort-trt", "trt")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The inspection result for one frame.

    Attributes:
        image_score: raw score from the graph; higher is more anomalous.
        is_anomalous: the manifest's rule ``image_score >= threshold``; None when no threshold is set.
        threshold: the image threshold used, in raw score units, or None.
        anomaly_map: float32 [H, W] at the graph's input size (of the ROI when one is used); None
            once a consumer has dropped it.
        normalized_score: the score mapped to 0..1 by the manifest's score normalisation, or None.
    """

    image_score: float
    is_anomalous: bool | None
    threshold: float | None
    anomaly_map: np.ndarray | None
    normalized_score: float | None = None

    def record(self) -> dict[str, Any]:
        """The verdict's JSON form, as every log line, webhook and report writes it (no map)."""
        return {
            "image_score": self.image_score,
            "is_anomalous": self.is_anomalous,
            "threshold": self.threshold,
            "normalized_score": self.normalized_score,
        }


def open_backend(
    artifact: str | os.PathLike,
    backend: str = "auto",
    *,
    max_batch: int | None = None,
    min_batch: int = 1,
    num_threads: int | None = None,
) -> Backend:
    """Open ``artifact`` on a backend: TensorRT for ``.engine`` files, ONNX Runtime for ``.onnx``.

    Args:
        artifact: a ``.onnx`` or ``.engine`` file.
        backend: one of ``BACKEND_CHOICES``; ``"auto"`` is ``"trt"`` for engines and ``"ort"`` (CUDA
            provider when present, else CPU) for ONNX files.
        max_batch: largest batch per model call, usually ``manifest.input_tensor.max_batch``.
        min_batch: smallest batch per model call, usually ``manifest.input_tensor.min_batch``.
        num_threads: ONNX Runtime intra-op threads (ignored by TensorRT).

    Raises:
        ReconadError: an unknown backend, a file type the backend cannot run, or a backend that
            cannot start here (e.g. no TensorRT).
    """
    path = Path(artifact)
    if backend not in BACKEND_CHOICES:
        raise ReconadError(f"Unknown backend {backend!r}; choose one of {list(BACKEND_CHOICES)}.")
    suffix = path.suffix.lower()
    if suffix == ".engine":
        if backend not in ("auto", "trt"):
            raise ReconadError(f"{path} is a TensorRT engine, which only the trt backend runs.")
        return TrtBackend(path, max_batch=max_batch)
    if suffix != ".onnx":
        raise ReconadError(f"{path} is neither an .onnx graph nor a TensorRT .engine.")
    if backend == "trt":
        raise ReconadError(
            f"The trt backend runs .engine files; build one from {path} with recon-export build-engine, or use ort-trt."
        )
    return OrtBackend(
        path, "ort" if backend == "auto" else backend, max_batch=max_batch, min_batch=min_batch, num_threads=num_threads
    )


def load_artifact_manifest(artifact: str | os.PathLike) -> Manifest | None:
    """The sidecar ``<stem>.json`` manifest of ``artifact``, hash-checked; None when there is none."""
    artifact = Path(artifact)
    sidecar = manifest_path_for(artifact)
    if not sidecar.is_file():
        return None
    manifest = Manifest.load(sidecar)
    check_manifest_kind(manifest, artifact)
    check_artifact_sha256(manifest, artifact)
    return manifest


def check_manifest_kind(manifest: Manifest, artifact: Path) -> None:
    """Refuse a manifest of an engine for an ONNX file and vice versa."""
    kind = {".onnx": "onnx", ".engine": "engine"}.get(artifact.suffix.lower())
    if kind is not None and manifest.artifact_kind != kind:
        raise ReconadError(
            f"{artifact} is an {kind} file but its manifest describes an {manifest.artifact_kind} artifact."
        )


def embedded_manifest(backend: Backend, artifact: Path) -> Manifest:
    """The manifest copied into the model file's own metadata (an ONNX graph's ``metadata_props``)."""
    text = backend.metadata.get(METADATA_KEY)
    if text is None:
        raise ReconadError(
            f"{artifact} has no manifest: neither {manifest_path_for(artifact).name} beside it nor one inside it."
        )
    try:
        manifest = Manifest.from_json(text)
    except ReconadError as error:
        raise ReconadError(f"The manifest inside {artifact} is invalid: {error}.") from None
    check_manifest_kind(manifest, artifact)
    return manifest


def check_backend_io(backend: Backend, manifest: Manifest, artifact: Path) -> None:
    """Refuse a model file whose inputs/outputs differ from the manifest's (names, dtypes, static dims)."""
    expected = [manifest.input_tensor, *manifest.output_tensors]
    wanted_inputs = (manifest.input_tensor.name,)
    actual_inputs = tuple(tensor.name for tensor in backend.inputs)
    if actual_inputs != wanted_inputs:
        raise ReconadError(f"{artifact} has inputs {list(actual_inputs)} but its manifest says {list(wanted_inputs)}.")
    actual = {tensor.name: tensor for tensor in (*backend.inputs, *backend.outputs)}
    for spec in expected:
        tensor = actual.get(spec.name)
        if tensor is None:
            raise ReconadError(f"{artifact} has no output {spec.name!r}, which its manifest promises.")
        if tensor.dtype != spec.dtype:
            raise ReconadError(f"{artifact} tensor {spec.name} is {tensor.dtype} but its manifest says {spec.dtype}.")
        if not _shapes_compatible(tensor, spec.shape):
            raise ReconadError(
                f"{artifact} tensor {spec.name} has shape {list(tensor.shape)} "
                f"but its manifest says {list(spec.shape)}."
            )


def _shapes_compatible(tensor: TensorInfo, shape: tuple[int, ...]) -> bool:
    if len(tensor.shape) != len(shape):
        return False
    return all(actual == -1 or wanted == -1 or actual == wanted for actual, wanted in zip(tensor.shape, shape))


class Inspector:
    """Runs an exported artifact on frames and turns its outputs into verdicts.

    Use ``Inspector.open(artifact)``; it is a context manager closing its backend on exit.

    Args:
        manifest: the artifact's manifest.
        backend: an open backend on the artifact.
        threshold: overrides the manifest's image threshold (raw score units).
    """

    def __init__(self, manifest: Manifest, backend: Backend, threshold: float | None = None) -> None:
        self.manifest = manifest
        self.backend = backend
        self.image_threshold: Threshold | None = (
            Threshold.manual(threshold, source="threshold given to the Inspector")
            if threshold is not None
            else manifest.image_threshold
        )

    @classmethod
    def open(
        cls,
        artifact: str | os.PathLike,
        backend: str = "auto",
        *,
        threshold: float | None = None,
        num_threads: int | None = None,
    ) -> Inspector:
        """Load the manifest, check the model file against it and start a backend.

        The manifest is ``<stem>.json`` beside the artifact (its sha256 must match the file), else
        the copy in the model file's own metadata.

        Args:
            artifact: a ``.onnx`` or ``.engine`` file.
            backend: see ``BACKEND_CHOICES``.
            threshold: overrides the manifest's image threshold (raw score units).
            num_threads: ONNX Runtime intra-op threads; None for all cores.

        Raises:
            ReconadError: a missing file or manifest, a hash or I/O mismatch, a backend that cannot start.
        """
        artifact = Path(artifact)
        if not artifact.is_file():
            raise ReconadError(f"Model file {artifact} does not exist.")
        manifest = load_artifact_manifest(artifact)
        opened = open_backend(artifact, backend, num_threads=num_threads)
        try:
            manifest = manifest or embedded_manifest(opened, artifact)
            opened.use_batch_range(manifest.input_tensor.min_batch, manifest.input_tensor.max_batch)
            check_backend_io(opened, manifest, artifact)
        except BaseException:
            opened.close()
            raise
        return cls(manifest, opened, threshold=threshold)

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.manifest.input_hw

    @property
    def threshold(self) -> float | None:
        """The image threshold in raw score units, or None (uncalibrated)."""
        return None if self.image_threshold is None else self.image_threshold.value

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Raw graph outputs for uint8 [N, H, W, 3] RGB images already at ``input_hw``."""
        return self.backend.infer(images)

    def inspect(
        self, frames: Frame | Sequence[Frame], *, colour: str = "RGB", roi: Roi | None = None
    ) -> list[Verdict]:
        """Verdicts for one frame or many: arrays of any size and kind, image paths, or a graph-ready batch.

        A uint8 [N, H, W, 3] RGB batch at ``input_hw`` (what ``reconad.runtime.frames.prepare_batch``
        returns) goes to the graph as it is; anything else is prepared first.

        Args:
            frames: see ``reconad.runtime.frames.prepare_batch``.
            colour: channel order of colour arrays: ``"RGB"``, or ``"BGR"`` for OpenCV frames.
            roi: optional (x, y, width, height) crop of every frame.
        """
        images = prepare_batch(frames, self.input_hw, colour=colour, roi=roi)  # [N, H, W, 3]
        return self.verdicts(self.infer(images))

    def verdicts(self, outputs: dict[str, np.ndarray]) -> list[Verdict]:
        """Verdicts from raw graph outputs (``anomaly_map`` [N, 1, H, W], ``image_score`` [N]) by the manifest's rule."""
        anomaly_maps = outputs[ANOMALY_MAP_NAME][:, 0]  # [N, H, W]
        scores = outputs[IMAGE_SCORE_NAME].astype(np.float64)  # [N]
        decisions = None if self.image_threshold is None else self.image_threshold.is_exceeded_by(scores)
        normalization = self.manifest.score_normalization
        normalized = normalization.apply(scores) if normalization is not None else None
        return [
            Verdict(
                image_score=float(score),
                is_anomalous=None if decisions is None else bool(decisions[index]),
                threshold=self.threshold,
                anomaly_map=anomaly_maps[index],
                normalized_score=None if normalized is None else float(normalized[index]),
            )
            for index, score in enumerate(scores)
        ]

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
