"""Checkpoint -> the fused ONNX graph (docs/architecture.md, "The fused graph"), its fp16 twin, manifests and references.

The only export module that imports torch (inside functions). Like timm's ``onnx_export``: export,
``onnx.checker``, then ONNX Runtime parity with PyTorch before any file is written. The exporter is
torch.onnx's dynamo path (torch.export), see ``trace_to_onnx`` for why and for its traps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

import reconad
from reconad.export.fp16 import convert_to_fp16, emulate_fp16_storage
from reconad.export.islands import ISLAND_NAMES, find_fp32_island_groups, name_nodes
from reconad.export.naming import artifact_name, artifact_stem
from reconad.export.ort_attention import ORT_CPU_RECIPE, fuse_attention
from reconad.runtime.atomic import temp_file_beside
from reconad.runtime.backends.ort import OrtBackend
from reconad.runtime.errors import ReconadError
from reconad.runtime.progress import Progress
from reconad.runtime.manifest import ANOMALY_MAP_NAME, GRAPH_TARGETS, INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, UNNAMED_CATEGORY, CategoryHead, ExporterInfo, Manifest, Precision, ScoreReducer, manifest_path_for, reference_path_for, sha256_file
from reconad.runtime.verify import CATEGORY_MARGIN_KEY, VerifyReport, compare_outputs

logger = logging.getLogger(__name__)

PRECISION_CHOICES = ("fp32", "fp16", "both", "int8")
MIN_OPSET = 17  # LayerNormalization is one op from 17 on
EXPORTER_OPSET = 18  # torch.onnx's dynamo exporter writes opset 18 at least; lower targets are converted
MAX_REFERENCE_IMAGES = 16  # from --reference-images DIR: evenly spaced over the sorted files
SYNTHETIC_REFERENCE_COUNT = 4
# Folding a constant subgraph may not blow a weight up beyond this (e.g. Expand to a large shape).
FOLD_MAX_GROWTH_BYTES = 1 << 20
FP16_RECIPE = (
    "FP16 weights and activations; FP32 islands (input normalisation, LayerNormalization, softmax logits, "
    "anomaly head, category head) behind explicit Casts; uint8 in, float32 and int64 out"
)


class ParityError(ReconadError):
    """The exported graph does not reproduce PyTorch within tolerance (nothing was written)."""

    exit_code = 1


def synthetic_reference_images(input_hw: tuple[int, int], count: int = SYNTHETIC_REFERENCE_COUNT) -> np.ndarray:
    """Deterministic uint8 [K, H, W, 3] RGB images: a smooth surface, the same with a dark blot, a
    striped texture and uniform noise, repeated with other seeds beyond four."""
    height, width = input_hw
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / max(height - 1, 1), xx / max(width - 1, 1)  # [H, W] in 0..1
    images = np.empty((count, height, width, 3), dtype=np.uint8)
    for index in range(count):
        rng = np.random.default_rng(index)
        tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        surface = (0.35 + 0.4 * xx + 0.2 * yy)[..., None] * tint * 255  # [H, W, 3]
        kind = index % 4
        if kind == 1:
            cy, cx, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.08, 0.15)
            blot = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2)[..., None]
            surface = np.where(blot, surface * 0.25, surface)
        elif kind == 2:
            surface = surface * (0.75 + 0.25 * np.sin(2 * np.pi * 8 * (xx + 0.5 * yy)))[..., None]
        elif kind == 3:
            surface = rng.uniform(0, 255, size=(height, width, 3))
        noise = rng.normal(0, 4, size=(height, width, 3))
        images[index] = np.clip(surface + noise, 0, 255).astype(np.uint8)
    return images


def load_reference_images(folder: str | os.PathLike, input_hw: tuple[int, int]) -> np.ndarray:
    """Up to ``MAX_REFERENCE_IMAGES`` image files of ``folder`` (evenly spaced, sorted), prepared
    exactly as the runtime prepares frames: uint8 [K, H, W, 3] RGB."""
    from reconad.runtime.frames import list_images, prepare_batch

    paths = list_images(folder)
    if not paths:
        raise ReconadError(f"Reference image folder {folder} holds no image files.")
    if len(paths) > MAX_REFERENCE_IMAGES:
        picks = np.linspace(0, len(paths) - 1, MAX_REFERENCE_IMAGES).round().astype(int)
        paths = [paths[i] for i in sorted(set(picks))]
    return prepare_batch(paths, input_hw)


def trace_to_onnx(detector: Any, max_batch: int, opset: int) -> onnx.ModelProto:
    """The detector as an fp32 ONNX graph with a dynamic batch axis (1..max_batch), folded and checked.

    torch.onnx's dynamo exporter (torch.export), because the TorchScript exporter is deprecated and
    writes the static SAME padding as dynamic Pad/Shape arithmetic. Its traps, handled here:
    an example batch of 1 is specialised into the graph, so the example has 2 images and the batch is
    a ``torch.export.Dim``; ``adaptive_avg_pool2d(x, 1)`` (EfficientNet's squeeze-excitation) is
    decomposed into mean + ``as_strided``, which becomes an index Gather, so it is translated as
    GlobalAveragePool instead; it writes opset 18 at least and its own down-conversion fails on Pad,
    so the graph is converted after optimisation (when Pad is fused into Conv and Split of weights folded),
    and the converter leaves opset 18's ``noop_with_empty_axes`` on ReduceMean (the cifar-32 score).
    """
    import torch
    from onnxscript import opset18

    from reconad.model.transformer import explicit_attention

    def global_average_pool(x: Any, output_size: Sequence[int]) -> Any:
        if list(output_size) != [1, 1]:
            raise NotImplementedError(f"adaptive_avg_pool2d to {output_size} is not in the fused graph")
        return opset18.GlobalAveragePool(x)

    height, width = detector.config.input_hw
    example_batch = 2 if max_batch > 1 else 1
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (example_batch, height, width, 3), dtype=torch.uint8, generator=generator)
    dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1, max=max_batch)}} if max_batch > 1 else None
    # explicit_attention: the graph keeps MatMul / Add / Softmax / MatMul, the form the islands are found on.
    quiet = _quiet_loggers("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
    with explicit_attention(detector), warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        program = torch.onnx.export(
            detector.eval(),
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=dynamic_shapes,
            opset_version=max(opset, EXPORTER_OPSET),
            dynamo=True,
            optimize=True,  # onnxscript's optimiser: constant folding, Pad and BatchNorm fused into Conv
            external_data=False,
            verbose=False,
            custom_translation_table={torch.ops.aten.adaptive_avg_pool2d.default: global_average_pool},
        )
    model = fold_constants(program.model_proto)
    if opset < EXPORTER_OPSET:
        model = onnx.version_converter.convert_version(model, opset)
        drop_reduce_noop_attribute(model)
    model = deduplicate_initializers(model)
    name_nodes(model)
    model.producer_name, model.producer_version = "reconad", reconad.__version__
    model.doc_string = f"reconad fused graph ({detector.config.preset}): uint8 images -> {', '.join(OUTPUT_NAMES)}"
    onnx.checker.check_model(model, full_check=True)
    return model


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace nodes whose inputs are all constant by initializers (the exporter's optimiser leaves
    Split and Transpose of weights in place), then drop unused initializers."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = {initializer.name: numpy_helper.to_array(initializer) for initializer in graph.initializer}
    outputs = {output.name for output in graph.output}
    kept, folded = [], []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        foldable = (
            node.domain in ("", "ai.onnx")
            and (inputs or node.op_type == "Constant")
            and all(name in known for name in inputs)
            and not set(node.output) & outputs
        )
        if foldable:
            values = _evaluate_node(ReferenceEvaluator, model, node, {name: known[name] for name in inputs})
            largest_input = max((known[name].nbytes for name in inputs), default=0)
            if all(v.nbytes <= max(2 * largest_input, FOLD_MAX_GROWTH_BYTES) for v in values):
                for name, value in zip(node.output, values):
                    known[name] = value
                    folded.append(numpy_helper.from_array(value, name))
                continue
        kept.append(node)
    used = {name for node in kept for name in node.input} | outputs
    initializers = [init for init in (*graph.initializer, *folded) if init.name in used]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model


def _evaluate_node(evaluator: Any, model: onnx.ModelProto, node: onnx.NodeProto, feeds: dict) -> list[np.ndarray]:
    inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
        for name, value in feeds.items()
    ]
    outputs = [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None) for name in node.output]
    single = helper.make_model(
        helper.make_graph([node], "fold", inputs, outputs), opset_imports=list(model.opset_import)
    )
    return [np.asarray(value) for value in evaluator(single).run(None, feeds)]


# Reduce ops that gained ``noop_with_empty_axes`` in opset 18 (ReduceSum had it since 13).
_REDUCE_OPS_18 = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                  "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


def drop_reduce_noop_attribute(model: onnx.ModelProto) -> None:
    """Remove ``noop_with_empty_axes=0`` (the default) that onnx's 18 -> 17 converter leaves on Reduce ops,
    where opset 17 does not know it."""
    for node in model.graph.node:
        if node.op_type in _REDUCE_OPS_18:
            kept = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(kept)


def deduplicate_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep one copy of byte-identical initializers (one neighbour mask, however the exporter copied it)."""
    graph = model.graph
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for initializer in graph.initializer:
        array = numpy_helper.to_array(initializer)
        key = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        if key in first:
            rename[initializer.name] = first[key]
        else:
            first[key] = initializer.name
    if rename:
        for node in graph.node:
            node.input[:] = [rename.get(name, name) for name in node.input]
        unique = [init for init in graph.initializer if init.name not in rename]
        del graph.initializer[:]
        graph.initializer.extend(unique)
    return model


def run_onnx(model: onnx.ModelProto, images: np.ndarray, max_batch: int) -> dict[str, np.ndarray]:
    """The graph on the runtime's own ONNX Runtime backend (CPU), in chunks of at most ``max_batch``."""
    with OrtBackend(model.SerializeToString(), "ort-cpu", max_batch=max_batch, memory_arena=True) as backend:
        return backend.infer(images)


def run_torch(detector: Any, images: np.ndarray, max_batch: int) -> dict[str, np.ndarray]:
    """The PyTorch reference outputs for ``images`` (every graph output), in chunks of at most ``max_batch``."""
    import torch

    pieces: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    with torch.inference_mode():
        for start in range(0, len(images), max_batch):
            outputs = detector(torch.from_numpy(images[start : start + max_batch]))
            for name, value in zip(OUTPUT_NAMES, outputs, strict=True):
                pieces[name].append(value.numpy())
    return {name: np.concatenate(values) for name, values in pieces.items()}


def category_margins(detector: Any, images: np.ndarray, max_batch: int) -> np.ndarray:
    """Per image, the second-nearest centroid's cosine distance minus the nearest's (PyTorch), float32 [K].

    ``verify`` forgives a different ``category`` only where this margin is within its tolerance (a near
    tie); +inf with fewer than two centroids, where no tie is possible.
    """
    import torch

    if len(detector.category_centroids) < 2:
        return np.full(len(images), np.inf, np.float32)
    margins = []
    with torch.inference_mode():
        for start in range(0, len(images), max_batch):
            features = detector.extract_features(torch.from_numpy(images[start : start + max_batch]))
            distance = 1.0 - detector.pooled_features(features) @ detector.category_centroids.T  # [B, K]
            nearest_two = distance.topk(2, dim=1, largest=False).values  # [B, 2]
            margins.append((nearest_two[:, 1] - nearest_two[:, 0]).numpy())
    return np.concatenate(margins).astype(np.float32)


def category_head_for(detector: Any, data_source: str | None = None) -> CategoryHead:
    """The manifest's description of the detector's category head (``"none"`` without centroids)."""
    from reconad.model import category_names

    names = category_names(detector)
    if not names:
        return CategoryHead(method="none", names=(UNNAMED_CATEGORY,))
    head = detector.provenance.get("category_head") or {}
    counts = head.get("n_images") if isinstance(head.get("n_images"), list) else []
    separation: tuple[float, ...] = ()
    if len(names) > 1:
        centroids = detector.category_centroids.detach().double()
        distance = 1.0 - centroids @ centroids.T  # [K, K]
        distance.fill_diagonal_(float("inf"))
        separation = tuple(round(float(value), 6) for value in distance.min(dim=1).values)
    return CategoryHead(
        method="nearest_centroid",
        names=names,
        n_images=tuple(int(count) for count in counts) if len(counts) == len(names) else (),
        separation=separation,
        source=str(head.get("source") or data_source or ""),
    )


def check_parity(
    model: onnx.ModelProto,
    images: np.ndarray,
    reference: dict[str, np.ndarray],
    precision: str,
    max_batch: int,
    label: str | None = None,
    check_batch_axis: bool = True,
    count_flips: bool = True,
) -> VerifyReport:
    """Run ``model`` on ONNX Runtime and compare with ``reference`` under ``recon-export verify``'s
    tolerances for ``precision``; with ``check_batch_axis`` the first image also runs alone, so a batch
    axis baked to one size fails here. Without ``count_flips``, decision flips (at verify's proxy
    threshold, the reference median: export has no calibrated threshold) are logged, not failed.

    Raises:
        ParityError: over tolerance.
    """
    label = label or f"{precision} ONNX graph"
    outputs = run_onnx(model, images, max_batch)
    report = compare_outputs(outputs, {"images": images, **reference}, precision=precision, threshold=None, artifact=label)
    failures = list(report.failures)
    if not count_flips and report.decision_flips:
        failures = [failure for failure in failures if "decision flip" not in failure]
        logger.warning("%s: %d decision flip(s) at the reference median (not failed)", label, report.decision_flips)
    if check_batch_axis and len(images) > 1:
        single = run_onnx(model, images[:1], 1)
        batch_gap = float(np.abs(single[ANOMALY_MAP_NAME] - outputs[ANOMALY_MAP_NAME][:1]).max())
        if not batch_gap <= 1e-4 * report.map_scale:
            failures.append(f"batch 1 and batch {min(len(images), max_batch)} differ by {batch_gap:.3g} on the map")
    if failures:
        raise ParityError(f"The {label} does not match PyTorch ({'; '.join(failures)}), so nothing was written.")
    logger.info(
        "%s vs PyTorch: map max abs %.3g, p99 abs %.3g (map range %.3g), score max abs %.3g, %d decision flips; "
        "category_distance max abs %.3g, %d category mismatches (%d near ties)",
        label,
        report.anomaly_map.max_abs,
        report.anomaly_map.p99_abs,
        float(np.ptp(reference[ANOMALY_MAP_NAME])),
        report.image_score.max_abs,
        report.decision_flips,
        report.category_distance.max_abs if report.category_distance else float("nan"),
        report.category_mismatches,
        report.category_near_ties,
    )
    return report


def build_manifest(
    detector: Any, onnx_file: str, precision: str, max_batch: int, opset: int, checkpoint_sha256: str,
    islands: tuple[str, ...], calibration: Any = None, target: str = "tensorrt",
) -> Manifest:
    import torch

    from reconad.model import PRESETS

    config = detector.config
    if config.score_reducer == "mean":
        reducer = ScoreReducer(method="mean")
    else:
        reducer = ScoreReducer(method=config.score_reducer, kernel_size=config.score_pool_size, stride=1)
    if precision == "int8":
        from reconad.export.int8 import INT8_RECIPE

        recipe = Precision(mode="int8", fp32_islands=islands, description=INT8_RECIPE, calibration=calibration)
    elif precision == "fp16":
        recipe = Precision(mode="fp16", fp32_islands=islands, description=FP16_RECIPE)
    else:
        description = ORT_CPU_RECIPE if target == "ort-cpu" else "float32 throughout; uint8 in, float32 out"
        recipe = Precision(mode="fp32", description=description)
    categories = detector.provenance.get("categories", ())
    return Manifest.for_onnx(
        onnx_file=onnx_file,
        model_config=config.to_dict(),
        input_hw=config.input_hw,
        max_batch=max_batch,
        dynamic_batch=max_batch > 1,
        score_reducer=reducer,
        precision=recipe,
        exporter=ExporterInfo(
            reconad_version=reconad.__version__,
            torch_version=torch.__version__,
            onnx_version=onnx.__version__,
            opset=opset,
        ),
        target=target,
        preset=config.preset if PRESETS.get(config.preset) == config else None,
        categories=tuple(str(c) for c in categories) if isinstance(categories, (list, tuple)) else (),
        category_head=category_head_for(detector),
        checkpoint_sha256=checkpoint_sha256,
    )


def check_no_calibration(manifest_path: Path) -> None:
    """Refuse to replace ``manifest_path`` when it holds a calibration (or cannot be read to tell)."""
    if not manifest_path.exists():
        return
    try:
        existing = Manifest.load(manifest_path)
    except ReconadError:
        raise ReconadError(
            f"{manifest_path} exists and is not a manifest this reconad reads; pass --overwrite to replace it."
        ) from None
    points = {"global": existing.global_operating_point, **existing.category_thresholds}
    calibrated = {name: point for name, point in points.items() if not point.is_empty}
    if calibrated:
        first = next(iter(calibrated.values()))
        raise ReconadError(
            f"{manifest_path} holds a calibration ({', '.join(calibrated)}; {first.describe()}), which a new export "
            "would discard: pass --overwrite to replace it, or export into another folder."
        )


def embed_manifest(model: onnx.ModelProto, manifest: Manifest) -> bytes:
    """The serialized model with the manifest (without its own hash) in ``metadata_props``."""
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_KEY: manifest.embedded_copy().to_json()})
    return model.SerializeToString()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_files_atomically(contents: dict[Path, bytes]) -> list[Path]:
    """Write every file to a temp file beside it first, then rename them all into place; on any error
    the temp files are removed, so an interrupted export leaves no partial file."""
    temps: dict[Path, Path] = {}
    try:
        for path in {path.parent for path in contents}:
            path.mkdir(parents=True, exist_ok=True)
        for path, data in contents.items():
            temps[path] = temp = temp_file_beside(path)
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for path, temp in temps.items():
            os.replace(temp, path)
    except OSError as error:
        raise ReconadError(f"Cannot write {error.filename or 'the artifacts'}: {error.strerror or type(error).__name__}.") from None
    finally:
        for temp in temps.values():
            Path(temp).unlink(missing_ok=True)
    return list(contents)


