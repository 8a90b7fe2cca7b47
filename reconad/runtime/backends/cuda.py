"""The few CUDA calls the TensorRT backend needs, over cuda-python or pycuda, whichever is installed.

Pinned host buffers, device buffers, one stream, async copies and CUDA graph capture (cuda-python only: no
pycuda release wraps stream capture, so with pycuda the backend never captures), after the memory
handling of TensorRT's ``samples/python/common_runtime.py``. Torch-free; bindings load on first use.
Every resource is a ``Releasable``: freed once, explicitly, by its owner. The device itself is probed
in ``device.py`` (through the driver, so the engine builder needs no binding).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from reconad.runtime.backends.device import format_cuda_version
from reconad.runtime.errors import ReconadError

BINDINGS = ("cuda-python", "pycuda")

def host_array_at(address: int, nbytes: int) -> np.ndarray:
    """A flat uint8 numpy view of ``nbytes`` of host memory at ``address`` (the caller keeps it alive)."""
    pointer = ctypes.cast(ctypes.c_void_p(address), ctypes.POINTER(ctypes.c_ubyte))
    return np.ctypeslib.as_array(pointer, (nbytes,))


class Releasable:
    """A CUDA resource freed exactly once, by ``free()`` (idempotent), never by the garbage collector.

    The one release mechanism of every buffer, stream and graph: the binding-specific release
    function is handed in at creation.
    """

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def free(self) -> None:
        """Release the resource; idempotent."""
        if self._release is not None:
            release, self._release = self._release, None
            self._on_free()
            release()

    def _on_free(self) -> None:
        """Forget what refers to the memory before it is released (subclasses)."""


class PinnedBuffer(Releasable):
    """Page-locked host memory, seen as a flat uint8 array; ``view`` reinterprets its start.

    Async copies only overlap with compute from pinned memory, and only its address stays fixed for a
    captured CUDA graph. Views taken before ``free`` must not be used afterwards.
    """

    def __init__(self, array: np.ndarray, release: Callable[[], None]) -> None:
        super().__init__(release)
        self.array = array  # uint8 [nbytes]
        self.nbytes = array.nbytes

    @property
    def address(self) -> int:
        return self.array.ctypes.data

    def view(self, dtype: np.dtype | type, shape: tuple[int, ...]) -> np.ndarray:
        """The first ``prod(shape)`` elements of ``dtype`` as an array of ``shape`` (no copy)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        return self.array[: count * dtype.itemsize].view(dtype).reshape(shape)

    def _on_free(self) -> None:
        self.array = self.array[:0]


class DeviceBuffer(Releasable):
    """Device memory at a fixed address (what ``IExecutionContext.set_tensor_address`` takes)."""

    def __init__(self, address: int, nbytes: int, release: Callable[[], None]) -> None:
        super().__init__(release)
        self.address = address
        self.nbytes = nbytes


class Stream(Releasable):
    """A CUDA stream; ``handle`` is the integer TensorRT's ``execute_async_v3`` takes."""

    def __init__(self, handle: int, native: Any, release: Callable[[], None]) -> None:
        super().__init__(release)
        self.handle = handle
        self.native = native  # the binding's own stream object


class GraphExec(Releasable):
    """An instantiated CUDA graph, replayed with ``CudaDriver.launch_graph``."""

    def __init__(self, native: Any, release: Callable[[], None]) -> None:
        super().__init__(release)
        self.native = native


