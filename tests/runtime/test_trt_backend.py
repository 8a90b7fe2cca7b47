"""The TensorRT backend without TensorRT: the version/GPU refusal, and the backend's plumbing on test doubles.

``FakeTensorRT`` and ``FakeCuda`` stand in for ``tensorrt`` and the CUDA binding so that buffer binding,
batch splitting, output ownership, CUDA-graph capture and replay, and deterministic freeing are
exercised. They check this module's use of the name-based API, not TensorRT itself: real engines run
only in the ``gpu`` tests (tests/export/test_engine_gpu.py).
"""

import contextlib
import sys
import types

import numpy as np
import pytest

from reconad.runtime.backends import trt as trt_backend
from reconad.runtime.inspector import open_backend
from reconad.runtime.backends.cuda import CudaDriver, DeviceBuffer, GraphExec, PinnedBuffer, Stream
from reconad.runtime.backends.device import GpuInfo
from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Inspector
from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_NAME, IMAGE_SCORE_NAME, INPUT_NAME, EngineInfo, Manifest, manifest_path_for
from reconad.runtime.backends.trt import TrtBackend, engine_mismatch, import_tensorrt, parse_version
from tests.runtime.onnx_graphs import CATEGORIES, colour_images, expected_outputs, random_images, write_artifact

HW = (4, 6)
ORIN = EngineInfo(tensorrt_version="10.3.0.26", cuda_version="12.6", gpu_name="Orin", compute_capability="8.7")


def mismatch(recorded=ORIN, version="10.3.0.26", gpu="Orin", capability="8.7"):
    return engine_mismatch(recorded, "m.engine", tensorrt_version=version, gpu_name=gpu, compute_capability=capability)


def test_same_tensorrt_and_gpu_run():
    assert mismatch() is None


def test_another_tensorrt_or_gpu_is_refused_in_one_sentence():
    message = mismatch(version="10.7.0.23")
    assert message == (
        "m.engine was built with TensorRT 10.3.0.26 for Orin (compute capability 8.7) but this is TensorRT "
        "10.7.0.23 on Orin (compute capability 8.7); rebuild it here with recon-export build-engine."
    )
    assert mismatch(gpu="NVIDIA H200", capability="9.0") is not None
    assert mismatch(gpu="Orin", capability="8.9") is not None
    assert mismatch(gpu="NVIDIA Orin", capability="8.7") is not None


def test_version_compatible_engines_run_on_later_tensorrt_of_the_same_major():
    compatible = EngineInfo(**{**ORIN.__dict__, "build_details": {"version_compatible": True}})
    assert mismatch(compatible, version="10.7.0") is None
    assert mismatch(compatible, version="10.1.0") is not None
    assert mismatch(compatible, version="11.0.0") is not None


def test_hardware_compatible_engines_run_on_any_ampere_or_newer_gpu():
    compatible = EngineInfo(**{**ORIN.__dict__, "gpu_name": "NVIDIA A10", "compute_capability": "8.6",
                               "build_details": {"hardware_compatible": True}})  # fmt: skip
    assert mismatch(compatible, gpu="NVIDIA H200", capability="9.0") is None
    assert mismatch(compatible, gpu="Tesla T4", capability="7.5") is not None


def test_versions_parse():
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert parse_version("8.6.1.post1") == (8, 6, 1)
    assert parse_version("11.0.0rc1") == (11, 0, 0)
    with pytest.raises(ReconadError):
        parse_version("dev")


def test_missing_or_old_tensorrt_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ReconadError, match=r"^TensorRT is not installed \(import tensorrt failed\)") as caught:
        import_tensorrt()
    assert caught.value.exit_code == 2
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.4.3.1"))
    with pytest.raises(ReconadError, match="older than 8.5"):
        import_tensorrt()


