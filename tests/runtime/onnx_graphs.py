"""Tiny ONNX graphs obeying the fused-graph contract, for runtime tests that must not need torch.

``anomaly_map = mean over RGB of the cast input * scale + offset`` [N, 1, H, W];
``image_score = max of anomaly_map`` [N]; the category head is a nearest centroid of the image's mean
colour, L2-normalised, among ``CENTROIDS`` (pure red, green, blue: ``CATEGORIES``): ``category`` int64 [N]
and ``category_distance`` (1 - cosine similarity) [N]. ``expected_outputs`` computes the same in numpy.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_NAME, IMAGE_SCORE_NAME, INPUT_NAME, METADATA_KEY, CategoryHead, ExporterInfo, Manifest, Precision, ScoreReducer, manifest_path_for, reference_path_for
from reconad.runtime.verify import CATEGORY_MARGIN_KEY

SCALE = 1.0 / 255.0
CATEGORIES = ("red", "green", "blue")
CENTROIDS = np.eye(3, dtype=np.float32)  # [K, 3]: one per category, L2-normalised
HEAD = CategoryHead(method="nearest_centroid", names=CATEGORIES, n_images=(4, 4, 4), separation=(1.0, 1.0, 1.0))


def colour_images(colours, input_hw=(16, 16), noise=0, seed=0) -> np.ndarray:
    """uint8 [N, H, W, 3] images of flat RGB ``colours`` (plus uniform noise of +-``noise``)."""
    rng = np.random.default_rng(seed)
    images = np.empty((len(colours), *input_hw, 3), np.uint8)
    for index, colour in enumerate(colours):
        jitter = rng.integers(-noise, noise + 1, size=(*input_hw, 3)) if noise else 0
        images[index] = np.clip(np.asarray(colour)[None, None, :] + jitter, 0, 255)
    return images


def build_graph(
    input_hw=(16, 16), batch: int | None = None, scale=SCALE, offset=0.0, opset=17, with_category=True
) -> onnx.ModelProto:
    """The contract graph; ``batch`` None gives a dynamic batch axis named N; ``with_category`` False gives
    a graph as exported before schema 2 (no category outputs)."""
    height, width = input_hw
    batch_dim = "N" if batch is None else batch
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[3], keepdims=1),  # [N, H, W, 1]
        helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["shifted"]),
        helper.make_node("Transpose", ["shifted"], [ANOMALY_MAP_NAME], perm=[0, 3, 1, 2]),  # [N, 1, H, W]
        helper.make_node("ReduceMax", [ANOMALY_MAP_NAME], [IMAGE_SCORE_NAME], axes=[1, 2, 3], keepdims=0),
    ]
    outputs = [
        helper.make_tensor_value_info(ANOMALY_MAP_NAME, TensorProto.FLOAT, [batch_dim, 1, height, width]),
        helper.make_tensor_value_info(IMAGE_SCORE_NAME, TensorProto.FLOAT, [batch_dim]),
    ]
    initializers = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]),
    ]
    if with_category:
        nodes += [
            helper.make_node("ReduceMean", ["pixels"], ["colour"], axes=[1, 2], keepdims=0),  # [N, 3]
            helper.make_node("ReduceL2", ["colour"], ["length"], axes=[1], keepdims=1),  # [N, 1]
            helper.make_node("Max", ["length", "epsilon"], ["safe_length"]),
            helper.make_node("Div", ["colour", "safe_length"], ["direction"]),
            helper.make_node("MatMul", ["direction", "centroids_t"], ["similarity"]),  # [N, K]
            helper.make_node("Sub", ["one", "similarity"], ["distances"]),
            helper.make_node("ArgMin", ["distances"], [CATEGORY_NAME], axis=1, keepdims=0),
            helper.make_node("ReduceMin", ["distances"], [CATEGORY_DISTANCE_NAME], axes=[1], keepdims=0),
        ]
        outputs += [
            helper.make_tensor_value_info(CATEGORY_NAME, TensorProto.INT64, [batch_dim]),
            helper.make_tensor_value_info(CATEGORY_DISTANCE_NAME, TensorProto.FLOAT, [batch_dim]),
        ]
        initializers += [
            helper.make_tensor("epsilon", TensorProto.FLOAT, [], [1e-6]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
            helper.make_tensor("centroids_t", TensorProto.FLOAT, [3, len(CENTROIDS)], CENTROIDS.T.ravel().tolist()),
        ]
    graph = helper.make_graph(
        nodes,
        "contract",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [batch_dim, height, width, 3])],
        outputs,
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def expected_outputs(images: np.ndarray, scale=SCALE, offset=0.0, with_category=True) -> dict[str, np.ndarray]:
    """The graph's outputs in numpy; with the category outputs also the reference's ``category_margin``."""
    pixels = images.astype(np.float32)
    anomaly_map = (pixels.mean(axis=3) * np.float32(scale) + np.float32(offset))[:, None]
    outputs = {ANOMALY_MAP_NAME: anomaly_map, IMAGE_SCORE_NAME: anomaly_map.max(axis=(1, 2, 3))}
    if with_category:
        colour = pixels.mean(axis=(1, 2))  # [N, 3]
        direction = colour / np.maximum(np.linalg.norm(colour, axis=1, keepdims=True), 1e-6)
        distances = 1.0 - direction @ CENTROIDS.T  # [N, K]
        nearest = np.sort(distances, axis=1)
        outputs[CATEGORY_NAME] = distances.argmin(axis=1).astype(np.int64)
        outputs[CATEGORY_DISTANCE_NAME] = nearest[:, 0].astype(np.float32)
        outputs[CATEGORY_MARGIN_KEY] = (nearest[:, 1] - nearest[:, 0]).astype(np.float32)
    return outputs


def make_manifest(
    onnx_file: str, input_hw=(16, 16), max_batch=4, dynamic_batch=True, precision="fp32", category_head=HEAD, **extra
) -> Manifest:
    """The manifest of ``build_graph``; ``category_head=None`` for a graph without category outputs."""
    return Manifest.for_onnx(
        onnx_file=onnx_file,
        model_config={"input_hw": list(input_hw), "d_model": 32},
        input_hw=input_hw,
        max_batch=max_batch,
        dynamic_batch=dynamic_batch,
        score_reducer=ScoreReducer(method="max_avgpool", kernel_size=1, stride=1),
        precision=Precision(mode=precision),
        exporter=ExporterInfo(reconad_version="0.1.0", opset=17),
        preset=None,
        categories=CATEGORIES,
        category_head=category_head,
        **extra,
    )


def write_artifact(
    folder: Path,
    name="model.onnx",
    input_hw=(16, 16),
    max_batch=4,
    dynamic_batch=True,
    sidecar=True,
    embed=True,
    reference_images: np.ndarray | None = None,
    graph_offset=0.0,
    with_category=True,
    **manifest_extra,
) -> Path:
    """Write a contract graph + its stamped manifest (and a reference npz when images are given)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not with_category:
        manifest_extra["category_head"] = None
    manifest = make_manifest(name, input_hw, max_batch, dynamic_batch, **manifest_extra)
    model = build_graph(input_hw, batch=None if dynamic_batch else max_batch, offset=graph_offset, with_category=with_category)
    if embed:
        helper.set_model_props(model, {METADATA_KEY: manifest.embedded_copy().to_json()})
    onnx.save(model, path)
    if sidecar:
        manifest.stamp_artifact(path).save(manifest_path_for(path))
    if reference_images is not None:
        np.savez(reference_path_for(path), images=reference_images, **expected_outputs(reference_images, with_category=with_category))
    return path


def random_images(count: int, input_hw=(16, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, *input_hw, 3), dtype=np.uint8)
