"""The Backend protocol every inference engine implements, and the chunked inference they share.

Follows Polygraphy's ``backend/base/runner.py``: context-managed, ``infer(images) -> dict``, and every
backend copies its outputs out for the caller. Implementations: ``ort.py`` (ONNX Runtime) and
``trt.py`` (TensorRT); ``reconad.runtime.inspector.open_backend`` picks one for an artifact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from reconad.runtime.errors import ReconadError


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Name, shape (-1 for a dynamic axis) and numpy dtype name of a model I/O tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@runtime_checkable
class Backend(Protocol):
    """What the Inspector and ``verify`` need from an inference engine.

    Attributes:
        name: the backend actually running, e.g. ``"ort-cpu"``, ``"ort-cuda"``, ``"trt"``.
        inputs: the model file's input tensors.
        outputs: the model file's output tensors.
        min_batch: the smallest batch one call to the model takes (a fixed-batch model: its batch);
            ``infer`` pads smaller ones.
        max_batch: the largest batch one call to the model takes; ``infer`` splits larger ones.
        metadata: string metadata stored inside the model file (ONNX ``metadata_props``; empty for
            engines), where an ONNX graph carries its embedded manifest.
    """

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    min_batch: int
    max_batch: int
    metadata: Mapping[str, str]

    def use_batch_range(self, min_batch: int, max_batch: int) -> None:
        """Set the per-call batch range from the manifest; a backend keeps what its model file fixes."""
        ...

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on uint8 [N, H, W, 3] RGB images, any N >= 1.

        Returns:
            ``{output name: array}`` for every graph output, e.g. ``anomaly_map`` float32 [N, 1, H, W]
            and ``image_score`` float32 [N]. The arrays belong to the caller: a backend never hands
            out views of buffers it reuses.
        """
        ...

    def close(self) -> None:
        """Release the session / engine and its memory; idempotent."""
        ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc_info: object) -> None: ...


def infer_in_chunks(
    images: np.ndarray,
    min_batch: int,
    max_batch: int,
    run_chunk: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Run ``run_chunk`` on slices of at most ``max_batch`` images and concatenate the outputs.

    A chunk smaller than ``min_batch`` (a fixed-batch artifact) is padded by repeating its last image,
    and the padded rows are cut from the outputs.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ReconadError(f"Images must be a non-empty [N, H, W, 3] batch, got shape {list(images.shape)}.")
    pieces: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), max_batch):
        chunk = images[start : start + max_batch]
        count = len(chunk)
        if count < min_batch:
            padding = np.repeat(chunk[-1:], min_batch - count, axis=0)
            chunk = np.concatenate([chunk, padding], axis=0)
        for name, value in run_chunk(np.ascontiguousarray(chunk)).items():
            pieces.setdefault(name, []).append(value[:count])
    return {name: np.concatenate(values, axis=0) for name, values in pieces.items()}
