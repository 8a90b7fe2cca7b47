"""A miniature fused graph for the engine tests: its ONNX model, the layers TensorRT 8.6's parser would
make of it (named layers per node, unnamed constants, ``(Unnamed Layer* N) [Normalization]`` for
LayerNormalization, a TopK for ArgMin: INT32 indices on 8.x, cast to INT64 on 10.x) or 8.5's of the
graph with LayerNormalization decomposed, and hand-written engine-inspector JSON in the 8.x/10.x format."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from reconad.export.precision_check import NetworkLayer
from reconad.export.layernorm import decompose_layer_norm
from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_NAME, IMAGE_SCORE_NAME, INPUT_NAME

# (name, op, inputs, outputs, attributes) of a miniature fused graph: normalisation, a conv, one
# attention with LayerNorm, a reconstruction, the anomaly head and the category head.
NODES = [
    ("to_nchw", "Transpose", [INPUT_NAME], ["x_u8"], {"perm": [0, 3, 1, 2]}),
    ("cast", "Cast", ["x_u8"], ["x_f"], {"to": TensorProto.FLOAT}),
    ("sub_mean", "Sub", ["x_f", "mean"], ["x_c"], {}),
    ("div_std", "Div", ["x_c", "std"], ["x_n"], {}),
    ("conv", "Conv", ["x_n", "conv_w"], ["feat"], {}),
    ("flatten", "Reshape", ["feat", "token_shape"], ["feat_t"], {}),
    ("to_tokens", "Transpose", ["feat_t"], ["tokens"], {"perm": [0, 2, 1]}),
    ("norm", "LayerNormalization", ["tokens", "ln_scale", "ln_bias"], ["normed"], {"axis": -1}),
    ("keys_t", "Transpose", ["normed"], ["keys"], {"perm": [0, 2, 1]}),
    ("qk", "MatMul", ["normed", "keys"], ["logits"], {}),
    ("scale", "Mul", ["logits", "half"], ["scaled"], {}),
    ("mask", "Add", ["scaled", "neighbour_mask"], ["masked"], {}),
    ("softmax", "Softmax", ["masked"], ["attention"], {"axis": -1}),
    ("context", "MatMul", ["attention", "normed"], ["context_out"], {}),
    ("reconstruct", "MatMul", ["context_out", "rec_w"], ["reconstruction"], {}),
    ("difference", "Sub", ["tokens", "reconstruction"], ["diff"], {}),
    ("square", "Mul", ["diff", "diff"], ["squared"], {}),
    ("channel_sum", "ReduceSum", ["squared", "sum_axes"], ["summed"], {"keepdims": 0}),
    ("root", "Sqrt", ["summed"], ["distance"], {}),
    ("to_map", "Reshape", ["distance", "map_shape"], [ANOMALY_MAP_NAME], {}),
    ("pool", "AveragePool", [ANOMALY_MAP_NAME], ["pooled"], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("score", "ReduceMax", ["pooled"], [IMAGE_SCORE_NAME], {"axes": [1, 2, 3], "keepdims": 0}),
    ("pool_features", "ReduceMean", ["feat"], ["pooled_features"], {"axes": [2, 3], "keepdims": 0}),  # [N, 4]
    ("feature_norm", "ReduceL2", ["pooled_features"], ["feature_length"], {"axes": [1], "keepdims": 1}),
    ("unit_features", "Div", ["pooled_features", "feature_length"], ["unit"], {}),
    ("similarity", "MatMul", ["unit", "centroids_t"], ["similarities"], {}),  # [N, 2]
    ("to_distance", "Sub", ["one", "similarities"], ["distances"], {}),
    ("nearest", "ArgMin", ["distances"], [CATEGORY_NAME], {"axis": 1, "keepdims": 0}),
    ("nearest_distance", "ReduceMin", ["distances"], [CATEGORY_DISTANCE_NAME], {"axes": [1], "keepdims": 0}),
]
CATEGORY_HEAD_NODES = {"pool_features", "feature_norm", "unit_features", "similarity", "to_distance", "nearest",
                       "nearest_distance"}  # fmt: skip
ISLANDS = {
    "cast", "sub_mean", "div_std",  # input normalisation
    "norm",  # LayerNormalization
    "qk", "scale", "mask", "softmax",  # softmax logits
    "difference", "square", "channel_sum", "root", "to_map", "pool", "score",  # anomaly head
} | CATEGORY_HEAD_NODES  # fmt: skip
# What the LayerNormalization "norm" becomes for TensorRT 8.5 (export.layernorm), with the layer types
# 8.5's parser makes of each node.
NORM_STEPS = {
    "norm/mean": "REDUCE", "norm/centered": "ELEMENTWISE", "norm/squared": "ELEMENTWISE", "norm/variance": "REDUCE",
    "norm/variance_eps": "ELEMENTWISE", "norm/std": "UNARY", "norm/normalized": "ELEMENTWISE",
    "norm/scaled": "ELEMENTWISE", "norm/shifted": "ELEMENTWISE",
}  # fmt: skip


def build_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {
        "mean": np.full((1, 3, 1, 1), 120.0, np.float32),
        "std": np.full((1, 3, 1, 1), 60.0, np.float32),
        "conv_w": rng.standard_normal((4, 3, 1, 1)).astype(np.float32),
        "token_shape": np.array([0, 4, 64], np.int64),
        "ln_scale": np.ones(4, np.float32),
        "ln_bias": np.zeros(4, np.float32),
        "half": np.array(0.5, np.float32),
        "neighbour_mask": np.zeros((64, 64), np.float32),
        "rec_w": rng.standard_normal((4, 4)).astype(np.float32),
        "sum_axes": np.array([2], np.int64),
        "map_shape": np.array([-1, 1, 8, 8], np.int64),
        "centroids_t": np.array([[1, 0], [0, 1], [0, 0], [0, 0]], np.float32),  # [C, K]
        "one": np.array(1.0, np.float32),
    }
    nodes = [helper.make_node(op, inputs, outputs, name=name, **attrs) for name, op, inputs, outputs, attrs in NODES]
    graph = helper.make_graph(
        nodes,
        "mini",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", 8, 8, 3])],
        [
            helper.make_tensor_value_info(ANOMALY_MAP_NAME, TensorProto.FLOAT, ["N", 1, 8, 8]),
            helper.make_tensor_value_info(IMAGE_SCORE_NAME, TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info(CATEGORY_NAME, TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info(CATEGORY_DISTANCE_NAME, TensorProto.FLOAT, ["N"]),
        ],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def parsed_network(
    strongly_typed_fp16: bool = False, decomposed_layer_norm: bool = False, category_dtype: str = "INT32"
) -> list[NetworkLayer]:
    """Layers as TensorRT 8.6's parser adds them: constants first, then the node's own layer(s).

    With ``strongly_typed_fp16`` the float layers outside the islands are HALF, as when the fp16
    graph is parsed strongly typed. With ``decomposed_layer_norm``, "norm" is the nodes
    ``decompose_layer_norm`` makes of it, as TensorRT 8.5 parses that graph (a named layer per node,
    an unnamed constant before each that reads a weight). ArgMin is a TopK layer whose INT32 indices
    are the output (8.x), or, with ``category_dtype="INT64"`` (10.x), cast to INT64 by one more layer.
    """
    layers: list[NetworkLayer] = []
    node = None
    steps = [step for step in decompose_layer_norm(build_model()).graph.node if step.name in NORM_STEPS]

    def add(name, type_name, outputs, dtypes, metadata=""):
        if strongly_typed_fp16 and node not in ISLANDS:
            dtypes = ["HALF" if dtype == "FLOAT" else dtype for dtype in dtypes]
        layers.append(NetworkLayer(len(layers), name, type_name, tuple(outputs), tuple(dtypes), metadata))

    def unnamed(type_name):
        return f"(Unnamed Layer* {len(layers)}) [{type_name}]"

    weights = {initializer.name for initializer in build_model().graph.initializer}
    for name, op, inputs, outputs, _ in NODES:
        node = name
        if op in ("Sub", "Div", "Mul", "Add") and set(inputs) & weights:
            constant = unnamed("Constant")
            add(constant, "CONSTANT", [f"{constant}_output"], ["FLOAT"])
        if name == "norm" and decomposed_layer_norm:
            for step in steps:
                if any(tensor.startswith("ln_") or tensor.endswith("/epsilon") for tensor in step.input):
                    constant = unnamed("Constant")
                    add(constant, "CONSTANT", [f"{constant}_output"], ["FLOAT"])
                add(step.name, NORM_STEPS[step.name], step.output, ["FLOAT"])
            continue
        if name == "norm":  # 8.6's LayerNormalization importer does not name its layer
            for _ in range(2):
                constant = unnamed("Constant")
                add(constant, "CONSTANT", [f"{constant}_output"], ["FLOAT"])
            add(unnamed("Normalization"), "NORMALIZATION", outputs, ["FLOAT"])
            continue
        if name == "channel_sum":  # shape arithmetic inside an island node: nothing to constrain
            shape = unnamed("Shape")
            add(shape, "SHAPE", [f"{shape}_output"], ["INT32"])
        if name == "to_nchw":
            add(name, "SHUFFLE", outputs, ["UINT8"])
            continue
        if op == "ArgMin":
            indices = outputs[0] if category_dtype == "INT32" else f"{unnamed('TopK')}_indices"
            add(name, "TOPK", [f"{name}_values", indices], ["FLOAT", "INT32"])
            if category_dtype != "INT32":
                add(unnamed("Cast"), "CAST", outputs, [category_dtype])
            continue
        metadata = f"[ONNX Layer: {name}]" if name == "pool" else ""  # 8.6+ parsers attach metadata
        add(name if name != "pool" else unnamed("Pooling"), op.upper(), outputs, ["FLOAT"], metadata)
    return layers


def tensor(name, text, key="Format/Datatype"):
    return {"Name": name, "Location": "Device", "Dimensions": [1, 4, 8, 8], key: text}


FP16 = "Channel major FP16 format where channel % 8 == 0"
FP32 = "Row major linear FP32"


def engine_json(
    softmax_format=FP32,
    conv_format=FP16,
    weights="Half",
    extra_layers=(),
    decomposed_layer_norm=False,
    norm_format=FP32,
):
    """An 8.6-style weakly typed FP16 engine of the mini graph (islands fused among themselves).

    With ``decomposed_layer_norm`` (TensorRT 8.5) the normalisation is the decomposed nodes, fused
    into reductions and pointwise layers, whose outputs are in ``norm_format``.
    """
    normalization = [
        {"Name": "(Unnamed Layer* 11) [Normalization]", "LayerType": "Normalization",
         "Inputs": [tensor("tokens", FP32)], "Outputs": [tensor("normed", norm_format)]},
    ]  # fmt: skip
    if decomposed_layer_norm:
        normalization = [
            {"Name": "norm/mean", "LayerType": "Reduce", "Outputs": [tensor("norm/mean", norm_format)]},
            {"Name": "PWN(norm/centered, norm/squared)", "LayerType": "PointWiseV2",
             "Outputs": [tensor("norm/squared", norm_format)]},
            {"Name": "norm/variance", "LayerType": "Reduce", "Outputs": [tensor("norm/variance", norm_format)]},
            {"Name": "PWN(PWN(PWN(PWN(norm/variance_eps, norm/std), norm/normalized), norm/scaled), norm/shifted)",
             "LayerType": "PointWiseV2", "Outputs": [tensor("normed", norm_format)]},
        ]  # fmt: skip
    layers = [
        {"Name": "Reformatting CopyNode for Input Tensor 0 to to_nchw", "LayerType": "Reformat",
         "Inputs": [tensor("images", "Row major linear UInt8 format")], "Outputs": [tensor("r0", "Row major linear UInt8 format")]},
        {"Name": "PWN(PWN(cast, sub_mean), div_std)", "LayerType": "PointWiseV2",
         "Inputs": [tensor("x_u8", "Row major linear UInt8 format")], "Outputs": [tensor("x_n", FP32)]},
        {"Name": "conv", "LayerType": "CaskConvolution", "Inputs": [tensor("x_n", FP16)],
         "Outputs": [tensor("feat", conv_format)], "Weights": {"Type": weights, "Count": 12}},
        *normalization,
        {"Name": "qk", "LayerType": "CaskGemmMatrixMultiply", "Inputs": [tensor("normed", FP32)],
         "Outputs": [tensor("logits", FP32)]},
        {"Name": "PWN(scale, mask)", "LayerType": "PointWiseV2", "Outputs": [tensor("masked", FP32)]},
        {"Name": "softmax", "LayerType": "CudaSoftMax", "Outputs": [tensor("attention", softmax_format)]},
        {"Name": "context + reconstruct", "LayerType": "CaskGemmMatrixMultiply",
         "Outputs": [tensor("reconstruction", conv_format)], "Weights": {"Type": weights, "Count": 16}},
        {"Name": "PWN(difference, square)", "LayerType": "PointWiseV2", "Outputs": [tensor("squared", FP32)]},
        {"Name": "channel_sum", "LayerType": "Reduce", "Outputs": [tensor("summed", FP32)]},
        {"Name": "root + to_map", "LayerType": "PointWiseV2", "Outputs": [tensor("anomaly_map", FP32)]},
        {"Name": "(Unnamed Layer* 27) [Pooling]", "LayerType": "CudaPooling", "Metadata": "[ONNX Layer: pool]",
         "Outputs": [tensor("pooled", FP32)]},
        {"Name": "score", "LayerType": "Reduce", "Outputs": [tensor("image_score", FP32)]},
        {"Name": "pool_features", "LayerType": "Reduce", "Outputs": [tensor("pooled_features", FP32)]},
        {"Name": "feature_norm", "LayerType": "Reduce", "Outputs": [tensor("feature_length", FP32)]},
        {"Name": "PWN(unit_features)", "LayerType": "PointWiseV2", "Outputs": [tensor("unit", FP32)]},
        {"Name": "similarity", "LayerType": "CaskGemmMatrixMultiply", "Outputs": [tensor("similarities", FP32)]},
        {"Name": "PWN(to_distance)", "LayerType": "PointWiseV2", "Outputs": [tensor("distances", FP32)]},
        {"Name": "nearest", "LayerType": "TopK", "Outputs": [tensor("category", "Row major linear Int32 format")]},
        {"Name": "nearest_distance", "LayerType": "Reduce", "Outputs": [tensor("category_distance", FP32)]},
        *extra_layers,
    ]  # fmt: skip
    bindings = ["images", "anomaly_map", "image_score", "category", "category_distance"]
    return json.dumps({"Layers": layers, "Bindings": bindings})
