"""Inference backends behind one protocol: ONNX Runtime here, TensorRT in ``trt_backend.py``.

``open_backend`` picks one by file type and name. The interface follows Polygraphy's ``BaseRunner``
(context-managed, ``infer(images) -> dict``); every backend copies its outputs out for the caller.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from reconad.runtime.errors import ReconadError

BACKEND_CHOICES = ("auto", "ort", "ort-cpu", "ort-cuda", "ort-trt", "trt")

# Execution providers per explicit ONNX Runtime backend, best first; CPU stays as the fallback for
# the few ops a GPU provider cannot take.
_ORT_PROVIDERS = {
    "ort-cpu": ("CPUExecutionProvider",),
    "ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "ort-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Name, shape (-1 for a dynamic axis) and numpy dtype name of a model I/O tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@runtime_checkable
class Backend(Protocol):
    """What the Inspector and ``verify`` need from an inference engine.

    Attributes:
        name: the backend actually running, e.g. ``"ort-cpu"``, ``"ort-cuda"``, ``"trt"``.
        inputs: the model file's input tensors.
        outputs: the model file's output tensors.
        max_batch: the largest batch one call to the model takes; ``infer`` splits larger ones.
    """

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    max_batch: int

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on uint8 [N, H, W, 3] RGB images, any N >= 1.

        Returns:
            ``{ANOMALY_MAP_NAME: float32 [N, 1, H, W], IMAGE_SCORE_NAME: float32 [N]}``. The arrays
            belong to the caller: a backend never hands out views of buffers it reuses.
        """
        ...

    def close(self) -> None:
        """Release the session / engine and its memory; idempotent."""
        ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc_info: object) -> None: ...


def infer_in_chunks(
    images: np.ndarray,
    min_batch: int,
    max_batch: int,
    run_chunk: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Run ``run_chunk`` on slices of at most ``max_batch`` images and concatenate the outputs.

    A chunk smaller than ``min_batch`` (a fixed-batch artifact) is padded by repeating its last image,
    and the padded rows are cut from the outputs.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ReconadError(f"Images must be a non-empty [N, H, W, 3] batch, got shape {list(images.shape)}.")
    pieces: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), max_batch):
        chunk = images[start : start + max_batch]
        count = len(chunk)
        if count < min_batch:
            padding = np.repeat(chunk[-1:], min_batch - count, axis=0)
            chunk = np.concatenate([chunk, padding], axis=0)
        for name, value in run_chunk(np.ascontiguousarray(chunk)).items():
            pieces.setdefault(name, []).append(value[:count])
    return {name: np.concatenate(values, axis=0) for name, values in pieces.items()}


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
    return tuple(name for name, wanted in _ORT_PROVIDERS.items() if wanted[0] in providers or name == "ort-cpu")


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


_ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16"}


