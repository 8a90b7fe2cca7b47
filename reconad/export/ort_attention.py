"""The ONNX-Runtime-only CPU graph: each explicit attention of the fused graph as one ``com.microsoft.MultiHeadAttention``.

The TensorRT graph (docs/architecture.md, "The fused graph") keeps attention as plain ops, Q.K^T MatMul, mask Add,
Softmax, MatMul, because the FP32 islands, the TensorRT 8.x precision constraints and the 8.5 LayerNorm rewrite are
found on that form. On a CPU, ONNX Runtime runs that form as separate kernels over [N, heads, L, L] logits (the
mask add alone is a full pass over them); its contrib ``MultiHeadAttention`` (onnxruntime's
``contrib_ops/cpu/bert/multihead_attention.cc``, the op its own transformer optimiser fuses BERT attention into)
adds the projection biases while splitting heads and computes scale.Q.K^T + attention_bias, softmax and the V
product per head in one parallel loop. No other runtime has the op, so this graph is a separate export target
(``--target ort-cpu``) and never a TensorRT input.

Made by rewriting the exported, parity-checked fp32 graph rather than by a second trace: both targets come from
one trace of the same forward, the rewrite needs only the wiring the exporter writes (below) and fails loudly
when that changes, and onnxruntime's own transformer optimiser (``onnxruntime.transformers.optimizer``, tried
with model types bert and vit) fuses none of these attentions, because it expects the mask to come from a
graph input. Plain ``onnx`` protobuf edits, as ``export/layernorm.py`` does (onnx-graphsurgeon is not a
dependency and would add nothing for a local pattern).

The pattern, per Softmax (L tokens, h heads of size d, D = h.d; ``q3`` / ``k3`` / ``v3`` [N, L, D]):
    q4 = Mul(Transpose(Reshape(q3, [-1, L, h, d]), [0, 2, 1, 3]), scale)   or a constant [1, h, L, d] (pre-scaled)
    kT = Transpose(Reshape(k3, [-1, L, h, d]), [0, 2, 3, 1]);  v4 = Transpose(Reshape(v3, ...), [0, 2, 1, 3])
    out = Reshape(Transpose(MatMul(Softmax(Add(MatMul(q4, kT), mask)), v4), [0, 2, 1, 3]), [-1, L, D])
becomes ``out = MultiHeadAttention(q3, k3, v3, bias, attention_bias=mask[1, 1, L, L], num_heads=h, scale)``;
where ``q3``, ``k3`` and ``v3`` are each ``Add(MatMul(x, W), b)`` used only here, the three ``b`` become the op's
``bias`` input. A constant query (the decoder's learned queries, folded with their projection and scale) is
stored as [1, L, D] and expanded to the keys' batch (the op takes one batch size), with scale 1.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from reconad.runtime.errors import ReconadError

CONTRIB_DOMAIN = "com.microsoft"
FUSED_OP = "MultiHeadAttention"
ORT_CPU_RECIPE = (
    "float32 throughout; attention as com.microsoft.MultiHeadAttention (ONNX Runtime only, not a TensorRT input); "
    "uint8 in, float32 out"
)
_HEADS_PERM = [0, 2, 1, 3]
_KEYS_T_PERM = [0, 2, 3, 1]


class _Index:
    """Producers, consumers and initializer values of one graph (rebuilt after every rewrite)."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {name: node for node in graph.node for name in node.output if name}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def constant(self, name: str) -> np.ndarray | None:
        init = self.initializers.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        consumers = self.consumers.get(name, [])
        return consumers[0] if len(consumers) == 1 and consumers[0].op_type == op_type else None

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _split_heads(index: _Index, name: str, perm: list[int]) -> tuple[str, int, int] | None:
    """``name`` = Transpose(Reshape(x3, [-1 or N, L, h, d]), perm): (x3, h, d), else None."""
    transpose = index.made_by(name, "Transpose")
    if transpose is None or _perm(transpose) != perm:
        return None
    reshape = index.made_by(transpose.input[0], "Reshape")
    shape = None if reshape is None else index.constant(reshape.input[1])
    if shape is None or shape.shape != (4,):
        return None
    return reshape.input[0], int(shape[2]), int(shape[3])


