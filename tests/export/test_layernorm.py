"""LayerNormalization decomposed for TensorRT 8.5: the same numbers as the op in ONNX Runtime, primitive
opset-13 ops named after the original node, on small graphs and on the exported tiny model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from reconad.export.builder import prepare_graph
from reconad.export.precision_plan import plan_precision
from reconad.export.islands import LAYER_NORM, find_fp32_island_groups
from reconad.export.layernorm import STEPS, decompose_layer_norm, decomposed_node_names
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import INPUT_NAME, OUTPUT_NAMES, SCORE_OUTPUT_NAMES

SHAPE = (2, 3, 4, 6)
PRIMITIVE_OPS = {"ReduceMean", "Sub", "Mul", "Add", "Sqrt", "Div", "Cast", "Reciprocal"}


def layer_norm_graph(
    axis=-1, bias=True, epsilon=1e-5, opset=17, outputs=("y",), elem_type=TensorProto.FLOAT, stash_type=None, seed=0
):
    """``x -> Relu -> LayerNormalization -> y`` (plus the optional Mean/InvStdDev outputs)."""
    rng = np.random.default_rng(seed)
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    normalized_shape = SHAPE[axis:]
    weights = [numpy_helper.from_array(rng.uniform(0.5, 2, normalized_shape).astype(dtype), "scale")]
    inputs = ["relu", "scale"]
    if bias:
        weights.append(numpy_helper.from_array(rng.standard_normal(normalized_shape).astype(dtype), "bias"))
        inputs.append("bias")
    attributes = {"axis": axis, "epsilon": epsilon} | ({} if stash_type is None else {"stash_type": stash_type})
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"], name="relu"),
        helper.make_node("LayerNormalization", inputs, list(outputs), name="block/norm", **attributes),
    ]
    reduced = [1 if d >= (axis % len(SHAPE)) else size for d, size in enumerate(SHAPE)]
    graph_outputs = [helper.make_tensor_value_info("y", elem_type, SHAPE)] + [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, reduced) for name in outputs[1:]
    ]
    graph = helper.make_graph(
        nodes, "ln", [helper.make_tensor_value_info("x", elem_type, SHAPE)], graph_outputs, initializer=weights
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run(model, feeds):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No graph optimisation: ONNX Runtime would fuse the decomposed pattern back into its LayerNorm kernel.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def sample(elem_type=TensorProto.FLOAT, seed=1):
    rng = np.random.default_rng(seed)
    # An offset and a spread, so the mean and the variance both matter.
    return (rng.standard_normal(SHAPE) * 3 + 2).astype(helper.tensor_dtype_to_np_dtype(elem_type))


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize(
    ("axis", "bias", "epsilon"),
    [(-1, True, 1e-5), (-1, False, 1e-5), (-2, True, 1e-3), (1, False, 0.1), (2, True, 1e-6), (0, True, 1e-5)],
)
def test_the_decomposition_computes_what_layer_normalization_computes(axis, bias, epsilon, opset):
    model = layer_norm_graph(axis, bias, epsilon, opset)
    decomposed = decompose_layer_norm(model)
    onnx.checker.check_model(decomposed, full_check=True)
    x = sample()
    (expected,), (actual,) = run(model, {"x": x}), run(decomposed, {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)

    ops = [node.op_type for node in decomposed.graph.node]
    assert ops[0] == "Relu" and set(ops[1:]) <= PRIMITIVE_OPS and "LayerNormalization" not in ops
    assert ops.count("Add") == 1 + bias and ops.count("ReduceMean") == 2
    assert all(onnx.defs.get_schema(op, 13).since_version <= 13 for op in ops)  # TensorRT 8.5's parser has them
    reductions = [node for node in decomposed.graph.node if node.op_type == "ReduceMean"]
    rank = len(SHAPE)
    for node in reductions:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if opset < 18:
            assert attributes["axes"] == list(range(axis % rank, rank)) and len(node.input) == 1
        else:
            assert "axes" not in attributes and len(node.input) == 2
            axes = {init.name: numpy_helper.to_array(init) for init in decomposed.graph.initializer}[node.input[1]]
            assert axes.tolist() == list(range(axis % rank, rank))
    assert decomposed.opset_import == model.opset_import


def test_new_nodes_are_named_after_the_layer_normalization_and_the_input_is_untouched():
    model = layer_norm_graph()
    before = model.SerializeToString()
    decomposed = decompose_layer_norm(model)
    assert model.SerializeToString() == before
    names = [node.name for node in decomposed.graph.node]
    expected = ["mean", "centered", "squared", "variance", "variance_eps", "std", "normalized", "scaled", "shifted"]
    assert names == ["relu"] + [f"block/norm/{step}" for step in expected]
    assert decomposed.graph.node[-1].output == ["y"]  # consumers of the output are unchanged
    assert decomposed_node_names(decomposed, ["block/norm"]) == {"block/norm": names[1:]}
    assert decomposed_node_names(decomposed, ["relu"]) == {}
    unchanged = layer_norm_graph()
    del unchanged.graph.node[1]
    assert decompose_layer_norm(unchanged) == unchanged


def test_the_optional_mean_and_inverse_std_outputs_are_computed():
    model = layer_norm_graph(axis=-2, outputs=("y", "mean", "inv_std_dev"))
    decomposed = decompose_layer_norm(model)
    x = sample()
    for expected, actual in zip(run(model, {"x": x}), run(decomposed, {"x": x}), strict=True):
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    assert "Reciprocal" in {node.op_type for node in decomposed.graph.node}


def test_fp16_input_keeps_its_statistics_in_the_float_stash_type():
    model = layer_norm_graph(elem_type=TensorProto.FLOAT16, stash_type=TensorProto.FLOAT)
    decomposed = decompose_layer_norm(model)
    x = sample(TensorProto.FLOAT16)
    (expected,), (actual,) = run(model, {"x": x}), run(decomposed, {"x": x})
    assert actual.dtype == np.float16
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), rtol=0, atol=2e-3)
    steps = {node.name.rsplit("/", 1)[1]: node for node in decomposed.graph.node if node.name.startswith("block/")}
    assert helper.get_attribute_value(steps["cast_in"].attribute[0]) == TensorProto.FLOAT
    assert helper.get_attribute_value(steps["cast_out"].attribute[0]) == TensorProto.FLOAT16
    epsilon = next(init for init in decomposed.graph.initializer if init.name == "block/norm/epsilon")
    assert epsilon.data_type == TensorProto.FLOAT
    assert set(steps) <= set(STEPS)


def test_graphs_it_cannot_rewrite_are_refused_in_one_sentence():
    unknown_rank = layer_norm_graph(axis=1)
    unknown_rank.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(ReconadError, match="axis 1 of an input of unknown rank"):
        decompose_layer_norm(unknown_rank)
    unknown_rank.graph.node[1].attribute[0].i = -3  # a negative axis needs no rank
    assert "LayerNormalization" not in {node.op_type for node in decompose_layer_norm(unknown_rank).graph.node}

    clash = layer_norm_graph()
    clash.graph.node[0].name = "block/norm/mean"
    with pytest.raises(ReconadError, match="already has a node named block/norm/mean"):
        decompose_layer_norm(clash)

    nested = layer_norm_graph()
    body = helper.make_graph([nested.graph.node[1]], "body", [], [helper.make_tensor_value_info("y", 1, None)])
    branch = helper.make_node("If", ["condition"], ["y"], name="if", then_branch=body, else_branch=body)
    del nested.graph.node[1]
    nested.graph.node.append(branch)
    with pytest.raises(ReconadError, match="inside a subgraph or function"):
        decompose_layer_norm(nested)


def test_the_exported_tiny_model_gives_the_same_outputs_decomposed(tiny_export):
    model = tiny_export.load("fp32")
    layer_norms = [node.name for node in model.graph.node if node.op_type == "LayerNormalization"]
    assert layer_norms
    decomposed = decompose_layer_norm(model)
    onnx.checker.check_model(decomposed)
    assert "LayerNormalization" not in {node.op_type for node in decomposed.graph.node}
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    expected, actual = run(model, {INPUT_NAME: images}), run(decomposed, {INPUT_NAME: images})
    for name, want, got in zip(OUTPUT_NAMES, expected, actual, strict=True):
        if name in SCORE_OUTPUT_NAMES:
            assert np.abs(want).max() > 1  # anomaly map and score of a random model, not all zeros
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=name)

    steps = decomposed_node_names(decomposed, layer_norms)
    assert sorted(steps) == sorted(layer_norms) and all(len(nodes) == 9 for nodes in steps.values())


def test_the_tensorrt_8_5_islands_are_every_node_of_each_decomposed_layer_norm(tiny_export):
    model = tiny_export.load("fp32")
    graph = prepare_graph(tiny_export.fp32, plan_precision((8, 5, 2), "fp16"))
    parsed = onnx.load_model_from_string(graph.model_bytes)
    assert [(node.name, list(node.output)) for node in parsed.graph.node] == list(graph.node_outputs)
    groups = find_fp32_island_groups(model)  # on the exported graph, LayerNormalization is one node per norm
    steps = decomposed_node_names(parsed, groups[LAYER_NORM])
    decomposed = {name for names in steps.values() for name in names}
    assert len(decomposed) == 9 * len(groups[LAYER_NORM]) and decomposed <= set(graph.islands)
    other_islands = {name for kind, names in groups.items() if kind != LAYER_NORM for name in names}
    assert set(graph.islands) == decomposed | other_islands
    assert graph.island_kinds == tuple(kind for kind, names in groups.items() if names)

    unchanged = prepare_graph(tiny_export.fp32, plan_precision((8, 6, 2), "fp16"))
    assert unchanged.model_bytes is None and set(unchanged.islands) == {n for names in groups.values() for n in names}
