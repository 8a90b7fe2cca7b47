"""build_engine's plumbing per TensorRT version, on a recording stand-in for the ``tensorrt`` module.

These tests do not verify TensorRT: ``RecordingTensorRT`` records which calls the builder makes
(network flags, builder flags, per-layer constraints, profile, workspace, timing cache, progress) for
each precision plan, and plays back a hand-written inspector report. Real builds run only in the
``gpu`` tests (tests/export/test_engine_gpu.py).
"""

import dataclasses
import enum
import json
import types

import onnx
import pytest

from reconad.export import engine
from reconad.export.build_config import BuildConfig
from reconad.export.engine import EnginePrecisionError, build_engine
from reconad.runtime.backends.device import GpuInfo
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import CATEGORY_NAME, OUTPUT_NAMES, Manifest, Precision, manifest_path_for
from tests.export.mini_graph import FP32, NORM_STEPS, build_model, engine_json, parsed_network
from tests.runtime.onnx_graphs import make_manifest

ORIN = GpuInfo(
    name="Orin", compute_capability="8.7", total_memory_mib=7620, integrated=True, driver_cuda_version="12.6"
)


class Named:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


class FakeTensor:
    def __init__(self, name, dtype, shape=()):
        self.name, self.dtype, self.shape = name, Named(dtype), shape


class FakeLayer:
    def __init__(self, spec):
        self.name, self.type, self.metadata = spec.name, Named(spec.type_name), spec.metadata
        self.outputs = [FakeTensor(name, dtype) for name, dtype in zip(spec.output_names, spec.output_dtypes, strict=True)]
        self.num_outputs = len(self.outputs)
        self.precision = None
        self.output_types = {}

    def get_output(self, index):
        return self.outputs[index]

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype.name


class FakeNetwork:
    """The parsed network; its outputs are the layer outputs named as the graph's outputs (their dtypes as parsed)."""

    def __init__(self, flags):
        self.flags = flags
        self.layers = []
        self.inputs = [FakeTensor("images", "UINT8", (-1, 8, 8, 3))]
        self.num_inputs = 1

    @property
    def outputs(self):
        produced = {tensor.name: tensor for layer in self.layers for tensor in layer.outputs}
        return [produced[name] for name in OUTPUT_NAMES if name in produced]

    @property
    def num_outputs(self):
        return len(self.outputs)

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, index):
        return self.layers[index]

    def get_input(self, index):
        return self.inputs[index]

    def get_output(self, index):
        return self.outputs[index]


