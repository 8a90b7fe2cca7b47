"""The FP32 islands of the fused graph, found by structure (op types and wiring), never by node names.

Used by ``export.fp16`` to write the mixed-precision ONNX, and by the TensorRT 8.x path to put FP32
precision constraints on the same nodes of the fp32 graph. See docs/architecture.md, "Precision plan".
"""

from __future__ import annotations

from collections import defaultdict, deque

import onnx
from onnx import TensorProto

from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_OUTPUT_NAMES, INPUT_NAME, SCORE_OUTPUT_NAMES

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)

# Island names as recorded in the manifest's ``precision.fp32_islands``.
LAYER_NORM = "LayerNormalization"
SOFTMAX_LOGITS = "softmax logits"
ANOMALY_HEAD = "anomaly head"
INPUT_NORMALIZATION = "input normalisation"
CATEGORY_HEAD = "category head"
ISLAND_NAMES = (INPUT_NORMALIZATION, LAYER_NORM, SOFTMAX_LOGITS, ANOMALY_HEAD, CATEGORY_HEAD)

# Ops between a Softmax and the Q.K^T product that produce the logits: mask add, scaling.
_LOGIT_OPS = ("Add", "Sub", "Mul", "Div", "Where")
_LOGIT_PRODUCTS = ("MatMul", "Gemm", "Einsum")
# Elementwise and layout ops that turn the uint8 image into the normalised float image.
_NORMALIZATION_OPS = ("Transpose", "Cast", "Sub", "Div", "Mul", "Add")


