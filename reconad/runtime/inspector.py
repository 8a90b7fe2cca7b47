"""The Inspector: an artifact and its manifest -> verdicts for frames; the runtime's public entry point.

Opening an artifact happens here (which backend runs it, which manifest describes it, whether the two
agree), and so does the verdict: the graph names the category (or the line forces one), the category's
operating point gives the thresholds (``Manifest.operating_point``), an image beyond the category's
distance limit is UNKNOWN, and the others are judged by the one decision rule, ``Threshold.is_exceeded_by``.
``Inspector.open`` refuses, in one sentence, a model file whose hash or I/O disagrees with its manifest;
``Inspector.require_calibration`` refuses to judge without the thresholds every image would need.
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
from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_DTYPES, CATEGORY_NAME, IMAGE_SCORE_NAME, METADATA_KEY, Manifest, check_artifact_sha256, manifest_path_for
from reconad.runtime.thresholds import OperatingPoint, Threshold

BACKEND_CHOICES = ("auto", "ort", "ort-cpu", "ort-cuda", "ort-trt", "trt")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The inspection result for one frame.

    Attributes:
        image_score: raw score from the graph; higher is more anomalous.
        is_anomalous: the rule ``image_score >= threshold`` of the category's operating point; None
            when no threshold applies or the image is UNKNOWN.
        threshold: the image threshold used, in raw score units, or None.
        anomaly_map: float32 [H, W] at the graph's input size (of the ROI when one is used); None
            once a consumer has dropped it.
        normalized_score: the score mapped to 0..1 by the operating point's score normalisation, or None.
        category: the category the image was judged as: the one the graph named, or the one forced by
            the line (``--category``); None when the model names none and none was forced.
        recognized_category: the category the graph named (None when the model names none).
        category_distance: the graph's cosine distance to that category's centroid, or None.
        is_unknown: ``category_distance`` is at or beyond the calibrated distance limit: the part is
            unlike every training category, so it is not judged (UNKNOWN).
    """

    image_score: float
    is_anomalous: bool | None
    threshold: float | None
    anomaly_map: np.ndarray | None
    normalized_score: float | None = None
    category: str | None = None
    recognized_category: str | None = None
    category_distance: float | None = None
    is_unknown: bool = False

    @property
    def known_product(self) -> bool:
        """Not UNKNOWN: the part is like one of the trained products (what the renderer and metrics read)."""
        return not self.is_unknown

    @property
    def decision(self) -> str | None:
        """``"unknown"``, ``"anomalous"`` or ``"good"``; None when not judged (no threshold)."""
        if self.is_unknown:
            return "unknown"
        if self.is_anomalous is None:
            return None
        return "anomalous" if self.is_anomalous else "good"

    def record(self) -> dict[str, Any]:
        """The verdict's JSON form, as every log line, webhook and report writes it (no map)."""
        return {
            "decision": self.decision,
            "image_score": self.image_score,
            "is_anomalous": self.is_anomalous,
            "threshold": self.threshold,
            "normalized_score": self.normalized_score,
            "category": self.category,
            "recognized_category": self.recognized_category,
            "category_distance": self.category_distance,
            "is_unknown": self.is_unknown,
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
    """Refuse a model file whose inputs/outputs differ from the manifest's (names, dtypes, static dims).

    ``category`` may be int64 or int32 whatever the manifest says (TensorRT 8.x engines return int32).
    """
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
        same_kind = spec.name == CATEGORY_NAME and tensor.dtype in CATEGORY_DTYPES
        if tensor.dtype != spec.dtype and not same_kind:
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
        threshold: one image threshold (raw score units) for every image, instead of the manifest's.
        category: judge every image as this category (its thresholds), whatever the graph names.
        no_threshold: scores only: no image is judged (``is_anomalous`` None), none flagged UNKNOWN.
        manifest_source: where ``manifest`` was read: ``"sidecar"`` (the ``<stem>.json``) or
            ``"embedded"`` (the copy inside the model file, which is never calibrated).
        artifact: the model file, for messages.

    Raises:
        ReconadError: a category the model does not know, or ``threshold`` with ``no_threshold``.
    """

    def __init__(
        self,
        manifest: Manifest,
        backend: Backend,
        threshold: float | None = None,
        *,
        category: str | None = None,
        no_threshold: bool = False,
        manifest_source: str = "sidecar",
        artifact: str | os.PathLike | None = None,
    ) -> None:
        self.manifest = manifest
        self.backend = backend
        self.artifact = Path(artifact) if artifact is not None else Path(manifest.artifact_file)
        self.manifest_source = manifest_source
        if threshold is not None and no_threshold:
            raise ReconadError("Give either a threshold or no_threshold (--threshold or --no-threshold), not both.")
        known = manifest.known_categories
        if category is not None and known and category not in known:
            raise ReconadError(
                f"{self.artifact.name} knows no category {category!r}; its categories are {', '.join(known)}."
            )
        self.category = category
        self.no_threshold = no_threshold
        self.threshold_override: Threshold | None = (
            Threshold.manual(threshold, source="threshold given to the Inspector") if threshold is not None else None
        )
        self._names = manifest.category_head.names if manifest.recognizes_categories else None

    @classmethod
    def open(
        cls,
        artifact: str | os.PathLike,
        backend: str = "auto",
        *,
        threshold: float | None = None,
        category: str | None = None,
        no_threshold: bool = False,
        num_threads: int | None = None,
    ) -> Inspector:
        """Load the manifest, check the model file against it and start a backend.

        The manifest is ``<stem>.json`` beside the artifact (its sha256 must match the file), else
        the copy in the model file's own metadata.

        Args:
            artifact: a ``.onnx`` or ``.engine`` file.
            backend: see ``BACKEND_CHOICES``.
            threshold: one image threshold for every image (raw score units), instead of the manifest's.
            category: judge every image as this category.
            no_threshold: scores only, no verdicts.
            num_threads: ONNX Runtime intra-op threads; None for all cores.

        Raises:
            ReconadError: a missing file or manifest, a hash or I/O mismatch, a backend that cannot start.
        """
        artifact = Path(artifact)
        if not artifact.is_file():
            raise ReconadError(f"Model file {artifact} does not exist.")
        manifest = load_artifact_manifest(artifact)
        source = "sidecar" if manifest is not None else "embedded"
        opened = open_backend(artifact, backend, num_threads=num_threads)
        try:
            manifest = manifest or embedded_manifest(opened, artifact)
            opened.use_batch_range(manifest.input_tensor.min_batch, manifest.input_tensor.max_batch)
            check_backend_io(opened, manifest, artifact)
            return cls(
                manifest, opened, threshold, category=category, no_threshold=no_threshold,
                manifest_source=source, artifact=artifact,
            )  # fmt: skip
        except BaseException:
            opened.close()
            raise

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.manifest.input_hw

    @property
    def image_threshold(self) -> Threshold | None:
        """The one image threshold every image is judged with, or None when it depends on the category
        (or none is set): ``--threshold``, a forced category's, or the global one of a model that names
        no category."""
        if self.no_threshold:
            return None
        if self.threshold_override is not None:
            return self.threshold_override
        if self.category is not None or self._names is None or not self.manifest.category_thresholds:
            return self.manifest.operating_point(self.category).image_threshold
        return None

    @property
    def threshold(self) -> float | None:
        """``image_threshold`` in raw score units, or None."""
        return None if self.image_threshold is None else self.image_threshold.value

    def operating_point(self, category: str | None) -> OperatingPoint:
        """The thresholds an image judged as ``category`` gets (before ``threshold`` overrides)."""
        return self.manifest.operating_point(category)

    def missing_calibration(self) -> str | None:
        """Why this Inspector cannot judge every image it may see, in one sentence; None when it can.

        Every category an image can be judged as needs an image threshold: the forced one, else each
        category the graph names (its own or the global one), else the global one.
        """
        if self.no_threshold or self.threshold_override is not None:
            return None
        if self.category is not None:
            wanted: tuple[str | None, ...] = (self.category,)
        elif self._names is not None:
            wanted = self._names
        else:
            wanted = (None,)
        missing = [name for name in wanted if self.operating_point(name).image_threshold is None]
        if not missing:
            return None
        artifact, sidecar = self.artifact, manifest_path_for(self.artifact).name
        flags = "or pass --threshold X (every image) or --no-threshold (scores only)"
        if self.manifest_source == "embedded":
            return (
                f"{artifact.name} carries no calibration: its thresholds are in {sidecar}, which is not beside it "
                f"(the manifest inside the model file is never calibrated); copy {sidecar} along, {flags}."
            )
        if missing == [None] and self.manifest.category_thresholds:
            calibrated = ", ".join(sorted(self.manifest.category_thresholds))
            return (
                f"{sidecar} has thresholds for {calibrated} only and {artifact.name} does not name the category "
                f"of an image: pass --category NAME, calibrate a global threshold (recon-inspect calibrate), {flags}."
            )
        if missing == [None] or len(missing) == len(wanted) and not self.manifest.category_thresholds:
            what = "no image threshold"
        else:
            what = f"no image threshold for {', '.join(missing)} (nor a global one)"
        return f"{sidecar} has {what}: calibrate it with recon-inspect calibrate {artifact} GOOD_IMAGES, {flags}."

    def judged_at_the_global_threshold(self) -> tuple[str, ...]:
        """The categories the graph names that have no threshold of their own, so their images are judged at
        the global one (calibrated on other products' images, it can miss their defects); () when a
        threshold or category is forced, or the model names none."""
        if self.no_threshold or self.threshold_override is not None or self.category is not None or not self._names:
            return ()
        own = {name for name, point in self.manifest.category_thresholds.items() if point.image_threshold is not None}
        return tuple(name for name in self._names if name not in own and self.operating_point(name).image_threshold is not None)

    def require_calibration(self) -> None:
        """Raise ``missing_calibration``'s sentence as a ``ReconadError`` (exit code 2) when there is one."""
        reason = self.missing_calibration()
        if reason is not None:
            raise ReconadError(reason)

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
        """Verdicts from raw graph outputs (``anomaly_map`` [N, 1, H, W], ``image_score`` [N], and ``category``,
        ``category_distance`` [N] when the graph names categories), each by its category's operating point."""
        anomaly_maps = outputs[ANOMALY_MAP_NAME][:, 0]  # [N, H, W]
        scores = outputs[IMAGE_SCORE_NAME].astype(np.float64)  # [N]
        recognized: list[str | None] = [None] * len(scores)
        distances: list[float | None] = [None] * len(scores)
        if self._names is not None:
            indices = np.asarray(outputs[CATEGORY_NAME]).astype(np.int64)  # int32 from TensorRT 8.x
            if ((indices < 0) | (indices >= len(self._names))).any():
                raise ReconadError(f"{self.artifact.name} named category index {int(indices.max())} of {len(self._names)}.")
            recognized = [self._names[index] for index in indices]
            distances = [float(value) for value in np.asarray(outputs[CATEGORY_DISTANCE_NAME], dtype=np.float64)]
        return [
            self._judge(float(scores[i]), anomaly_maps[i], recognized[i], distances[i]) for i in range(len(scores))
        ]

    def _judge(
        self, score: float, anomaly_map: np.ndarray, recognized: str | None, distance: float | None
    ) -> Verdict:
        category = self.category or recognized
        point = self.operating_point(category)
        # The distance is to the centroid the graph chose, so its limit is that category's.
        limit = self.operating_point(recognized).distance_limit if recognized is not None else None
        unknown = not self.no_threshold and limit is not None and bool(limit.is_exceeded_by(distance))
        threshold = None if self.no_threshold else (self.threshold_override or point.image_threshold)
        is_anomalous = None if threshold is None or unknown else bool(threshold.is_exceeded_by(score))
        normalization = point.score_normalization
        return Verdict(
            image_score=score,
            is_anomalous=is_anomalous,
            threshold=None if threshold is None else threshold.value,
            anomaly_map=anomaly_map,
            normalized_score=None if normalization is None else float(normalization.apply(score)),
            category=category,
            recognized_category=recognized,
            category_distance=distance,
            is_unknown=unknown,
        )

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
