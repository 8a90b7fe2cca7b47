"""Engine artifacts without TensorRT: naming, Jetson release probing, which ONNX is parsed, the batch range,
the engine manifest as written, and the one-sentence refusal when TensorRT is missing."""

import json
import subprocess
import sys

import pytest

from reconad.export.build_config import BuildConfig
from reconad.export.engine import build_details, build_engine, resolve_batch_range, resolve_onnx, write_engine
from reconad.export.naming import device_slug, engine_file_name, resolve_engine_path, run_name, sibling_onnx_path
from reconad.export.precision_plan import plan_precision
from reconad.runtime.atomic import write_bytes_atomic
from reconad.runtime.backends.device import parse_l4t_release, read_jetson_release
from reconad.export.precision_check import analyze_layer_precisions
from reconad.runtime.backends.device import GpuInfo
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import EngineInfo, Manifest, Precision, check_artifact_sha256, sha256_file
from reconad.runtime.backends.trt import engine_mismatch
from tests.runtime.onnx_graphs import write_artifact

ORIN = GpuInfo(
    name="Orin", compute_capability="8.7", total_memory_mib=7620, integrated=True, driver_cuda_version="12.6"
)


def test_engine_names_describe_the_artifact():
    assert device_slug("Orin") == "orin"
    assert device_slug("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert device_slug("NVIDIA H200") == "h200"
    assert device_slug("NVIDIA") == "gpu"
    name = engine_file_name("bottle", (512, 512), "fp16", "10.3.0.26", "Orin")
    assert name == "bottle-512x512-fp16-trt10.3.0-orin.engine"
    assert engine_file_name("m", (224, 256), "fp32", "8.5.2", "NVIDIA H200") == "m-224x256-fp32-trt8.5.2-h200.engine"


def test_run_names_and_siblings_follow_the_exported_precision_tags(tmp_path):
    assert run_name(tmp_path / "weave-512x512-fp16.onnx") == "weave"
    assert run_name(tmp_path / "model.fp16.onnx") == "model" == run_name(tmp_path / "model.onnx")
    assert sibling_onnx_path(tmp_path / "weave-512x512-fp16.onnx", "fp32") == tmp_path / "weave-512x512-fp32.onnx"
    assert sibling_onnx_path(tmp_path / "model.fp16.onnx", "fp32") == tmp_path / "model.fp32.onnx"
    assert sibling_onnx_path(tmp_path / "model.onnx", "fp16") == tmp_path / "model-fp16.onnx"


def test_engine_path_is_the_given_file_or_a_named_file_in_a_folder(tmp_path):
    onnx_path = write_artifact(tmp_path / "export", name="run7-16x24-fp32.onnx", input_hw=(16, 24))
    manifest = Manifest.load(onnx_path.with_suffix(".json"))
    given = tmp_path / "x.engine"
    assert resolve_engine_path(given, onnx_path, manifest, "fp16", "10.3.0", ORIN) == given
    named = "run7-16x24-fp16-trt10.3.0-orin.engine"
    assert resolve_engine_path(None, onnx_path, manifest, "fp16", "10.3.0", ORIN) == onnx_path.parent / named
    folder = tmp_path / "engines" / "artifacts"
    assert resolve_engine_path(folder, onnx_path, manifest, "fp16", "10.3.0", ORIN) == folder / named


def test_l4t_release_from_nv_tegra_release_and_dpkg(tmp_path):
    text = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13\n"
    assert parse_l4t_release(text) == "36.4.0"
    assert parse_l4t_release("# R35 (release), REVISION: 3.1, GCID: 32827747") == "35.3.1"
    assert parse_l4t_release("Ubuntu") is None

    release = tmp_path / "nv_tegra_release"
    release.write_text(text)
    calls = []

    def dpkg(command, **kwargs):
        calls.append(command[-1])
        versions = {"nvidia-jetpack": "6.1+b123", "nvidia-l4t-core": "36.4.0-20240912212859"}
        return subprocess.CompletedProcess(command, 0, stdout=versions[command[-1]], stderr="")

    assert read_jetson_release(release, run=dpkg) == ("6.1", "36.4.0")
    assert read_jetson_release(tmp_path / "missing", run=dpkg) == ("6.1", "36.4.0")  # from nvidia-l4t-core
    assert calls == ["nvidia-jetpack", "nvidia-l4t-core", "nvidia-jetpack"]

    def no_dpkg(command, **kwargs):
        raise FileNotFoundError("dpkg-query")

    assert read_jetson_release(tmp_path / "missing", run=no_dpkg) == (None, None)


def test_the_graph_parsed_is_the_one_the_plan_needs(tmp_path):
    fp32 = write_artifact(tmp_path, name="weave-16x16-fp32.onnx", precision="fp32")
    fp16 = write_artifact(tmp_path, name="weave-16x16-fp16.onnx", precision="fp16")
    strong, weak = plan_precision((10, 3, 0), "fp16"), plan_precision((8, 6, 2), "fp16")
    assert resolve_onnx(fp16, strong)[0] == fp16 and resolve_onnx(fp32, strong)[0] == fp16
    assert resolve_onnx(fp16, weak)[0] == fp32 and resolve_onnx(fp32, weak)[0] == fp32
    assert resolve_onnx(fp32, weak)[1].precision.mode == "fp32"

    alone = write_artifact(tmp_path / "alone", name="weave-16x16-fp32.onnx", precision="fp32")
    with pytest.raises(
        ReconadError, match="built from the fp16 ONNX, but weave-16x16-fp32.onnx is fp32 and weave-16x16-fp16.onnx"
    ):
        resolve_onnx(alone, strong)
    bare = write_artifact(tmp_path / "bare", name="model.onnx", sidecar=False)
    with pytest.raises(ReconadError, match="has no manifest model.json"):
        resolve_onnx(bare, strong)
    with pytest.raises(ReconadError, match="does not exist"):
        resolve_onnx(tmp_path / "nope.onnx", strong)


def test_batch_range_respects_the_exported_graph(tmp_path):
    dynamic = Manifest.load(write_artifact(tmp_path / "d", max_batch=8).with_suffix(".json")).input_tensor
    fixed = Manifest.load(write_artifact(tmp_path / "f", max_batch=2, dynamic_batch=False).with_suffix(".json"))
    assert resolve_batch_range(BuildConfig(min_batch=1, opt_batch=2, max_batch=4), dynamic) == (1, 2, 4)
    assert resolve_batch_range(BuildConfig(max_batch=8), fixed.input_tensor) == (2, 2, 2)
    with pytest.raises(ReconadError, match="max_batch 16 is above the 8 the ONNX graph was exported for"):
        resolve_batch_range(BuildConfig(max_batch=16), dynamic)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a.engine"
    write_bytes_atomic(path, b"plan")
    write_bytes_atomic(path, b"plan2")
    assert path.read_bytes() == b"plan2" and sorted(p.name for p in tmp_path.iterdir()) == ["a.engine"]


GOOD_ENGINE = json.dumps(
    {"Layers": [{"Name": "conv", "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP16 format"}]}]}
)