class FakeCuda(CudaDriver):
    """Host memory posing as device memory; copies happen at once; a capture records the enqueued work."""

    binding = "fake"
    supports_graphs = True

    def __init__(self, fail_capture=False):
        self.memory: dict[int, np.ndarray] = {}
        self.live: set[str] = set()
        self.capture: list | None = None
        self.fail_capture = fail_capture
        self.launches = 0
        self._next = 0x1000

    def activate(self):
        return contextlib.nullcontext()

    def runtime_version(self):
        return "12.6"

    def _track(self, key):
        self.live.add(key)
        return lambda: self.live.remove(key)

    def alloc_pinned(self, nbytes):
        array = np.zeros(nbytes, np.uint8)
        return PinnedBuffer(array, self._track(f"pinned {id(array)}"))

    def alloc_device(self, nbytes):
        self._next += 0x1000
        address = self._next
        self.memory[address] = np.zeros(nbytes, np.uint8)
        release = self._track(f"device {address}")
        return DeviceBuffer(address, nbytes, lambda: (release(), self.memory.pop(address)))

    def create_stream(self):
        return Stream(7, None, self._track("stream"))

    def copy_to_device(self, device, host, stream):
        self.memory[device.address][: host.nbytes] = host.view(np.uint8)

    def copy_to_host(self, host, device, stream):
        host.view(np.uint8)[:] = self.memory[device.address][: host.nbytes]

    def synchronize(self, stream):
        pass

    def begin_capture(self, stream):
        self.capture = []

    def end_capture(self, stream):
        work, self.capture = self.capture, None
        if self.fail_capture:
            raise ReconadError("CUDA could not end the CUDA graph capture: cudaErrorStreamCaptureInvalidated.")
        return GraphExec(work, self._track(f"graph {id(work)}"))

    def launch_graph(self, graph, stream):
        self.launches += 1
        for run in graph.native:
            run()


class FakeContext:
    """The name-based execution API over FakeCuda memory: anomaly_map = channel mean / 255, score = its max;
    category and category_distance as the contract graph's (tests/runtime/onnx_graphs.py), category in
    the engine's dtype."""

    def __init__(self, cuda, category_dtype=np.int64):
        self.cuda = cuda
        self.category_dtype = category_dtype
        self.batch = None
        self.addresses = {}
        self.direct_runs = 0

    def set_input_shape(self, name, shape):
        if name != INPUT_NAME or tuple(shape[1:]) != (*HW, 3) or not 1 <= shape[0] <= 4:
            return False
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, name):
        return {
            INPUT_NAME: (self.batch, *HW, 3),
            ANOMALY_MAP_NAME: (self.batch, 1, *HW),
            IMAGE_SCORE_NAME: (self.batch,),
            CATEGORY_NAME: (self.batch,),
            CATEGORY_DISTANCE_NAME: (self.batch,),
        }[name]

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle):
        assert stream_handle == 7
        batch, memory = self.batch, self.cuda.memory

        def run():
            count = batch * HW[0] * HW[1] * 3
            images = memory[self.addresses[INPUT_NAME]][:count].reshape(batch, *HW, 3)
            anomaly_map = images.astype(np.float32).mean(axis=3)[:, None] / 255
            memory[self.addresses[ANOMALY_MAP_NAME]][: anomaly_map.nbytes] = anomaly_map.reshape(-1).view(np.uint8)
            scores = anomaly_map.max(axis=(1, 2, 3))
            memory[self.addresses[IMAGE_SCORE_NAME]][: scores.nbytes] = scores.view(np.uint8)
            head = expected_outputs(images)
            category = head[CATEGORY_NAME].astype(self.category_dtype)
            memory[self.addresses[CATEGORY_NAME]][: category.nbytes] = category.view(np.uint8)
            distance = head[CATEGORY_DISTANCE_NAME]
            memory[self.addresses[CATEGORY_DISTANCE_NAME]][: distance.nbytes] = distance.view(np.uint8)

        if self.cuda.capture is not None:
            self.cuda.capture.append(run)
        else:
            self.direct_runs += 1
            run()
        return True


