"""The int8 graph: static quantization (QDQ) calibrated on good images, the FP32 islands left in floating point.

ONNX Runtime's own tooling does the work (``onnxruntime.quantization.quantize_static``, ``QuantFormat.QDQ``,
a ``CalibrationDataReader``); this module chooses what it quantizes and feeds it images read through the
runtime's one image path (``reconad.runtime.frames``). MatMul, Gemm and Conv get INT8 inputs: weights
symmetric per output channel, activations symmetric with zero point 0, as TensorRT's explicit
quantization requires (TensorRT developer guide, "Explicit Quantization"; a uint8 or asymmetric QDQ graph
does not build). Only their inputs: no Q/DQ pair on a matrix op's output, TensorRT's own placement
recommendation (same guide, "Q/DQ Layer-Placement Recommendations"). A pair on a convolution's output
quantizes the pre-activation range (on the pretrained Lite0 backbone 10 to 75, where the ReLU6 after it
keeps 0..6): 2-12x coarser steps than the activation's own; on the trained lite0-256 demo model the
backbone features the anomaly map reads came out at 3.6 dB signal-to-noise against the fp32 graph
(onnxruntime's ``qdq_loss_debug``; 19 dB with this recipe; benchmarks/bench_int8_trained.py). The
random-weight tiny model's features stayed at 30 dB with that placement, which is why it passed.
The nodes of ``export.islands`` (input normalisation, LayerNormalization, the softmax
logits with their Q.K^T MatMul, the anomaly head and the category head) are excluded, so they read and
write floats exactly as in the fp32 graph, and so are the matrix ops that feed the reconstruction error
directly (``residual_producers``: on the tiny model they take the image AUROC gap to fp32 from -4.2 to
-1.0 points and the score error from 2.2e-2 to 1.4e-2) and the depthwise convolutions (``depthwise_convolutions``:
each output sums 9 or 25 inputs of one channel, so rounding noise is not averaged over channels, the
known weak spot of separable networks, Sheng et al. 2018, "A Quantization-Friendly Separable Convolution
for MobileNets"; on the trained lite0-256 demo model they take the category distance error from 2.1e-2 to
4.1e-3 and the map p99 error from 2.6% to 1.4% of the map range; they are 1.6% of its multiply-adds).
Every node outside the quantized matrix ops reads the float tensor, not a shared pair's rounded copy
(``float_consumers_read_floats``: the residual Adds and the feature taps).
Torch-free: ``export.onnx`` calls it with the traced graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from reconad.export.islands import find_fp32_island_groups, name_nodes
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import CALIBRATION_METHODS, INPUT_NAME, Int8Calibration

INT8_OP_TYPES = ("MatMul", "Gemm", "Conv")
# The steps that make the recipe hold on trained models (module docstring); ``quantize_to_int8(without=...)``.
RECIPE_STEPS = ("inputs-only", "depthwise-float", "float-reads")
# Chosen by measurement (benchmarks/bench_int8.py, "calibration methods"): see DEFAULT_CALIBRATION_METHOD's note there.
# On the trained lite0-256 demo model (benchmarks/bench_int8_trained.py) entropy chose minmax's ranges and
# percentile clipped more and came out worse (category distance error 2.2e-2 against 1.9e-2).
DEFAULT_CALIBRATION_METHOD = "minmax"
MIN_CALIBRATION_IMAGES = 8
MAX_CALIBRATION_IMAGES = 64  # evenly spaced over the sorted files of all folders (fewer at large sizes, see below)
CALIBRATION_BATCH = 1
# onnxruntime's calibrators keep every calibration image's activations until the end (its
# CalibMaxIntermediateOutputs discards, in 1.32, what it should merge), roughly 1 GB per image at 512 px:
# 16 images at 512 px were killed for memory on a 23 GB machine. So the count scales with the pixels.
CALIBRATION_PIXEL_BUDGET = MAX_CALIBRATION_IMAGES * 128 * 128
INT8_RECIPE = (
    "QDQ static quantization (onnxruntime.quantization): MatMul/Gemm/Conv inputs INT8 (weights symmetric per "
    "channel, activations symmetric, zero point 0; Q/DQ on inputs only); FP32 islands (input normalisation, "
    "LayerNormalization, softmax logits with Q.K^T, anomaly head, category head), the matrix ops feeding the "
    "reconstruction error and the depthwise convolutions in floating point, and every float node reads unrounded "
    "tensors; uint8 in, float32 and int64 out"
)


def max_calibration_images(input_hw: tuple[int, int]) -> int:
    """How many calibration images fit the memory budget at this input size: 64 at 128 px and below, 16 at
    256, 8 (the minimum) at 512."""
    fitting = CALIBRATION_PIXEL_BUDGET // max(1, input_hw[0] * input_hw[1])
    return max(MIN_CALIBRATION_IMAGES, min(MAX_CALIBRATION_IMAGES, fitting))


def load_calibration_images(
    folders: Sequence[str | os.PathLike], input_hw: tuple[int, int], limit: int | None = None
) -> np.ndarray:
    """Good images for calibration, prepared exactly as the runtime prepares frames: uint8 [K, H, W, 3] RGB.

    Up to ``limit`` files (default ``max_calibration_images(input_hw)``), evenly spaced over the sorted
    files of every folder together.

    Raises:
        ReconadError: no folder, a folder that is missing or holds no images, or fewer than
            ``MIN_CALIBRATION_IMAGES`` images in all (too few to set an activation range).
    """
    from reconad.runtime.frames import list_images, prepare_batch

    if not folders:
        raise ReconadError("An int8 export needs --calibration-images: a folder of good images.")
    paths: list[Path] = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise ReconadError(f"Calibration image folder {folder} does not exist.")
        found = list_images(folder)
        if not found:
            raise ReconadError(f"Calibration image folder {folder} holds no image files.")
        paths += found
    if len(paths) < MIN_CALIBRATION_IMAGES:
        raise ReconadError(
            f"--calibration-images holds {len(paths)} images; calibrating int8 ranges needs at least "
            f"{MIN_CALIBRATION_IMAGES} good images."
        )
    limit = max_calibration_images(input_hw) if limit is None else limit
    if len(paths) > limit:
        picks = np.linspace(0, len(paths) - 1, limit).round().astype(int)
        paths = [paths[index] for index in sorted(set(picks))]
    return prepare_batch(paths, input_hw)


def residual_producers(model: onnx.ModelProto, head_nodes: Sequence[str]) -> list[str]:
    """The MatMul/Gemm/Conv nodes that produce the two sides of the reconstruction error directly.

    The anomaly map is ``||f - f_hat||``, the small difference of two large tensors: INT8 rounding of
    the last matrix op on either side (the transformer's output projection, the backbone convolutions
    whose features are tapped) lands in the map undamped, so these stay in floating point. Found by
    walking back from the anomaly head's inputs through non-matrix ops to the first matrix op on each path.
    """
    producer = {name: node for node in model.graph.node for name in node.output}
    constants = {init.name for init in model.graph.initializer}
    head = set(head_nodes)
    frontier = [name for node in model.graph.node if node.name in head for name in node.input
                if name in producer and producer[name].name not in head]
    found, seen = [], set()
    while frontier:
        tensor = frontier.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in INT8_OP_TYPES:
            found.append(node.name)
            continue
        frontier += [name for name in node.input if name and name not in constants]
    order = {node.name: position for position, node in enumerate(model.graph.node)}
    return sorted(found, key=order.__getitem__)


def depthwise_convolutions(model: onnx.ModelProto) -> list[str]:
    """The grouped (depthwise) Conv nodes, ``group`` > 1, in graph order: they stay in floating point
    (see the module docstring for why)."""
    return [node.name for node in model.graph.node if node.op_type == "Conv"
            and any(attribute.name == "group" and attribute.i > 1 for attribute in node.attribute)]  # fmt: skip


def int8_excluded_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that stay in floating point: every FP32 island of ``export.islands``, the
    ``residual_producers`` of the anomaly head and the ``depthwise_convolutions``."""
    groups = find_fp32_island_groups(model)
    wanted = {name for names in groups.values() for name in names}
    wanted |= set(residual_producers(model, groups["anomaly head"]))
    wanted |= set(depthwise_convolutions(model))
    return [node.name for node in model.graph.node if node.name in wanted]


