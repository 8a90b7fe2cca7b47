"""LayerNormalization rewritten as primitive ops, for TensorRT 8.5's ONNX parser (it has the op from 8.6).

The exported graph keeps LayerNormalization as one op (opset 17, docs/architecture.md); ``export.builder`` rewrites
a copy just before a TensorRT 8.5 parse. Each new node is named ``<LayerNormalization node>/<step>``
so the FP32-island mapping can follow it (``decomposed_node_names``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from reconad.runtime.errors import ReconadError

# Node name suffixes of one decomposition, in graph order; the casts, the bias add and the
# inverse standard deviation appear only when the LayerNormalization needs them.
STEPS = (
    "cast_in",
    "mean",
    "centered",
    "squared",
    "variance",
    "variance_eps",
    "std",
    "normalized",
    "inv_std",
    "cast_out",
    "scaled",
    "shifted",
)
AXES_INPUT_FROM_OPSET = 18  # ReduceMean takes axes as an input from opset 18, as an attribute before
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [entry.version for entry in model.opset_import if entry.domain in _DEFAULT_DOMAINS]
    if not versions:
        raise ReconadError("The graph imports no default ONNX opset, so its LayerNormalization cannot be rewritten.")
    return max(versions)


def _is_layer_norm(node: onnx.NodeProto) -> bool:
    return node.op_type == "LayerNormalization" and node.domain in _DEFAULT_DOMAINS


def _nested_layer_norms(model: onnx.ModelProto) -> bool:
    """LayerNormalization inside a subgraph (If/Loop/Scan body) or a model-local function."""

    def in_graph(graph: onnx.GraphProto, nested: bool) -> bool:
        for node in graph.node:
            if nested and _is_layer_norm(node):
                return True
            for attribute in node.attribute:
                bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
                if any(in_graph(body, True) for body in bodies):
                    return True
        return False

    in_functions = any(_is_layer_norm(node) for function in model.functions for node in function.node)
    return in_functions or in_graph(model.graph, False)


def _tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """``name -> (element type, rank or None)`` for every tensor shape inference can type."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        tensor_type = info.type.tensor_type
        rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        types[info.name] = (tensor_type.elem_type, rank)
    for initializer in model.graph.initializer:
        types[initializer.name] = (initializer.data_type, len(initializer.dims))
    return types


def _attribute(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _reduced_axes(node: onnx.NodeProto, axis: int, rank: int | None) -> list[int]:
    """The normalised axes ``axis .. rank-1``, non-negative whenever the rank is known."""
    if rank is not None:
        if not -rank <= axis < rank:
            raise ReconadError(f"LayerNormalization {node.name} has axis {axis}, outside a rank-{rank} input.")
        return list(range(axis % rank, rank))
    if axis < 0:
        return list(range(axis, 0))
    raise ReconadError(
        f"LayerNormalization {node.name} normalises from axis {axis} of an input of unknown rank; "
        "give the graph input shapes (or a negative axis) so it can be rewritten."
    )


def _decompose_node(
    node: onnx.NodeProto,
    types: dict[str, tuple[int, int | None]],
    opset: int,
    tensor_name: Callable[[str], str],
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers that compute ``node``'s outputs."""
    prefix = node.name
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    outputs = list(node.output) + [""] * (3 - len(node.output))
    x_type, rank = types.get(x, (TensorProto.UNDEFINED, None))
    if x_type == TensorProto.UNDEFINED:
        x_type = types.get(scale, (TensorProto.UNDEFINED, None))[0]
    if x_type == TensorProto.UNDEFINED:
        raise ReconadError(
            f"LayerNormalization {prefix} has an input of unknown element type, so it cannot be rewritten."
        )
    stash_type = int(_attribute(node, "stash_type", TensorProto.FLOAT))
    epsilon = float(_attribute(node, "epsilon", 1e-5))
    axes = _reduced_axes(node, int(_attribute(node, "axis", -1)), rank)

    nodes: list[onnx.NodeProto] = []
    epsilon_name = tensor_name(f"{prefix}/epsilon")
    stash_dtype = helper.tensor_dtype_to_np_dtype(stash_type)
    initializers = [numpy_helper.from_array(np.array(epsilon, stash_dtype), epsilon_name)]
    axes_name = None
    if opset >= AXES_INPUT_FROM_OPSET:
        axes_name = tensor_name(f"{prefix}/axes")
        initializers.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))

    def add(step: str, op_type: str, inputs: list[str], output: str | None = None, **attributes: Any) -> str:
        output = output or tensor_name(f"{prefix}/{step}")
        nodes.append(helper.make_node(op_type, inputs, [output], name=f"{prefix}/{step}", **attributes))
        return output

    def reduce_mean(step: str, tensor: str, output: str | None = None) -> str:
        if axes_name is not None:
            return add(step, "ReduceMean", [tensor, axes_name], output, keepdims=1)
        return add(step, "ReduceMean", [tensor], output, axes=axes, keepdims=1)

    # Two-pass variance (mean of squared deviations): no cancellation, unlike E[x^2] - E[x]^2.
    stashed = add("cast_in", "Cast", [x], to=stash_type) if stash_type != x_type else x
    mean = reduce_mean("mean", stashed, outputs[1] or None)
    centered = add("centered", "Sub", [stashed, mean])
    squared = add("squared", "Mul", [centered, centered])
    variance = reduce_mean("variance", squared)
    std = add("std", "Sqrt", [add("variance_eps", "Add", [variance, epsilon_name])])
    normalized = add("normalized", "Div", [centered, std])
    if outputs[2]:
        add("inv_std", "Reciprocal", [std], outputs[2])
    if stash_type != x_type:
        normalized = add("cast_out", "Cast", [normalized], to=x_type)
    if bias is None:
        add("scaled", "Mul", [normalized, scale], outputs[0])
    else:
        add("shifted", "Add", [add("scaled", "Mul", [normalized, scale]), bias], outputs[0])
    return nodes, initializers


