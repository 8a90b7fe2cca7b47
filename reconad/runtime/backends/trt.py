"""TensorRT backend: a serialized engine run through the name-based I/O API (TensorRT 8.5 to 11).

The interface is Polygraphy's ``BaseRunner`` (context-managed, ``infer -> dict``, documented buffer
reuse) on the memory handling of TensorRT's ``samples/python/common_runtime.py``: pinned host and
device buffers sized for the largest batch, one stream, async copies, optionally one CUDA graph per
batch size. ``tensorrt`` and the CUDA binding are imported when a backend opens, never at import.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reconad.runtime.backends.base import TensorInfo, infer_in_chunks
from reconad.runtime.backends.cuda import CudaDriver, DeviceBuffer, GraphExec, PinnedBuffer, Stream, open_cuda
from reconad.runtime.backends.device import probe_gpu
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import EngineInfo, Manifest, manifest_path_for

_LOG = logging.getLogger(__name__)

OLDEST_TENSORRT = (8, 5)  # the name-based I/O API (set_tensor_address, execute_async_v3) starts here


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a one-sentence ``ReconadError`` (exit code 2) when it is missing or too old."""
    try:
        import tensorrt
    except ImportError:
        raise ReconadError(
            "TensorRT is not installed (import tensorrt failed); engines are built and run on the target, "
            "where JetPack provides it (on an x86 GPU server: pip install 'reconad[gpu]', which brings tensorrt-cu12)."
        ) from None
    version = parse_version(tensorrt.__version__)
    if version[:2] < OLDEST_TENSORRT:
        raise ReconadError(
            f"TensorRT {tensorrt.__version__} is older than 8.5, the first release with the name-based I/O API "
            "this code uses; upgrade JetPack or TensorRT."
        )
    return tensorrt