class FakeEngine:
    num_io_tensors = 5
    names = (INPUT_NAME, ANOMALY_MAP_NAME, IMAGE_SCORE_NAME, CATEGORY_NAME, CATEGORY_DISTANCE_NAME)

    def __init__(self, cuda, category_dtype=np.int64):
        self.cuda = cuda
        self.category_dtype = category_dtype  # int32 as TensorRT 8.x builds it, int64 from 10.x on
        self.contexts = []

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return "input" if name == INPUT_NAME else "output"

    def get_tensor_dtype(self, name):
        return {INPUT_NAME: np.uint8, CATEGORY_NAME: self.category_dtype}.get(name, np.float32)

    def get_tensor_shape(self, name):
        return {INPUT_NAME: (-1, *HW, 3), ANOMALY_MAP_NAME: (-1, 1, *HW)}.get(name, (-1,))

    def get_tensor_profile_shape(self, name, profile):
        return (1, *HW, 3), (2, *HW, 3), (4, *HW, 3)

    def create_execution_context(self):
        self.contexts.append(FakeContext(self.cuda, self.category_dtype))
        return self.contexts[-1]


def fake_tensorrt(cuda, version="10.3.0.26"):
    runtimes = []
    category_dtype = np.int32 if parse_version(version) < (10,) else np.int64

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False
            runtimes.append(self)

        def deserialize_cuda_engine(self, data):
            return FakeEngine(cuda, category_dtype) if data == b"fake plan" else None

    return types.SimpleNamespace(
        __version__=version,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None}),
        Runtime=Runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="input", OUTPUT="output"),
        nptype=lambda dtype: dtype,
        runtimes=runtimes,
    )


@pytest.fixture
def fakes(monkeypatch):
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "open_cuda", lambda device, binding: cuda)
    monkeypatch.setattr(trt_backend, "probe_gpu", lambda device=0: GpuInfo("Orin", "8.7", 7620, True, "12.6"))
    return types.SimpleNamespace(cuda=cuda, trt=trt)


def write_engine(folder, gpu_name="Orin", details=None, tensorrt_version=ORIN.tensorrt_version, **manifest_extra):
    """A fake plan plus the manifest build-engine would write for it (category int32 on TensorRT 8.x)."""
    onnx_path = write_artifact(folder, name="m-4x6-fp16.onnx", input_hw=HW, precision="fp16", **manifest_extra)
    engine_path = folder / "m-4x6-fp16-trt10.3.0-orin.engine"
    engine_path.write_bytes(b"fake plan")
    info = EngineInfo(**{**ORIN.__dict__, "gpu_name": gpu_name, "tensorrt_version": tensorrt_version,
                         "build_details": details or {}})  # fmt: skip
    dtypes = {CATEGORY_NAME: "int32"} if parse_version(tensorrt_version) < (10,) else None
    onnx_manifest = Manifest.load(manifest_path_for(onnx_path))
    manifest = onnx_manifest.for_engine(engine_file=engine_path, engine=info, output_dtypes=dtypes)
    manifest.save(manifest_path_for(engine_path))
    return engine_path


def expected(images):
    anomaly_map = images.astype(np.float32).mean(axis=3)[:, None] / 255
    return anomaly_map, anomaly_map.max(axis=(1, 2, 3))


def test_infer_binds_buffers_by_name_and_returns_the_callers_arrays(tmp_path, fakes):
    with TrtBackend(write_engine(tmp_path)) as backend:
        assert (backend.min_batch, backend.max_batch, backend.input_hw) == (1, 4, HW)
        assert [t.name for t in backend.inputs] == [INPUT_NAME] and backend.inputs[0].dtype == "uint8"
        assert [(t.name, t.shape, t.dtype) for t in backend.outputs] == [
            (ANOMALY_MAP_NAME, (-1, 1, *HW), "float32"),
            (IMAGE_SCORE_NAME, (-1,), "float32"),
            (CATEGORY_NAME, (-1,), "int64"),
            (CATEGORY_DISTANCE_NAME, (-1,), "float32"),
        ]
        images = random_images(3, HW)
        outputs = backend.infer(images)
        anomaly_map, scores = expected(images)
        np.testing.assert_allclose(outputs[ANOMALY_MAP_NAME], anomaly_map, rtol=1e-6)
        np.testing.assert_allclose(outputs[IMAGE_SCORE_NAME], scores, rtol=1e-6)
        backend.infer(random_images(3, HW, seed=1))
        np.testing.assert_allclose(outputs[ANOMALY_MAP_NAME], anomaly_map, rtol=1e-6)  # still ours


