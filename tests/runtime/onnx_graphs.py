"""Tiny ONNX graphs obeying the fused-graph contract, for runtime tests that must not need torch.

``anomaly_map = mean over RGB of the cast input * scale + offset`` [N, 1, H, W];
``image_score = max of anomaly_map`` [N]. ``expected_outputs`` computes the same in numpy.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from reconad.runtime.manifest import ANOMALY_MAP_NAME, IMAGE_SCORE_NAME, INPUT_NAME, METADATA_KEY, ExporterInfo, Manifest, Precision, ScoreReducer, manifest_path_for, reference_path_for

SCALE = 1.0 / 255.0


def build_graph(input_hw=(16, 16), batch: int | None = None, scale=SCALE, offset=0.0, opset=17) -> onnx.ModelProto:
    """The contract graph; ``batch`` None gives a dynamic batch axis named N."""
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
    graph = helper.make_graph(
        nodes,
        "contract",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [batch_dim, height, width, 3])],
        [
            helper.make_tensor_value_info(ANOMALY_MAP_NAME, TensorProto.FLOAT, [batch_dim, 1, height, width]),
            helper.make_tensor_value_info(IMAGE_SCORE_NAME, TensorProto.FLOAT, [batch_dim]),
        ],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
            helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def expected_outputs(images: np.ndarray, scale=SCALE, offset=0.0) -> dict[str, np.ndarray]:
    anomaly_map = (images.astype(np.float32).mean(axis=3) * np.float32(scale) + np.float32(offset))[:, None]
    return {ANOMALY_MAP_NAME: anomaly_map, IMAGE_SCORE_NAME: anomaly_map.max(axis=(1, 2, 3))}


def make_manifest(onnx_file: str, input_hw=(16, 16), max_batch=4, dynamic_batch=True, precision="fp32", **extra) -> Manifest:
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
        categories=("synthetic",),
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
    **manifest_extra,
) -> Path:
    """Write a contract graph + its stamped manifest (and a reference npz when images are given)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    manifest = make_manifest(name, input_hw, max_batch, dynamic_batch, **manifest_extra)
    model = build_graph(input_hw, batch=None if dynamic_batch else max_batch, offset=graph_offset)
    if embed:
        helper.set_model_props(model, {METADATA_KEY: manifest.embedded_copy().to_json()})
    onnx.save(model, path)
    if sidecar:
        manifest.stamp_artifact(path).save(manifest_path_for(path))
    if reference_images is not None:
        np.savez(reference_path_for(path), images=reference_images, **expected_outputs(reference_images))
    return path


def random_images(count: int, input_hw=(16, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, *input_hw, 3), dtype=np.uint8)