class FakeConfig:
    def __init__(self, trt):
        self.trt = trt
        self.flags, self.cleared, self.pools, self.profiles = set(), set(), {}, []
        self.cache = None
        self.profiling_verbosity = None
        if trt.version >= (10,):
            self.progress_monitor = None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag.name)

    def clear_flag(self, flag):
        self.cleared.add(flag.name)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        return types.SimpleNamespace(data=data, serialize=lambda: data + b"+tuned")

    def set_timing_cache(self, cache, ignore_mismatch):
        """TensorRT returns False for a cache made on another device or version (``mismatched`` here)."""
        if cache.data == self.trt.mismatched_cache:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class RecordingTensorRT:
    """Just enough of ``tensorrt`` for EngineBuilder, recording what it is asked to do."""

    def __init__(self, version, layer_specs, inspector_json, parse_errors=()):
        self.__version__ = version
        self.version = tuple(int(part) for part in version.split("."))
        self.layer_specs, self.inspector_json, self.parse_errors = layer_specs, inspector_json, list(parse_errors)
        self.networks, self.configs, self.parsed, self.built = [], [], [], []
        self.num_DLA_cores = 2  # Orin AGX / NX; the Nano has none
        self.mismatched_cache = b"cache from another GPU"
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda logger, severity: None})
        creation = {"EXPLICIT_BATCH": 0} | ({"STRONGLY_TYPED": 5} if self.version >= (10,) else {})
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
        flags = ["TF32", "GPU_FALLBACK", "VERSION_COMPATIBLE"]
        flags += ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"] if self.version < (11,) else []
        self.BuilderFlag = types.SimpleNamespace(**{name: Named(name) for name in flags})
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
        self.DeviceType = types.SimpleNamespace(DLA="DLA")
        self.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")
        self.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
        self.float32 = Named("FLOAT")
        if self.version >= (10,):
            self.IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda monitor: None})
        self.Builder, self.OnnxParser, self.Runtime = self._builder(), self._parser(), self._runtime()

    def init_libnvinfer_plugins(self, logger, namespace):
        pass

    def _builder(trt):
        class Builder:
            def __init__(self, logger):
                self.num_DLA_cores = trt.num_DLA_cores

            def create_network(self, flags):
                trt.networks.append(FakeNetwork(flags))
                return trt.networks[-1]

            def create_builder_config(self):
                trt.configs.append(FakeConfig(trt))
                return trt.configs[-1]

            def create_optimization_profile(self):
                profile = types.SimpleNamespace(shapes={})
                profile.set_shape = lambda name, low, opt, high: profile.shapes.update({name: (low, opt, high)})
                return profile

            def build_serialized_network(self, network, config):
                monitor = getattr(config, "progress_monitor", None)
                if monitor is not None:
                    monitor.phase_start("Building engine", None, 2)
                    monitor.step_complete("Building engine", 0)
                    monitor.phase_finish("Building engine")
                trt.built.append((network, config))
                return b"serialized plan"

        return Builder

    def _parser(trt):
        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = len(trt.parse_errors)

            def parse_from_file(self, path):
                trt.parsed.append(path)
                self.network.layers = [FakeLayer(spec) for spec in trt.layer_specs]
                return not trt.parse_errors

            def parse(self, model, path=None):
                trt.parsed.append(onnx.load_model_from_string(bytes(model)))
                self.network.layers = [FakeLayer(spec) for spec in trt.layer_specs]
                return not trt.parse_errors

            def get_error(self, index):
                error = trt.parse_errors[index]
                return types.SimpleNamespace(
                    desc=lambda: error["desc"], node=lambda: 4, node_name=lambda: error["node"]
                )

        return OnnxParser

    def _runtime(trt):
        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                assert data == b"serialized plan"
                context = types.SimpleNamespace(set_input_shape=lambda name, shape: True)
                inspector = types.SimpleNamespace(get_engine_information=lambda fmt: trt.inspector_json)
                return types.SimpleNamespace(
                    create_execution_context=lambda: context, create_engine_inspector=lambda: inspector
                )

        return Runtime


def write_exports(folder):
    """The mini graph exported as fp32 and 'fp16' (the same graph: the recording parser ignores it)."""
    model = build_model()
    folder.mkdir(parents=True)
    paths = {}
    for precision in ("fp32", "fp16"):
        path = folder / f"mini-8x8-{precision}.onnx"
        onnx.save(model, path)
        islands = ("input normalisation", "LayerNormalization") if precision == "fp16" else ()
        manifest = make_manifest(path.name, input_hw=(8, 8), max_batch=8, precision=precision)
        if islands:
            manifest = dataclasses.replace(manifest, precision=Precision(mode="fp16", fp32_islands=islands))
        manifest.stamp_artifact(path).save(manifest_path_for(path))
        paths[precision] = path
    return paths


@pytest.fixture
def exports(tmp_path):
    return write_exports(tmp_path / "export")