def test_copy_false_hands_out_views_that_the_next_call_overwrites(tmp_path, fakes):
    with TrtBackend(write_engine(tmp_path)) as backend:
        first = backend.infer(random_images(2, HW), copy=False)
        kept = first[IMAGE_SCORE_NAME].copy()
        second_images = random_images(2, HW, seed=5)
        backend.infer(second_images, copy=False)
        np.testing.assert_allclose(first[IMAGE_SCORE_NAME], expected(second_images)[1], rtol=1e-6)
        assert not np.allclose(first[IMAGE_SCORE_NAME], kept)


def test_large_batches_are_split_and_each_chunk_kept(tmp_path, fakes):
    with TrtBackend(write_engine(tmp_path), max_batch=3) as backend:
        assert backend.max_batch == 3
        images = random_images(10, HW, seed=2)
        outputs = backend.infer(images, copy=False)  # chunked results are always copies
        anomaly_map, scores = expected(images)
        np.testing.assert_allclose(outputs[ANOMALY_MAP_NAME], anomaly_map, rtol=1e-6)
        np.testing.assert_allclose(outputs[IMAGE_SCORE_NAME], scores, rtol=1e-6)


def test_wrong_images_are_refused(tmp_path, fakes):
    with TrtBackend(write_engine(tmp_path)) as backend:
        with pytest.raises(ReconadError, match=r"takes uint8 \[N, 4, 6, 3\] images, got float32"):
            backend.infer(random_images(1, HW).astype(np.float32))
        with pytest.raises(ReconadError, match=r"got uint8 \[1, 6, 4, 3\]"):
            backend.infer(random_images(1, (6, 4)))


def test_cuda_graph_is_captured_once_and_replayed_until_the_batch_size_changes(tmp_path, fakes):
    with TrtBackend(write_engine(tmp_path), cuda_graph=True) as backend:
        for seed in range(3):
            images = random_images(2, HW, seed=seed)
            np.testing.assert_allclose(backend.infer(images)[IMAGE_SCORE_NAME], expected(images)[1], rtol=1e-6)
        live = backend._context
        assert live.direct_runs == 1  # the warm-up before the capture; every call after replays the graph
        assert fakes.cuda.launches == 3
        images = random_images(4, HW, seed=9)
        np.testing.assert_allclose(backend.infer(images)[IMAGE_SCORE_NAME], expected(images)[1], rtol=1e-6)
        assert live.direct_runs == 2 and fakes.cuda.launches == 4  # a new batch size: warm-up, new capture
        assert len([key for key in fakes.cuda.live if key.startswith("graph")]) == 1  # the old graph is freed


def test_a_failed_capture_falls_back_to_plain_runs(tmp_path, fakes, caplog):
    fakes.cuda.fail_capture = True
    with TrtBackend(write_engine(tmp_path), cuda_graph=True) as backend:
        for seed in range(2):
            images = random_images(2, HW, seed=seed)
            np.testing.assert_allclose(backend.infer(images)[IMAGE_SCORE_NAME], expected(images)[1], rtol=1e-6)
        assert backend.cuda_graph is False and fakes.cuda.launches == 0
    assert "CUDA graph capture failed" in caplog.text


