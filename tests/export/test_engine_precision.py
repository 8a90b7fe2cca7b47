"""FP32-island layer selection on a parsed network and the engine-inspector precision check (no TensorRT).

The mini graph, its parsed layers and the inspector JSON are in ``mini_graph.py``; the 11.x split
format is written here.
"""

import json

import onnx
import pytest

from reconad.export.builder import prepare_graph
from reconad.export.precision_plan import plan_precision
from reconad.export.precision_check import (
    NetworkLayer,
    analyze_layer_precisions,
    assign_layers_to_nodes,
    onnx_names_in_metadata,
    parse_engine_layers,
    select_island_layers,
    tensor_precision,
    typed_layer_names,
)
from reconad.export.islands import find_fp32_islands
from reconad.runtime.errors import ReconadError
from tests.export.mini_graph import (
    FP32,
    ISLANDS,
    NODES,
    NORM_STEPS,
    build_model,
    engine_json,
    parsed_network,
    tensor,
)


def node_outputs(model):
    return [(node.name, list(node.output)) for node in model.graph.node]


def test_the_islands_of_the_mini_graph_are_the_expected_nodes():
    assert set(find_fp32_islands(build_model())) == ISLANDS


def test_layers_are_assigned_to_the_node_whose_output_they_reach():
    model, layers = build_model(), parsed_network()
    assignment = assign_layers_to_nodes(layers, node_outputs(model))
    by_name = {layer.name: assignment.get(layer.index) for layer in layers}
    assert by_name["sub_mean"] == "sub_mean" and by_name["(Unnamed Layer* 2) [Constant]"] == "sub_mean"
    norm_layers = [name for name, node in by_name.items() if node == "norm"]
    assert len(norm_layers) == 3 and any("[Normalization]" in name for name in norm_layers)
    pooling = next(layer for layer in layers if layer.type_name == "AVERAGEPOOL")
    assert assignment[pooling.index] == "pool"  # by metadata
    assert all(node is not None for node in assignment.values())


def test_island_layers_are_the_float_computing_layers_of_island_nodes():
    model, layers = build_model(), parsed_network()
    chosen, missing = select_island_layers(layers, node_outputs(model), find_fp32_islands(model))
    names = {layer.name for layer in chosen}
    assert missing == []
    assert {"cast", "sub_mean", "div_std", "qk", "softmax", "difference", "score"} <= names
    assert any("[Normalization]" in name for name in names) and any("[Pooling]" in name for name in names)
    assert not names & {"conv", "context", "reconstruct", "to_nchw", "keys_t"}
    assert all(layer.type_name not in ("CONSTANT", "SHAPE") for layer in chosen)


def test_on_tensorrt_8_5_the_islands_are_the_layers_of_every_decomposed_layer_norm_node(tmp_path):
    path = tmp_path / "mini.onnx"
    onnx.save(build_model(), path)
    graph = prepare_graph(path, plan_precision((8, 5, 2), "fp16"))
    assert set(graph.islands) == ISLANDS - {"norm"} | set(NORM_STEPS)
    assert "LayerNormalization" in graph.island_kinds
    layers = parsed_network(decomposed_layer_norm=True)
    chosen, missing = select_island_layers(layers, graph.node_outputs, graph.islands)
    assert missing == []
    names = {layer.name for layer in chosen}
    assert set(NORM_STEPS) <= names and not any("[Constant]" in name for name in names)
    assert not names & {"conv", "context", "reconstruct", "to_nchw", "keys_t"}


def test_islands_without_a_float_layer_are_reported():
    layers = [NetworkLayer(0, "transpose", "SHUFFLE", ("x_u8",), ("UINT8",))]
    chosen, missing = select_island_layers(layers, [("transpose", ["x_u8"]), ("gone", ["y"])], ["transpose", "gone"])
    assert chosen == [] and missing == ["gone"]


def test_typed_layer_names_split_a_strongly_typed_network():
    layers = [
        NetworkLayer(0, "cast_in", "IDENTITY", ("x",), ("FLOAT",), "[ONNX Layer: /Cast]"),
        NetworkLayer(1, "conv", "CONVOLUTION", ("y",), ("HALF",), "[ONNX Layer: /conv/Conv]"),
        NetworkLayer(2, "to_fp32", "CAST", ("z",), ("FLOAT",)),
        NetworkLayer(3, "w", "CONSTANT", ("c",), ("HALF",)),
        NetworkLayer(4, "shape", "SHAPE", ("s",), ("INT64",)),
    ]
    fp32, fp16 = typed_layer_names(layers)
    assert fp32 == {"cast_in", "/Cast", "to_fp32"} and fp16 == {"conv", "/conv/Conv"}


def island_names():
    model, layers = build_model(), parsed_network()
    chosen, _ = select_island_layers(layers, node_outputs(model), find_fp32_islands(model))
    fp32 = {layer.name for layer in chosen} | ISLANDS
    other = {layer.name for layer in layers} - {layer.name for layer in chosen}
    other |= {name for name, *_ in NODES} - ISLANDS
    return fp32, other