class _GraphIndex:
    """Producers, consumers, constant tensors and element types of one graph."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.producer = {name: node for node in self.graph.node for name in node.output if name}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.constants = {initializer.name for initializer in self.graph.initializer}
        self.constants |= {node.output[0] for node in self.graph.node if node.op_type == "Constant"}
        inferred = onnx.shape_inference.infer_shapes(model)
        self.elem_type = {
            info.name: info.type.tensor_type.elem_type
            for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
        }
        self.elem_type.update({init.name: init.data_type for init in self.graph.initializer})

    def is_float(self, name: str) -> bool:
        return self.elem_type.get(name) in FLOAT_TYPES

    def dynamic_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [name for name in node.input if name and name not in self.constants]

    def computes_floats(self, node: onnx.NodeProto) -> bool:
        return node.op_type != "Shape" and any(self.is_float(name) for name in node.output)

    def reads_floats(self, node: onnx.NodeProto) -> bool:
        return node.op_type != "Shape" and any(self.is_float(name) for name in node.input if name)

    def ancestors(self, outputs: tuple[str, ...]) -> set[int]:
        """``id`` of every node the tensors ``outputs`` are computed from (through non-constant inputs)."""
        found, queue = set(), deque(outputs)
        while queue:
            node = self.producer.get(queue.popleft())
            if node is not None and id(node) not in found:
                found.add(id(node))
                queue.extend(self.dynamic_inputs(node))
        return found


def _softmax_logits(index: _GraphIndex) -> list[onnx.NodeProto]:
    """Each Softmax with the chain that produces its input, back to and including the Q.K^T product."""
    found = []
    for softmax in (node for node in index.graph.node if node.op_type == "Softmax"):
        found.append(softmax)
        tensor = softmax.input[0]
        while (node := index.producer.get(tensor)) is not None:
            if node.op_type in _LOGIT_PRODUCTS:
                found.append(node)
                break
            dynamic = index.dynamic_inputs(node)
            if node.op_type not in _LOGIT_OPS or len(dynamic) != 1:
                break
            found.append(node)
            tensor = dynamic[0]
    return found


def _anomaly_head(index: _GraphIndex) -> list[onnx.NodeProto]:
    """The feature difference nearest to ``anomaly_map`` and everything between it and the outputs."""
    difference, queue, seen = None, deque([ANOMALY_MAP_NAME]), {ANOMALY_MAP_NAME}
    while queue and difference is None:
        node = index.producer.get(queue.popleft())
        if node is None:
            continue
        if node.op_type == "Sub" and len(index.dynamic_inputs(node)) == 2 and index.is_float(node.output[0]):
            difference = node
            break
        for name in index.dynamic_inputs(node):
            if name not in seen:
                seen.add(name)
                queue.append(name)
    if difference is None:
        raise ReconadError(
            "The graph has no feature difference (a Sub of two computed tensors) upstream of "
            f"{ANOMALY_MAP_NAME}, so it is not a reconad graph."
        )
    ancestors = index.ancestors(SCORE_OUTPUT_NAMES)
    head, queue = [], deque([difference])
    reached = {id(difference)}
    while queue:
        node = queue.popleft()
        head.append(node)
        for name in node.output:
            for consumer in index.consumers.get(name, ()):
                if id(consumer) in ancestors and id(consumer) not in reached:
                    reached.add(id(consumer))
                    queue.append(consumer)
    return head


def _category_head(index: _GraphIndex) -> list[onnx.NodeProto]:
    """What only the category outputs are computed from: the pooling of the backbone features, their
    normalisation, the centroid distances and the arg-min (the features themselves are shared).

    Nodes that read floats count, not only those that write them: an ArgMin over FP16 distances would
    break near ties differently than the FP32 reference does.
    """
    outputs = tuple(output.name for output in index.graph.output if output.name in CATEGORY_OUTPUT_NAMES)
    if not outputs:
        return []
    own = index.ancestors(outputs) - index.ancestors(SCORE_OUTPUT_NAMES)
    return [node for node in index.graph.node if id(node) in own and (index.computes_floats(node) or index.reads_floats(node))]


def _input_normalization(index: _GraphIndex) -> list[onnx.NodeProto]:
    """The chain from the uint8 ``images`` through layout, cast and (x - mean) / std, up to the first Conv."""
    found, tensor = [], INPUT_NAME
    while True:
        following = [node for node in index.consumers.get(tensor, ()) if node.op_type != "Shape"]
        if len(following) != 1 or following[0].op_type not in _NORMALIZATION_OPS:
            return found
        node = following[0]
        if len(index.dynamic_inputs(node)) != 1:
            return found
        found.append(node)
        tensor = node.output[0]


def find_fp32_island_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names per island (keys ``ISLAND_NAMES``), each list in graph order.

    Islands: the input normalisation (uint8 -> float, (x - mean) / std: cheap, and the first place a
    rounding error would spread everywhere), every LayerNormalization, each attention's logits
    (Q.K^T product, mask add, Softmax: the mask fill and large logits need FP32), and the whole
    anomaly head (the channel sum of squared errors overflows FP16's 65504 on strong anomalies), and the
    category head (pooled-feature distances to the centroids and their arg-min: near ties must break
    as in FP32; a graph exported before schema 2 has none). Only nodes that compute floating-point
    tensors are listed (shape arithmetic is left out), and in the category head those that read them.

    Raises:
        ReconadError: the graph has no anomaly head, or an island node has no name.
    """
    index = _GraphIndex(model)
    groups = {
        INPUT_NORMALIZATION: _input_normalization(index),
        LAYER_NORM: [node for node in index.graph.node if node.op_type == "LayerNormalization"],
        SOFTMAX_LOGITS: _softmax_logits(index),
        ANOMALY_HEAD: _anomaly_head(index),
        CATEGORY_HEAD: _category_head(index),
    }
    order = {id(node): position for position, node in enumerate(index.graph.node)}
    named = {}
    for group, nodes in groups.items():
        keep = index.reads_floats if group == CATEGORY_HEAD else index.computes_floats
        nodes = sorted({id(n): n for n in nodes if index.computes_floats(n) or keep(n)}.values(), key=lambda n: order[id(n)])
        unnamed = [node.op_type for node in nodes if not node.name]
        if unnamed:
            raise ReconadError(f"The graph has unnamed {unnamed[0]} nodes in its {group}; re-export it with reconad.")
        named[group] = [node.name for node in nodes]
    return named


def find_fp32_islands(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that must compute in FP32 in a mixed-precision build, in graph order.

    Stable interface: the fp16 writer keeps exactly these nodes FP32, and the TensorRT 8.x builder
    constrains the layers of the same names. See ``find_fp32_island_groups`` for what is included.
    """
    groups = find_fp32_island_groups(model)
    wanted = {name for names in groups.values() for name in names}
    return [node.name for node in model.graph.node if node.name in wanted]


def name_nodes(model: onnx.ModelProto, tag: str = "") -> None:
    """Give every node a unique name: precision constraints and engine layer reports refer to them.
    A nameless or repeated name becomes ``<name or op type>_<tag><position>`` (the int8 pass tags its
    Q/DQ nodes ``q``, so they cannot collide with the fp32 graph's names)."""
    seen = set()
    for position, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_{tag}{position}"
        seen.add(node.name)
