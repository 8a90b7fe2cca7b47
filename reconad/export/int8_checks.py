"""The checks an int8 graph passes before ``recon-export to-onnx --precision int8`` writes anything.

The fp16 graph's checks (``recon-export verify``'s tolerances for its precision, against PyTorch on the
reference set: no NaN/Inf, no decision flip, map p99 and score error bounds, categories) with the int8
tolerances of ``reconad.runtime.verify.TOLERANCES``, plus one only int8 needs: the mean image AUROC on
labelled evaluation data (the test split of an MVTec-layout folder) within ``MAX_AUROC_DROP`` of the fp32
graph's, both run on the runtime's ONNX Runtime CPU backend (``reconad.train.artifacts``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from reconad.export.int8 import DEFAULT_CALIBRATION_METHOD, calibration_record, int8_node_counts, load_calibration_images, quantize_to_int8
from reconad.runtime.backends.ort import OrtBackend
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import Int8Calibration
from reconad.runtime.verify import VerifyReport, compare_outputs

logger = logging.getLogger("reconad.export.int8")

MAX_AUROC_DROP = 0.005  # half a point of image AUROC (0..1 scale), either way


class Int8CheckError(ReconadError):
    """The int8 graph fails a check (nothing was written); exit code 1, like a failed parity check."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class Int8Options:
    """What an int8 export needs besides the checkpoint.

    Attributes:
        calibration_images: folders of good images (``--calibration-images``, repeatable).
        evaluation_data: an MVTec-layout folder whose test split (good and defective images) measures the
            image AUROC of the fp32 and int8 graphs.
        method: the calibration method (``reconad.runtime.manifest.CALIBRATION_METHODS``).
        evaluation_categories: categories of ``evaluation_data`` to use; None for the checkpoint's.
    """

    calibration_images: tuple[Path, ...]
    evaluation_data: Path
    method: str = DEFAULT_CALIBRATION_METHOD
    evaluation_categories: tuple[str, ...] | None = None


def check_int8_parity(model: onnx.ModelProto, images: np.ndarray, reference: dict[str, np.ndarray], max_batch: int) -> VerifyReport:
    """The int8 graph on ONNX Runtime (CPU) against the PyTorch reference under the int8 tolerances.

    Raises:
        Int8CheckError: NaN/Inf, a decision flip at the reference median, a map p99 / score / category
            distance error over its bound, or another category named (not a near tie).
    """
    with OrtBackend(model.SerializeToString(), "ort-cpu", max_batch=max_batch, memory_arena=True) as backend:
        outputs = backend.infer(images)
    report = compare_outputs(outputs, {"images": images, **reference}, precision="int8", threshold=None, artifact="int8 ONNX graph")
    if report.failures:
        raise Int8CheckError(f"The int8 ONNX graph does not match PyTorch ({'; '.join(report.failures)}), so nothing was written.")
    logger.info(
        "int8 ONNX graph vs PyTorch: map max abs %.3g, p99 abs %.3g (%.2f%% of the map range %.3g; bound %.3g), "
        "score max abs %.3g, %d decision flips, category_distance max abs %.3g, %d category mismatches (%d near ties)",
        report.anomaly_map.max_abs,
        report.anomaly_map.p99_abs,
        100 * report.anomaly_map.p99_abs / report.map_scale,
        report.map_scale,
        (report.tolerance.map_p99_abs or math.nan) * report.map_scale,
        report.image_score.max_abs,
        report.decision_flips,
        report.category_distance.max_abs if report.category_distance else math.nan,
        report.category_mismatches,
        report.category_near_ties,
    )
    return report


def check_auroc(fp32_model: onnx.ModelProto, int8_model: onnx.ModelProto, options: Int8Options, input_hw: tuple[int, int], max_batch: int) -> dict[str, float]:
    """Mean image AUROC of both graphs on ``options.evaluation_data``; returns ``{"fp32", "int8", "images"}``.

    Raises:
        Int8CheckError: the int8 graph's AUROC differs from the fp32 graph's by more than ``MAX_AUROC_DROP``.
    """
    from reconad.train.artifacts import image_auroc_of_graphs

    graphs = {"fp32": fp32_model.SerializeToString(), "int8": int8_model.SerializeToString()}
    aurocs, count = image_auroc_of_graphs(graphs, options.evaluation_data, input_hw, options.evaluation_categories, max_batch)
    gap = aurocs["int8"] - aurocs["fp32"]
    if not abs(gap) <= MAX_AUROC_DROP:
        raise Int8CheckError(
            f"The int8 graph's image AUROC on {options.evaluation_data} is {aurocs['int8']:.4f} against the fp32 graph's "
            f"{aurocs['fp32']:.4f} ({100 * gap:+.2f} points, more than {100 * MAX_AUROC_DROP:.1f}), so nothing was written."
        )
    logger.info("image AUROC on %d test images of %s: fp32 %.4f, int8 %.4f (%+.2f points)",
                count, options.evaluation_data, aurocs["fp32"], aurocs["int8"], 100 * gap)
    return {**aurocs, "images": count}


def build_checked_int8_graph(
    fp32_model: onnx.ModelProto,
    images: np.ndarray,
    reference: dict[str, np.ndarray],
    max_batch: int,
    config: Any,
    options: Int8Options,
) -> tuple[onnx.ModelProto, Int8Calibration]:
    """Calibrate, quantize and check the int8 graph; nothing is written here.

    Args:
        fp32_model: the traced fp32 graph, already checked against PyTorch.
        images: the reference images, uint8 [K, H, W, 3]; ``reference``: PyTorch's outputs for them.
        config: the detector's ``ModelConfig`` (``input_hw``).

    Raises:
        ReconadError: bad calibration or evaluation folders; ``Int8CheckError`` (exit 1) when a check fails.
    """
    calibration_images = load_calibration_images(options.calibration_images, config.input_hw)
    logger.info("calibrating int8 ranges on %d good images (%s)", len(calibration_images), options.method)
    model = quantize_to_int8(fp32_model, calibration_images, options.method)
    counts = int8_node_counts(model)
    logger.info("int8 graph: %d MatMul/Gemm/Conv in INT8, %d in floating point (islands, residual producers, depthwise)", counts["int8"], counts["float"])
    check_int8_parity(model, images, reference, max_batch)
    check_auroc(fp32_model, model, options, config.input_hw, max_batch)
    return model, calibration_record(calibration_images, options.calibration_images, options.method)
