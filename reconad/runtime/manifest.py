"""Graph tensor names and the artifact manifest: the contract between export and runtime.

The names below are the only definition of the fused graph's I/O; every other module imports them.
Every ``.onnx`` / ``.engine`` has a ``<stem>.json`` manifest (schema ``SCHEMA_VERSION``) described by
the frozen dataclasses here; ``Manifest.from_dict`` validates a JSON document field by field with the
project's one record decoder (``reconad.runtime.config.decode``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


from reconad.runtime.atomic import write_text_atomic
from reconad.runtime.config import check_choice, check_iso_date, decode, encode, read_text, require, utc_now_iso
from reconad.runtime.errors import ReconadError
from reconad.runtime.thresholds import OperatingPoint, ScoreNormalization, Threshold

INPUT_NAME = "images"  # uint8 [N, H, W, 3] RGB
ANOMALY_MAP_NAME = "anomaly_map"  # float32 [N, 1, H, W]
IMAGE_SCORE_NAME = "image_score"  # float32 [N]
CATEGORY_NAME = "category"  # int64 [N] (int32 from TensorRT 8.x engines): index into category_head.names
CATEGORY_DISTANCE_NAME = "category_distance"  # float32 [N]: cosine distance to that category's centroid
SCORE_OUTPUT_NAMES = (ANOMALY_MAP_NAME, IMAGE_SCORE_NAME)
CATEGORY_OUTPUT_NAMES = (CATEGORY_NAME, CATEGORY_DISTANCE_NAME)
OUTPUT_NAMES = (*SCORE_OUTPUT_NAMES, *CATEGORY_OUTPUT_NAMES)  # the graph's outputs, in this order
# TensorRT 8.5/8.6 have no INT64 tensors: their ONNX parser maps an int64 graph output to INT32 and makes
# ArgMin a TopK whose indices are INT32; 10.x casts them to INT64 (onnx-tensorrt argMinMaxHelper).
CATEGORY_DTYPES = ("int64", "int32")

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)  # schema 1 (no category head, global thresholds only) migrates on load
CATEGORY_METHODS = ("nearest_centroid", "none")
UNNAMED_CATEGORY = "all"  # the one category of a graph whose checkpoint had no centroids
METADATA_KEY = "reconad_manifest"  # ONNX metadata_props key holding the manifest JSON
ARTIFACT_KINDS = ("onnx", "engine")
PRECISION_MODES = ("fp32", "fp16", "int8")
# What an ONNX graph is for: "tensorrt", the portable graph (every backend, the only build-engine input);
# "ort-cpu", attention as ONNX Runtime's contrib MultiHeadAttention (export/ort_attention.py), ONNX Runtime only.
GRAPH_TARGETS = ("tensorrt", "ort-cpu")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")  # onnxruntime.quantization CalibrationMethod, lower case
SCORE_REDUCERS = ("max_avgpool", "mean")

_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def check_sha256(value: str | None, key: str) -> None:
    require(
        value is None or _SHA256_PATTERN.fullmatch(value) is not None,
        f"manifest field {key} must be 64 lowercase hex digits, got {value!r}",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputTensor:
    """The graph input: always uint8 NHWC RGB; cast and normalisation happen inside the graph.

    Attributes:
        name: tensor name, ``INPUT_NAME``.
        shape: ``[N, H, W, 3]``; N is -1 for a dynamic batch axis, else the fixed batch size.
        dtype: ``"uint8"``.
        layout: ``"NHWC"``.
        colour: ``"RGB"`` (OpenCV frames are BGR: the runtime converts them).
        min_batch: smallest batch the artifact accepts (1 for dynamic batch).
        max_batch: largest batch the artifact accepts; the runtime splits larger batches.
    """

    name: str = INPUT_NAME
    shape: tuple[int, ...]
    dtype: str = "uint8"
    layout: str = "NHWC"
    colour: str = "RGB"
    min_batch: int = 1
    max_batch: int

    def __post_init__(self) -> None:
        require(self.name == INPUT_NAME, f"manifest input_tensor.name must be {INPUT_NAME!r}, got {self.name!r}")
        require(
            len(self.shape) == 4 and self.shape[3] == 3 and self.shape[1] > 0 and self.shape[2] > 0,
            f"manifest input_tensor.shape must be [N, H, W, 3], got {list(self.shape)}",
        )
        require(self.dtype == "uint8", f"manifest input_tensor.dtype must be 'uint8', got {self.dtype!r}")
        require(self.layout == "NHWC", f"manifest input_tensor.layout must be 'NHWC', got {self.layout!r}")
        require(self.colour == "RGB", f"manifest input_tensor.colour must be 'RGB', got {self.colour!r}")
        require(
            1 <= self.min_batch <= self.max_batch,
            f"manifest input_tensor batch range must satisfy 1 <= min_batch <= max_batch, "
            f"got {self.min_batch}..{self.max_batch}",
        )
        batch = self.shape[0]
        require(
            batch == -1 or batch == self.min_batch == self.max_batch,
            f"manifest input_tensor.shape has fixed batch {batch} but min_batch/max_batch are "
            f"{self.min_batch}/{self.max_batch}",
        )

    @property
    def input_hw(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[2])

    @property
    def dynamic_batch(self) -> bool:
        return self.shape[0] == -1


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputTensor:
    """One graph output.

    Attributes:
        name: one of ``OUTPUT_NAMES``.
        shape: ``[N, 1, H, W]`` for ``anomaly_map``, ``[N]`` for the others; N as in the input.
        dtype: ``"float32"`` (also for fp16 artifacts: their I/O types are unchanged); ``category`` is
            ``"int64"``, or ``"int32"`` in an engine of a TensorRT without INT64 tensors (8.x): the
            dtype the artifact really returns.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_choice(self.name, OUTPUT_NAMES, "output_tensors.name")
        if self.name == CATEGORY_NAME:
            check_choice(self.dtype, CATEGORY_DTYPES, f"output {CATEGORY_NAME} dtype")
        else:
            require(self.dtype == "float32", f"manifest output {self.name} dtype must be 'float32', got {self.dtype!r}")