def test_close_frees_every_buffer_stream_and_graph_once(tmp_path, fakes):
    backend = TrtBackend(write_engine(tmp_path), cuda_graph=True)
    backend.infer(random_images(2, HW))
    assert len(fakes.cuda.live) == 5 * 2 + 1 + 1  # pinned + device per tensor, the stream, one graph
    backend.close()
    assert fakes.cuda.live == set() and fakes.cuda.memory == {}
    backend.close()
    with pytest.raises(ReconadError, match="is closed"):
        backend.infer(random_images(1, HW))


def test_an_engine_for_another_gpu_is_refused_before_any_cuda_work(tmp_path, fakes):
    engine_path = write_engine(tmp_path, gpu_name="NVIDIA H200")
    with pytest.raises(ReconadError, match="built with TensorRT 10.3.0.26 for NVIDIA H200 .* rebuild it here"):
        TrtBackend(engine_path)
    assert fakes.cuda.live == set() and fakes.trt.runtimes == []


def test_version_compatible_engines_allow_their_host_code(tmp_path, fakes):
    with TrtBackend(write_engine(tmp_path, details={"version_compatible": True})):
        assert fakes.trt.runtimes[0].engine_host_code_allowed is True


def test_an_unloadable_engine_is_refused_and_nothing_leaks(tmp_path, fakes):
    engine_path = write_engine(tmp_path)
    engine_path.write_bytes(b"another plan")
    manifest_path_for(engine_path).unlink()
    with pytest.raises(ReconadError, match="could not load .* rebuild it here"):
        TrtBackend(engine_path)
    assert fakes.cuda.live == set()
    with pytest.raises(ReconadError, match="does not exist"):
        TrtBackend(tmp_path / "none.engine")


def test_open_backend_and_the_inspector_run_engines_through_the_same_code(tmp_path, fakes):
    engine_path = write_engine(tmp_path)
    with open_backend(engine_path) as backend:
        assert isinstance(backend, TrtBackend) and backend.name == "trt"
    images = random_images(5, HW, seed=3)
    with Inspector.open(engine_path) as inspector:
        verdicts = inspector.inspect(list(images))
    np.testing.assert_allclose([verdict.image_score for verdict in verdicts], expected(images)[1], rtol=1e-5)
    assert fakes.cuda.live == set()


def test_a_tensorrt_8_engine_returns_int32_categories_and_the_inspector_reads_them(tmp_path, monkeypatch):
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda, version="8.6.2.3")
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "open_cuda", lambda device, binding: cuda)
    monkeypatch.setattr(trt_backend, "probe_gpu", lambda device=0: GpuInfo("Orin", "8.7", 7620, True, "12.6"))
    engine_path = write_engine(tmp_path, tensorrt_version="8.6.2.3")
    manifest = Manifest.load(manifest_path_for(engine_path))
    assert [o.dtype for o in manifest.output_tensors] == ["float32", "float32", "int32", "float32"]
    images = colour_images([(200, 10, 10), (10, 10, 200), (10, 200, 10)], HW)
    with TrtBackend(engine_path) as backend:
        assert backend.outputs[2].dtype == "int32"
        outputs = backend.infer(images)
        assert outputs[CATEGORY_NAME].dtype == np.int32 and outputs[CATEGORY_NAME].tolist() == [0, 2, 1]
    with Inspector.open(engine_path, no_threshold=True) as inspector:
        verdicts = inspector.inspect(images)
    assert [v.category for v in verdicts] == [CATEGORIES[0], CATEGORIES[2], CATEGORIES[1]]
    np.testing.assert_allclose([v.category_distance for v in verdicts], expected_outputs(images)[CATEGORY_DISTANCE_NAME], rtol=1e-6)
    # An engine whose manifest says int64 but returns int32 (or the reverse) is still the same contract.
    manifest_path_for(engine_path).write_text(manifest.to_json().replace('"int32"', '"int64"'))
    with Inspector.open(engine_path, no_threshold=True) as inspector:
        assert [v.category for v in inspector.inspect(images)][0] == CATEGORIES[0]