def export_onnx(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    max_batch: int = 8,
    opset: int = MIN_OPSET,
    reference_images: str | os.PathLike | None = None,
    overwrite: bool = False,
    int8: Any = None,
    target: str = "tensorrt",
) -> list[Path]:
    """Export a checkpoint to the fused ONNX graph(s) with manifests and reference outputs.

    Writes, for each precision P asked (``"both"`` = fp32 and fp16), ``<stem>-<H>x<W>-P.onnx`` (the
    manifest also in its ``metadata_props``), ``<stem>-<H>x<W>-P.json`` and
    ``<stem>-<H>x<W>-P.reference.npz`` (``images`` uint8 [K, H, W, 3] and the PyTorch ``anomaly_map``
    [K, 1, H, W], ``image_score`` [K], ``category`` int64 [K], ``category_distance`` [K] for them, and
    ``category_margin`` [K], the gap to the second-nearest centroid; the same content for both
    precisions). ``stem`` comes from ``artifact_stem``. Nothing is written unless the fp32 graph matches
    PyTorch and the fp16 graph passes the fp16 tolerances of ``recon-export verify``, both as ONNX
    Runtime runs it and with FP16 storage emulated (``emulate_fp16_storage``). A manifest already in
    ``out_dir`` that holds a calibration is never replaced without ``overwrite``.

    Args:
        checkpoint: a ``reconad.model`` checkpoint.
        out_dir: created if missing.
        precision: ``"fp32"``, ``"fp16"`` or ``"both"``.
        max_batch: the batch axis accepts 1..max_batch (1 gives a static batch of 1).
        opset: ONNX opset, at least 17.
        reference_images: a folder of images for the reference set; default 4 synthetic images.
        overwrite: replace manifests in ``out_dir`` that hold a calibration (thresholds calibrated
            for the old graph; the new graph's scores need a new calibration).
        int8: for ``precision="int8"``, an ``export.int8_checks.Int8Options`` (calibration images,
            method, evaluation data); the int8 graph must also pass ``int8_checks.check_int8_graph``.
        target: ``"tensorrt"`` (the portable graph every backend runs and every engine is built from) or
            ``"ort-cpu"`` (fp32 only: that graph with attention as ONNX Runtime's MultiHeadAttention,
            ``export.ort_attention``, held to the same fp32 parity; written as ``...-fp32-ort-cpu.onnx``).

    Returns:
        The paths written.

    Raises:
        ReconadError: bad arguments or checkpoint; ``ParityError`` (exit code 1) when a graph is over tolerance.
    """
    if precision not in PRECISION_CHOICES:
        raise ReconadError(f"Precision must be one of {list(PRECISION_CHOICES)}, got {precision!r}.")
    if max_batch < 1:
        raise ReconadError(f"max_batch must be at least 1, got {max_batch}.")
    if (precision == "int8") != (int8 is not None):
        raise ReconadError("An int8 export needs --calibration-images and --evaluation-data, and only an int8 export takes them.")
    if opset < MIN_OPSET:
        raise ReconadError(f"Opset {opset} is too old: the graph needs opset {MIN_OPSET} or later (LayerNormalization).")
    if target not in GRAPH_TARGETS:
        raise ReconadError(f"Target must be one of {list(GRAPH_TARGETS)}, got {target!r}.")
    if target == "ort-cpu" and precision != "fp32":
        raise ReconadError(f"The ort-cpu target is an fp32 graph only (ONNX Runtime's fused attention on CPU), not {precision}: "
                           "export it with --precision fp32.")
    from reconad.model import load_detector

    detector = load_detector(checkpoint)
    config = detector.config
    images = (
        synthetic_reference_images(config.input_hw)
        if reference_images is None
        else load_reference_images(reference_images, config.input_hw)
    )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReconadError(f"Output folder {out_dir} is a file.")
    stem = artifact_stem(checkpoint, detector.provenance)
    wanted = ("fp32", "fp16") if precision == "both" else (precision,)
    if not overwrite:
        for mode in wanted:
            check_no_calibration(manifest_path_for(out_dir / artifact_name(stem, config.input_hw, mode, target)))

    logger.info("exporting %s (%s, %dx%d) with opset %d", checkpoint, config.preset, *config.input_hw, opset)
    steps = 3 + (3 if precision in ("fp16", "both") else 0) + (1 if precision == "int8" or target == "ort-cpu" else 0)
    with Progress("exporting", steps, unit="steps") as progress, progress.heartbeat():
        progress.advance(0, step="trace")
        fp32_model = trace_to_onnx(detector, max_batch, opset)
        progress.advance(1, step="PyTorch reference")
        reference = run_torch(detector, images, max_batch)
        graphs = {"fp32": fp32_model}
        reference = {**reference, CATEGORY_MARGIN_KEY: category_margins(detector, images, max_batch)}
        progress.advance(1, step="fp32 parity")
        check_parity(fp32_model, images, reference, "fp32", max_batch)
        progress.advance(1)
        if target == "ort-cpu":  # the same parity, on the graph that is written
            progress.advance(0, step="fused attention parity")
            graphs["fp32"] = fuse_attention(fp32_model)
            check_parity(graphs["fp32"], images, reference, "fp32", max_batch, "fp32 ort-cpu graph (fused attention)")
            progress.advance(1)
        islands: tuple[str, ...] = ()
        if precision in ("fp16", "both"):
            progress.advance(0, step="fp16 conversion")
            groups = find_fp32_island_groups(fp32_model)
            islands = tuple(name for name in ISLAND_NAMES if groups[name])
            graphs["fp16"] = convert_to_fp16(fp32_model)
            progress.advance(1, step="fp16 parity")
            check_parity(graphs["fp16"], images, reference, "fp16", max_batch)
            # ONNX Runtime's CPU run skips most FP16 rounding (see emulate_fp16_storage); this one does not.
            # It is the pessimistic bound: its flips at a proxy threshold between near-equal scores are
            # reported, while the artifact's own run above must have none.
            progress.advance(1, step="fp16 storage emulated")
            emulated = emulate_fp16_storage(graphs["fp16"])
            label = "fp16 graph with FP16 storage emulated"
            check_parity(emulated, images, reference, "fp16", max_batch, label, check_batch_axis=False, count_flips=False)
            progress.advance(1)
        calibration = None
        if precision == "int8":
            from reconad.export.int8_checks import build_checked_int8_graph

            progress.advance(0, step="int8 calibration and checks")
            groups = find_fp32_island_groups(fp32_model)
            islands = tuple(name for name in ISLAND_NAMES if groups[name])
            graphs["int8"], calibration = build_checked_int8_graph(fp32_model, images, reference, max_batch, config, int8)
            progress.advance(1)
    checkpoint_sha256 = sha256_file(checkpoint)
    reference_npz = npz_bytes(images=images, **reference)
    contents: dict[Path, bytes] = {}
    for mode in wanted:
        onnx_path = out_dir / artifact_name(stem, config.input_hw, mode, target)
        manifest = build_manifest(detector, onnx_path.name, mode, max_batch, opset, checkpoint_sha256, islands,
                                  calibration, target)
        model_bytes = embed_manifest(graphs[mode], manifest)
        manifest = dataclasses.replace(manifest, onnx_sha256=hashlib.sha256(model_bytes).hexdigest())
        contents[onnx_path] = model_bytes
        contents[reference_path_for(onnx_path)] = reference_npz
        contents[manifest_path_for(onnx_path)] = manifest.to_json().encode("utf-8")
    return write_files_atomically(contents)


class _quiet_loggers:
    """Raise the given loggers to ERROR for a block (the exporter logs progress and optional-op notes)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(name) for name in names]
        self.levels: list[int] = []

    def __enter__(self) -> None:
        self.levels = [log.level for log in self.loggers]
        for log in self.loggers:
            log.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for log, level in zip(self.loggers, self.levels):
            log.setLevel(level)