def _scaled_query(index: _Index, name: str) -> tuple[str | np.ndarray, float, int, int] | None:
    """The query side of Q.K^T: (q3 or a constant [1, L, D], scale, h, d), else None."""
    value = index.constant(name)
    if value is not None:  # the decoder's learned queries, projected and scaled at export
        if value.ndim != 4 or value.shape[0] != 1:
            return None
        _, heads, length, size = value.shape
        return np.ascontiguousarray(value.transpose(0, 2, 1, 3)).reshape(1, length, heads * size), 1.0, heads, size
    mul = index.made_by(name, "Mul")
    if mul is None:
        return None
    for tensor, factor in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        scale = index.constant(factor)
        if scale is not None and scale.size == 1:
            split = _split_heads(index, tensor, _HEADS_PERM)
            if split is not None:
                return split[0], float(scale.reshape(())), split[1], split[2]
    return None


def _bias_source(index: _Index, name: str, hidden: int) -> tuple[str, np.ndarray] | None:
    """``name`` = Add(MatMul(x, W), b) with b a constant [D], used only by the attention: (MatMul output, b)."""
    add = index.made_by(name, "Add")
    if add is None or len(index.consumers.get(name, [])) != 1:
        return None
    for tensor, other in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        bias = index.constant(other)
        if bias is not None and bias.shape == (hidden,) and index.made_by(tensor, "MatMul") is not None:
            return tensor, bias.astype(np.float32)
    return None


class _Match:
    """One explicit attention found around ``softmax``, and what replaces it."""

    def __init__(self, softmax: onnx.NodeProto, query: str | np.ndarray, key: str, value: str,
                 mask: str | None, scale: float, heads: int, hidden: int, output: str):
        self.softmax, self.query, self.key, self.value = softmax, query, key, value
        self.mask, self.scale, self.heads, self.hidden, self.output = mask, scale, heads, hidden, output


def _match(index: _Index, softmax: onnx.NodeProto) -> _Match | None:
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    if axis not in (-1, 3):
        return None
    mask, logits = None, softmax.input[0]
    add = index.made_by(logits, "Add")
    if add is not None:
        constants = [name for name in add.input if name in index.initializers]
        if len(constants) != 1:
            return None
        mask, logits = constants[0], next(name for name in add.input if name != constants[0])
    product = index.made_by(logits, "MatMul")
    query = None if product is None else _scaled_query(index, product.input[0])
    key = None if product is None else _split_heads(index, product.input[1], _KEYS_T_PERM)
    weighted = index.only_consumer(softmax.output[0], "MatMul")
    if query is None or key is None or weighted is None or weighted.input[0] != softmax.output[0]:
        return None
    value = _split_heads(index, weighted.input[1], _HEADS_PERM)
    merge = index.only_consumer(weighted.output[0], "Transpose")
    if value is None or merge is None or _perm(merge) != _HEADS_PERM:
        return None
    flatten = index.only_consumer(merge.output[0], "Reshape")
    shape = None if flatten is None else index.constant(flatten.input[1])
    heads, size = query[2], query[3]
    if shape is None or shape.shape != (3,) or int(shape[2]) != heads * size:
        return None
    if (key[1], key[2]) != (heads, size) or (value[1], value[2]) != (heads, size):
        return None
    return _Match(softmax, query[0], key[0], value[0], mask, query[1], heads, heads * size, flatten.output[0])


