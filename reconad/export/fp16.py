"""The mixed-precision graph: FP16 weights and activations, FP32 islands, I/O types unchanged.

Written here rather than by onnxconverter-common so that the islands are exactly those of
``export.islands`` (docs/architecture.md, "Precision plan") and every precision border is an explicit Cast.
The uint8 -> float cast and (x - mean) / std stay FP32 (an island); the result is cast to FP16.
``emulate_fp16_storage`` gives the FP32 graph that rounds like FP16 storage, for CPU validation.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from reconad.export.islands import find_fp32_islands
from reconad.runtime.errors import ReconadError

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
# Inputs whose type the op fixes regardless of its data type (Resize: roi and scales stay float32).
_FIXED_TYPE_INPUTS = {"Resize": {1, 2}}
# Ops that only read a tensor's shape: no Cast in front of them.
_SHAPE_ONLY_OPS = ("Shape", "Size")


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        info.name: info.type.tensor_type.elem_type
        for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    types.update({initializer.name: initializer.data_type for initializer in model.graph.initializer})
    return types


def _to_fp16_array(array: np.ndarray, name: str) -> np.ndarray:
    finite = array[np.isfinite(array)]
    if finite.size and np.abs(finite).max() > FP16_MAX:
        raise ReconadError(
            f"Weight {name} holds values up to {np.abs(finite).max():.3g}, beyond FP16's {FP16_MAX:.0f}; "
            "export this model as fp32."
        )
    return array.astype(np.float16)


def _with_graph(model: onnx.ModelProto, nodes: list, initializers: list) -> onnx.ModelProto:
    """A checked copy of ``model`` with these nodes and initializers; value_info is dropped, since its
    element types are stale after a precision rewrite."""
    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(model)
    del rebuilt.graph.node[:]
    rebuilt.graph.node.extend(nodes)
    del rebuilt.graph.initializer[:]
    rebuilt.graph.initializer.extend(initializers)
    del rebuilt.graph.value_info[:]
    onnx.checker.check_model(rebuilt)
    return rebuilt


def convert_to_fp16(model: onnx.ModelProto, fp32_nodes: Collection[str] | None = None) -> onnx.ModelProto:
    """A mixed-precision copy of an fp32 graph.

    Every float32 computation becomes FP16 except the nodes in ``fp32_nodes``; a Cast is inserted
    wherever a tensor crosses between the two (one Cast per tensor and direction). Weights used only
    by FP16 nodes are stored as FP16, those used by FP32 nodes stay FP32 (a weight used by both is
    kept once per precision). Graph inputs and outputs keep their types.

    Args:
        model: the fp32 graph (not modified).
        fp32_nodes: names of the nodes that stay FP32; default ``find_fp32_islands(model)``.

    Raises:
        ReconadError: a weight does not fit FP16's range.
    """
    keep_fp32 = set(find_fp32_islands(model) if fp32_nodes is None else fp32_nodes)
    types = _elem_types(model)
    graph = model.graph
    initializers = {initializer.name: initializer for initializer in graph.initializer}

    # Which precision each float32 weight is read in.
    weight_uses: dict[str, set[int]] = {}
    for node in graph.node:
        target = TensorProto.FLOAT if node.name in keep_fp32 else TensorProto.FLOAT16
        for position, name in enumerate(node.input):
            if name in initializers and types.get(name) == TensorProto.FLOAT and _is_data_input(node, position):
                weight_uses.setdefault(name, set()).add(target)

    new_initializers, weight_names = [], {}
    for initializer in graph.initializer:
        uses = weight_uses.get(initializer.name, set())
        if TensorProto.FLOAT16 not in uses:
            new_initializers.append(initializer)
            continue
        half = numpy_helper.from_array(
            _to_fp16_array(numpy_helper.to_array(initializer), initializer.name), initializer.name
        )
        if TensorProto.FLOAT in uses:  # read in both precisions: keep the fp32 original beside the copy
            new_initializers.append(initializer)
            half.name = f"{initializer.name}__fp16"
        new_initializers.append(half)
        weight_names[initializer.name] = half.name

    current = dict(types)  # tensor name -> element type after conversion
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []

    def cast_to(name: str, target: int) -> str:
        if (name, target) not in casts:
            suffix = "fp16" if target == TensorProto.FLOAT16 else "fp32"
            cast_name = f"{name}__to_{suffix}"
            new_nodes.append(helper.make_node("Cast", [name], [cast_name], name=cast_name, to=target))
            casts[(name, target)] = cast_name
            current[cast_name] = target
        return casts[(name, target)]

    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        target = TensorProto.FLOAT if node.name in keep_fp32 else TensorProto.FLOAT16
        for position, name in enumerate(node.input):
            if not name or not _is_data_input(node, position) or node.op_type in _SHAPE_ONLY_OPS:
                continue
            if name in weight_uses:
                if target == TensorProto.FLOAT16:
                    node.input[position] = weight_names[name]
                continue
            if current.get(name) in (TensorProto.FLOAT, TensorProto.FLOAT16) and current[name] != target:
                node.input[position] = cast_to(name, target)
        if target == TensorProto.FLOAT16:
            _retype_attributes(node)
        for name in node.output:
            if types.get(name) == TensorProto.FLOAT:
                current[name] = target
        new_nodes.append(node)

    # Graph outputs keep float32: re-cast any that ended up FP16 under their original name.
    for output in graph.output:
        if current.get(output.name) == TensorProto.FLOAT16:
            inner = f"{output.name}__fp16"
            for node in new_nodes:
                node.output[:] = [inner if name == output.name else name for name in node.output]
                node.input[:] = [inner if name == output.name else name for name in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [output.name], name=f"{output.name}__to_fp32", to=TensorProto.FLOAT))

    converted = _with_graph(model, new_nodes, new_initializers)
    return onnx.shape_inference.infer_shapes(converted, strict_mode=True)


def _is_data_input(node: onnx.NodeProto, position: int) -> bool:
    return position not in _FIXED_TYPE_INPUTS.get(node.op_type, ())


def _retype_attributes(node: onnx.NodeProto) -> None:
    """Make an FP16 node's float32-producing attributes FP16 (Cast targets, Constant values)."""
    for attribute in node.attribute:
        if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
            attribute.i = TensorProto.FLOAT16
        elif (
            node.op_type in ("Constant", "ConstantOfShape")
            and attribute.type == onnx.AttributeProto.TENSOR
            and attribute.t.data_type == TensorProto.FLOAT
        ):
            array = numpy_helper.to_array(attribute.t)
            attribute.t.CopyFrom(numpy_helper.from_array(_to_fp16_array(array, node.name), attribute.t.name))
        elif node.op_type == "Constant" and attribute.name in ("value_float", "value_floats"):
            raise ReconadError(f"Constant node {node.name} uses {attribute.name}; fold it into an initializer first.")


