"""The engine path on first contact with a device: DLA core selection, capture-error clearing, pycuda without
capture, hardware compatibility limited to Ampere+ discrete GPUs, timing caches from another device, and the
build-time option checks (TensorRT stand-ins; real builds are the gpu tests)."""

import types

import numpy as np
import pytest

from reconad.export.build_config import BuildConfig
from reconad.export.precision_plan import check_build_options
from reconad.runtime.backends.cuda import PyCudaDriver
from reconad.runtime.backends.trt import TrtBackend
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import EngineInfo, IMAGE_SCORE_NAME
from tests.runtime.onnx_graphs import random_images
from tests.runtime.test_trt_backend import HW, ORIN, expected, fakes, mismatch, write_engine  # noqa: F401 (fixture)


def with_dla_cores(trt, cores):
    original = trt.Runtime

    class Runtime(original):
        def __init__(self, logger):
            super().__init__(logger)
            self.num_DLA_cores = cores
            self.DLA_core = None

    trt.Runtime = Runtime


def test_a_dla_engine_runs_on_the_core_it_was_built_for(tmp_path, fakes):
    with_dla_cores(fakes.trt, 2)
    with TrtBackend(write_engine(tmp_path, details={"dla_core": 1})):
        assert fakes.trt.runtimes[0].DLA_core == 1


def test_a_dla_engine_on_a_device_without_that_core_is_refused(tmp_path, fakes):
    with_dla_cores(fakes.trt, 0)  # Orin Nano: no DLA
    with pytest.raises(ReconadError, match="built for DLA core 0, but this device has no DLA core"):
        TrtBackend(write_engine(tmp_path, details={"dla_core": 0}))
    assert fakes.cuda.live == set()


def test_a_failed_capture_clears_the_stale_cuda_error_before_plain_runs(tmp_path, fakes):
    cleared = []
    fakes.cuda.clear_error = lambda: cleared.append(True) or "cudaErrorStreamCaptureInvalidated"
    fakes.cuda.fail_capture = True
    with TrtBackend(write_engine(tmp_path), cuda_graph=True) as backend:
        images = random_images(2, HW, seed=1)
        np.testing.assert_allclose(backend.infer(images)[IMAGE_SCORE_NAME], expected(images)[1], rtol=1e-6)
        assert cleared == [True] and backend.cuda_graph is False


def test_without_stream_capture_no_graph_is_captured_and_the_log_says_so(tmp_path, fakes, caplog):
    fakes.cuda.supports_graphs = False
    fakes.cuda.binding = "pycuda"
    with TrtBackend(write_engine(tmp_path), cuda_graph=True) as backend:
        backend.infer(random_images(2, HW))
        assert backend.cuda_graph is False and fakes.cuda.launches == 0
    assert "pycuda cannot capture CUDA graphs" in caplog.text


def test_pycuda_never_claims_stream_capture():
    class Stream:
        def begin_capture(self):  # even a pycuda that grew the method is not used
            raise AssertionError("not called")

    class Device:
        def __init__(self, index):
            pass

        def retain_primary_context(self):
            return types.SimpleNamespace(push=lambda: None, detach=lambda: None)

    fake = types.SimpleNamespace(init=lambda: None, Device=Device, Stream=Stream, Error=RuntimeError,
                                 get_version=lambda: (12, 2, 0), Context=types.SimpleNamespace(pop=lambda: None))  # fmt: skip
    driver = PyCudaDriver(fake)
    assert driver.supports_graphs is False and driver.runtime_version() is None
    assert driver.binding_version().endswith("(built for CUDA 12.2)")
    with pytest.raises(ReconadError, match="no stream capture"):
        driver.begin_capture(None)


def test_hardware_compatible_engines_do_not_run_on_an_integrated_gpu():
    compatible = EngineInfo(**{**ORIN.__dict__, "gpu_name": "NVIDIA A10", "compute_capability": "8.6",
                               "build_details": {"hardware_compatible": True}})  # fmt: skip
    assert mismatch(compatible, gpu="NVIDIA H200", capability="9.0") is None
    from reconad.runtime.backends.trt import engine_mismatch

    reason = engine_mismatch(compatible, "m.engine", tensorrt_version=ORIN.tensorrt_version, gpu_name="Orin",
                             compute_capability="8.7", integrated=True)  # fmt: skip
    assert reason is not None and "rebuild it here" in reason


@pytest.mark.parametrize("version", [(10, 8, 0), (10, 13, 3), (11, 0, 0), (11, 4, 0)])
def test_dla_is_refused_on_jetpack_where_tensorrt_has_none(version):
    with pytest.raises(ReconadError, match="has no DLA on JetPack"):
        check_build_options(version, BuildConfig(dla_core=0), jetson=True, integrated_gpu=True)


@pytest.mark.parametrize("version", [(8, 5, 2), (8, 6, 2), (10, 3, 0), (10, 7, 0), (11, 4, 1)])
def test_dla_is_accepted_on_jetpack_where_tensorrt_has_it(version):
    check_build_options(version, BuildConfig(dla_core=1), jetson=True, integrated_gpu=True)


def test_hardware_compatible_is_refused_for_a_jetson():
    with pytest.raises(ReconadError, match="discrete GPUs"):
        check_build_options((10, 3, 0), BuildConfig(hardware_compatible=True), jetson=True, integrated_gpu=True)
    check_build_options((10, 3, 0), BuildConfig(hardware_compatible=True), jetson=False, integrated_gpu=False)


def test_the_builder_checks_the_dla_core_exists_and_replaces_a_foreign_timing_cache(tmp_path, monkeypatch):
    from reconad.export.builder import EngineBuilder
    from reconad.export.precision_plan import plan_precision
    from tests.export.mini_graph import engine_json, parsed_network
    from tests.export.test_engine_builder import RecordingTensorRT

    trt = RecordingTensorRT("10.3.0", parsed_network(strongly_typed_fp16=True), engine_json())
    cache = tmp_path / "t.cache"
    cache.write_bytes(trt.mismatched_cache)
    lines = []
    builder = EngineBuilder(trt, BuildConfig(timing_cache=cache), plan_precision((10, 3, 0), "fp16"), lines.append)
    builder.network = types.SimpleNamespace(get_input=lambda i: types.SimpleNamespace(shape=(1, 8, 8, 3), name="images"))
    built = builder.configure((1, 1, 1))
    assert built.cache.data == b"" and any("another device or TensorRT; replacing it" in line for line in lines)
    builder.build()
    assert cache.read_bytes() == b"+tuned"  # the fresh cache replaced the foreign one
    trt.num_DLA_cores = 0
    nano = EngineBuilder(trt, BuildConfig(dla_core=0), plan_precision((10, 3, 0), "fp16"), lines.append)
    nano.network = builder.network
    with pytest.raises(ReconadError, match="--dla-core 0 cannot be used: this device has no DLA"):
        nano.configure((1, 1, 1))
