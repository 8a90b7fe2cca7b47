"""The FP32 islands and the mixed-precision graph: types, Casts at borders, accuracy, and an overflowing head."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from reconad.export.fp16 import convert_to_fp16, emulate_fp16_storage
from reconad.export.islands import (
    ANOMALY_HEAD,
    CATEGORY_HEAD,
    INPUT_NORMALIZATION,
    LAYER_NORM,
    SOFTMAX_LOGITS,
    find_fp32_island_groups,
    find_fp32_islands,
)
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_NAME, IMAGE_SCORE_NAME, INPUT_NAME, OUTPUT_NAMES, reference_path_for
from reconad.runtime.verify import compare_outputs

FP16_MAX = 65504.0


def run(model: onnx.ModelProto, images: np.ndarray) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})))


def op_types(model: onnx.ModelProto, names: list[str]) -> list[str]:
    by_name = {node.name: node.op_type for node in model.graph.node}
    return [by_name[name] for name in names]


def output_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = (*inferred.graph.value_info, *inferred.graph.output)
    return {info.name: info.type.tensor_type.elem_type for info in infos}


def test_islands_of_the_fused_graph(tiny_export):
    model = tiny_export.load("fp32")
    groups = find_fp32_island_groups(model)
    assert op_types(model, groups[INPUT_NORMALIZATION]) == ["Cast", "Sub", "Div"]
    assert op_types(model, groups[LAYER_NORM]) == ["LayerNormalization"] * 6
    assert op_types(model, groups[SOFTMAX_LOGITS]) == ["MatMul", "Add", "Softmax"] * 3
    assert op_types(model, groups[ANOMALY_HEAD]) == [
        "Sub", "Pow", "ReduceSum", "Sqrt", "Resize", "AveragePool", "Reshape", "ReduceMax"
    ]
    # Pool, normalise (clamped norm, broadcast), cosine to the centroids, nearest: the features are shared.
    assert op_types(model, groups[CATEGORY_HEAD]) == [
        "ReduceMean", "ReduceL2", "Clip", "Expand", "Div", "MatMul", "Sub", "ReduceMin", "ArgMin"
    ]
    islands = find_fp32_islands(model)
    assert sorted(islands) == sorted(name for names in groups.values() for name in names)
    order = [node.name for node in model.graph.node]
    assert islands == sorted(islands, key=order.index)


def test_islands_do_not_depend_on_node_names(tiny_export):
    model = tiny_export.load("fp32")
    positions = {node.name: i for i, node in enumerate(model.graph.node)}
    expected = sorted(positions[name] for name in find_fp32_islands(model))
    rng = np.random.default_rng(0)
    for node, label in zip(model.graph.node, rng.permutation(len(model.graph.node))):
        node.name = f"n{label}"  # opaque names, in no particular order
    found = sorted(next(i for i, n in enumerate(model.graph.node) if n.name == name) for name in find_fp32_islands(model))
    assert found == expected


def test_islands_need_an_anomaly_head():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], [ANOMALY_MAP_NAME], name="relu")],
        "no-head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(ANOMALY_MAP_NAME, TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ReconadError, match="no feature difference"):
        find_fp32_islands(helper.make_model(graph))


def test_fp16_graph_types_and_casts(tiny_export):
    fp32_model, model = tiny_export.load("fp32"), tiny_export.load("fp16")
    islands = set(find_fp32_islands(fp32_model))
    types = output_types(model)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert [types[name] for name in OUTPUT_NAMES] == [TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT]
    by_name = {node.name: node for node in model.graph.node}
    producer = {out: node for node in model.graph.node for out in node.output}
    # The same nodes stay FP32; everything else that computes floats is FP16.
    for node in model.graph.node:
        float_outputs = [types[o] for o in node.output if types.get(o) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        if node.op_type == "Cast" or not float_outputs:
            continue
        expected = TensorProto.FLOAT if node.name in islands else TensorProto.FLOAT16
        assert set(float_outputs) == {expected}, (node.name, node.op_type)
    assert islands <= set(by_name)
    # Casts sit exactly on island borders: between an FP32 island node and an FP16 node.
    casts = [node for node in model.graph.node if node.op_type == "Cast" and node.name not in islands]
    assert casts
    for cast in casts:
        source = producer[cast.input[0]]
        assert (source.name in islands) != (cast.attribute[0].i == TensorProto.FLOAT)
    # Weights of FP16 nodes are FP16; the mask, LayerNorm parameters and mean/std stay FP32.
    initializers = {init.name: init for init in model.graph.initializer}
    conv_weights = [initializers[node.input[1]] for node in model.graph.node if node.op_type == "Conv"]
    assert conv_weights and all(w.data_type == TensorProto.FLOAT16 for w in conv_weights)
    for node in model.graph.node:
        if node.name in islands:
            for name in node.input:
                if name in initializers and initializers[name].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
                    assert initializers[name].data_type == TensorProto.FLOAT, (node.name, name)
    assert Counter(i.data_type for i in model.graph.initializer)[TensorProto.FLOAT16] > 50
    onnx.checker.check_model(model, full_check=True)


def _head_input_types(model: onnx.ModelProto, head: list[str]) -> dict[str, set[int]]:
    """Per node of the category head (by op type), the element types of its tensor inputs (weights included)."""
    types = output_types(model) | {init.name: init.data_type for init in model.graph.initializer}
    types[INPUT_NAME] = TensorProto.UINT8
    by_name = {node.name: node for node in model.graph.node}
    return {by_name[name].op_type: {types[i] for i in by_name[name].input if i and i in types} for name in head}


def test_convert_to_fp16_keeps_the_category_head_fp32(tiny_export):
    fp32_model = tiny_export.load("fp32")
    head = find_fp32_island_groups(fp32_model)[CATEGORY_HEAD]
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    inputs = _head_input_types(convert_to_fp16(fp32_model), head)
    assert all(kinds & floats == {TensorProto.FLOAT} for op, kinds in inputs.items() if op != "Expand"), inputs
    assert inputs["ArgMin"] == {TensorProto.FLOAT}  # near ties break as in FP32
    # The control: without the island, the same structure reads FP16 (so the check above can fail).
    others = [name for group, names in find_fp32_island_groups(fp32_model).items() if group != CATEGORY_HEAD for name in names]
    naive = _head_input_types(convert_to_fp16(fp32_model, fp32_nodes=others), head)
    assert naive["ArgMin"] == {TensorProto.FLOAT16} and TensorProto.FLOAT16 in naive["MatMul"]


def test_fp16_names_the_same_categories_as_pytorch(tiny_export):
    reference = dict(np.load(reference_path_for(tiny_export.fp16)))
    for model in (tiny_export.load("fp16"), emulate_fp16_storage(tiny_export.load("fp16"))):
        outputs = run(model, reference["images"])
        assert outputs[CATEGORY_NAME].dtype == np.int64
        np.testing.assert_array_equal(outputs[CATEGORY_NAME], reference[CATEGORY_NAME])
        assert np.abs(outputs[CATEGORY_DISTANCE_NAME] - reference[CATEGORY_DISTANCE_NAME]).max() <= 2e-3


def test_fp16_matches_the_pytorch_reference(tiny_export):
    reference = dict(np.load(reference_path_for(tiny_export.fp16)))
    outputs = run(tiny_export.load("fp16"), reference["images"])
    report = compare_outputs(outputs, reference, precision="fp16", threshold=None)
    map_range = reference[ANOMALY_MAP_NAME].max() - reference[ANOMALY_MAP_NAME].min()
    assert report.passed, report.failures
    assert report.anomaly_map.p99_abs <= 0.01 * map_range and report.decision_flips == 0
    assert report.anomaly_map.p99_abs > 0  # it really ran in FP16
    assert np.array_equal(np.argsort(outputs[IMAGE_SCORE_NAME]), np.argsort(reference[IMAGE_SCORE_NAME]))
    emulated = run(emulate_fp16_storage(tiny_export.load("fp16")), reference["images"])
    emulated_report = compare_outputs(emulated, reference, precision="fp16", threshold=None)
    assert emulated_report.passed, emulated_report.failures
    assert emulated_report.anomaly_map.p99_abs >= report.anomaly_map.p99_abs  # rounds more than ORT does


def test_head_stays_finite_when_the_squared_error_sum_overflows_fp16(tiny_export):
    """A reconstruction far off the features: per-token sum of squared errors >> 65504."""
    model = tiny_export.load("fp32")
    (bias,) = [init for init in model.graph.initializer if init.name == "reconstructor.output_proj.bias"]
    bias.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(bias).shape, 300.0, np.float32), bias.name))
    images = np.load(reference_path_for(tiny_export.fp32))["images"]
    expected = run(model, images)
    assert (expected[ANOMALY_MAP_NAME] ** 2).min() > FP16_MAX  # the channel sum itself overflows FP16

    fp16_model = convert_to_fp16(model)
    for outputs in (run(fp16_model, images), run(emulate_fp16_storage(fp16_model), images)):
        for name in OUTPUT_NAMES:
            assert np.isfinite(outputs[name]).all()
            np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-2)

    groups = find_fp32_island_groups(model)
    without_head = [name for group, names in groups.items() if group != ANOMALY_HEAD for name in names]
    naive = run(emulate_fp16_storage(convert_to_fp16(model, fp32_nodes=without_head)), images)
    assert not np.isfinite(naive[ANOMALY_MAP_NAME]).any()  # inf, and NaN where Resize weighs inf by 0


def test_storage_emulation_rounds_like_fp16():
    """Round trip through a Cast to FP16: the emulation must give numpy's float16 values and infinities."""
    nodes = [
        helper.make_node("Cast", ["x"], ["half"], to=TensorProto.FLOAT16, name="to_half"),
        helper.make_node("Cast", ["half"], ["y"], to=TensorProto.FLOAT, name="to_float"),
    ]
    graph = helper.make_graph(
        nodes,
        "round-trip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.normal(0, 1, 5000), rng.normal(0, 3000, 5000), [65504, 65519, 65520, 1e5, -1e5, 0, 2049, 2051]]
    ).astype(np.float32)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(emulate_fp16_storage(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).astype(np.float32)
    normal = np.abs(x) >= 2**-14  # FP16 subnormals are not modelled
    np.testing.assert_array_equal(y[normal], expected[normal])


def test_weights_beyond_fp16_range_are_refused(tiny_export):
    model = tiny_export.load("fp32")
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    (weight,) = [init for init in model.graph.initializer if init.name == conv.input[1]]
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = 1e6
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    with pytest.raises(ReconadError, match="beyond FP16's 65504"):
        convert_to_fp16(model)
