"""recon-export triton-repo: config.pbtxt parsed with Triton's own ModelConfig schema, versions, appending,
all-or-nothing writes, engines, and a stock tritonserver reading the repository."""

import dataclasses
import json
import types

import pytest
from typer.testing import CliRunner

from reconad.export.cli import app
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import EngineInfo, Manifest, OutputTensor, manifest_path_for
from tests.runtime.onnx_graphs import write_artifact
from tests.triton_servers import require_tritonclient, stock_server

require_tritonclient()
from google.protobuf import text_format  # noqa: E402  (tritonclient brings protobuf)
from tritonclient.grpc import model_config_pb2  # noqa: E402

from reconad.export.triton import TritonRepoConfig, build_model_config, write_triton_repo  # noqa: E402
from reconad.runtime.serve import TritonTensor, triton_tensors  # noqa: E402


def parse_config(model_dir) -> model_config_pb2.ModelConfig:
    """Triton's own schema: a field, enum or syntax it does not know raises ParseError."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def tensor_tuple(tensor):
    reshape = tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None
    return (tensor.name, model_config_pb2.DataType.Name(tensor.data_type), tuple(tensor.dims), reshape)


def tree(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def artifacts(tmp_path):
    return [
        write_artifact(tmp_path / "a", name="line1-16x16-fp32.onnx", max_batch=8),
        write_artifact(tmp_path / "b", name="line1-16x16-fp16.onnx", max_batch=4, graph_offset=0.5),
    ]


def test_one_onnx_graph_makes_a_batching_onnxruntime_model(tmp_path, artifacts):
    result = write_triton_repo(artifacts[:1], tmp_path / "repo")
    assert result.model_dir == tmp_path / "repo" / "line1" and result.versions == (1,)
    config = parse_config(result.model_dir)
    assert (config.name, config.platform, config.max_batch_size) == ("line1", "onnxruntime_onnx", 8)
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert [tensor_tuple(tensor) for tensor in config.input] == [("images", "TYPE_UINT8", (16, 16, 3), None)]
    assert [tensor_tuple(tensor) for tensor in config.output] == [
        ("anomaly_map", "TYPE_FP32", (1, 16, 16), None),
        ("image_score", "TYPE_FP32", (1,), ()),  # the graph's [N] is the client's [N, 1]
        ("category", "TYPE_INT64", (1,), ()),
        ("category_distance", "TYPE_FP32", (1,), ()),
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    (group,) = config.instance_group
    assert group.count == 1 and model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_AUTO"
    version = result.model_dir / "1"
    assert sorted(path.name for path in version.iterdir()) == ["manifest.json", "model.onnx"]
    assert (version / "model.onnx").read_bytes() == artifacts[0].read_bytes()
    source = Manifest.load(manifest_path_for(artifacts[0]))
    carried = Manifest.load(version / "manifest.json")
    assert carried == dataclasses.replace(source, artifact_file="model.onnx")
    assert Manifest.from_json(config.parameters["reconad_manifest_v1"].string_value) == carried
    assert result.config_text == (result.model_dir / "config.pbtxt").read_text()
    assert not list(tmp_path.glob(".repo.*"))  # no staging folder left beside the repository


def test_several_artifacts_are_versions_and_a_later_run_appends(tmp_path, artifacts):
    repo = tmp_path / "repo"
    first = write_triton_repo(
        artifacts, repo, TritonRepoConfig(name="inspect", instances=3, instance_kind="cpu", max_queue_delay_us=500)
    )
    assert first.versions == (1, 2)
    config = parse_config(first.model_dir)
    assert config.max_batch_size == 4  # the smaller of the two artifacts' max_batch
    assert (config.instance_group[0].count, config.instance_group[0].kind) == (3, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    third = write_artifact(tmp_path / "c", name="line1-16x16-fp32.onnx", max_batch=16, graph_offset=1.0)
    appended = write_triton_repo([third], repo, TritonRepoConfig(name="inspect"))
    assert appended.versions == (3,)
    config = parse_config(appended.model_dir)
    assert config.max_batch_size == 4 and config.instance_group[0].count == 3  # settings kept from the first run
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert sorted(config.parameters) == ["reconad_manifest_v1", "reconad_manifest_v2", "reconad_manifest_v3"]
    for number, artifact in zip((1, 2, 3), [*artifacts, third]):
        assert (repo / "inspect" / str(number) / "model.onnx").read_bytes() == artifact.read_bytes()
    with pytest.raises(ReconadError, match="takes batches up to 4 only, but the model's max_batch_size would be 8"):
        write_triton_repo([third], repo, TritonRepoConfig(name="inspect", max_batch=8))  # version 2 cannot


def test_a_failed_run_leaves_the_repository_as_it_was(tmp_path, artifacts, monkeypatch):
    repo = tmp_path / "repo"
    write_triton_repo(artifacts[:1], repo)
    before = tree(repo)
    other_size = write_artifact(tmp_path / "d", name="line1-32x32-fp32.onnx", input_hw=(32, 32))
    with pytest.raises(ReconadError, match="serves other inputs or outputs"):
        write_triton_repo([other_size], repo)
    with pytest.raises(ReconadError, match="have different inputs or outputs"):
        write_triton_repo([artifacts[1], other_size], tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()

    import reconad.export.triton as triton_module

    copy = triton_module.shutil.copyfile
    copies = []

    def copy_then_fail(source, target):
        copies.append(target)
        if len(copies) == 2:
            raise OSError(28, "No space left on device", str(target))
        return copy(source, target)

    monkeypatch.setattr(triton_module.shutil, "copyfile", copy_then_fail)
    with pytest.raises(ReconadError, match=r"failed .*No space left on device; it is unchanged"):
        write_triton_repo([artifacts[0], artifacts[0]], repo)
    assert tree(repo) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "b", "d", "repo"]  # no staging left


def test_fixed_batch_graphs_are_served_without_batching(tmp_path):
    fixed = write_artifact(tmp_path, name="line1-16x16-fp32.onnx", max_batch=2, dynamic_batch=False)
    result = write_triton_repo([fixed], tmp_path / "repo")
    config = parse_config(result.model_dir)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [tensor_tuple(tensor) for tensor in config.output] == [
        ("anomaly_map", "TYPE_FP32", (2, 1, 16, 16), None),
        ("image_score", "TYPE_FP32", (2,), None),
        ("category", "TYPE_INT64", (2,), None),
        ("category_distance", "TYPE_FP32", (2,), None),
    ]
    with pytest.raises(ReconadError, match="fixed batch of 2, so Triton cannot batch it"):
        write_triton_repo([fixed], tmp_path / "repo2", TritonRepoConfig(max_batch=2))


def write_engine(folder, onnx_path, min_batch=1, max_batch=4):
    onnx_manifest = Manifest.load(manifest_path_for(onnx_path))
    engine_path = folder / "line1-16x16-fp16-trt10.3.0-orin.engine"
    engine_path.write_bytes(b"serialized plan " + bytes([min_batch, max_batch]))
    info = EngineInfo(tensorrt_version="10.3.0.26", gpu_name="Orin", compute_capability="8.7")
    manifest = onnx_manifest.for_engine(engine_file=engine_path, engine=info, min_batch=min_batch, max_batch=max_batch)
    manifest.save(manifest_path_for(engine_path))
    return engine_path


def test_engines_become_tensorrt_plans_on_the_gpu(tmp_path, artifacts):
    engine = write_engine(tmp_path / "a", artifacts[0])
    result = write_triton_repo([engine], tmp_path / "repo", TritonRepoConfig(instances=2))
    config = parse_config(result.model_dir)
    assert (config.platform, config.max_batch_size) == ("tensorrt_plan", 4)
    assert (config.instance_group[0].count, config.instance_group[0].kind) == (2, model_config_pb2.ModelInstanceGroup.KIND_GPU)
    assert (result.model_dir / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert Manifest.load(result.model_dir / "1" / "manifest.json").artifact_file == "model.plan"
    with pytest.raises(ReconadError, match="must be gpu"):
        write_triton_repo([engine], tmp_path / "cpu", TritonRepoConfig(instance_kind="cpu"))
    with pytest.raises(ReconadError, match="one platform per model"):
        write_triton_repo([engine, artifacts[0]], tmp_path / "mixed")
    with pytest.raises(ReconadError, match="holds a tensorrt_plan model"):
        write_triton_repo(artifacts[:1], tmp_path / "repo")
    narrow = write_engine(tmp_path / "b", artifacts[0], min_batch=2, max_batch=4)
    with pytest.raises(ReconadError, match="takes batches of 2..4 only"):
        write_triton_repo([narrow], tmp_path / "narrow")


def test_bad_input_is_one_sentence(tmp_path, artifacts):
    bare = write_artifact(tmp_path / "bare", name="line1-16x16-fp32.onnx", sidecar=False)
    with pytest.raises(ReconadError, match="has no line1-16x16-fp32.json beside it"):
        write_triton_repo([bare], tmp_path / "repo")
    with pytest.raises(ReconadError, match="does not exist"):
        write_triton_repo([tmp_path / "missing.onnx"], tmp_path / "repo")
    with pytest.raises(ReconadError, match="takes batches up to 8 only"):
        write_triton_repo(artifacts[:1], tmp_path / "repo", TritonRepoConfig(max_batch=9))
    with pytest.raises(ReconadError, match="exceed the max_batch_size 8"):
        write_triton_repo(artifacts[:1], tmp_path / "repo", TritonRepoConfig(preferred_batch_sizes=(4, 16)))
    (tmp_path / "repo" / "line1").mkdir(parents=True)
    with pytest.raises(ReconadError, match="is not a Triton model folder"):
        write_triton_repo(artifacts[:1], tmp_path / "repo")
    with pytest.raises(ReconadError, match="is not allowed"):
        TritonRepoConfig(name="a/b")


def test_outputs_come_from_the_manifest_so_new_graph_outputs_flow_through():
    """The manifest of issue 11 adds category (int64 [N]) and category_distance (float32 [N])."""
    manifest = types.SimpleNamespace(
        input_tensor=types.SimpleNamespace(name="images", dtype="uint8", shape=(-1, 16, 16, 3)),
        output_tensors=(
            OutputTensor(name="anomaly_map", shape=(-1, 1, 16, 16)),
            OutputTensor(name="image_score", shape=(-1,)),
            types.SimpleNamespace(name="category", dtype="int64", shape=(-1,)),
            types.SimpleNamespace(name="category_distance", dtype="float32", shape=(-1,)),
        ),
    )
    inputs, outputs = triton_tensors(manifest)
    assert outputs[2:] == (TritonTensor("category", "int64", (1,), ()), TritonTensor("category_distance", "float32", (1,), ()))
    config = build_model_config(
        name="m", kind="onnx", inputs=inputs, outputs=outputs, max_batch=4, instances=1, instance_kind="gpu",
        preferred_batch_sizes=(2, 4), max_queue_delay_us=100, manifests={1: "{}"},
    )  # fmt: skip
    parsed = text_format.Parse(text_format.MessageToString(config), model_config_pb2.ModelConfig())
    assert [tensor_tuple(tensor) for tensor in parsed.output][2] == ("category", "TYPE_INT64", (1,), ())


def test_cli_writes_the_repository_and_refuses_bad_input_in_one_line(tmp_path, artifacts):
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["triton-repo", *map(str, artifacts), "--out", str(tmp_path / "repo"), "--name", "cam", "--max-batch", "2",
         "--instances", "2", "--preferred-batch-size", "1", "--preferred-batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"wrote {tmp_path / 'repo' / 'cam' / 'config.pbtxt'}"
    config = parse_config(tmp_path / "repo" / "cam")
    assert config.max_batch_size == 2 and list(config.dynamic_batching.preferred_batch_size) == [1, 2]
    bad = runner.invoke(app, ["triton-repo", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "repo")])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0 and "does not exist" in bad.output


def repository_index(url):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        return {(entry["name"], entry.get("version")): entry for entry in client.get_model_repository_index()}
    finally:
        client.close()


def test_a_stock_tritonserver_reads_the_repository(tmp_path, artifacts):
    """The wheel's tritonserver ships the Python backend only (no onnxruntime backend): it discovers the model
    and both versions and validates config.pbtxt, then can only report the missing backend. A config that Triton
    rejects never gets that far (the control below)."""
    repo = tmp_path / "repo"
    write_triton_repo(artifacts, repo)
    broken = tmp_path / "broken"
    write_triton_repo(artifacts[:1], broken)
    config_path = broken / "line1" / "config.pbtxt"
    config_path.write_text(config_path.read_text().replace("preferred_batch_size: 8", "preferred_batch_size: 16"))
    with stock_server(repo, tmp_path / "stock.log") as (url, _):
        index = repository_index(url)
    assert set(index) == {("line1", "1"), ("line1", "2")}, index
    for entry in index.values():
        assert entry["state"] == "UNAVAILABLE"
        assert "unable to find backend library for backend 'onnxruntime'" in entry["reason"], entry
    with stock_server(broken, tmp_path / "broken.log") as (url, _):
        index = repository_index(url)
    assert ("line1", "1") not in index  # rejected while reading the config, before any version is loaded
    assert "preferred size must be <= max batch size" in (tmp_path / "broken.log").read_text()


def test_manifest_parameters_are_compact_json(tmp_path, artifacts):
    result = write_triton_repo(artifacts[:1], tmp_path / "repo")
    text = parse_config(result.model_dir).parameters["reconad_manifest_v1"].string_value
    assert "\n" not in text and json.loads(text)["artifact_file"] == "model.onnx"


PYTHON_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    # the contract graph of tests/runtime/onnx_graphs.py, in numpy
    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "images").as_numpy()  # [B, H, W, 3]
            anomaly_map = (images.astype(np.float32).mean(axis=3) * np.float32(1 / 255) + np.float32(OFFSET))[:, None]
            score = anomaly_map.max(axis=(1, 2, 3))  # [B]: the config's reshape makes it [B, 1] for clients
            tensors = [pb_utils.Tensor("anomaly_map", anomaly_map), pb_utils.Tensor("image_score", score)]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
"""