def use(monkeypatch, trt):
    monkeypatch.setattr(engine, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(engine, "probe_gpu", lambda device=0: ORIN)
    monkeypatch.setattr(engine, "read_jetson_release", lambda: ("6.0", "36.3.0"))
    monkeypatch.setattr(engine, "_cuda_versions", lambda: {"runtime": "12.2", "binding": "cuda-python 12.2.1"})
    return trt


def test_tensorrt_8_6_builds_the_fp32_graph_with_fp16_flag_and_obeyed_island_constraints(
    tmp_path, exports, monkeypatch
):
    trt = use(monkeypatch, RecordingTensorRT("8.6.2.3", parsed_network(), engine_json()))
    lines = []
    config = BuildConfig(timing_cache=tmp_path / "cache" / "t.cache", workspace_mib=512, opt_batch=2, max_batch=4)
    result = build_engine(exports["fp16"], tmp_path / "out", config, profile_name="orin-nano", log=lines.append)

    assert trt.parsed == [str(exports["fp32"])]
    network, built = trt.built[0]
    assert network.flags == 1 << 0  # EXPLICIT_BATCH only
    assert built.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"} and built.cleared == set()
    assert built.pools == {"WORKSPACE": 512 << 20} and built.profiling_verbosity == "DETAILED"
    assert built.profiles[0].shapes == {"images": ((1, 8, 8, 3), (2, 8, 8, 3), (4, 8, 8, 3))}
    constrained = {layer.name for layer in network.layers if layer.precision is not None}
    assert {"cast", "softmax", "score", "(Unnamed Layer* 11) [Normalization]"} <= constrained
    assert not constrained & {"conv", "context", "reconstruct", "to_nchw"}
    assert all(layer.output_types == {0: "FLOAT"} for layer in network.layers if layer.precision is not None)
    assert (tmp_path / "cache" / "t.cache").read_bytes() == b"+tuned"
    assert {"(Unnamed Layer* 11) [Normalization]", "softmax", "score"} <= set(result.report.island_layers)

    assert result.engine_path == tmp_path / "out" / "mini-8x8-fp16-trt8.6.2-orin.engine"
    assert result.engine_path.read_bytes() == b"serialized plan"
    manifest = Manifest.load(result.manifest_path)
    assert manifest == result.manifest and manifest.artifact_kind == "engine"
    assert manifest.precision.fp32_islands == (
        "input normalisation",
        "LayerNormalization",
        "softmax logits",
        "anomaly head",
        "category head",
    )
    # TensorRT 8.x has no INT64 tensors: the engine's category output is INT32, and its manifest says so.
    assert {"nearest", "pool_features", "similarity", "nearest_distance"} <= constrained
    assert [(o.name, o.dtype) for o in manifest.output_tensors][2:] == [(CATEGORY_NAME, "int32"), ("category_distance", "float32")]
    details = manifest.engine.build_details
    assert (
        details["plan"]["constrained_layers"] == len(constrained)
        and details["plan"]["onnx_file"] == "mini-8x8-fp32.onnx"
    )
    assert details["profile"] == "orin-nano" and details["layer_precisions"]["island_violations"] == []
    assert (manifest.engine.jetpack, manifest.engine.l4t, manifest.engine.cuda_runtime_version) == ("6.0", "36.3.0", "12.2")
    assert (manifest.engine.cuda_driver_version, manifest.engine.cuda_binding) == ("12.6", "cuda-python 12.2.1")
    assert manifest.engine.cuda_version is None  # the old ambiguous name is no longer written
    assert any("FP32 constraints on" in line for line in lines)
    assert any("no progress on this version" in line for line in lines)


def test_tensorrt_10_builds_the_fp16_graph_strongly_typed_with_progress(tmp_path, exports, monkeypatch):
    network_layers = parsed_network(strongly_typed_fp16=True, category_dtype="INT64")
    trt = use(monkeypatch, RecordingTensorRT("10.3.0", network_layers, engine_json()))
    lines = []
    result = build_engine(exports["fp32"], tmp_path / "m.engine", BuildConfig(dla_core=0), log=lines.append)
    assert trt.parsed == [str(exports["fp16"])]
    network, built = trt.built[0]
    assert network.flags == 1 << 5  # STRONGLY_TYPED only
    assert built.flags == {"GPU_FALLBACK"} and built.default_device_type == "DLA" and built.DLA_core == 0
    assert all(layer.precision is None for layer in network.layers)
    assert built.progress_monitor is not None
    assert "  Building engine (2 steps)" in lines and any(
        line.startswith("  Building engine done in") for line in lines
    )
    manifest = result.manifest
    assert manifest.precision.fp32_islands == ("input normalisation", "LayerNormalization")
    assert manifest.engine.build_details["plan"]["strongly_typed"] is True
    assert result.report.island_layers  # the FP32-typed layers were checked in the inspector report
    # 10.x's parser casts ArgMin's INT32 indices to INT64: the output keeps the graph's dtype.
    assert manifest.output_tensors[2].dtype == "int64"
    assert "  output category () INT64" in lines


def test_a_network_without_the_outputs_its_manifest_promises_is_refused(tmp_path, exports, monkeypatch):
    layers = [layer for layer in parsed_network() if layer.name not in ("nearest", "nearest_distance")]
    use(monkeypatch, RecordingTensorRT("8.6.2.3", layers, engine_json()))
    with pytest.raises(ReconadError, match=r"outputs \['anomaly_map', 'image_score'\] but its manifest promises"):
        build_engine(exports["fp16"], tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_tensorrt_11_builds_fp32_engines_strongly_typed_without_tf32(tmp_path, exports, monkeypatch):
    fp32_engine = engine_json(conv_format=FP32, weights="Float")
    trt = use(monkeypatch, RecordingTensorRT("11.0.0", parsed_network(), fp32_engine))
    result = build_engine(exports["fp16"], tmp_path, BuildConfig(precision="fp32", version_compatible=True))
    network, built = trt.built[0]
    assert trt.parsed == [str(exports["fp32"])] and network.flags == 1 << 5
    assert built.flags == {"VERSION_COMPATIBLE"} and built.cleared == {"TF32"}
    assert result.engine_path.name == "mini-8x8-fp32-trt11.0.0-orin.engine"


def test_a_strongly_typed_network_without_fp16_is_refused_before_building(tmp_path, exports, monkeypatch):
    trt = use(monkeypatch, RecordingTensorRT("11.0.0", parsed_network(), engine_json()))
    with pytest.raises(ReconadError, match="no FP16 layer, so a strongly typed build would be FP32"):
        build_engine(exports["fp16"], tmp_path / "m.engine")
    assert trt.built == [] and not (tmp_path / "m.engine").exists()


def test_a_silently_fp32_engine_is_not_written(tmp_path, exports, monkeypatch):
    fp32_engine = engine_json(conv_format=FP32, weights="Float")
    use(monkeypatch, RecordingTensorRT("10.3.0", parsed_network(strongly_typed_fp16=True), fp32_engine))
    with pytest.raises(EnginePrecisionError, match="came out FP32.*layer report") as caught:
        build_engine(exports["fp16"], tmp_path / "m.engine")
    assert caught.value.exit_code == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "m.layers.json"]
    assert json.loads((tmp_path / "m.layers.json").read_text())["Layers"]


def test_parser_errors_stop_the_build_in_one_sentence(tmp_path, exports, monkeypatch):
    errors = [{"desc": "Unsupported op Einsum", "node": "/attn/Einsum"}]
    use(monkeypatch, RecordingTensorRT("10.3.0", [], engine_json(), parse_errors=errors))
    with pytest.raises(ReconadError) as caught:
        build_engine(exports["fp16"], tmp_path / "m.engine")
    assert str(caught.value) == (
        "TensorRT 10.3.0 could not parse mini-8x8-fp16.onnx at node /attn/Einsum: Unsupported op Einsum."
    )


def test_tensorrt_8_5_parses_the_fp32_graph_with_layer_normalization_decomposed_and_constrained(
    tmp_path, exports, monkeypatch
):
    network_layers = parsed_network(decomposed_layer_norm=True)
    engine = engine_json(decomposed_layer_norm=True)
    trt = use(monkeypatch, RecordingTensorRT("8.5.2.2", network_layers, engine))
    lines = []
    result = build_engine(exports["fp16"], tmp_path, log=lines.append)

    (parsed,) = trt.parsed  # the rewritten fp32 graph, from memory
    ops = [node.op_type for node in parsed.graph.node]
    assert "LayerNormalization" not in ops and ops.count("ReduceMean") == 2 + 1  # + the category head's pooling
    assert [node.name for node in parsed.graph.node if node.name.startswith("norm/")] == list(NORM_STEPS)
    assert onnx.load(exports["fp32"]).graph.node[7].op_type == "LayerNormalization"  # the file is untouched
    network, built = trt.built[0]
    assert network.flags == 1 << 0 and built.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    constrained = {layer.name for layer in network.layers if layer.precision is not None}
    assert set(NORM_STEPS) <= constrained and {"cast", "softmax", "score"} <= constrained
    assert not constrained & {"conv", "context", "reconstruct", "keys_t"}
    assert not any("[Constant]" in name for name in constrained)
    assert {"norm/mean", "norm/variance", "PWN(norm/centered, norm/squared)"} <= set(result.report.island_layers)
    assert result.report.island_violations == ()
    assert result.engine_path.name == "mini-8x8-fp16-trt8.5.2-orin.engine"
    manifest = Manifest.load(result.manifest_path)
    assert "LayerNormalization" in manifest.precision.fp32_islands
    assert "LayerNormalization decomposed" in manifest.precision.description
    details = manifest.engine.build_details
    assert details["plan"]["layer_norm_decomposed"] is True and details["plan"]["onnx_file"] == "mini-8x8-fp32.onnx"
    assert any("LayerNormalization decomposed" in line for line in lines)


def test_tensorrt_8_5_fails_a_decomposed_layer_norm_that_runs_in_fp16(tmp_path, exports, monkeypatch):
    engine = engine_json(decomposed_layer_norm=True, norm_format="Row major linear FP16 format")
    use(monkeypatch, RecordingTensorRT("8.5.2", parsed_network(decomposed_layer_norm=True), engine))
    with pytest.raises(EnginePrecisionError, match="FP32-island layers run in FP16, e.g. norm/mean"):
        build_engine(exports["fp16"], tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_tensorrt_8_5_fp32_engines_decompose_without_constraints(tmp_path, exports, monkeypatch):
    fp32_engine = engine_json(conv_format=FP32, weights="Float", decomposed_layer_norm=True)
    trt = use(monkeypatch, RecordingTensorRT("8.5.2", parsed_network(decomposed_layer_norm=True), fp32_engine))
    result = build_engine(exports["fp16"], tmp_path, BuildConfig(precision="fp32"))
    (parsed,) = trt.parsed
    assert "LayerNormalization" not in {node.op_type for node in parsed.graph.node}
    network, built = trt.built[0]
    assert built.flags == set() and built.cleared == {"TF32"}
    assert all(layer.precision is None for layer in network.layers)
    assert result.manifest.engine.build_details["plan"]["layer_norm_decomposed"] is True


def test_the_built_engine_names_the_onnx_it_parsed_and_its_reference(tmp_path, exports, monkeypatch):
    """build_engine up to the TensorRT calls (the recording stand-in): the manifest leads verify to the reference."""
    from reconad.runtime.manifest import reference_path_for, sha256_file
    from reconad.runtime.verify import find_reference

    reference = reference_path_for(exports["fp16"])
    reference.write_bytes(b"the reference npz")
    use(monkeypatch, RecordingTensorRT("10.3.0", parsed_network(strongly_typed_fp16=True, category_dtype="INT64"), engine_json()))
    lines = []
    result = build_engine(exports["fp32"], tmp_path / "engines", log=lines.append)  # 10.x parses the fp16 sibling
    written = Manifest.load(result.manifest_path)
    assert result.engine_path.parent == tmp_path / "engines" and result.engine_path.is_file()
    assert written.engine.onnx_path == f"../export/{exports['fp16'].name}"
    assert written.engine.reference_path == f"../export/{reference.name}"
    assert written.engine.reference_sha256 == sha256_file(reference)
    assert find_reference(result.engine_path, written).resolve() == reference.resolve()
    assert not any("verify will need --reference" in line for line in lines)
    reference.unlink()
    build_engine(exports["fp16"], tmp_path / "engines", log=lines.append)
    assert f"  {reference.name} is not beside {exports['fp16'].name}: verify will need --reference" in lines