def decompose_layer_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every LayerNormalization computed by opset-13 primitive ops.

    Per node: ReduceMean, Sub, Mul (square), ReduceMean, Add epsilon, Sqrt, Div, Mul scale, Add bias
    (when given), with Casts around the statistics when ``stash_type`` differs from the input type,
    and Reciprocal when the optional inverse-standard-deviation output is used. ``axis`` and
    ``epsilon`` are honoured; ReduceMean takes its axes as an attribute below opset 18 and as an
    input from 18 on. The opset imports and every other node are unchanged.

    Args:
        model: a graph with LayerNormalization nodes in its main graph (not modified).

    Returns:
        The rewritten copy; new nodes are named ``<LayerNormalization node>/<step>`` (``STEPS``).

    Raises:
        ReconadError: a LayerNormalization inside a subgraph or function, an input of unknown type
            or rank (with a non-negative axis), or a name the new nodes would take is already used.
    """
    if _nested_layer_norms(model):
        raise ReconadError("The graph has LayerNormalization inside a subgraph or function, which cannot be rewritten.")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if not any(_is_layer_norm(node) for node in model.graph.node):
        return copy
    opset = _default_opset(model)
    types = _tensor_types(model)
    graph = model.graph
    node_names = {node.name for node in graph.node if node.name}
    tensors = {name for node in graph.node for name in (*node.input, *node.output) if name}
    tensors |= {info.name for info in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}

    def tensor_name(wanted: str) -> str:
        name, count = wanted, 0
        while name in tensors:
            count += 1
            name = f"{wanted}_{count}"
        tensors.add(name)
        return name

    new_nodes: list[onnx.NodeProto] = []
    new_initializers: list[onnx.TensorProto] = []
    for position, node in enumerate(graph.node):
        if not _is_layer_norm(node):
            new_nodes.append(node)
            continue
        named = onnx.NodeProto()
        named.CopyFrom(node)
        if not named.name:
            named.name = f"LayerNormalization_{position}"
        taken = sorted(node_names & {f"{named.name}/{step}" for step in STEPS})
        if taken:
            raise ReconadError(f"The graph already has a node named {taken[0]}, a name the LayerNorm rewrite needs.")
        nodes, initializers = _decompose_node(named, types, opset, tensor_name)
        new_nodes += nodes
        new_initializers += initializers

    del copy.graph.node[:]
    copy.graph.node.extend(new_nodes)
    copy.graph.initializer.extend(new_initializers)
    return copy


def decomposed_node_names(model: onnx.ModelProto, layer_norm_names: Collection[str]) -> dict[str, list[str]]:
    """``LayerNormalization node name -> the nodes computing it`` in a graph ``decompose_layer_norm`` wrote.

    Read from its ``<name>/<step>`` naming, in graph order, for the names in ``layer_norm_names`` only.
    """
    wanted, steps = set(layer_norm_names), set(STEPS)
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        prefix, _, step = node.name.rpartition("/")
        if prefix in wanted and step in steps:
            found.setdefault(prefix, []).append(node.name)
    return found
