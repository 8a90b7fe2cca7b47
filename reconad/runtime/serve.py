"""``recon-inspect serve``: the Inspector behind a real Triton Inference Server, through NVIDIA's PyTriton.

PyTriton (``nvidia-pytriton``, extra ``serve``) ships the ``tritonserver`` binary and runs our Python
inference function as a Triton model, with Triton's dynamic batcher merging requests of many clients.
The tensor layout (``triton_tensors``) is shared with ``reconad.export.triton`` so a client sees the
same names, types and dims from ``serve`` and from a stock Triton serving a ``triton-repo`` repository.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Inspector
from reconad.runtime.manifest import Manifest

IS_ANOMALOUS_NAME = "is_anomalous"  # BOOL [N, 1]: image_score >= threshold
THRESHOLD_NAME = "threshold"  # FP32 [N, 1]: the threshold applied; NaN when the frame has none (no verdict)
VERDICT_OUTPUT_NAMES = (IS_ANOMALOUS_NAME, THRESHOLD_NAME)

SERVE_INSTALL_HINT = "install it with pip install 'reconad[serve]'"

# numpy dtype name (manifest) -> Triton data type (model_config.proto DataType)
TRITON_DATA_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}

_MODEL_NAME_PATTERN = re.compile(r"[^A-Za-z0-9._-]+")
_ARTIFACT_STEM_PATTERN = re.compile(r"(.+?)-\d+x\d+-")  # <run>-<H>x<W>-<precision>[-trt...]


@dataclasses.dataclass(frozen=True)
class TritonTensor:
    """One model input or output as Triton sees it.

    Attributes:
        name: the graph tensor name.
        dtype: numpy dtype name, e.g. ``"float32"``; ``data_type`` is Triton's name for it.
        dims: the shape a client sees, without the batch axis when the model batches
            (``max_batch_size > 0``), else the full shape. Never empty: a per-frame scalar is ``(1,)``.
        reshape: the shape the model itself has per frame when it differs from ``dims``: ``()`` for a
            graph output of shape ``[N]`` (Triton's ``reshape: { shape: [] }``), else None.
    """

    name: str
    dtype: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None

    @property
    def data_type(self) -> str:
        try:
            return TRITON_DATA_TYPES[self.dtype]
        except KeyError:
            raise ReconadError(f"Tensor {self.name} has dtype {self.dtype}, which Triton has no type for.") from None


def triton_tensors(manifest: Manifest, batching: bool = True) -> tuple[tuple[TritonTensor, ...], tuple[TritonTensor, ...]]:
    """The graph's input and outputs (from the manifest, in its order) as Triton tensors.

    Args:
        manifest: the artifact's manifest; every ``output_tensors`` entry becomes an output, so
            outputs added to the graph (e.g. ``category``) flow through.
        batching: True for ``max_batch_size > 0`` (dims exclude the batch axis), False for a
            fixed-batch model served without batching (dims are the full shapes).

    Returns:
        ``(inputs, outputs)``.
    """

    def convert(name: str, dtype: str, shape: tuple[int, ...]) -> TritonTensor:
        if not batching:
            return TritonTensor(name, dtype, tuple(shape))
        per_frame = tuple(shape[1:])  # drop N
        if not per_frame:  # [N] -> clients see [N, 1], the model keeps [N]
            return TritonTensor(name, dtype, (1,), reshape=())
        return TritonTensor(name, dtype, per_frame)

    tensor = manifest.input_tensor
    inputs = (convert(tensor.name, tensor.dtype, tensor.shape),)
    outputs = tuple(convert(output.name, output.dtype, output.shape) for output in manifest.output_tensors)
    return inputs, outputs


def verdict_tensors() -> tuple[TritonTensor, ...]:
    """The two outputs ``serve`` adds to the graph's: ``is_anomalous`` and ``threshold``, [N, 1] each."""
    return (TritonTensor(IS_ANOMALOUS_NAME, "bool", (1,)), TritonTensor(THRESHOLD_NAME, "float32", (1,)))


def default_model_name(artifact: str | os.PathLike) -> str:
    """The Triton model name for an artifact: the run part of ``<run>-<H>x<W>-<precision>...``, else the stem.

    Characters Triton model names cannot hold (PyTriton allows letters, digits, ``.``, ``_`` and
    ``-``) become ``_``.
    """
    stem = Path(artifact).stem
    match = _ARTIFACT_STEM_PATTERN.match(stem)
    name = match.group(1) if match else stem
    return _MODEL_NAME_PATTERN.sub("_", name).strip("_") or "reconad"


def check_model_name(name: str) -> str:
    """Refuse a model name Triton cannot serve (it is a folder name and part of every URL)."""
    if not name or _MODEL_NAME_PATTERN.search(name) or name in (".", ".."):
        raise ReconadError(
            f"Model name {name!r} is not allowed; use letters, digits, '.', '_' and '-' only."
        )
    return name


# --- PyTriton's Python backend stub and libpython -------------------------------------------------

_LIBPYTHON_PATTERN = re.compile(r"\s(/\S*/libpython3\.\d+[^/\s]*\.so[^/\s]*)$")


@dataclasses.dataclass(frozen=True)
class StubLibraryFix:
    """What ``serve`` does about the libpython that PyTriton's model stub will load.

    Attributes:
        library_dir: the folder of this interpreter's own ``libpython3.X.so`` put first on the server's
            ``LD_LIBRARY_PATH``; None when there is none to point at.
        message: one sentence for the operator.
    """

    library_dir: Path | None
    message: str


def stub_library_fix(maps_text: str | None = None, environ: dict[str, str] | None = None) -> StubLibraryFix:
    """Find this interpreter's own libpython so PyTriton's stub loads it, not the system's copy.

    PyTriton's Python backend stub (``triton_python_backend_stub``) links ``libpython3.X.so.1.0`` and
    the dynamic loader finds the system's. When the interpreter serving the model is another build of
    the same version (pyenv, conda, a venv of either), the stub runs that build's standard library on
    the system's ``libpython`` and the model fails to initialise (measured: an ``AttributeError`` on
    ``_thread.RLock._recursion_count`` inside ``multiprocessing``). Pointing ``LD_LIBRARY_PATH`` at the
    interpreter's own ``lib/`` fixes it; PyTriton copies ``os.environ`` into the server process.

    Args:
        maps_text: the text of ``/proc/self/maps`` (read when None): the libpython mapped into this
            process is the one the stub must use.
        environ: the environment whose ``LD_LIBRARY_PATH`` is checked; ``os.environ`` when None.

    Returns:
        The folder to prepend (None when already first, statically linked, or not Linux) and a sentence.
    """
    environ = os.environ if environ is None else environ
    if maps_text is None:
        try:
            maps_text = Path("/proc/self/maps").read_text()
        except OSError:
            return StubLibraryFix(None, "Not on Linux: PyTriton runs on Linux only.")
    library = None
    for line in maps_text.splitlines():
        match = _LIBPYTHON_PATTERN.search(line)
        if match:
            library = Path(match.group(1))
            break
    if library is None:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        own = Path(sysconfig.get_config_var("LIBDIR") or "") / (sysconfig.get_config_var("INSTSONAME") or "")
        if sysconfig.get_config_var("Py_ENABLE_SHARED") and own.is_file():
            library = own
        else:
            return StubLibraryFix(
                None,
                f"This Python ({sys.executable}) is statically linked, so PyTriton's model stub loads the system's "
                f"libpython{version} instead of its own; if the model fails to initialise, serve from a Python built "
                f"with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared) or from the system python{version}.",
            )
    library_dir = library.parent
    current = [entry for entry in environ.get("LD_LIBRARY_PATH", "").split(":") if entry]
    if current and Path(current[0]) == library_dir:
        return StubLibraryFix(None, f"LD_LIBRARY_PATH already starts with {library_dir}, this Python's own {library.name}.")
    return StubLibraryFix(
        library_dir, f"Pointing the Triton server at this Python's own {library} (LD_LIBRARY_PATH) for PyTriton's model stub."
    )


def apply_stub_library_fix(fix: StubLibraryFix, environ: Any = None) -> None:
    """Prepend ``fix.library_dir`` to ``LD_LIBRARY_PATH`` (in ``os.environ`` unless told otherwise)."""
    environ = os.environ if environ is None else environ
    if fix.library_dir is None:
        return
    current = environ.get("LD_LIBRARY_PATH", "")
    environ["LD_LIBRARY_PATH"] = f"{fix.library_dir}:{current}" if current else str(fix.library_dir)


# --- the server -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How ``serve`` exposes the Inspector.

    Attributes:
        address: the address every endpoint (HTTP, gRPC, metrics) binds to; loopback unless asked.
        http_port: Triton's HTTP/REST (KServe v2) port.
        grpc_port: Triton's gRPC port.
        metrics_port: Triton's Prometheus metrics port (``/metrics``).
        model_name: the Triton model name; None derives it from the artifact (``default_model_name``).
        max_batch: the largest batch Triton forms; None takes the manifest's ``input_tensor.max_batch``.
        max_queue_delay_us: how long Triton holds a request to batch it with others, in microseconds.
        exit_timeout_s: how long the server waits for in-flight requests when stopping.
        log_file: where ``tritonserver`` writes its log; None for a new file in the temp folder
            (its path is reported at start-up).
    """

    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_name: str | None = None
    max_batch: int | None = None
    max_queue_delay_us: int = 2000  # a few ms of added latency buys batches across cameras
    exit_timeout_s: int = 5
    log_file: Path | None = None

    def __post_init__(self) -> None:
        for key in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, key)
            if not 0 < port < 65536:
                raise ReconadError(f"--{key.replace('_', '-')} must be a port number (1..65535), got {port}.")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3:
            raise ReconadError(f"The HTTP, gRPC and metrics ports must differ, got {list(ports)}.")
        if self.max_batch is not None and self.max_batch < 1:
            raise ReconadError(f"--max-batch must be at least 1, got {self.max_batch}.")
        if self.max_queue_delay_us < 0:
            raise ReconadError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}.")
        if self.model_name is not None:
            check_model_name(self.model_name)


def check_ports_free(address: str, ports: dict[str, int]) -> None:
    """Refuse, in one sentence, ports another process listens on (Triton would die and PyTriton wait long)."""
    for key, port in ports.items():
        try:
            family, kind, _, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as error:
            raise ReconadError(f"Cannot listen on address {address!r}: {error.strerror}.") from None
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no clash
            try:
                probe.bind(where)
            except OSError as error:
                flag = key.replace("_", "-")
                raise ReconadError(
                    f"Cannot listen on {address}:{port} (--{flag}): {error.strerror}; choose a free port."
                ) from None


def _import_pytriton() -> Any:
    try:
        import pytriton.triton
    except ImportError:
        raise ReconadError(f"PyTriton is not installed, so recon-inspect serve cannot start; {SERVE_INSTALL_HINT}.") from None
    return pytriton


def verdict_outputs(inspector: Inspector, images: np.ndarray, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The served outputs for one batch: the graph's (reshaped to Triton dims) plus the verdict.

    Args:
        inspector: gives the verdicts (threshold rule, per-frame thresholds) for ``outputs``.
        images: the uint8 [N, H, W, 3] batch (only its length is used).
        outputs: the graph outputs for ``images``.

    Returns:
        Every manifest output as ``[N, *dims]``, ``is_anomalous`` bool [N, 1] (False where the frame
        has no threshold) and ``threshold`` float32 [N, 1] (NaN where it has none).
    """
    count = len(images)
    _, tensors = triton_tensors(inspector.manifest)
    # In the declared dtype: ONNX Runtime returns int64 (``category``) as numpy's longlong, which PyTriton's
    # strict output check does not take for int64.
    served = {
        tensor.name: np.ascontiguousarray(outputs[tensor.name], dtype=np.dtype(tensor.dtype)).reshape(count, *tensor.dims)
        for tensor in tensors
    }
    verdicts = inspector.verdicts(outputs)
    served[IS_ANOMALOUS_NAME] = np.array([[bool(verdict.is_anomalous)] for verdict in verdicts], dtype=np.bool_)
    served[THRESHOLD_NAME] = np.array(
        [[math.nan if verdict.threshold is None else verdict.threshold] for verdict in verdicts], dtype=np.float32
    )
    return served


class InspectorServer:
    """A Triton Inference Server (PyTriton) serving one Inspector as one model, with dynamic batching.

    Use as a context manager or ``start()`` / ``stop()``; ``serve_forever()`` blocks until SIGINT,
    SIGTERM or the server dies. The Inspector is closed by ``stop()``.

    Args:
        inspector: an open Inspector (any backend).
        config: ports, address, batching.
        model_name: the Triton model name.
        report: receives one line per event (start-up, the libpython fix, the endpoints).
    """

    def __init__(
        self,
        inspector: Inspector,
        config: ServeConfig,
        model_name: str,
        report: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.inspector = inspector
        self.config = config
        self.model_name = check_model_name(model_name)
        self.report = report
        tensor = inspector.manifest.input_tensor
        self.max_batch = config.max_batch if config.max_batch is not None else tensor.max_batch
        self._triton: Any = None
        self.log_file: Path | None = config.log_file
        self._lock = threading.Lock()

    @property
    def http_url(self) -> str:
        return f"http://{self.config.address}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.config.address}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.address}:{self.config.metrics_port}/metrics"

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:  # one model instance; the lock also keeps a TensorRT context single-threaded
            outputs = self.inspector.infer(images)
        return verdict_outputs(self.inspector, images, outputs)

    def start(self) -> None:
        """Start ``tritonserver``, load the model and wait until it is ready; one-sentence errors."""
        _import_pytriton()
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        check_ports_free(
            self.config.address,
            {"http_port": self.config.http_port, "grpc_port": self.config.grpc_port, "metrics_port": self.config.metrics_port},
        )
        fix = stub_library_fix()
        self.report(fix.message)
        apply_stub_library_fix(fix)
        for name in ("pytriton", "tritonclient"):
            logging.getLogger(name).setLevel(logging.ERROR)  # failures are reported here, in one sentence

        log_file = self.config.log_file
        if log_file is None:
            log_file = Path(tempfile.mkdtemp(prefix="reconad-serve-")) / "tritonserver.log"
        self.log_file = log_file
        inputs, outputs = triton_tensors(self.inspector.manifest)
        outputs = (*outputs, *verdict_tensors())
        triton_config = TritonConfig(
            http_address=self.config.address,
            http_port=self.config.http_port,
            grpc_address=self.config.address,
            grpc_port=self.config.grpc_port,
            metrics_address=self.config.address,
            metrics_port=self.config.metrics_port,
            allow_gpu_metrics=False,
            exit_timeout_secs=self.config.exit_timeout_s,
            log_file=log_file,
        )
        model_config = ModelConfig(
            max_batch_size=self.max_batch,
            batcher=DynamicBatcher(
                max_queue_delay_microseconds=self.config.max_queue_delay_us, preferred_batch_size=[self.max_batch]
            ),
        )

        def spec(tensor: TritonTensor) -> Any:
            return Tensor(name=tensor.name, dtype=np.dtype(tensor.dtype).type, shape=tensor.dims)

        triton = Triton(config=triton_config)
        try:
            triton.run()
            triton.bind(
                model_name=self.model_name,
                infer_func=batch(self._infer),
                inputs=[spec(tensor) for tensor in inputs],
                outputs=[spec(tensor) for tensor in outputs],
                config=model_config,
                strict=True,
            )
        except Exception as error:  # PyTriton / tritonclient exception types, a port in use, a dead stub
            triton.stop()
            raise ReconadError(_start_failure(error, fix)) from None
        self._triton = triton
        self.report(
            f"serving model {self.model_name!r} ({self.inspector.backend.name}, batches up to {self.max_batch}) on "
            f"{self.http_url} (HTTP), {self.grpc_url} (gRPC), {self.metrics_url} (Prometheus); server log {self.log_file}"
        )

    def serve_forever(self) -> None:
        """Block until SIGINT/SIGTERM or the server stops, then stop it."""
        if self._triton is None:
            raise ReconadError("The server is not started.")
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(1.0):
                if not self._triton.is_alive():
                    raise ReconadError("The Triton server stopped unexpectedly.")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

    def stop(self) -> None:
        """Stop the server (waits up to ``exit_timeout_s`` for in-flight requests) and close the Inspector."""
        triton, self._triton = self._triton, None
        if triton is not None:
            triton.stop()
        self.inspector.close()

    def __enter__(self) -> InspectorServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _start_failure(error: BaseException, fix: StubLibraryFix) -> str:
    """One sentence for a server or model that would not start (tritonclient puts the server's log in it)."""
    text = str(error).replace("\\n", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "initialize" in text or "initialise" in text:
        exceptions = [line for line in lines if re.match(r"\w+(Error|Exception): ", line)]
        detail = exceptions[-1] if exceptions else lines[0] if lines else type(error).__name__
        detail = re.sub(r"[\s:]*Traceback \(most recent call last\):.*$", "", detail)[:200]
        if fix.library_dir is None and "statically linked" in fix.message:
            return f"The Triton model failed to initialise ({detail}); {fix.message[0].lower()}{fix.message[1:]}"
        return f"The Triton model failed to initialise ({detail})."
    return f"The Triton server failed to start: {(lines[0] if lines else type(error).__name__)[:300].rstrip('.')}."


def serve_artifact(
    artifact: str | os.PathLike,
    config: ServeConfig,
    *,
    backend: str = "auto",
    threshold: float | None = None,
    num_threads: int | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> None:
    """Open ``artifact`` in an Inspector and serve it until SIGINT/SIGTERM (``recon-inspect serve``).

    Raises:
        ReconadError: a bad artifact, a batch size the artifact cannot take, PyTriton missing, a server
            that cannot start.
    """
    _import_pytriton()
    inspector = Inspector.open(artifact, backend, threshold=threshold, num_threads=num_threads)
    try:
        if inspector.threshold is None:
            report(
                "No image threshold (uncalibrated artifact): every frame gets threshold NaN and is_anomalous false; "
                "calibrate with recon-inspect calibrate or pass --threshold."
            )
        server = InspectorServer(inspector, config, config.model_name or default_model_name(artifact), report)
        server.start()
    except BaseException:
        inspector.close()
        raise
    server.serve_forever()
