"""The precision policy: what each TensorRT version (8.5 to 11) parses and sets for an fp16 or fp32 engine.

``plan_precision`` is the one place that knows it (docs/architecture.md, "Precision plan");
the builder only carries the plan out, and ``precision_check`` verifies the built engine against it.
"""

from __future__ import annotations

import dataclasses

from reconad.export.build_config import NETWORK_TYPINGS, PRECISIONS, BuildConfig
from reconad.runtime.errors import ReconadError

WEAK_TYPING_DEPRECATED = (10, 12)  # TensorRT deprecates weak typing here and removes it in 11
STRONG_TYPING_FROM = (10, 0)
# The ONNX parser imports LayerNormalization (INormalizationLayer) from 8.6 on; before, export.layernorm
# rewrites it into primitive ops for the parse.
LAYER_NORM_FROM = (8, 6)


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """What to parse and which flags to set for one requested precision on one TensorRT version.

    Attributes:
        tensorrt_version: the builder's version.
        precision: the engine precision asked for.
        onnx_precision: which exported graph to parse (``"fp32"`` or ``"fp16"``).
        strongly_typed: the network takes its types from the graph (``STRONGLY_TYPED``; always on in 11).
        explicit_batch_flag: set ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` (needed before 10).
        fp16_flag: set ``BuilderFlag.FP16`` (weak typing: TensorRT may pick FP16 kernels).
        int8_flag: set ``BuilderFlag.INT8`` (weak typing with a QDQ graph: explicit quantization; the
            scales come from the graph's Q/DQ nodes, no calibrator).
        constrain_islands: put FP32 layer precision and output types on the FP32-island layers and
            set ``OBEY_PRECISION_CONSTRAINTS``.
        disable_tf32: clear ``BuilderFlag.TF32`` so an fp32 engine keeps full FP32 matmuls/convolutions.
        decompose_layer_norm: rewrite every LayerNormalization into ReduceMean/Sub/Mul/Add/Sqrt/Div
            (``export.layernorm``) before parsing, because this parser cannot import the op (8.5).
        description: one line for the manifest.
    """

    tensorrt_version: tuple[int, ...]
    precision: str
    onnx_precision: str
    strongly_typed: bool
    explicit_batch_flag: bool
    fp16_flag: bool
    constrain_islands: bool
    disable_tf32: bool
    decompose_layer_norm: bool
    description: str
    int8_flag: bool = False

    @property
    def builder_flags(self) -> tuple[str, ...]:
        """``trt.BuilderFlag`` names to set."""
        return ("FP16",) * self.fp16_flag + ("INT8",) * self.int8_flag + ("OBEY_PRECISION_CONSTRAINTS",) * self.constrain_islands