# Veltkamp splitting: hi = s - (s - x) with s = x * (2**13 + 1) keeps the 24 - 13 = 11 significant bits
# of FP16 (round to nearest) using FP32 arithmetic only.
_VELTKAMP_FACTOR = float(2**13 + 1)
_FP16_OVERFLOW = 65520.0  # FP16 rounds magnitudes from here on to infinity


def emulate_fp16_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP32 graph that rounds, after every node, exactly the tensors the mixed-precision ``model``
    stores as FP16: to 11 significant bits, and to +-inf beyond 65504 (FP16 subnormals are not modelled).

    Why: ONNX Runtime's CPU provider runs an FP16 node without an FP16 kernel in FP32 and removes the
    Cast pair (FP32 -> FP16 -> FP32) between two such nodes, so chains of them never round or
    overflow; a TensorRT FP16 engine does. This graph is the conservative CPU stand-in.
    """
    types = _elem_types(model)
    graph = model.graph
    constants = {"factor": _VELTKAMP_FACTOR, "limit": _FP16_OVERFLOW, "infinity": np.inf}
    names = {key: f"fp16_emulation__{key}" for key in constants}
    initializers = [numpy_helper.from_array(np.array(constants[k], np.float32), names[k]) for k in constants]
    for initializer in graph.initializer:
        if initializer.data_type == TensorProto.FLOAT16:  # already FP16 values: exact in FP32
            array = numpy_helper.to_array(initializer).astype(np.float32)
            initializers.append(numpy_helper.from_array(array, initializer.name))
        else:
            initializers.append(initializer)

    nodes = []
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
                array = numpy_helper.to_array(attribute.t).astype(np.float32)
                attribute.t.CopyFrom(numpy_helper.from_array(array, attribute.t.name))
        rounded = [name for name in node.output if types.get(name) == TensorProto.FLOAT16]
        node.output[:] = [f"{name}__unrounded" if name in rounded else name for name in node.output]
        nodes.append(node)
        for name in rounded:
            nodes.extend(_round_to_fp16_nodes(f"{name}__unrounded", name, **names))

    return _with_graph(model, nodes, initializers)


def _round_to_fp16_nodes(source: str, target: str, factor: str, limit: str, infinity: str) -> list[onnx.NodeProto]:
    p = f"{target}__fp16_rounding"

    def node(op: str, inputs: list[str], output: str) -> onnx.NodeProto:
        name = output if output.startswith(p) else f"{p}_select"
        return helper.make_node(op, inputs, [output], name=name)

    return [
        node("Mul", [source, factor], f"{p}_scaled"),
        node("Sub", [f"{p}_scaled", source], f"{p}_low"),
        node("Sub", [f"{p}_scaled", f"{p}_low"], f"{p}_high"),  # source rounded to 11 significant bits
        node("Abs", [source], f"{p}_magnitude"),
        node("Less", [f"{p}_magnitude", limit], f"{p}_fits"),  # False for +-inf and NaN too
        node("Mul", [source, infinity], f"{p}_overflow"),  # +-inf, and NaN stays NaN
        node("Where", [f"{p}_fits", f"{p}_high", f"{p}_overflow"], target),
    ]