def write_built_engine(tmp_path, **config):
    onnx_path = write_artifact(tmp_path / "export", name="model.fp16.onnx", precision="fp16")
    onnx_manifest = Manifest.load(onnx_path.with_suffix(".json"))
    plan = plan_precision((10, 3, 0, 26), "fp16")
    build = BuildConfig(**config)
    report = analyze_layer_precisions(GOOD_ENGINE, set(), {"conv"})
    info = EngineInfo(
        tensorrt_version="10.3.0.26",
        cuda_version="12.6",
        gpu_name=ORIN.name,
        compute_capability=ORIN.compute_capability,
        jetpack="6.1",
        l4t="36.4.0",
        build_details=build_details(
            build, plan, ORIN, report, (1, 1, 4), onnx_file=onnx_path.name, constrained_layers=0,
            profile_name="orin-nano", build_seconds=61.23,
        ),
    )  # fmt: skip
    precision = Precision(mode="fp16", fp32_islands=("LayerNormalization",), description=plan.description)
    target = tmp_path / "engines" / "model-16x16-fp16-trt10.3.0-orin.engine"
    target.parent.mkdir()
    manifest, manifest_path = write_engine(target, b"serialized plan", onnx_manifest, info, precision, (1, 1, 4))
    return onnx_path, target, manifest, manifest_path