def version_text(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def plan_precision(
    tensorrt_version: tuple[int, ...], precision: str = "fp16", network_typing: str = "auto"
) -> PrecisionPlan:
    """The precision policy, per TensorRT version (docs/architecture.md, "Precision plan").

    - 8.5/8.6 (JetPack 5.1, 6.0; also 9.x): the fp32 graph, EXPLICIT_BATCH, the FP16 builder flag,
      FP32 precision and output types on the island layers, OBEY_PRECISION_CONSTRAINTS. 8.5's parser
      has no LayerNormalization, so there each one is decomposed into primitive ops before parsing and
      all of those ops are island layers: FP32 like the single op on 8.6.
    - 10.x (JetPack 6.1+, 7): strongly typed from the fp16 graph; the weak 8.x recipe (without
      EXPLICIT_BATCH, which 10 ignores) only when ``network_typing="weak"`` and before 10.12.
    - 11+: strongly typed only (there is no FP16 builder flag).

    An fp32 engine is built from the fp32 graph with TF32 off, strongly typed on 10+.

    An int8 engine is built from the int8 (QDQ) graph as explicit quantization (TensorRT developer guide,
    "Working with Quantized Types"): strongly typed on 10+, where the Q/DQ nodes set INT8 and the rest keeps
    the graph's FP32; on 8.x (and weak 10.x) with the INT8 and FP16 builder flags, so the float parts may
    run in FP16, and FP32 constraints, obeyed, on the islands.

    Raises:
        ReconadError: the version is older than 8.5, or the typing asked for does not exist there.
    """
    if precision not in PRECISIONS:
        raise ReconadError(f"Precision must be one of {list(PRECISIONS)}, got {precision!r}.")
    if network_typing not in NETWORK_TYPINGS:
        raise ReconadError(f"Network typing must be one of {list(NETWORK_TYPINGS)}, got {network_typing!r}.")
    version = tuple(tensorrt_version)
    text = version_text(version)
    if version[:2] < (8, 5):
        raise ReconadError(f"TensorRT {text} is older than 8.5, the oldest release this builder supports.")
    typing = network_typing
    if typing == "auto":
        typing = "strong" if version[:2] >= STRONG_TYPING_FROM else "weak"
    if typing == "strong" and version[:2] < STRONG_TYPING_FROM:
        raise ReconadError(f"Strongly typed builds need TensorRT 10 or later; this is TensorRT {text}.")
    if typing == "weak" and version[:2] >= WEAK_TYPING_DEPRECATED:
        raise ReconadError(
            f"TensorRT {text} has deprecated (10.12) or removed (11) weak typing and the FP16 builder flag; "
            "build strongly typed from the fp16 ONNX instead (network_typing auto)."
        )
    if precision == "int8":
        return _int8_plan(version, typing, text)
    if typing == "strong":
        return PrecisionPlan(
            tensorrt_version=version,
            precision=precision,
            onnx_precision=precision,
            strongly_typed=True,
            explicit_batch_flag=False,
            fp16_flag=False,
            constrain_islands=False,
            disable_tf32=precision == "fp32",
            decompose_layer_norm=False,
            description=f"strongly typed from the {precision} ONNX (TensorRT {text})",
        )
    fp16 = precision == "fp16"
    decompose = version[:2] < LAYER_NORM_FROM
    graph = "fp32 ONNX (LayerNormalization decomposed)" if decompose else "fp32 ONNX"
    description = (
        f"{graph} with the FP16 builder flag and FP32 constraints on the islands, obeyed (TensorRT {text})"
        if fp16
        else f"{graph} built in FP32, TF32 off (TensorRT {text})"
    )
    return PrecisionPlan(
        tensorrt_version=version,
        precision=precision,
        onnx_precision="fp32",
        strongly_typed=False,
        explicit_batch_flag=version[0] < 10,
        fp16_flag=fp16,
        constrain_islands=fp16,
        disable_tf32=not fp16,
        decompose_layer_norm=decompose,
        description=description,
    )


def _int8_plan(version: tuple[int, ...], typing: str, text: str) -> PrecisionPlan:
    strong = typing == "strong"
    decompose = not strong and version[:2] < LAYER_NORM_FROM
    graph = "int8 QDQ ONNX (LayerNormalization decomposed)" if decompose else "int8 QDQ ONNX"
    return PrecisionPlan(
        tensorrt_version=version,
        precision="int8",
        onnx_precision="int8",
        strongly_typed=strong,
        explicit_batch_flag=not strong and version[0] < 10,
        fp16_flag=not strong,
        constrain_islands=not strong,
        disable_tf32=strong,  # strongly typed: the float parts are the graph's FP32, kept exact
        decompose_layer_norm=decompose,
        description=(
            f"strongly typed from the {graph}: explicit quantization, float parts FP32 (TensorRT {text})"
            if strong
            else f"{graph} with the INT8 and FP16 builder flags (explicit quantization) and FP32 constraints on the "
            f"islands, obeyed (TensorRT {text})"
        ),
        int8_flag=not strong,
    )


# TensorRT 10.7 was the last 10.x release with DLA; 11.0-11.3 have none, 11.4.0 only on Windows on ARM, and
# 11.4.1 brings it back on Jetson AGX Orin with JetPack 7.2.2+ (TensorRT 11.4.1 "Working with DLA").
NO_DLA_ON_JETPACK = ((10, 8), (11, 4, 1))


def check_build_options(tensorrt_version: tuple[int, ...], config: BuildConfig, *, jetson: bool = False, integrated_gpu: bool = False) -> None:
    """Refuse options this TensorRT or device does not have, in one sentence.

    Args:
        jetson: the builder runs on JetPack (``/etc/nv_tegra_release``).
        integrated_gpu: the GPU is integrated (Jetson, DRIVE): hardware compatibility is for Ampere-or-newer
            discrete GPUs only (TensorRT developer guide, "Hardware Compatibility": not on JetPack or DRIVE OS).
    """
    version = version_text(tensorrt_version)
    if config.hardware_compatible and (integrated_gpu or jetson):
        raise ReconadError(
            "--hardware-compatible engines are for Ampere-or-newer discrete GPUs; TensorRT does not build them for "
            "an integrated GPU (Jetson), so drop the option."
        )
    low, high = NO_DLA_ON_JETPACK
    if config.dla_core is not None and jetson and low <= tuple(tensorrt_version) < high:
        raise ReconadError(
            f"TensorRT {version} has no DLA on JetPack (10.7 was the last 10.x release with it; 11.4.1 brings it back "
            "on AGX Orin with JetPack 7.2.2+), so drop --dla-core or build with a TensorRT that has DLA."
        )
    if tensorrt_version[:2] >= (8, 6):
        return
    for option in ("version_compatible", "hardware_compatible", "builder_optimization_level"):
        if getattr(config, option) not in (None, False):
            raise ReconadError(f"{option} needs TensorRT 8.6 or later; this is TensorRT {version}.")