def output_tensors_for(
    input_shape: tuple[int, ...], with_category: bool, dtypes: Mapping[str, str] | None = None
) -> tuple[OutputTensor, ...]:
    """The graph outputs for an input of ``input_shape`` ``[N, H, W, 3]``, in ``OUTPUT_NAMES`` order.

    Args:
        with_category: the graph has the ``category`` and ``category_distance`` outputs.
        dtypes: dtype per output name where it is not the default (``category``: int64).
    """
    batch, height, width, _ = input_shape
    shapes = {ANOMALY_MAP_NAME: (batch, 1, height, width), IMAGE_SCORE_NAME: (batch,)}
    if with_category:
        shapes |= {CATEGORY_NAME: (batch,), CATEGORY_DISTANCE_NAME: (batch,)}
    defaults = {CATEGORY_NAME: "int64"}
    chosen = {**defaults, **(dtypes or {})}
    return tuple(OutputTensor(name=name, shape=shape, dtype=chosen.get(name, "float32")) for name, shape in shapes.items())


@dataclasses.dataclass(frozen=True, kw_only=True)
class CategoryHead:
    """How the graph's ``category`` output names the product in front of the camera (``reconad.model.detector``).

    Attributes:
        method: ``"nearest_centroid"``: the image's backbone features, average-pooled over the token grid
            and L2-normalised, against one L2-normalised centroid per category fitted on the training
            images; ``category`` is the nearest centroid's index and ``category_distance`` its cosine
            distance (1 - cosine similarity, 0..2). ``"none"``: the checkpoint had no centroids (an older
            run, ``import-uniad``): the graph outputs ``category`` 0 (``"all"``) and distance 0 for every
            image, and the runtime judges every image with the global thresholds (or the ``--category``
            it is given).
        names: category names in the order of the ``category`` index; ``("all",)`` for ``"none"``.
        n_images: training images each centroid was fitted on, parallel to ``names``; empty for ``"none"``.
        separation: per name, the cosine distance from its centroid to the nearest other one (how far
            the next product is); empty with fewer than two centroids. The calibrated distance limit
            sits between a category's good images and half this (``reconad.runtime.calibration``).
        source: what the centroids were fitted on, e.g. ``"160 training images of /data"``.
    """

    method: str
    names: tuple[str, ...]
    n_images: tuple[int, ...] = ()
    separation: tuple[float, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        check_choice(self.method, CATEGORY_METHODS, "category_head.method")
        require(bool(self.names) and len(set(self.names)) == len(self.names),
                f"manifest category_head.names must be distinct and not empty, got {list(self.names)}")
        if self.method == "none":
            require(self.names == (UNNAMED_CATEGORY,),
                    f"manifest category_head 'none' names only {UNNAMED_CATEGORY!r}, got {list(self.names)}")
        require(not self.n_images or len(self.n_images) == len(self.names),
                "manifest category_head.n_images must have one count per name")
        require(not self.separation or len(self.separation) == len(self.names),
                "manifest category_head.separation must have one distance per name")

    @property
    def recognizes(self) -> bool:
        """Whether the graph really tells the categories apart (``"nearest_centroid"``)."""
        return self.method == "nearest_centroid"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreReducer:
    """How the graph reduces the anomaly map to the image score (informational: it is in the graph).

    Attributes:
        method: ``"max_avgpool"`` (max of the k x k average-pooled map) or ``"mean"`` (cifar-32).
        kernel_size: k of the average pooling; None for ``"mean"``.
        stride: stride of the average pooling; None for ``"mean"``.
    """

    method: str
    kernel_size: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.method, SCORE_REDUCERS, "score_reducer.method")
        require(
            self.method != "max_avgpool" or ((self.kernel_size or 0) >= 1 and (self.stride or 0) >= 1),
            "manifest score_reducer 'max_avgpool' needs a positive kernel_size and stride",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Calibration:
    """The good images an int8 graph's activation ranges were calibrated on (static quantization).

    Attributes:
        count: images read (prepared as the runtime prepares frames).
        folders: the folders given to ``--calibration-images``, as given.
        method: one of ``CALIBRATION_METHODS``: how each activation's range was chosen from them.
        activation_type: ``"int8"``, symmetric with zero point 0 (what TensorRT's explicit quantization reads).
        per_channel: weights quantized per output channel (symmetric INT8).
    """

    count: int
    folders: tuple[str, ...]
    method: str
    activation_type: str = "int8"
    per_channel: bool = True

    def __post_init__(self) -> None:
        check_choice(self.method, CALIBRATION_METHODS, "precision.calibration.method")
        require(self.count >= 1, f"manifest field precision.calibration.count must be at least 1, got {self.count}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Precision:
    """The precision recipe of the graph or engine.

    Attributes:
        mode: ``"fp32"``, ``"fp16"`` (FP16 weights/activations with FP32 islands) or ``"int8"`` (a QDQ
            graph: MatMul/Gemm/Conv in INT8, the islands in floating point).
        fp32_islands: what is kept in floating point in an fp16 or int8 artifact, e.g.
            ``("LayerNormalization", "softmax logits", "anomaly head")``; empty for fp32.
        description: one free-form line, e.g. how the engine was typed
            (``"strongly typed from the fp16 ONNX"``).
        calibration: the calibration set of an int8 artifact; None for fp32 and fp16.
    """

    mode: str
    fp32_islands: tuple[str, ...] = ()
    description: str = ""
    calibration: Int8Calibration | None = None

    def __post_init__(self) -> None:
        check_choice(self.mode, PRECISION_MODES, "precision.mode")
        require(
            (self.calibration is not None) == (self.mode == "int8"),
            "manifest field precision.calibration is given for int8 artifacts and only for them",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExporterInfo:
    """The software that wrote the ONNX graph.

    Attributes:
        reconad_version: ``reconad.__version__`` at export.
        torch_version: ``torch.__version__`` at export.
        onnx_version: ``onnx.__version__`` at export.
        opset: the ONNX default-domain opset of the graph.
    """

    reconad_version: str
    torch_version: str | None = None
    onnx_version: str | None = None
    opset: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineInfo:
    """Where and how a TensorRT engine was built (an engine only runs on the same stack).

    Attributes:
        tensorrt_version: ``tensorrt.__version__`` of the builder.
        cuda_runtime_version: the CUDA runtime the Python CUDA binding talks to (cuda-python's
            ``cudaRuntimeGetVersion``), e.g. ``"12.6"``; None with pycuda (driver API only) or no binding.
        cuda_driver_version: the newest CUDA version the driver supports (``cuDriverGetVersion``).
        cuda_binding: the Python CUDA binding and its version, e.g. ``"cuda-python 12.6.2"`` or
            ``"pycuda 2024.1.2 (built for CUDA 12.2)"``.
        cuda_version: what manifests before these three fields called the binding's CUDA version; read, never written.
        gpu_name: device name, e.g. ``"Orin"``.
        compute_capability: ``"major.minor"``, e.g. ``"8.7"``.
        jetpack: JetPack release on a Jetson, else None.
        l4t: L4T release on a Jetson (``/etc/nv_tegra_release``), else None.
        build_details: free-form JSON-able build facts (profile, workspace, layer precisions...).
        onnx_path: the ONNX file the engine was built from (its hash is the manifest's ``onnx_sha256``),
            relative to the engine's folder where it can be, else absolute; POSIX separators.
        reference_path: that ONNX's ``.reference.npz``, the same way; None when it had none. ``verify``
            finds the engine's reference through it (``reconad.runtime.verify.find_reference``).
        reference_sha256: sha256 of that reference when the engine was built.
    """

    tensorrt_version: str
    cuda_runtime_version: str | None = None
    cuda_driver_version: str | None = None
    cuda_binding: str | None = None
    cuda_version: str | None = None
    gpu_name: str
    compute_capability: str
    jetpack: str | None = None
    l4t: str | None = None
    build_details: dict[str, Any] = dataclasses.field(default_factory=dict)
    onnx_path: str | None = None
    reference_path: str | None = None
    reference_sha256: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "build_details", _json_normalized(self.build_details, "engine.build_details"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything the runtime needs besides the model file; written as ``<stem>.json`` beside it.

    The same JSON is embedded in ONNX ``metadata_props[METADATA_KEY]``; that embedded copy has
    ``onnx_sha256 = None`` (a file cannot contain its own hash) and the sidecar JSON wins when both exist.

    Attributes:
        schema_version: ``SCHEMA_VERSION``; schema 1 is migrated on load (its graph has no category
            outputs and its thresholds are global), other versions are refused.
        artifact_kind: ``"onnx"`` or ``"engine"``.
        artifact_file: file name of the model, relative to the manifest's folder.
        preset: ``reconad.model`` preset name, or None for a custom config.
        model_config: the full ``ModelConfig`` as a JSON dict.
        input_tensor: the graph input.
        output_tensors: the graph outputs in ``OUTPUT_NAMES`` order; a graph exported before schema 2
            has only ``anomaly_map`` and ``image_score``.
        score_reducer: how the graph computes ``image_score`` from ``anomaly_map``.
        precision: fp32 / fp16 recipe.
        exporter: versions of the exporting software.
        target: ``GRAPH_TARGETS``: ``"tensorrt"`` (the portable graph, every engine's) or ``"ort-cpu"``
            (fused attention, ONNX Runtime only).
        created_at: ISO 8601 UTC time the artifact was written.
        image_threshold: the global threshold on ``image_score``; None until calibrated.
        pixel_threshold: the global threshold on ``anomaly_map`` values for defect masks; None until calibrated.
        score_normalization: optional global map of raw scores to 0..1 for display.
        distance_limit: the global out-of-distribution limit on ``category_distance``; None: no limit.
        category_thresholds: per category name, its own ``OperatingPoint`` (image and pixel threshold,
            normalisation, distance limit, each with its provenance); a category without one is judged
            with the global fields above (``operating_point``).
        categories: the training categories (one model for all of them).
        category_head: how the ``category`` output names the product; None for a graph without it.
        checkpoint_sha256: sha256 of the checkpoint the graph was exported from.
        onnx_sha256: sha256 of the ONNX file (for an engine: the ONNX it was built from).
        engine_sha256: sha256 of the engine file; engines only.
        engine: build facts; engines only.
    """

    schema_version: int = SCHEMA_VERSION
    artifact_kind: str
    artifact_file: str
    preset: str | None = None
    model_config: dict[str, Any]
    input_tensor: InputTensor
    output_tensors: tuple[OutputTensor, ...]
    score_reducer: ScoreReducer
    precision: Precision
    exporter: ExporterInfo
    target: str = "tensorrt"
    created_at: str
    image_threshold: Threshold | None = None
    pixel_threshold: Threshold | None = None
    score_normalization: ScoreNormalization | None = None
    distance_limit: Threshold | None = None
    category_thresholds: dict[str, OperatingPoint] = dataclasses.field(default_factory=dict)
    categories: tuple[str, ...] = ()
    category_head: CategoryHead | None = None
    checkpoint_sha256: str | None = None
    onnx_sha256: str | None = None
    engine_sha256: str | None = None
    engine: EngineInfo | None = None

    def __post_init__(self) -> None:
        require(
            self.schema_version == SCHEMA_VERSION,
            f"manifest schema version is {self.schema_version} but this reconad reads version {SCHEMA_VERSION}",
        )
        check_choice(self.artifact_kind, ARTIFACT_KINDS, "artifact_kind")
        require(
            bool(self.artifact_file) and Path(self.artifact_file).name == self.artifact_file,
            f"manifest artifact_file must be a bare file name, got {self.artifact_file!r}",
        )
        object.__setattr__(self, "model_config", _json_normalized(self.model_config, "model_config"))
        names = tuple(output.name for output in self.output_tensors)
        require(
            names in (OUTPUT_NAMES, SCORE_OUTPUT_NAMES),
            f"manifest outputs must be {list(OUTPUT_NAMES)} (or, before schema 2, {list(SCORE_OUTPUT_NAMES)}) "
            f"in that order, got {list(names)}",
        )
        expected = {t.name: t.shape for t in output_tensors_for(self.input_tensor.shape, names == OUTPUT_NAMES)}
        for output in self.output_tensors:
            require(
                tuple(output.shape) == expected[output.name],
                f"manifest output {output.name} shape {list(output.shape)} does not match the input "
                f"(expected {list(expected[output.name])})",
            )
        require(
            (self.category_head is not None) == (names == OUTPUT_NAMES),
            f"manifest category_head must be present exactly when the graph has the {CATEGORY_NAME} output",
        )
        known = self.known_categories
        unknown = sorted(set(self.category_thresholds) - set(known))
        require(
            not known or not unknown,
            f"manifest category_thresholds name {unknown}, which are not categories of this model ({list(known)})",
        )
        check_iso_date(self.created_at, "created_at")
        check_choice(self.target, GRAPH_TARGETS, "target")
        for key in ("checkpoint_sha256", "onnx_sha256", "engine_sha256"):
            check_sha256(getattr(self, key), key)
        is_engine = self.artifact_kind == "engine"
        require(
            is_engine == (self.engine is not None),
            "manifest field engine must be present for an engine artifact and absent for an ONNX artifact",
        )
        require(is_engine or self.engine_sha256 is None, "manifest of an ONNX artifact must not carry engine_sha256")
        require(not is_engine or self.target == "tensorrt", "manifest of an engine must have target tensorrt")

    @classmethod
    def for_onnx(
        cls,
        *,
        onnx_file: str,
        model_config: Mapping[str, Any],
        input_hw: tuple[int, int],
        max_batch: int,
        score_reducer: ScoreReducer,
        precision: Precision,
        exporter: ExporterInfo,
        target: str = "tensorrt",
        dynamic_batch: bool = True,
        preset: str | None = None,
        categories: tuple[str, ...] = (),
        category_head: CategoryHead | None = None,
        checkpoint_sha256: str | None = None,
        image_threshold: Threshold | None = None,
        pixel_threshold: Threshold | None = None,
        score_normalization: ScoreNormalization | None = None,
    ) -> Manifest:
        """The manifest of a freshly exported ONNX graph (``onnx_sha256`` unset: see ``stamp_artifact``).

        Args:
            onnx_file: file name (or path; only the name is kept) of the ONNX graph.
            model_config: ``dataclasses.asdict(config)`` of the exported ``ModelConfig``.
            input_hw: the graph's static (H, W).
            max_batch: largest batch; with ``dynamic_batch=False`` the fixed batch size.
            target: ``GRAPH_TARGETS``: what the graph is for (``"ort-cpu"``: ONNX Runtime only).
            dynamic_batch: whether the batch axis is dynamic (1..max_batch).
            category_head: the graph's category head; None for a graph without ``category`` outputs.
        """
        height, width = input_hw
        batch = -1 if dynamic_batch else max_batch
        return cls(
            artifact_kind="onnx",
            artifact_file=Path(onnx_file).name,
            preset=preset,
            model_config=dict(model_config),
            input_tensor=InputTensor(
                shape=(batch, height, width, 3),
                min_batch=1 if dynamic_batch else max_batch,
                max_batch=max_batch,
            ),
            output_tensors=output_tensors_for((batch, height, width, 3), category_head is not None),
            score_reducer=score_reducer,
            precision=precision,
            exporter=exporter,
            target=target,
            created_at=utc_now_iso(),
            image_threshold=image_threshold,
            pixel_threshold=pixel_threshold,
            score_normalization=score_normalization,
            categories=tuple(categories),
            category_head=category_head,
            checkpoint_sha256=checkpoint_sha256,
        )

    def for_engine(
        self,
        *,
        engine_file: str | os.PathLike,
        engine: EngineInfo,
        precision: Precision | None = None,
        min_batch: int | None = None,
        max_batch: int | None = None,
        output_dtypes: Mapping[str, str] | None = None,
    ) -> Manifest:
        """The manifest of an engine built from this ONNX manifest's graph, stamped with its sha256.

        Args:
            engine_file: path of the serialized engine (it must exist: it is hashed).
            engine: build facts.
            precision: the engine's recipe; defaults to the ONNX graph's.
            min_batch: the optimisation profile's smallest batch; defaults to the graph's.
            max_batch: the optimisation profile's largest batch; defaults to the graph's.
            output_dtypes: the engine's real output dtypes (numpy names) where they differ from the
                graph's, e.g. ``{"category": "int32"}`` on TensorRT 8.x.
        """
        require(self.artifact_kind == "onnx", "an engine manifest can only be derived from an ONNX manifest")
        require(
            self.onnx_sha256 is not None,
            "the ONNX manifest has no onnx_sha256; load the sidecar JSON, not the embedded copy",
        )
        tensor = self.input_tensor
        if min_batch is not None or max_batch is not None:
            low = tensor.min_batch if min_batch is None else min_batch
            high = tensor.max_batch if max_batch is None else max_batch
            batch = -1 if low != high or tensor.dynamic_batch else low
            tensor = dataclasses.replace(tensor, shape=(batch, *tensor.shape[1:]), min_batch=low, max_batch=high)
        dtypes = {output.name: output.dtype for output in self.output_tensors} | dict(output_dtypes or {})
        derived = dataclasses.replace(
            self,
            artifact_kind="engine",
            artifact_file=Path(engine_file).name,
            input_tensor=tensor,
            output_tensors=output_tensors_for(tensor.shape, self.category_head is not None, dtypes),
            precision=precision or self.precision,
            engine=engine,
            created_at=utc_now_iso(),
        )
        return derived.stamp_artifact(engine_file)

    def stamp_artifact(self, artifact_path: str | os.PathLike) -> Manifest:
        """A copy naming ``artifact_path`` and carrying its sha256 (``onnx_sha256`` or ``engine_sha256``)."""
        digest = sha256_file(artifact_path)
        key = "onnx_sha256" if self.artifact_kind == "onnx" else "engine_sha256"
        return dataclasses.replace(self, artifact_file=Path(artifact_path).name, **{key: digest})

    def embedded_copy(self) -> Manifest:
        """The copy to write into the ONNX file's own ``metadata_props`` (without its own hash)."""
        return dataclasses.replace(self, onnx_sha256=None) if self.artifact_kind == "onnx" else self

    @property
    def artifact_sha256(self) -> str | None:
        """The recorded hash of the model file this manifest describes."""
        return self.onnx_sha256 if self.artifact_kind == "onnx" else self.engine_sha256

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.input_tensor.input_hw

    @property
    def recognizes_categories(self) -> bool:
        """Whether the graph names the category of each image (a fitted ``category_head``)."""
        return self.category_head is not None and self.category_head.recognizes

    @property
    def known_categories(self) -> tuple[str, ...]:
        """The category names thresholds may be calibrated for: the head's, else the training categories."""
        if self.recognizes_categories:
            return self.category_head.names
        return tuple(self.categories)

    @property
    def global_operating_point(self) -> OperatingPoint:
        """The global thresholds, for images of a category without its own."""
        return OperatingPoint(
            image_threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            score_normalization=self.score_normalization,
            distance_limit=self.distance_limit,
        )

    def operating_point(self, category: str | None) -> OperatingPoint:
        """The thresholds an image of ``category`` is judged with: its own when calibrated, else the global ones."""
        own = self.category_thresholds.get(category) if category is not None else None
        return own if own is not None and own.image_threshold is not None else self.global_operating_point

    def with_operating_point(self, category: str | None, point: OperatingPoint) -> Manifest:
        """A copy with ``point`` as the thresholds of ``category`` (None: the global ones)."""
        if category is None:
            return dataclasses.replace(
                self,
                image_threshold=point.image_threshold,
                pixel_threshold=point.pixel_threshold,
                score_normalization=point.score_normalization,
                distance_limit=point.distance_limit,
            )
        return dataclasses.replace(self, category_thresholds={**self.category_thresholds, category: point})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists); ``from_dict`` inverts it."""
        return encode(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Validate and build a manifest; any problem raises a one-sentence ``ReconadError``."""
        require(isinstance(data, Mapping), "manifest must be a JSON object")
        require("schema_version" in data, "manifest has no schema_version, so it is not a reconad manifest")
        version = data["schema_version"]
        require(
            version in READABLE_SCHEMA_VERSIONS and not isinstance(version, bool),
            f"manifest schema version is {version!r} but this reconad reads versions "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}",
        )
        if version == 1:
            data = migrate_schema_1(data)
        return decode(cls, data, "manifest")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ReconadError(f"manifest is not valid JSON ({error.msg} at line {error.lineno})") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read and validate a manifest file; errors name the file in one sentence."""
        path = Path(path)
        text = read_text(path, "manifest")
        try:
            return cls.from_json(text)
        except ReconadError as error:
            raise ReconadError(f"Invalid manifest {path}: {error}.") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temp file in the same folder, then ``os.replace``."""
        write_text_atomic(path, self.to_json())


def migrate_schema_1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A schema-1 manifest as schema 2: the same fields; its graph has no category outputs (so no
    ``category_head``) and its thresholds are the global ones. Written back as schema 2."""
    return {**data, "schema_version": SCHEMA_VERSION}


def load_manifest(path: str | os.PathLike) -> Manifest:
    """``Manifest.load``: read and validate a manifest JSON file."""
    return Manifest.load(path)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise ReconadError(f"Cannot read {path}: {error.strerror or type(error).__name__}.") from None
    return digest.hexdigest()


def manifest_path_for(artifact_path: str | os.PathLike) -> Path:
    """``dir/model.fp16.onnx`` -> ``dir/model.fp16.json``."""
    return Path(artifact_path).with_suffix(".json")


def reference_path_for(artifact_path: str | os.PathLike) -> Path:
    """``dir/model.fp16.onnx`` -> ``dir/model.fp16.reference.npz`` (written by ``to-onnx``)."""
    path = Path(artifact_path)
    return path.with_name(f"{path.stem}.reference.npz")


def check_artifact_sha256(manifest: Manifest, artifact_path: str | os.PathLike) -> None:
    """Raise a ``ReconadError`` unless the file's sha256 is the one the manifest records."""
    expected = manifest.artifact_sha256
    require(
        expected is not None, f"The manifest of {artifact_path} records no sha256 for it; re-export or re-stamp it."
    )
    actual = sha256_file(artifact_path)
    require(
        actual == expected,
        f"{artifact_path} does not match its manifest (sha256 {actual[:12]}… instead of {expected[:12]}…): "
        "the file is corrupt or belongs to another manifest.",
    )


def _json_normalized(value: Any, key: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ReconadError(f"manifest field {key} is not JSON-serialisable ({error})") from None
