"""ONNX Runtime backend: one InferenceSession (CPU, CUDA or TensorRT execution provider), spinning off.

The export's parity checks run the graphs they are about to write through this same class (from
serialized bytes), so what is checked is what the runtime runs. onnxruntime is imported on first use.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from reconad.runtime.backends.base import TensorInfo, infer_in_chunks
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import METADATA_KEY

# Execution providers per explicit ONNX Runtime backend, best first; CPU stays as the fallback for
# the few ops a GPU provider cannot take.
ORT_PROVIDERS = {
    "ort-cpu": ("CPUExecutionProvider",),
    "ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "ort-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
DEFAULT_MAX_BATCH = 64  # per session run, for a dynamic-batch graph whose manifest is not read yet

_ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16"}
_ORT_DTYPES |= {"tensor(int64)": "int64", "tensor(int32)": "int32"}


def import_onnxruntime() -> Any:
    """onnxruntime, or a one-sentence ``ReconadError`` saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ReconadError("ONNX Runtime is not installed; install it with pip install 'reconad[runtime]'.") from None
    return onnxruntime


def available_ort_backends() -> tuple[str, ...]:
    """The ``ort-*`` backend names this onnxruntime build can run (``ort-cpu`` is always there)."""
    providers = set(import_onnxruntime().get_available_providers())
    return tuple(name for name, wanted in ORT_PROVIDERS.items() if wanted[0] in providers or name == "ort-cpu")


def _ort_shape(shape: list[Any]) -> tuple[int, ...]:
    return tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in shape)


def _ort_reason(error: Exception) -> str:
    """``[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:Protobuf parsing failed.``
    -> ``Protobuf parsing failed (INVALID_PROTOBUF)``."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    match = re.match(r"\[ONNXRuntimeError\] : \d+ : (\w+) : (.*)", lines[0])
    if match is None:
        return lines[0][:200].rstrip(".")
    code, detail = match.groups()
    detail = re.sub(r"^Load model from .* failed:", "", detail).strip().rstrip(".")
    return f"{detail[:200]} ({code})"


def _tensor_infos(arguments: list[Any]) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(arg.name, _ort_shape(arg.shape), _ORT_DTYPES.get(arg.type, arg.type)) for arg in arguments)


def _is_ort_cpu_graph(session: Any) -> bool:
    """Whether the session's graph carries a manifest with ``"target": "ort-cpu"`` (export/ort_attention.py)."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        return text is not None and json.loads(text).get("target") == "ort-cpu"
    except (ValueError, AttributeError):
        return False  # not a manifest this reconad wrote: the inspector reports it when it reads it


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_num_threads(num_threads: int | None) -> None:
    """Refuse intra-op thread counts below 1 or above the usable cores (more only oversubscribe them:
    1000 threads on 2 cores ran a line at 2.1 fps). Raises ReconadError."""
    if num_threads is None:
        return
    cores = usable_cores()
    if not 1 <= num_threads <= cores:
        raise ReconadError(f"num_threads must be between 1 and the {cores} cores this process can use, got {num_threads}.")


