"""build-engine on an int8 (QDQ) ONNX: the plan per TensorRT version, the builder's calls up to TensorRT, the INT8
precision check; and the inspector reports of TensorRT 8.x / 10.x / 11.x read alike."""

import dataclasses
import json

import onnx
import pytest

from reconad.export.build_config import BuildConfig
from reconad.export.engine import EnginePrecisionError, build_engine
from reconad.export.precision_check import analyze_layer_precisions, tensor_precision, weight_precisions
from reconad.export.precision_plan import plan_precision
from reconad.runtime.manifest import Int8Calibration, Manifest, Precision, manifest_path_for
from tests.export.mini_graph import build_model, engine_json, parsed_network
from tests.export.test_engine_builder import RecordingTensorRT, use
from tests.runtime.onnx_graphs import make_manifest

INT8 = "Channel major INT8 format where channel % 32 == 0"
CALIBRATION = Int8Calibration(count=16, folders=("good/a", "good/b"), method="minmax")


def write_int8_export(folder):
    folder.mkdir(parents=True)
    path = folder / "mini-8x8-int8.onnx"
    onnx.save(build_model(), path)
    manifest = make_manifest(path.name, input_hw=(8, 8), max_batch=8, precision="fp32")
    precision = Precision(mode="int8", fp32_islands=("input normalisation", "LayerNormalization"), calibration=CALIBRATION)
    manifest = dataclasses.replace(manifest, precision=precision)
    manifest.stamp_artifact(path).save(manifest_path_for(path))
    return path


@pytest.mark.parametrize("version", [(8, 5, 2, 2), (8, 6, 2, 3), (9, 3, 0)])
def test_int8_before_10_sets_int8_and_fp16_flags_and_constrains_the_islands(version):
    plan = plan_precision(version, "int8")
    assert plan.onnx_precision == "int8" and not plan.strongly_typed and plan.explicit_batch_flag
    assert plan.builder_flags == ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS")
    assert plan.decompose_layer_norm == (version[:2] == (8, 5))


@pytest.mark.parametrize("version", [(10, 3, 0), (10, 13, 0), (11, 0, 0)])
def test_int8_on_10_and_later_is_strongly_typed_from_the_qdq_graph(version):
    plan = plan_precision(version, "int8")
    assert plan.onnx_precision == "int8" and plan.strongly_typed and plan.builder_flags == ()
    assert "explicit quantization" in plan.description
    weak = plan_precision((10, 8, 0), "int8", "weak")
    assert weak.builder_flags == ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS") and not weak.explicit_batch_flag


def int8_engine_json(**changes):
    return engine_json(conv_format=INT8, weights="Int8", **changes)


def test_tensorrt_8_6_builds_the_int8_graph_with_int8_flag_and_records_the_calibration(tmp_path, monkeypatch):
    source = write_int8_export(tmp_path / "export")
    trt = use(monkeypatch, RecordingTensorRT("8.6.2.3", parsed_network(), int8_engine_json()))
    result = build_engine(source, tmp_path / "out", BuildConfig(precision="int8"), log=lambda line: None)
    assert trt.parsed == [str(source)]
    network, built = trt.built[0]
    assert built.flags == {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"}
    assert any(layer.precision is not None for layer in network.layers)  # the islands, FP32
    manifest = Manifest.load(result.manifest_path)
    assert manifest.precision.mode == "int8" and manifest.precision.calibration == CALIBRATION
    assert result.engine_path.name == "mini-8x8-int8-trt8.6.2-orin.engine"
    assert manifest.engine.build_details["layer_precisions"]["int8_weights"] == 2


def test_tensorrt_10_builds_int8_strongly_typed_and_refuses_an_engine_without_int8(tmp_path, monkeypatch):

    source = write_int8_export(tmp_path / "export")
    network_layers = parsed_network(category_dtype="INT64")
    trt = use(monkeypatch, RecordingTensorRT("10.3.0", network_layers, int8_engine_json()))
    result = build_engine(source, tmp_path / "a.engine", BuildConfig(precision="int8"), log=lambda line: None)
    network, built = trt.built[0]
    assert network.flags == 1 << 5 and built.flags == set()
    assert result.report.has_int8 and result.report.island_layers
    # An engine whose inspector shows no INT8 (the Q/DQ nodes were not honoured) is not written.
    use(monkeypatch, RecordingTensorRT("10.3.0", network_layers, engine_json()))
    with pytest.raises(EnginePrecisionError, match="no INT8 layer"):
        build_engine(source, tmp_path / "b.engine", BuildConfig(precision="int8"), log=lambda line: None)
    assert not (tmp_path / "b.engine").exists()


def test_an_island_running_in_int8_is_a_violation():
    report = analyze_layer_precisions(int8_engine_json(softmax_format=INT8), {"softmax"}, {"conv"})
    assert report.island_violations == ("softmax: attention is int8",)
    assert any("run in INT8" in problem for problem in report.problems("int8"))


def layer_report(layout: str, precision_text: str, weight_type: str) -> dict:
    """One convolution layer as each TensorRT release's inspector writes it (hand-written after their formats)."""
    if layout == "8.x":  # "Format/Datatype" in one string, "Weights": {"Type", "Count"}
        output = {"Name": "feat", "Format/Datatype": f"Channel major {precision_text} format where channel % 8 == 0"}
        return {"Name": "conv", "LayerType": "CaskConvolution", "Outputs": [output], "Weights": {"Type": weight_type, "Count": 4}}
    if layout == "10.x":  # the same keys; Myelin-era spelling of the type in some layers
        output = {"Name": "feat", "Format/Datatype": precision_text.title()}
        return {"Name": "conv", "LayerType": "CaskConvolution", "Outputs": [output], "Weights": {"Type": weight_type, "Count": 4}}
    # 11.x: per-tensor "Datatype" and "Format", lower-case keys elsewhere, weights under another key
    output = {"name": "feat", "Datatype": precision_text, "Format": "Channel major, channel % 8 == 0"}
    return {"name": "conv", "layertype": "CaskConvolution", "outputs": [output], "KernelWeights": {"Datatype": weight_type, "Count": 4}}


@pytest.mark.parametrize("layout", ["8.x", "10.x", "11.x"])
@pytest.mark.parametrize("precision_text, weight_type, expected", [("FP16", "Half", "fp16"), ("Int8", "Int8", "int8"), ("FP32", "Float", "fp32")])
def test_inspector_reports_of_each_release_give_the_same_precisions(layout, precision_text, weight_type, expected):
    if layout == "10.x" and precision_text == "FP16":
        precision_text = "Half"
    layer = layer_report(layout, precision_text, weight_type)
    report = analyze_layer_precisions(json.dumps({"Layers": [layer]}), set(), {"conv"})
    assert report.tensor_counts == {expected: 1}
    assert weight_precisions(layer) == ([expected] if expected != "fp32" else ["fp32"])
    # An fp16 build on 11 is not mistaken for FP32 ("came out FP32"), nor an int8 one for "no INT8 layer".
    assert report.problems(expected) == []


def test_tensor_precision_reads_keys_in_any_case():
    assert tensor_precision({"DATATYPE": "Half"}) == "fp16"
    assert tensor_precision({"datatype": "Int8", "format": "Row major linear"}) == "int8"
    assert tensor_precision({"Format": "Row major linear UInt8 format"}) == "int"