def parse_version(text: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` -> ``(10, 3, 0, 26)``; trailing non-numeric parts (``"8.6.1.post1"``) are dropped."""
    numbers = []
    for part in str(text).split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    if not numbers:
        raise ReconadError(f"Cannot read the TensorRT version {text!r}.")
    return tuple(numbers)


def _compute_capability(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def engine_mismatch(
    recorded: EngineInfo,
    engine_name: str,
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    integrated: bool = False,
) -> str | None:
    """Why an engine built as ``recorded`` cannot run on this TensorRT and GPU, in one sentence; None if it can.

    Engines run only on the TensorRT version and GPU model they were built with, unless they were
    built version compatible (then a later TensorRT of the same major version may run them) or
    hardware compatible (then any Ampere-or-newer discrete GPU, compute capability 8.0+, may run them: TensorRT's
    developer guide, "Hardware Compatibility", excludes JetPack and DRIVE OS, i.e. integrated GPUs).

    Args:
        recorded: the manifest's ``engine`` section; ``build_details`` may hold ``version_compatible``
            and ``hardware_compatible`` booleans.
        engine_name: the engine file, for the message.
        tensorrt_version: ``tensorrt.__version__`` here.
        gpu_name: this device's name.
        compute_capability: this device's ``"major.minor"``.
        integrated: this GPU is integrated (Jetson), where a hardware-compatible engine does not run.
    """
    details = recorded.build_details
    built, running = parse_version(recorded.tensorrt_version), parse_version(tensorrt_version)
    if details.get("version_compatible"):
        version_ok = running[0] == built[0] and running >= built
    else:
        version_ok = running == built
    if details.get("hardware_compatible"):
        gpu_ok = _compute_capability(compute_capability) >= (8, 0) and not integrated
    else:
        gpu_ok = gpu_name == recorded.gpu_name and compute_capability == recorded.compute_capability
    if version_ok and gpu_ok:
        return None
    return (
        f"{engine_name} was built with TensorRT {recorded.tensorrt_version} for {recorded.gpu_name} "
        f"(compute capability {recorded.compute_capability}) but this is TensorRT {tensorrt_version} on "
        f"{gpu_name} (compute capability {compute_capability}); rebuild it here with recon-export build-engine."
    )


@dataclasses.dataclass
class _Binding:
    """One I/O tensor with its buffers, sized for the largest batch."""

    name: str
    is_input: bool
    dtype: np.dtype
    host: PinnedBuffer
    device: DeviceBuffer | None


class TrtBackend:
    """A TensorRT engine on one CUDA stream, with pinned host buffers reused across calls.

    Opening checks the engine's sidecar manifest (when present) against this TensorRT and GPU and
    refuses a mismatch in one sentence. Use it as a context manager or call ``close()``: buffers,
    stream and CUDA graphs are freed there, not by the garbage collector.

    Args:
        engine_path: the ``.engine`` file.
        max_batch: largest batch per engine call (at most the optimisation profile's maximum, which
            is the default); ``infer`` splits larger batches.
        cuda_graph: replay the engine as a CUDA graph, captured after one plain run and captured
            again whenever the batch size changes (a graph is only valid for the shapes it was
            captured with), so it pays off at a steady batch size; when capture fails (some engines
            cannot be captured) it runs without, and says so in the log; cuda-python only (no pycuda release has
            stream capture: with pycuda it runs without graphs and logs that).
        manifest: the engine's manifest; default the ``<stem>.json`` beside it, if any.
        device: CUDA device index.
        cuda_binding: ``"cuda-python"`` or ``"pycuda"``; default whichever is installed.
    """

    name = "trt"
    metadata: Mapping[str, str] = types.MappingProxyType({})  # an engine embeds no manifest: it sits beside it

    def __init__(
        self,
        engine_path: str | os.PathLike,
        *,
        max_batch: int | None = None,
        cuda_graph: bool = False,
        manifest: Manifest | None = None,
        device: int = 0,
        cuda_binding: str | None = None,
    ) -> None:
        self.engine_path = Path(engine_path)
        self.cuda_graph = cuda_graph
        self._cuda: CudaDriver | None = None
        self._bindings: list[_Binding] = []
        self._stream: Stream | None = None
        self._graph: GraphExec | None = None  # captured for the current batch size
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        if not self.engine_path.is_file():
            raise ReconadError(f"Engine file {self.engine_path} does not exist.")
        trt = import_tensorrt()
        self.tensorrt_version = trt.__version__
        if manifest is None and manifest_path_for(self.engine_path).is_file():
            manifest = Manifest.load(manifest_path_for(self.engine_path))
        recorded = manifest.engine if manifest is not None else None
        if recorded is not None:
            gpu = probe_gpu(device)
            reason = engine_mismatch(
                recorded,
                self.engine_path.name,
                tensorrt_version=trt.__version__,
                gpu_name=gpu.name,
                compute_capability=gpu.compute_capability,
                integrated=gpu.integrated,
            )
            if reason is not None:
                raise ReconadError(reason)
        self._cuda = open_cuda(device, cuda_binding)
        try:
            with self._cuda.activate():
                self._open(trt, recorded, max_batch)
        except BaseException:
            self.close()
            raise

    def _open(self, trt: Any, recorded: EngineInfo | None, max_batch: int | None) -> None:
        cuda = self._cuda
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        dla_core = recorded.build_details.get("dla_core") if recorded is not None else None
        if dla_core is not None:
            # A DLA engine runs on the core the runtime names (IRuntime::setDLACore), 0 unless set.
            cores = int(getattr(self._runtime, "num_DLA_cores", 0) or 0)
            if not 0 <= int(dla_core) < cores:
                raise ReconadError(
                    f"{self.engine_path.name} was built for DLA core {dla_core}, but this device has "
                    f"{cores or 'no'} DLA core{'s' if cores != 1 else ''} under TensorRT {trt.__version__}."
                )
            self._runtime.DLA_core = int(dla_core)
        if recorded is not None and recorded.build_details.get("version_compatible"):
            # A version-compatible plan carries its own lean runtime, i.e. host code to trust and run.
            self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise ReconadError(
                f"TensorRT {trt.__version__} could not load {self.engine_path}: it was built by another TensorRT "
                "version or for another GPU, or the file is damaged; rebuild it here with recon-export build-engine."
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ReconadError(
                f"TensorRT could not create an execution context for {self.engine_path} (out of GPU memory?)."
            )
        engine = self._engine
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        input_names = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        if len(input_names) != 1:
            raise ReconadError(f"{self.engine_path} has inputs {input_names}; a reconad engine has exactly one.")
        self.input_name = input_names[0]
        input_shape = tuple(engine.get_tensor_shape(self.input_name))  # [N, H, W, 3], N = -1 when dynamic
        if len(input_shape) != 4:
            raise ReconadError(f"{self.engine_path} input has shape {list(input_shape)}, not [N, H, W, 3].")
        if input_shape[0] == -1:
            low, _, high = (tuple(shape) for shape in engine.get_tensor_profile_shape(self.input_name, 0))
            engine_min, engine_max = low[0], high[0]
        else:
            engine_min = engine_max = input_shape[0]
        self.min_batch = engine_min
        self.max_batch = engine_max if max_batch is None else max(engine_min, min(max_batch, engine_max))
        self._buffer_batch = self.max_batch  # the buffers below are sized for this many images
        self.input_hw = (input_shape[1], input_shape[2])
        dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))) for name in names}
        self.inputs = (TensorInfo(self.input_name, input_shape, dtypes[self.input_name].name),)
        self.outputs = tuple(
            TensorInfo(name, tuple(engine.get_tensor_shape(name)), dtypes[name].name)
            for name in names
            if name != self.input_name
        )
        if self.cuda_graph and not self._cuda.supports_graphs:
            _LOG.warning("%s cannot capture CUDA graphs (no stream capture); %s runs without them.",
                         self._cuda.binding, self.engine_path.name)
            self.cuda_graph = False
        self._set_batch(self.max_batch)
        for name in names:
            nbytes = int(np.prod(self._shapes[name], dtype=np.int64)) * dtypes[name].itemsize
            binding = _Binding(name, name == self.input_name, dtypes[name], cuda.alloc_pinned(nbytes), None)
            self._bindings.append(binding)  # registered at once so that close() frees it if the next line fails
            binding.device = cuda.alloc_device(nbytes)
            device = binding.device
            if not self._context.set_tensor_address(name, device.address):
                raise ReconadError(f"TensorRT refused the buffer of tensor {name} of {self.engine_path}.")
        self._stream = cuda.create_stream()

    def use_batch_range(self, min_batch: int, max_batch: int) -> None:
        """Lower the per-call maximum (e.g. to the manifest's); the engine's profile and buffers bound it."""
        self.max_batch = max(self.min_batch, min(max_batch, self._buffer_batch))

    def _set_batch(self, batch: int) -> None:
        """Set the input shape for ``batch`` images and read every tensor's resulting shape."""
        shape = (batch, *self.input_hw, 3)
        if self._graph is not None:
            self._graph.free()
            self._graph = None
        if not self._context.set_input_shape(self.input_name, shape):
            raise ReconadError(f"TensorRT refused input shape {list(shape)} for {self.engine_path}.")
        self._batch = batch
        self._shapes = {self.input_name: shape}
        for tensor in self.outputs:
            resolved = tuple(self._context.get_tensor_shape(tensor.name))
            if any(dim < 0 for dim in resolved):
                raise ReconadError(f"TensorRT could not resolve the shape of {tensor.name} for a batch of {batch}.")
            self._shapes[tensor.name] = resolved

    def infer(self, images: np.ndarray, *, copy: bool = True) -> dict[str, np.ndarray]:
        """Run the engine on uint8 [N, H, W, 3] RGB images, any N >= 1 (split by ``max_batch``).

        Args:
            images: uint8 [N, H, W, 3] at the engine's input size.
            copy: when False and N fits one engine call, the returned arrays are views of this
                backend's pinned output buffers, overwritten by the next ``infer`` and invalid after
                ``close`` (as Polygraphy's ``BaseRunner.infer`` warns): copy what you keep. The
                default copies, so the arrays belong to the caller as the ``Backend`` protocol says.

        Returns:
            ``{output name: array}``: ``anomaly_map`` float32 [N, 1, H, W], ``image_score`` float32 [N].
        """
        if self._context is None:
            raise ReconadError(f"The TensorRT backend for {self.engine_path} is closed.")
        images = np.asarray(images)
        expected = (*self.input_hw, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ReconadError(
                f"{self.engine_path.name} takes uint8 [N, {expected[0]}, {expected[1]}, 3] images, "
                f"got {images.dtype} {list(images.shape)}."
            )
        if self.min_batch <= len(images) <= self.max_batch:
            outputs = self._run(np.ascontiguousarray(images))
            return {name: value.copy() for name, value in outputs.items()} if copy else outputs
        # Chunks reuse the same buffers, so each chunk's outputs are copied before the next runs.
        return infer_in_chunks(
            images,
            self.min_batch,
            self.max_batch,
            lambda chunk: {name: value.copy() for name, value in self._run(chunk).items()},
        )

    def _run(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        cuda, stream = self._cuda, self._stream
        with cuda.activate():
            if len(chunk) != self._batch:
                self._set_batch(len(chunk))
            outputs = {}
            for binding in self._bindings:
                host = binding.host.view(binding.dtype, self._shapes[binding.name])
                if binding.is_input:
                    np.copyto(host, chunk)
                    cuda.copy_to_device(binding.device, host.reshape(-1), stream)
            self._execute()
            for binding in self._bindings:
                if not binding.is_input:
                    host = binding.host.view(binding.dtype, self._shapes[binding.name])
                    cuda.copy_to_host(host.reshape(-1), binding.device, stream)
                    outputs[binding.name] = host
            cuda.synchronize(stream)
        return outputs

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.handle):
            raise ReconadError(f"TensorRT failed to run {self.engine_path} on a batch of {self._batch}.")

    def _execute(self) -> None:
        if not (self.cuda_graph and self._cuda.supports_graphs):
            self._enqueue()
            return
        if self._graph is None:
            self._graph = self._capture()
            if self._graph is None:
                return  # capture failed: the warm-up run already produced this batch's outputs
        self._cuda.launch_graph(self._graph, self._stream)

    def _capture(self) -> GraphExec | None:
        """Capture ``execute_async_v3`` for the current batch size after one plain (warm-up) run.

        TensorRT finishes shape-dependent setup in the first enqueue after a shape change, which
        must not be inside a capture. Returns None, and turns graphs off, when capture fails.
        """
        cuda, stream = self._cuda, self._stream
        self._enqueue()
        cuda.synchronize(stream)
        try:
            cuda.begin_capture(stream)
            try:
                captured = self._context.execute_async_v3(stream.handle)
            finally:
                graph = cuda.end_capture(stream)
        except ReconadError as error:
            # A failed capture leaves a sticky-until-read runtime error; clear it (as trtexec does) so that
            # the next plain run is not reported as failing.
            cuda.clear_error()
            _LOG.warning("CUDA graph capture failed for %s, running without: %s", self.engine_path.name, error)
            self.cuda_graph = False
            return None
        if not captured:
            graph.free()
            cuda.clear_error()
            _LOG.warning("TensorRT could not be captured in a CUDA graph for %s; running without.", self.engine_path)
            self.cuda_graph = False
            return None
        return graph

    def close(self) -> None:
        """Free graphs, buffers, the stream, the context and the engine; idempotent.

        Every resource is released even when one release fails; the first failure is raised afterwards.
        """
        if self._cuda is None:
            return
        cuda, self._cuda = self._cuda, None
        resources: list[Any] = [self._graph] if self._graph is not None else []
        for binding in self._bindings:
            resources += [buffer for buffer in (binding.device, binding.host) if buffer is not None]
        if self._stream is not None:
            resources.append(self._stream)
        self._graph, self._bindings, self._stream = None, [], None
        failure: ReconadError | None = None
        with cuda.activate():
            for resource in resources:
                try:
                    resource.free()
                except ReconadError as error:
                    failure = failure or error
            # Context before engine before runtime: each holds memory of the next.
            self._context = None
            self._engine = None
            self._runtime = None
        cuda.close()
        if failure is not None:
            raise failure

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