def test_the_engine_manifest_records_the_stack_recipe_and_both_hashes(tmp_path):
    onnx_path, target, manifest, manifest_path = write_built_engine(tmp_path)
    assert manifest_path == target.with_suffix(".json")
    loaded = Manifest.load(manifest_path)
    assert loaded == manifest and loaded.artifact_kind == "engine" and loaded.artifact_file == target.name
    assert loaded.engine_sha256 == sha256_file(target) and loaded.onnx_sha256 == sha256_file(onnx_path)
    check_artifact_sha256(loaded, target)
    engine = loaded.engine
    assert (engine.tensorrt_version, engine.cuda_version, engine.gpu_name, engine.compute_capability) == (
        "10.3.0.26", "12.6", "Orin", "8.7"
    )  # fmt: skip
    assert (engine.jetpack, engine.l4t) == ("6.1", "36.4.0")
    details = engine.build_details
    assert details["profile"] == "orin-nano" and details["batch"] == {"min": 1, "opt": 1, "max": 4}
    assert details["plan"]["strongly_typed"] is True and details["plan"]["onnx_precision"] == "fp16"
    assert details["layer_precisions"]["tensor_counts"] == {"fp16": 1}
    assert loaded.precision.mode == "fp16" and "strongly typed" in loaded.precision.description
    assert loaded.input_tensor.shape == (-1, 16, 16, 3) and loaded.input_tensor.max_batch == 4
    assert (
        engine_mismatch(engine, target.name, tensorrt_version="10.3.0.26", gpu_name="Orin", compute_capability="8.7")
        is None
    )
    assert "rebuild it here" in engine_mismatch(
        engine, target.name, tensorrt_version="10.3.0.26", gpu_name="NVIDIA H200", compute_capability="9.0"
    )
    assert sorted(path.name for path in target.parent.iterdir()) == sorted([target.name, manifest_path.name])


def test_compatibility_flags_reach_the_runtime_check(tmp_path):
    _, target, manifest, _ = write_built_engine(tmp_path, version_compatible=True)
    assert manifest.engine.build_details["version_compatible"] is True
    newer = engine_mismatch(
        manifest.engine, target.name, tensorrt_version="10.7.0", gpu_name="Orin", compute_capability="8.7"
    )
    assert newer is None


def test_no_engine_is_left_without_its_manifest(tmp_path, monkeypatch):
    save = Manifest.save

    def fail_for_engines(self, path):
        if self.artifact_kind == "engine":
            raise OSError("disk full")
        save(self, path)

    monkeypatch.setattr(Manifest, "save", fail_for_engines)
    with pytest.raises(OSError):
        write_built_engine(tmp_path)
    assert list((tmp_path / "engines").iterdir()) == []


def test_without_tensorrt_the_build_stops_with_one_sentence(tmp_path, monkeypatch):
    onnx_path = write_artifact(tmp_path, name="model.fp16.onnx", precision="fp16")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    with pytest.raises(ReconadError) as caught:
        build_engine(onnx_path, tmp_path / "m.engine")
    message = str(caught.value)
    assert message.startswith("TensorRT is not installed") and message.count(".") <= 2 and "\n" not in message
    assert caught.value.exit_code == 2
    assert not (tmp_path / "m.engine").exists()


def engine_from(onnx_path, target):
    """write_engine for ``onnx_path`` into ``target`` with the sources recorded as build_engine records them."""
    from reconad.export.engine import source_files

    info = EngineInfo(tensorrt_version="10.3.0.26", gpu_name="Orin", compute_capability="8.7", **source_files(onnx_path, target))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx_manifest = Manifest.load(onnx_path.with_suffix(".json"))
    return write_engine(target, b"serialized plan", onnx_manifest, info, onnx_manifest.precision, (1, 1, 4))


