"""The Inspector: one artifact + its manifest -> verdicts for frames; the runtime's public entry point.

``Inspector.open`` refuses, in one sentence, a model file whose hash or I/O disagrees with its manifest.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reconad.runtime.backends.base import Backend, OrtBackend, TensorInfo, open_backend
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import (
    ANOMALY_MAP_NAME,
    IMAGE_SCORE_NAME,
    METADATA_KEY,
    Manifest,
    check_artifact_sha256,
    manifest_path_for,
)
from reconad.runtime.frames import Frame, Roi, prepare_batch


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The inspection result for one frame.

    Attributes:
        image_score: raw score from the graph; higher is more anomalous.
        is_anomalous: ``image_score >= threshold``; None when no threshold is set (uncalibrated).
        threshold: the image threshold used, in raw score units, or None.
        anomaly_map: float32 [H, W] at the graph's input size (of the ROI when one is used).
        normalized_score: the score mapped to 0..1 by the manifest's score normalisation, or None.
    """

    image_score: float
    is_anomalous: bool | None
    threshold: float | None
    anomaly_map: np.ndarray
    normalized_score: float | None = None


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
    """The manifest copied into an ONNX file's ``metadata_props`` (read through onnxruntime, not onnx)."""
    text = getattr(backend, "custom_metadata", {}).get(METADATA_KEY)
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
    """

    def __init__(self, manifest: Manifest, backend: Backend, threshold: float | None = None) -> None:
        self.manifest = manifest
        self.backend = backend
        if threshold is None and manifest.image_threshold is not None:
            threshold = manifest.image_threshold.value
        self.threshold = threshold

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
        the copy in the ONNX file's metadata.

        Args:
            artifact: a ``.onnx`` or ``.engine`` file.
            backend: see ``reconad.runtime.backends.BACKEND_CHOICES``.
            threshold: overrides the manifest's image threshold (raw score units).
            num_threads: ONNX Runtime intra-op threads; None for all cores.
        """
        artifact = Path(artifact)
        if not artifact.is_file():
            raise ReconadError(f"Model file {artifact} does not exist.")
        manifest = load_artifact_manifest(artifact)
        tensor = manifest.input_tensor if manifest is not None else None
        opened = open_backend(
            artifact,
            backend,
            max_batch=tensor.max_batch if tensor else None,
            min_batch=tensor.min_batch if tensor else 1,
            num_threads=num_threads,
        )
        try:
            if manifest is None:
                manifest = embedded_manifest(opened, artifact)
                if isinstance(opened, OrtBackend):  # only ONNX files embed a manifest
                    opened.use_batch_range(manifest.input_tensor.min_batch, manifest.input_tensor.max_batch)
            check_backend_io(opened, manifest, artifact)
        except BaseException:
            opened.close()
            raise
        return cls(manifest, opened, threshold=threshold)

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.manifest.input_hw

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Raw graph outputs for uint8 [N, H, W, 3] RGB images already at ``input_hw``."""
        return self.backend.infer(images)

    def inspect(
        self, frames: Frame | Sequence[Frame], *, colour: str = "RGB", roi: Roi | None = None
    ) -> list[Verdict]:
        """Verdicts for one frame or many (arrays of any size and kind, or image paths).

        Args:
            frames: see ``reconad.runtime.frames.prepare_batch``.
            colour: channel order of colour arrays: ``"RGB"``, or ``"BGR"`` for OpenCV frames.
            roi: optional (x, y, width, height) crop of every frame.
        """
        images = prepare_batch(frames, self.input_hw, colour=colour, roi=roi)  # [N, H, W, 3]
        return self.verdicts_from_outputs(self.infer(images))

    def verdicts_from_outputs(self, outputs: dict[str, np.ndarray]) -> list[Verdict]:
        """Turn raw outputs (``anomaly_map`` [N, 1, H, W], ``image_score`` [N]) into verdicts."""
        anomaly_maps = outputs[ANOMALY_MAP_NAME][:, 0]  # [N, H, W]
        scores = outputs[IMAGE_SCORE_NAME].astype(np.float64)
        normalization = self.manifest.score_normalization
        normalized = normalization.apply(scores) if normalization is not None else None
        verdicts = []
        for index, score in enumerate(scores):
            verdicts.append(
                Verdict(
                    image_score=float(score),
                    # the rule of Threshold.is_exceeded_by: anomalous at or above the threshold
                    is_anomalous=None if self.threshold is None else bool(score >= self.threshold),
                    threshold=self.threshold,
                    anomaly_map=anomaly_maps[index],
                    normalized_score=None if normalized is None else float(normalized[index]),
                )
            )
        return verdicts

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