class OrtBackend:
    """An ONNX Runtime session on one model file, with thread spinning off.

    Args:
        model_path: the ``.onnx`` file.
        backend: ``"ort-cpu"``, ``"ort-cuda"``, ``"ort-trt"``, or ``"ort"`` for the best available
            among CUDA and CPU (the TensorRT provider builds engines at start-up, taking minutes, so
            it is used only when asked for).
        max_batch: largest batch per session run; defaults to the model's fixed batch, else 64.
        min_batch: smallest batch per session run (a fixed-batch model needs its batch size).
        num_threads: intra-op threads; None lets ONNX Runtime use every core.
        memory_arena: ONNX Runtime's CPU memory arena. Off by default: the arena keeps its peak
            allocations reserved, and without it the runtime's peak RSS at 512 px drops by about a
            fifth (393 vs 488 MiB measured, benchmarks/bench_onnx.py) for ~7% CPU latency; on a
            Jetson the CPU and GPU share that memory.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        backend: str = "ort",
        *,
        max_batch: int | None = None,
        min_batch: int = 1,
        num_threads: int | None = None,
        memory_arena: bool = False,
    ) -> None:
        ort = import_onnxruntime()
        self.model_path = Path(model_path)
        self.name = self._resolve_name(backend, ort.get_available_providers())
        options = ort.SessionOptions()
        # Spinning threads busy-wait between ops and starve every other process on small CPUs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = memory_arena
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        options.log_severity_level = 3  # errors only: provider fallback warnings are reported by name
        providers = list(_ORT_PROVIDERS[self.name])
        if not self.model_path.is_file():
            raise ReconadError(f"Model file {self.model_path} does not exist.")
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=providers)
        except Exception as error:  # ORT raises its own pybind exception types for corrupt files
            raise ReconadError(f"ONNX Runtime cannot load {self.model_path}: {_ort_reason(error)}.") from None
        if providers[0] not in self._session.get_providers():
            raise ReconadError(
                f"ONNX Runtime could not start {providers[0]} for backend {self.name} "
                "(check the CUDA/TensorRT libraries)."
            )
        self.inputs = tuple(
            TensorInfo(arg.name, _ort_shape(arg.shape), _ORT_DTYPES.get(arg.type, arg.type))
            for arg in self._session.get_inputs()
        )
        self.outputs = tuple(
            TensorInfo(arg.name, _ort_shape(arg.shape), _ORT_DTYPES.get(arg.type, arg.type))
            for arg in self._session.get_outputs()
        )
        self.custom_metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        fixed_batch = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else -1
        if fixed_batch > 0:
            self.min_batch = self.max_batch = fixed_batch
        else:
            self.min_batch, self.max_batch = min_batch, max_batch or 64

    def use_batch_range(self, min_batch: int, max_batch: int) -> None:
        """Set the per-call batch range (from a manifest read after opening); a fixed batch stays fixed."""
        if self.inputs[0].shape[0] == -1:
            self.min_batch, self.max_batch = min_batch, max_batch

    @staticmethod
    def _resolve_name(backend: str, available: list[str]) -> str:
        if backend == "ort":
            return "ort-cuda" if "CUDAExecutionProvider" in available else "ort-cpu"
        if backend not in _ORT_PROVIDERS:
            raise ReconadError(f"Unknown ONNX Runtime backend {backend!r}; choose one of {list(_ORT_PROVIDERS)}.")
        provider = _ORT_PROVIDERS[backend][0]
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


def open_backend(
    artifact: str | os.PathLike,
    backend: str = "auto",
    *,
    max_batch: int | None = None,
    min_batch: int = 1,
    num_threads: int | None = None,
) -> Backend:
    """Open ``artifact`` on a backend: TensorRT for ``.engine`` files, ONNX Runtime for ``.onnx``.

    Args:
        artifact: a ``.onnx`` or ``.engine`` file.
        backend: one of ``BACKEND_CHOICES``; ``"auto"`` is ``"trt"`` for engines and ``"ort"`` (CUDA
            provider when present, else CPU) for ONNX files.
        max_batch: largest batch per model call, usually ``manifest.input_tensor.max_batch``.
        min_batch: smallest batch per model call, usually ``manifest.input_tensor.min_batch``.
        num_threads: ONNX Runtime intra-op threads (ignored by TensorRT).
    """
    path = Path(artifact)
    if backend not in BACKEND_CHOICES:
        raise ReconadError(f"Unknown backend {backend!r}; choose one of {list(BACKEND_CHOICES)}.")
    suffix = path.suffix.lower()
    if suffix == ".engine":
        if backend not in ("auto", "trt"):
            raise ReconadError(f"{path} is a TensorRT engine, which only the trt backend runs.")
        return _open_trt_backend(path, max_batch=max_batch)
    if suffix != ".onnx":
        raise ReconadError(f"{path} is neither an .onnx graph nor a TensorRT .engine.")
    if backend == "trt":
        raise ReconadError(
            f"The trt backend runs .engine files; build one from {path} with recon-export build-engine, or use ort-trt."
        )
    return OrtBackend(
        path,
        "ort" if backend == "auto" else backend,
        max_batch=max_batch,
        min_batch=min_batch,
        num_threads=num_threads,
    )


_TRT_MODULES = ("tensorrt", "cuda", "pycuda")  # missing any of these means no TensorRT stack here


def _open_trt_backend(path: Path, *, max_batch: int | None) -> Backend:
    try:
        from reconad.runtime.backends.trt import TrtBackend
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in _TRT_MODULES and error.name != "reconad.runtime.backends.trt":
            raise
        raise ReconadError(
            f"TensorRT is not installed here, so {path} cannot run; install TensorRT (JetPack ships it) "
            "or run the .onnx artifact with an ort backend."
        ) from None
    return TrtBackend(path, max_batch=max_batch)