def test_a_stock_tritonserver_running_the_repository_gives_the_remote_loop_the_local_verdicts(tmp_path):
    """The repository as written, run by a stock tritonserver: the wheel has no ONNX Runtime backend, so each
    version's graph runs as a Python-backend model.py (platform swapped for backend "python"; inputs, outputs,
    reshape, batching and the manifests in parameters untouched). The remote inspector reads the threshold
    from the manifest the config carries and must give the local Inspector's verdicts."""
    from reconad.runtime import Inspector
    from reconad.runtime.config import utc_now_iso
    from reconad.runtime.thresholds import Calibration, Threshold
    from reconad.runtime.remote import RemoteInspector
    from tests.runtime.onnx_graphs import random_images
    from tests.triton_servers import python_backend_dir

    calibration = Calibration(method="manual", n_images=0, date=utc_now_iso(), source="test")
    versions = [
        write_artifact(tmp_path / f"v{index}", name="line1-16x16-fp32.onnx", max_batch=8, graph_offset=offset,
                       image_threshold=Threshold(value=0.5 + offset, calibration=calibration),
                       with_category=False)  # the model.py below computes the two score outputs only
        for index, offset in enumerate((0.0, 0.25))
    ]  # fmt: skip
    repo = tmp_path / "repo"
    write_triton_repo(versions, repo)
    config_path = repo / "line1" / "config.pbtxt"
    config_path.write_text(config_path.read_text().replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
    for number, offset in ((1, 0.0), (2, 0.25)):
        (repo / "line1" / str(number) / "model.py").write_text(PYTHON_MODEL.replace("OFFSET", repr(offset)))
    images = random_images(6, seed=21)
    with stock_server(repo, tmp_path / "stock.log", python_backend_dir(tmp_path / "backends")) as (http_url, grpc_url):
        for url, version, artifact in (
            (f"grpc://{grpc_url}/line1/1", "1", versions[0]),
            (f"http://{http_url}/line1/2", "2", versions[1]),
            (f"grpc://{grpc_url}/line1", "2", versions[1]),  # no version: the highest
        ):
            with RemoteInspector.open(url) as remote, Inspector.open(artifact, backend="ort-cpu") as local:
                assert remote.manifest.image_threshold.value == local.threshold, url
                assert remote.input_hw == (16, 16) and remote.backend.max_batch == 8
                raw = remote.backend.infer(images)  # the graph's shapes again: [N] for the score
                assert (raw["image_score"].shape, raw["anomaly_map"].shape) == ((6,), (6, 1, 16, 16)), url
                got, want = remote.inspect(list(images)), local.inspect(list(images))
            assert [v.is_anomalous for v in got] == [v.is_anomalous for v in want], url
            assert [v.threshold for v in got] == [v.threshold for v in want]
            for remote_verdict, local_verdict in zip(got, want):
                assert remote_verdict.image_score == pytest.approx(local_verdict.image_score, abs=1e-6)
                assert remote_verdict.anomaly_map == pytest.approx(local_verdict.anomaly_map, abs=1e-6)