def test_a_good_fp16_engine_passes_with_its_islands_checked_fp32():
    fp32, other = island_names()
    report = analyze_layer_precisions(engine_json(), fp32, other)
    assert report.problems("fp16") == []
    assert report.tensor_counts["fp16"] == 2 and report.fp16_weights == 2
    assert "softmax" in report.island_layers and "PWN(PWN(cast, sub_mean), div_std)" in report.island_layers
    assert "(Unnamed Layer* 27) [Pooling]" in report.island_layers  # matched through its metadata
    assert "conv" not in report.island_layers and "context + reconstruct" not in report.island_layers
    assert report.island_violations == () and report.islands_unverified == ()
    summary = report.summary()
    assert summary["island_layers_checked"] == len(report.island_layers) and summary["opaque_layers"] == 0
    json.dumps(summary)


def test_a_silently_fp32_engine_fails():
    fp32, other = island_names()
    report = analyze_layer_precisions(engine_json(conv_format=FP32, weights="Float"), fp32, other)
    problems = report.problems("fp16")
    assert len(problems) == 1 and problems[0].startswith("The engine came out FP32")
    assert report.problems("fp32") == []


def test_an_island_running_in_fp16_fails():
    fp32, other = island_names()
    report = analyze_layer_precisions(engine_json(softmax_format="Row major linear FP16 format"), fp32, other)
    assert report.island_violations == ("softmax: attention is fp16",)
    assert any("FP32-island layers run in FP16" in problem for problem in report.problems("fp16"))


def test_reformat_layers_named_after_an_island_are_not_checked_as_the_island():
    reformat = {
        "Name": "Reformatting CopyNode for Input Tensor 0 to context",
        "LayerType": "Reformat",
        "Outputs": [tensor("attention_half", "Row major linear FP16 format")],
    }
    named_after_island = dict(reformat, Name="Reformatting CopyNode for Output Tensor 0 to softmax")
    fp32, other = island_names()
    report = analyze_layer_precisions(engine_json(extra_layers=[reformat, named_after_island]), fp32, other)
    assert report.island_violations == () and report.tensor_counts["fp16"] == 4


def test_fp16_in_an_fp32_engine_fails():
    report = analyze_layer_precisions(engine_json(), set(), set())
    assert "although fp32 was requested" in report.problems("fp32")[0]


def test_myelin_regions_count_their_boundary_types_and_leave_inner_islands_unverified():
    foreign = {
        "Name": "{ForeignNode[qk...context]}",
        "LayerType": "Myelin",
        "Metadata": "[ONNX Layer: qk]\x1e[ONNX Layer: softmax | Local Function: attn]\x1e[ONNX Layer: context]",
        "Outputs": [tensor("context_out", "Half")],
    }
    fp32, other = island_names()
    report = analyze_layer_precisions(
        engine_json(conv_format=FP32, weights="Float", extra_layers=[foreign]), fp32, other
    )
    assert report.opaque_layers == ("{ForeignNode[qk...context]}",)
    assert report.problems("fp16") == []  # the region's FP16 output shows the engine is FP16
    assert report.islands_unverified == ()  # qk and softmax were also seen in their own checked layers
    lone = analyze_layer_precisions(json.dumps({"Layers": [foreign]}), {"qk", "softmax"}, {"context"})
    assert lone.islands_unverified == ("qk", "softmax") and lone.island_layers == ()


def test_tensorrt_11_split_datatype_fields_are_read():
    layers = {
        "Layers": [
            {"Name": "conv", "Outputs": [{"Name": "y", "DataType": "Half", "Format": "Channel major (kHWC8)"}]},
            {"Name": "score", "Outputs": [{"Name": "s", "DataType": "Float", "Format": "Row major linear (kLINEAR)"}]},
        ],
        "I/O Tensors": [{"Name": "images", "IOMode": "Input", "DataType": "UInt8"}],
    }
    report = analyze_layer_precisions(layers, {"score"}, {"conv"})
    assert report.tensor_counts == {"fp16": 1, "fp32": 1}
    assert report.island_layers == ("score",) and report.problems("fp16") == []


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"Format/Datatype": "Row major linear FP32"}, "fp32"),
        ({"Format/Datatype": "Two wide channel vectorized row major FP16 format"}, "fp16"),
        ({"Format/Datatype": "Half"}, "fp16"),
        ({"Format/Datatype": "Float"}, "fp32"),
        ({"Format/Datatype": "Row major linear BFloat16 format"}, "bf16"),
        ({"Format/Datatype": "Row major linear Int32"}, "int"),
        ({"Format/Datatype": "Row major linear UInt8 format"}, "int"),
        ({"Format/Datatype": "Channel major INT8 format where channel % 16 == 0"}, "int8"),
        ({"DataType": "Half", "Format": "kLINEAR"}, "fp16"),
        ({"Format/Datatype": "Unknown format"}, None),
        ({}, None),
    ],
)
def test_tensor_precision_reads_every_format_string(entry, expected):
    assert tensor_precision(entry) == expected


def test_engines_without_detailed_verbosity_or_json_are_refused():
    with pytest.raises(ReconadError, match="without detailed profiling verbosity"):
        parse_engine_layers(json.dumps({"Layers": ["conv", "softmax"]}))
    with pytest.raises(ReconadError, match="not JSON"):
        parse_engine_layers("Layers: conv")
    with pytest.raises(ReconadError, match="no layers"):
        parse_engine_layers(json.dumps({"Bindings": []}))


def test_onnx_names_in_metadata():
    text = "[ONNX Layer: /enc/norm/LayerNormalization]\x1e[ONNX Layer: /enc/Add | Local Function: block]"
    assert onnx_names_in_metadata(text) == ["/enc/norm/LayerNormalization", "/enc/Add"]
    assert onnx_names_in_metadata("") == []