class OrtBackend:
    """An ONNX Runtime session on one model, with thread spinning off.

    Args:
        model: the ``.onnx`` file, or a serialized ``onnx.ModelProto`` (bytes) not yet written.
        backend: ``"ort-cpu"``, ``"ort-cuda"``, ``"ort-trt"``, or ``"ort"`` for the best available
            among CUDA and CPU (the TensorRT provider builds engines at start-up, taking minutes, so
            it is used only when asked for).
        max_batch: largest batch per session run; defaults to the model's fixed batch, else
            ``DEFAULT_MAX_BATCH``.
        min_batch: smallest batch per session run (a fixed-batch model needs its batch size).
        num_threads: intra-op threads, 1 to ``usable_cores()``; None lets ONNX Runtime use every core.
        memory_arena: ONNX Runtime's CPU memory arena. None (default): on for a graph whose embedded manifest
            says ``"target": "ort-cpu"``, off for every other. Off: the arena keeps its peak allocations
            reserved, and without it the runtime's peak RSS at 512 px drops by about a fifth (393 vs 488 MiB
            measured, benchmarks/bench_onnx.py) for ~7% CPU latency; on a Jetson the CPU and GPU share that
            memory. On for the ort-cpu graph: its MultiHeadAttention kernels allocate their scratch ([N, heads,
            L, L] logits, 32 MiB per image at 512 px) on every call, outside the session's memory plan, and
            without the arena glibc maps and faults those pages in afresh each time (mvtec-512, batch 1, the
            2-core machine under load, one process: 0.73x the tensorrt graph's speed without the arena, 1.1x
            with it; benchmarks/bench_table.py --variants ort-fp32 ort-fp32-arena ort-fp32-fused measures it).

    Raises:
        ReconadError: no onnxruntime, an unavailable provider, a missing or unloadable model, a thread
            count outside 1 to ``usable_cores()``.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        backend: str = "ort",
        *,
        max_batch: int | None = None,
        min_batch: int = 1,
        num_threads: int | None = None,
        memory_arena: bool | None = None,
    ) -> None:
        check_num_threads(num_threads)
        ort = import_onnxruntime()
        in_memory = isinstance(model, bytes)
        self.num_threads = num_threads  # None: every core
        self.model_path = Path("<in-memory ONNX graph>") if in_memory else Path(model)
        self.name = self._resolve_name(backend, ort.get_available_providers())
        providers = list(ORT_PROVIDERS[self.name])
        if not in_memory and not self.model_path.is_file():
            raise ReconadError(f"Model file {self.model_path} does not exist.")
        self._session = self._open(ort, model, providers, bool(memory_arena), num_threads)
        if memory_arena is None and _is_ort_cpu_graph(self._session):  # see memory_arena above
            self._session = None  # one session in memory at a time
            self._session = self._open(ort, model, providers, True, num_threads)
        if providers[0] not in self._session.get_providers():
            raise ReconadError(
                f"ONNX Runtime could not start {providers[0]} for backend {self.name} "
                "(check the CUDA/TensorRT libraries)."
            )
        self.inputs = _tensor_infos(self._session.get_inputs())
        self.outputs = _tensor_infos(self._session.get_outputs())
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self._fixed_batch = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else -1
        self.min_batch, self.max_batch = 1, DEFAULT_MAX_BATCH
        self.use_batch_range(min_batch, max_batch or DEFAULT_MAX_BATCH)

    def _open(self, ort: Any, model: Any, providers: list[str], memory_arena: bool, num_threads: int | None) -> Any:
        options = ort.SessionOptions()
        # Spinning threads busy-wait between ops and starve every other process on small CPUs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = memory_arena
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        options.log_severity_level = 3  # errors only: provider fallback warnings are reported by name
        source = model if isinstance(model, bytes) else str(self.model_path)
        try:
            return ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as error:  # ORT raises its own pybind exception types for corrupt files
            raise ReconadError(f"ONNX Runtime cannot load {self.model_path}: {_ort_reason(error)}.") from None

    def use_batch_range(self, min_batch: int, max_batch: int) -> None:
        """Set the per-call batch range (e.g. from a manifest read after opening); a fixed batch stays fixed."""
        if self._fixed_batch > 0:
            self.min_batch = self.max_batch = self._fixed_batch
        else:
            self.min_batch, self.max_batch = min_batch, max_batch

    @staticmethod
    def _resolve_name(backend: str, available: list[str]) -> str:
        if backend == "ort":
            return "ort-cuda" if "CUDAExecutionProvider" in available else "ort-cpu"
        if backend not in ORT_PROVIDERS:
            raise ReconadError(f"Unknown ONNX Runtime backend {backend!r}; choose one of {list(ORT_PROVIDERS)}.")
        provider = ORT_PROVIDERS[backend][0]
        if provider not in available:
            raise ReconadError(
                f"This onnxruntime has no {provider} for backend {backend}; install onnxruntime-gpu or use ort-cpu."
            )
        return backend

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """See ``Backend.infer``; splits batches larger than ``max_batch``."""
        if self._session is None:
            raise ReconadError(f"The backend for {self.model_path} is closed.")
        names = [output.name for output in self.outputs]

        def run_chunk(chunk: np.ndarray) -> dict[str, np.ndarray]:
            try:
                values = self._session.run(names, {self.inputs[0].name: chunk})
            except Exception as error:  # ORT's own exception types: wrong input shape/dtype, kernel failure
                raise ReconadError(f"ONNX Runtime failed to run {self.model_path}: {_ort_reason(error)}.") from None
            return dict(zip(names, values))

        return infer_in_chunks(np.asarray(images), self.min_batch, self.max_batch, run_chunk)

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