class _ImageReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over uint8 [K, H, W, 3] images, in small batches."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self._batches = iter([{INPUT_NAME: images[start : start + batch]} for start in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _calibration_method(name: str):  # -> onnxruntime.quantization.CalibrationMethod
    from onnxruntime.quantization import CalibrationMethod

    if name not in CALIBRATION_METHODS:
        raise ReconadError(f"Calibration method must be one of {list(CALIBRATION_METHODS)}, got {name!r}.")
    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]  # fmt: skip


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer logs a pre-processing hint on the root logger at WARNING for every call, and its
    histogram calibrators print progress on stdout (where the CLI writes the paths it wrote)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_to_int8(
    fp32_model: onnx.ModelProto,
    images: np.ndarray,
    method: str = DEFAULT_CALIBRATION_METHOD,
    *,
    activation_type: str = "int8",
    without: Collection[str] = (),
) -> onnx.ModelProto:
    """The QDQ int8 copy of the fused fp32 graph, its activation ranges calibrated on ``images``.

    Args:
        fp32_model: the traced, folded fp32 graph (not modified); every node named.
        images: good images, uint8 [K, H, W, 3] (``load_calibration_images``).
        method: ``"minmax"``, ``"percentile"`` (99.999th, onnxruntime's default) or ``"entropy"``; the last
            two hold every calibration image's activations in memory at once (onnxruntime's histogram
            calibrators: about 1 GB per image at 512 px), so give them few images at large sizes.
        activation_type: ``"int8"`` (symmetric, the only form TensorRT builds) or ``"uint8"``
            (asymmetric, ONNX Runtime CPU's U8S8 path; for measurement only, never written by the CLI).
        without: recipe steps to leave out, for measurement only (benchmarks/bench_int8_trained.py), never
            by the CLI: any of ``RECIPE_STEPS``; all three give the recipe before the trained-model fix.

    Returns:
        The checked int8 graph: QuantizeLinear/DequantizeLinear pairs on the inputs (never the outputs) of
        every MatMul, Gemm and Conv that ``int8_excluded_nodes`` leaves, weights stored as INT8 initializers.

    Raises:
        ReconadError: an unknown method, or onnxruntime's quantizer failed.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    calibrate = _calibration_method(method)
    if activation_type not in ("int8", "uint8"):
        raise ReconadError(f"activation_type must be int8 or uint8, got {activation_type!r}.")
    symmetric = activation_type == "int8"
    unknown = set(without) - set(RECIPE_STEPS)
    if unknown:
        raise ReconadError(f"Unknown int8 recipe steps {sorted(unknown)}; expected some of {list(RECIPE_STEPS)}.")
    excluded = int8_excluded_nodes(fp32_model)
    if "depthwise-float" in without:
        depthwise = set(depthwise_convolutions(fp32_model))
        excluded = [name for name in excluded if name not in depthwise]
    with tempfile.TemporaryDirectory(prefix="reconad-int8-") as work:
        source, target = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        onnx.save(fp32_model, source)
        try:
            with _quiet_quantizer():
                quantize_static(
                    str(source),
                    str(target),
                    _ImageReader(images),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(INT8_OP_TYPES),
                    nodes_to_exclude=excluded,
                    per_channel=True,
                    reduce_range=False,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=calibrate,
                    extra_options={
                        "ActivationSymmetric": symmetric,
                        "WeightSymmetric": True,
                        # One Q/DQ pair per tensor, shared by its consumers (onnxruntime's default; TensorRT
                        # propagates and fuses the pair into each consumer itself).
                        "DedicatedQDQPair": False,
                        # Inputs only (TensorRT's placement recommendation): a pair on a Conv's output would
                        # quantize the range before its activation (see the module docstring).
                        "OpTypesToExcludeOutputQuantization": [] if "inputs-only" in without else list(INT8_OP_TYPES),
                        "CalibTensorRangeSymmetric": symmetric,
                        "CalibMovingAverage": False,
                        # Entropy searches thresholds over histogram bins beyond the 128 quantized ones;
                        # onnxruntime's default of 128 bins leaves one candidate, the full range. 2048 bins,
                        # as TensorRT's entropy calibrator uses (on the tiny model it still picked the same
                        # ranges as minmax: benchmarks/bench_int8.py --methods).
                        **({"CalibNumBins": 2048} if method == "entropy" else {}),
                    },
                )
        except (RuntimeError, ValueError, KeyError, onnx.checker.ValidationError) as error:
            raise ReconadError(f"onnxruntime's quantizer could not quantize the graph ({error}).") from None
        model = onnx.load(str(target))
    model.producer_name, model.producer_version = fp32_model.producer_name, fp32_model.producer_version
    model.doc_string = fp32_model.doc_string
    if "float-reads" not in without:
        float_consumers_read_floats(model, set(excluded))
    name_nodes(model, tag="q")
    onnx.checker.check_model(model, full_check=True)
    return model


def float_consumers_read_floats(model: onnx.ModelProto, float_nodes: set[str]) -> int:
    """Rewire, in place, every node that computes in floating point to read the float tensor a shared
    QuantizeLinear/DequantizeLinear pair rounds, not the pair's output; returns how many inputs moved.

    onnxruntime's quantizer, quantizing a tensor for one matrix op, hands the dequantized copy to every
    consumer (``replace_input_of_all_nodes``, also with ``DedicatedQDQPair`` when one consumer is quantized):
    the residual Add after a LayerNormalization, the Resize that taps a backbone stage for the anomaly map.
    Those then carry INT8 rounding into the residual stream and into ``f`` of ``||f - f_hat||``, which the
    FP32 islands and ``residual_producers`` are there to avoid. Only the MatMul/Gemm/Conv nodes outside
    ``float_nodes`` keep reading dequantized tensors; a pair left with no reader is removed.
    """
    producer = {name: node for node in model.graph.node for name in node.output}
    initializers = {init.name for init in model.graph.initializer}
    rounded = {}  # DequantizeLinear output -> the float activation its QuantizeLinear reads
    for node in model.graph.node:
        quantize = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantize is not None and quantize.op_type == "QuantizeLinear" and quantize.input[0] not in initializers:
            rounded[node.output[0]] = quantize.input[0]
    moved = 0
    for node in model.graph.node:
        if node.op_type in INT8_OP_TYPES and node.name not in float_nodes:
            continue
        for position, name in enumerate(node.input):
            if name in rounded:
                node.input[position] = rounded[name]
                moved += 1
    while True:  # drop the Q/DQ nodes nothing reads any more
        read = {name for node in model.graph.node for name in node.input} | {output.name for output in model.graph.output}
        unread = [node for node in model.graph.node
                  if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(name in read for name in node.output)]  # fmt: skip
        if not unread:
            break
        for node in unread:
            model.graph.node.remove(node)
    read = {name for node in model.graph.node for name in node.input}
    for init in [init for init in model.graph.initializer if init.name not in read]:
        model.graph.initializer.remove(init)
    return moved


def int8_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many MatMul/Gemm/Conv nodes read a DequantizeLinear output (INT8) and how many read floats."""
    producer = {name: node for node in model.graph.node for name in node.output}
    counts = {"int8": 0, "float": 0}
    for node in model.graph.node:
        if node.op_type in INT8_OP_TYPES:
            first = producer.get(node.input[0])
            counts["int8" if first is not None and first.op_type == "DequantizeLinear" else "float"] += 1
    return counts


def calibration_record(images: np.ndarray, folders: Sequence[str | os.PathLike], method: str) -> Int8Calibration:
    """The manifest's ``precision.calibration`` for an int8 graph calibrated on ``images`` from ``folders``."""
    return Int8Calibration(count=int(len(images)), folders=tuple(str(f) for f in folders), method=method)