def fuse_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the fp32 fused graph with every attention as ``com.microsoft.MultiHeadAttention``.

    Args:
        model: the exported fp32 graph (opset 17 or later), attention in the explicit form above.

    Returns:
        A new model: the same inputs, outputs and names outside attention; one MultiHeadAttention per Softmax
        (query/key/value [N, L, D] float32, ``bias`` [3D] where the projections' biases fold in,
        ``attention_bias`` [1, 1, L, L] shared by the attentions with the same mask); opset ``com.microsoft`` 1
        imported. Runs on ONNX Runtime only.

    Raises:
        ReconadError: the graph has no Softmax, or one that is not in the explicit attention form (the
            exporter's wiring changed): nothing is half-rewritten.
    """
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    graph = fused.graph
    softmaxes = [node.name or node.output[0] for node in graph.node if node.op_type == "Softmax"]
    if not softmaxes:
        raise ReconadError("The graph has no Softmax, so it has no attention for the ort-cpu target to fuse.")
    masks: dict[str, str] = {}
    for name in softmaxes:
        index = _Index(graph)
        softmax = next(node for node in graph.node if (node.name or node.output[0]) == name)
        match = _match(index, softmax)
        if match is None:
            raise ReconadError(
                f"The attention at {name} is not in the exported explicit form (Q.K^T MatMul, mask Add, Softmax, "
                "MatMul), so the ort-cpu graph cannot be made from this graph."
            )
        _replace(graph, index, match, masks)
    _drop_dead(graph)
    if not any(entry.domain == CONTRIB_DOMAIN for entry in fused.opset_import):
        fused.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    onnx.checker.check_model(fused, full_check=True)  # the contrib nodes: structure only (onnx has no schema)
    return fused


def _replace(graph: onnx.GraphProto, index: _Index, match: _Match, masks: dict[str, str]) -> None:
    """Insert the MultiHeadAttention (and the query's Expand) before the node that produced ``match.output``."""
    prefix = f"{match.softmax.name or match.softmax.output[0]}/mha"
    new_nodes: list[onnx.NodeProto] = []
    query = match.query
    if isinstance(query, np.ndarray):  # a constant [1, Lq, D]: expand to the keys' batch
        constant = f"{prefix}/query"
        graph.initializer.append(numpy_helper.from_array(query.astype(np.float32), constant))
        graph.initializer.append(numpy_helper.from_array(np.array(query.shape[1:], np.int64), f"{prefix}/query_dims"))
        new_nodes += [
            helper.make_node("Shape", [match.key], [f"{prefix}/batch"], f"{prefix}/batch", start=0, end=1),
            helper.make_node("Concat", [f"{prefix}/batch", f"{prefix}/query_dims"], [f"{prefix}/query_shape"],
                             f"{prefix}/query_shape", axis=0),
            helper.make_node("Expand", [constant, f"{prefix}/query_shape"], [f"{prefix}/query_expanded"],
                             f"{prefix}/query_expanded"),
        ]
        query = f"{prefix}/query_expanded"
    hidden = match.hidden
    sources = [None if isinstance(match.query, np.ndarray) else _bias_source(index, query, hidden),
               _bias_source(index, match.key, hidden), _bias_source(index, match.value, hidden)]
    bias = ""
    inputs = [query, match.key, match.value]
    if sources[1] is not None and sources[2] is not None:
        biases = [np.zeros(hidden, np.float32) if source is None else source[1] for source in sources]
        inputs = [input_ if source is None else source[0] for input_, source in zip(inputs, sources)]
        bias = f"{prefix}/bias"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(biases), bias))
    attention_bias = ""
    if match.mask is not None:
        if match.mask not in masks:
            mask = index.constant(match.mask).astype(np.float32)
            masks[match.mask] = f"{match.mask}/attention_bias"
            mask4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
            graph.initializer.append(numpy_helper.from_array(mask4, masks[match.mask]))
        attention_bias = masks[match.mask]
    new_nodes.append(helper.make_node(
        FUSED_OP, [*inputs, bias, "", attention_bias], [match.output], f"{prefix}", domain=CONTRIB_DOMAIN,
        num_heads=match.heads, scale=match.scale,
    ))
    old = index.producer[match.output]
    old.output[0] = f"{match.output}/unused"  # the explicit chain's last node, removed as dead below
    at = list(graph.node).index(old)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(at + offset, node)


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (repeatedly), then unused initializers and value_info."""
    outputs = {output.name for output in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        keep = [node for node in graph.node if any(name in used for name in node.output if name)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {name for node in graph.node for name in node.input} | outputs
    produced = {name for node in graph.node for name in node.output}
    initializers = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    infos = [info for info in graph.value_info if info.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)