def test_the_engine_manifest_records_its_onnx_and_reference_and_verify_finds_them(tmp_path):
    """The README's flow: to-onnx writes export/, build-engine --out engines/artifacts/, verify the engine."""
    from reconad.runtime.verify import find_reference
    from tests.runtime.onnx_graphs import random_images

    onnx_path = write_artifact(tmp_path / "export", name="line1-16x16-fp16.onnx", reference_images=random_images(2))
    reference = onnx_path.with_name("line1-16x16-fp16.reference.npz")
    target = tmp_path / "engines" / "artifacts" / "line1-16x16-fp16-trt10.3.0-orin.engine"
    _, manifest_path = engine_from(onnx_path, target)
    engine_info = Manifest.load(manifest_path).engine
    assert engine_info.onnx_path == "../../export/line1-16x16-fp16.onnx"
    assert engine_info.reference_path == "../../export/line1-16x16-fp16.reference.npz"
    assert engine_info.reference_sha256 == sha256_file(reference)
    assert find_reference(target, Manifest.load(manifest_path)).resolve() == reference.resolve()

    moved = tmp_path / "device"  # the engine and its manifest copied alone, the reference copied beside them
    moved.mkdir()
    for path in (target, manifest_path, reference):
        moved.joinpath(path.name).write_bytes(path.read_bytes())
    assert find_reference(moved / target.name, Manifest.load(moved / manifest_path.name)) == moved / reference.name

    reference.write_bytes(reference.read_bytes() + b"\0")  # changed since the build
    with pytest.raises(ReconadError, match=r"has changed since line1-16x16-fp16-trt10\.3\.0-orin\.engine was built"):
        find_reference(target, Manifest.load(manifest_path))
    reference.unlink()
    with pytest.raises(ReconadError) as missing:
        find_reference(target, Manifest.load(manifest_path))
    assert str(missing.value).startswith("Reference ../../export/line1-16x16-fp16.reference.npz (relative to ")
    assert "is missing; copy it there, or beside the engine, or pass --reference." in str(missing.value)
    own = target.with_name(f"{target.stem}.reference.npz")  # one beside the engine, by its name, comes first
    own.write_bytes(b"any")
    assert find_reference(target, Manifest.load(manifest_path)) == own


def test_an_engine_from_an_onnx_without_reference_says_so(tmp_path):
    from reconad.runtime.verify import find_reference

    onnx_path = write_artifact(tmp_path / "export", name="line1-16x16-fp32.onnx")
    target = tmp_path / "line1.engine"
    _, manifest_path = engine_from(onnx_path, target)
    manifest = Manifest.load(manifest_path)
    assert manifest.engine.onnx_path == "export/line1-16x16-fp32.onnx" and manifest.engine.reference_path is None
    with pytest.raises(ReconadError, match="was built from export/line1-16x16-fp32.onnx, which had no .reference.npz"):
        find_reference(target, manifest)


def test_an_engine_built_before_sources_were_recorded_finds_the_reference_of_its_onnx_beside_it(tmp_path):
    from reconad.runtime.verify import find_reference
    from tests.runtime.onnx_graphs import random_images

    onnx_path = write_artifact(tmp_path, name="line1-16x16-fp16.onnx", reference_images=random_images(2))
    onnx_manifest = Manifest.load(onnx_path.with_suffix(".json"))
    target = tmp_path / "line1.engine"
    info = EngineInfo(tensorrt_version="8.6.2", gpu_name="Orin", compute_capability="8.7")  # no onnx_path
    manifest, _ = write_engine(target, b"plan", onnx_manifest, info, onnx_manifest.precision, (1, 1, 4))
    assert find_reference(target, manifest) == tmp_path / "line1-16x16-fp16.reference.npz"
    onnx_path.with_suffix(".json").unlink()
    with pytest.raises(ReconadError, match="No reference for .*line1.engine: pass --reference"):
        find_reference(target, manifest)
