"""The CUDA layer without a GPU: binding selection and its one-sentence errors, version formatting, pinned
buffer views, and (where cuda-python is installed) its error path on a machine without a driver."""

import ctypes
import sys

import numpy as np
import pytest

from reconad.runtime.backends import cuda, device
from reconad.runtime.errors import ReconadError

BLOCK_BINDINGS = ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "pycuda", "pycuda.driver")


@pytest.fixture
def no_bindings(monkeypatch):
    for name in BLOCK_BINDINGS:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_neither_binding_installed_is_one_sentence(no_bindings):
    with pytest.raises(ReconadError) as caught:
        cuda.open_cuda()
    assert str(caught.value) == (
        "Neither cuda-python nor pycuda is installed, so TensorRT engines cannot run here; "
        "pip install cuda-python (or pycuda)."
    )
    with pytest.raises(ReconadError, match="^pycuda is not installed"):
        cuda.open_cuda(binding="pycuda")
    with pytest.raises(ReconadError, match="Unknown CUDA binding"):
        cuda.open_cuda(binding="numba")


def test_the_binding_named_is_the_one_opened(monkeypatch):
    opened = []
    monkeypatch.setattr(cuda, "_import_cudart", lambda: "cudart-module")
    monkeypatch.setattr(cuda, "_import_pycuda", lambda: "pycuda-module")
    monkeypatch.setattr(cuda, "CudaPythonDriver", lambda module, device: opened.append(("cuda-python", module)))
    monkeypatch.setattr(cuda, "PyCudaDriver", lambda module, device: opened.append(("pycuda", module)))
    cuda.open_cuda()
    cuda.open_cuda(binding="pycuda")
    monkeypatch.setattr(cuda, "_import_cudart", lambda: None)
    cuda.open_cuda()
    assert opened == [("cuda-python", "cudart-module"), ("pycuda", "pycuda-module"), ("pycuda", "pycuda-module")]


def test_cuda_versions_are_formatted_like_nvidia_smi():
    assert device.format_cuda_version(12020) == "12.2"
    assert device.format_cuda_version(11080) == "11.8"
    assert device.format_cuda_version(13000) == "13.0"


def test_no_driver_library_is_one_sentence():
    with pytest.raises(ReconadError, match=r"^No NVIDIA driver here \(libcuda not found\)"):
        device.probe_gpu(library_names=("libcuda-that-does-not-exist.so",))


def test_pinned_buffer_views_share_memory_and_free_once():
    memory = (ctypes.c_ubyte * 64)()
    released = []
    buffer = cuda.PinnedBuffer(cuda.host_array_at(ctypes.addressof(memory), 64), lambda: released.append(1))
    assert buffer.nbytes == 64 and buffer.address == ctypes.addressof(memory)
    floats = buffer.view(np.float32, (2, 4))
    floats[:] = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert np.frombuffer(bytes(memory), dtype=np.float32)[:8].tolist() == list(range(8))
    assert buffer.view(np.uint8, (3,)).shape == (3,)
    buffer.free()
    buffer.free()
    assert released == [1] and buffer.array.size == 0
    device = cuda.DeviceBuffer(1234, 16, lambda: released.append(2))
    device.free()
    device.free()
    assert released == [1, 2]


def test_cuda_python_without_a_driver_fails_in_one_sentence():
    """Runs only where cuda-python is installed; on a machine without an NVIDIA driver it checks the
    error path of the real binding (on a GPU machine it opens the device instead)."""
    runtime = cuda._import_cudart()
    if runtime is None:
        pytest.skip("cuda-python is not installed here")
    try:
        driver = cuda.CudaPythonDriver(runtime)
    except ReconadError as error:
        assert str(error).startswith("CUDA could not ") and ": cudaError" in str(error)
        assert "\n" not in str(error)
        return
    assert driver.runtime_version().count(".") == 1
    driver.close()