class CudaDriver:
    """The CUDA runtime calls of the TensorRT backend, one implementation per Python binding.

    Every call that touches the GPU runs inside ``with driver.activate():`` so that the right device
    (and, for pycuda, its primary context, the one TensorRT uses) is current on the calling thread.
    Failures raise a one-sentence ``ReconadError`` naming the CUDA error.
    """

    binding: str
    supports_graphs: bool

    def activate(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def runtime_version(self) -> str | None:
        """The CUDA runtime version the binding talks to, e.g. ``"12.6"``; None when it uses no runtime."""
        raise NotImplementedError

    def binding_version(self) -> str:
        """The binding and its version, e.g. ``"cuda-python 12.6.2"``."""
        raise NotImplementedError

    def clear_error(self) -> str | None:
        """Read and reset the thread's last CUDA runtime error (``cudaGetLastError``), as trtexec does after a
        failed graph capture so that the next plain run does not report it; returns its name, or None."""
        return None

    def alloc_pinned(self, nbytes: int) -> PinnedBuffer:
        raise NotImplementedError

    def alloc_device(self, nbytes: int) -> DeviceBuffer:
        raise NotImplementedError

    def create_stream(self) -> Stream:
        raise NotImplementedError

    def copy_to_device(self, device: DeviceBuffer, host: np.ndarray, stream: Stream) -> None:
        """Enqueue a copy of the contiguous pinned ``host`` array to the start of ``device``."""
        raise NotImplementedError

    def copy_to_host(self, host: np.ndarray, device: DeviceBuffer, stream: Stream) -> None:
        """Enqueue a copy of the start of ``device`` into the contiguous pinned ``host`` array."""
        raise NotImplementedError

    def synchronize(self, stream: Stream) -> None:
        raise NotImplementedError

    def begin_capture(self, stream: Stream) -> None:
        raise NotImplementedError

    def end_capture(self, stream: Stream) -> GraphExec:
        """End the capture begun on ``stream`` and instantiate the captured graph."""
        raise NotImplementedError

    def launch_graph(self, graph: GraphExec, stream: Stream) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the driver itself holds (pycuda's context); buffers are freed by their owners."""


def _check_host_array(host: np.ndarray) -> None:
    if not host.flags.c_contiguous:
        raise ReconadError("A CUDA copy needs a contiguous host array; this is a bug in the caller.")


class CudaPythonDriver(CudaDriver):
    """NVIDIA's cuda-python: ``cuda.bindings.runtime`` (12.6+), or ``cuda.cudart`` on older releases."""

    binding = "cuda-python"
    supports_graphs = True

    def __init__(self, cudart: Any, device: int = 0) -> None:
        self._cudart = cudart
        self._device = device
        with self.activate():
            self._call("start on the device", cudart.cudaFree(0))  # creates the primary context early

    def _call(self, what: str, result: Any) -> Any:
        """Unpack a cuda-python result tuple ``(error, *values)``, raising on any error."""
        error, *values = result if isinstance(result, tuple) else (result,)
        if int(error) != 0:
            cudart = self._cudart
            name = cudart.cudaGetErrorName(error)[1]
            text = cudart.cudaGetErrorString(error)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise ReconadError(f"CUDA could not {what}: {name} ({text.rstrip('.')}).")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        self._call(f"select device {self._device}", self._cudart.cudaSetDevice(self._device))
        yield

    def runtime_version(self) -> str | None:
        version = self._call("read the runtime version", self._cudart.cudaRuntimeGetVersion())
        return format_cuda_version(int(version))

    def binding_version(self) -> str:
        return f"cuda-python {_module_version('cuda.bindings', 'cuda')}"

    def clear_error(self) -> str | None:
        error = self._cudart.cudaGetLastError()
        error = error[0] if isinstance(error, tuple) else error
        if int(error) == 0:
            return None
        name = self._cudart.cudaGetErrorName(error)[1]
        return name.decode() if isinstance(name, bytes) else str(name)

    def alloc_pinned(self, nbytes: int) -> PinnedBuffer:
        address = int(self._call(f"allocate {nbytes} bytes of pinned memory", self._cudart.cudaMallocHost(nbytes)))
        return PinnedBuffer(
            host_array_at(address, nbytes),
            lambda: self._call("free pinned memory", self._cudart.cudaFreeHost(address)),
        )

    def alloc_device(self, nbytes: int) -> DeviceBuffer:
        address = int(self._call(f"allocate {nbytes} bytes of device memory", self._cudart.cudaMalloc(nbytes)))
        return DeviceBuffer(address, nbytes, lambda: self._call("free device memory", self._cudart.cudaFree(address)))

    def create_stream(self) -> Stream:
        cudart = self._cudart
        # Non-blocking: no implicit synchronisation with the legacy default stream other code may use.
        native = self._call("create a stream", cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        return Stream(int(native), native, lambda: self._call("destroy a stream", cudart.cudaStreamDestroy(native)))

    def copy_to_device(self, device: DeviceBuffer, host: np.ndarray, stream: Stream) -> None:
        _check_host_array(host)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(
            "copy to the device",
            self._cudart.cudaMemcpyAsync(device.address, host.ctypes.data, host.nbytes, kind, stream.native),
        )

    def copy_to_host(self, host: np.ndarray, device: DeviceBuffer, stream: Stream) -> None:
        _check_host_array(host)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(
            "copy to the host",
            self._cudart.cudaMemcpyAsync(host.ctypes.data, device.address, host.nbytes, kind, stream.native),
        )

    def synchronize(self, stream: Stream) -> None:
        self._call("finish the stream's work", self._cudart.cudaStreamSynchronize(stream.native))

    def begin_capture(self, stream: Stream) -> None:
        # Thread-local mode, as TensorRT's samples use: other threads may keep calling CUDA meanwhile.
        mode = self._cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call("begin a CUDA graph capture", self._cudart.cudaStreamBeginCapture(stream.native, mode))

    def end_capture(self, stream: Stream) -> GraphExec:
        cudart = self._cudart
        graph = self._call("end the CUDA graph capture", cudart.cudaStreamEndCapture(stream.native))
        try:
            instantiate = getattr(cudart, "cudaGraphInstantiateWithFlags", None) or cudart.cudaGraphInstantiate
            native = self._call("instantiate the CUDA graph", instantiate(graph, 0))
        finally:
            self._call("destroy the captured graph", cudart.cudaGraphDestroy(graph))
        return GraphExec(native, lambda: self._call("destroy a CUDA graph", cudart.cudaGraphExecDestroy(native)))

    def launch_graph(self, graph: GraphExec, stream: Stream) -> None:
        self._call("launch the CUDA graph", self._cudart.cudaGraphLaunch(graph.native, stream.native))


class PyCudaDriver(CudaDriver):
    """pycuda on the device's primary context (the one TensorRT's runtime API uses), pushed per call."""

    binding = "pycuda"

    def __init__(self, driver: Any, device: int = 0) -> None:
        self._driver = driver
        try:
            driver.init()
            self._context = driver.Device(device).retain_primary_context()
        except driver.Error as error:
            raise ReconadError(f"pycuda could not open CUDA device {device}: {error}.") from None
        # No pycuda release wraps stream capture (cuStreamBeginCapture), so the backend never captures a CUDA
        # graph through pycuda; TrtBackend says so when cuda_graph is asked for.
        self.supports_graphs = False

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self._driver.Context.pop()

    def _guard(self, what: str, function: Callable[..., Any], *arguments: Any) -> Any:
        try:
            return function(*arguments)
        except self._driver.Error as error:
            raise ReconadError(f"CUDA could not {what}: {str(error).strip().rstrip('.')}.") from None

    def runtime_version(self) -> str | None:
        return None  # pycuda uses the driver API only; its get_version() is the CUDA it was built for

    def binding_version(self) -> str:
        major, minor, _ = self._driver.get_version()
        return f"pycuda {_module_version('pycuda')} (built for CUDA {major}.{minor})"

    def alloc_pinned(self, nbytes: int) -> PinnedBuffer:
        what = f"allocate {nbytes} bytes of pinned memory"
        array = self._guard(what, self._driver.pagelocked_empty, nbytes, np.uint8)
        allocation = array.base  # pycuda's HostAllocation, which owns the memory
        return PinnedBuffer(array, lambda: self._guard("free pinned memory", allocation.free))

    def alloc_device(self, nbytes: int) -> DeviceBuffer:
        allocation = self._guard(f"allocate {nbytes} bytes of device memory", self._driver.mem_alloc, nbytes)
        return DeviceBuffer(int(allocation), nbytes, lambda: self._guard("free device memory", allocation.free))

    def create_stream(self) -> Stream:
        native = self._guard("create a stream", self._driver.Stream)
        return Stream(int(native.handle), native, lambda: None)  # pycuda destroys streams when collected

    def copy_to_device(self, device: DeviceBuffer, host: np.ndarray, stream: Stream) -> None:
        _check_host_array(host)
        self._guard("copy to the device", self._driver.memcpy_htod_async, device.address, host, stream.native)

    def copy_to_host(self, host: np.ndarray, device: DeviceBuffer, stream: Stream) -> None:
        _check_host_array(host)
        self._guard("copy to the host", self._driver.memcpy_dtoh_async, host, device.address, stream.native)

    def synchronize(self, stream: Stream) -> None:
        self._guard("finish the stream's work", stream.native.synchronize)

    def begin_capture(self, stream: Stream) -> None:
        raise ReconadError("pycuda has no stream capture, so CUDA graphs need cuda-python.")

    def end_capture(self, stream: Stream) -> GraphExec:
        raise ReconadError("pycuda has no stream capture, so CUDA graphs need cuda-python.")

    def launch_graph(self, graph: GraphExec, stream: Stream) -> None:
        raise ReconadError("pycuda has no stream capture, so CUDA graphs need cuda-python.")

    def close(self) -> None:
        context, self._context = getattr(self, "_context", None), None
        if context is not None:
            context.detach()


def _module_version(*modules: str) -> str:
    """``__version__`` of the first importable of ``modules``, else ``"?"``."""
    for module in modules:
        try:
            version = getattr(importlib.import_module(module), "__version__", None)
        except ImportError:
            continue
        if version:
            return str(version)
    return "?"


def _import_cudart() -> Any | None:
    for module in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6, then older releases
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    return None


def _import_pycuda() -> Any | None:
    try:
        return importlib.import_module("pycuda.driver")
    except ImportError:
        return None


def open_cuda(device: int = 0, binding: str | None = None) -> CudaDriver:
    """A ``CudaDriver`` on ``device`` through cuda-python, else pycuda (or the one named by ``binding``)."""
    if binding is not None and binding not in BINDINGS:
        raise ReconadError(f"Unknown CUDA binding {binding!r}; choose one of {list(BINDINGS)}.")
    if binding in (None, "cuda-python"):
        cudart = _import_cudart()
        if cudart is not None:
            return CudaPythonDriver(cudart, device)
    if binding in (None, "pycuda"):
        driver = _import_pycuda()
        if driver is not None:
            return PyCudaDriver(driver, device)
    missing = "Neither cuda-python nor pycuda is installed" if binding is None else f"{binding} is not installed"
    raise ReconadError(f"{missing}, so TensorRT engines cannot run here; pip install cuda-python (or pycuda).")
