"""A Triton Inference Server as the loop's backend: ``recon-inspect run SOURCE --server grpc://host:8001/NAME``.

The server is ours (``recon-inspect serve``) or a stock Triton serving a ``recon-export triton-repo``
repository. Frames are prepared here exactly as for a local Inspector and sent through ``tritonclient``;
the verdict rule is the Inspector's (``score >= threshold``) with the threshold from ``--threshold``, the
manifest the repository carries (config parameter ``reconad_manifest_v<N>``), or ``serve``'s own
``threshold`` output. A server that cannot be reached raises ``ServerUnavailableError``, which the loop
treats like a lost camera (counted, retried with backoff).
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from reconad.runtime.backends.base import TensorInfo, infer_in_chunks
from reconad.runtime.errors import BackendUnavailableError, ReconadError
from reconad.runtime.inspector import Verdict
from reconad.runtime.manifest import ANOMALY_MAP_NAME, IMAGE_SCORE_NAME, INPUT_NAME, Manifest
from reconad.runtime.thresholds import Threshold
from reconad.runtime.frames import Frame, Roi, prepare_batch

MANIFEST_PARAMETER_PREFIX = "reconad_manifest_v"  # + version; written by recon-export triton-repo
THRESHOLD_OUTPUT = "threshold"  # recon-inspect serve's per-frame threshold (NaN: none)
VERDICT_OUTPUTS = ("is_anomalous", THRESHOLD_OUTPUT)  # served by recon-inspect serve; the verdict is redone here
_URL_PATTERN = re.compile(r"(grpc|http)://([^/:]+|\[[^\]]+\]):(\d+)/([A-Za-z0-9._-]+)(?:/(\d+))?/?")
_TRITON_DTYPES = {"UINT8": "uint8", "FP32": "float32", "FP16": "float16", "INT64": "int64", "INT32": "int32", "BOOL": "bool"}


class ServerUnavailableError(BackendUnavailableError):
    """The Triton server cannot be reached (down, restarting, network): a transient fault, retried."""


@dataclasses.dataclass(frozen=True)
class ServerAddress:
    """``grpc://host:port/NAME[/VERSION]`` or ``http://...``, parsed."""

    protocol: str
    host: str
    port: int
    model: str
    version: str = ""  # empty: the server's choice (the highest ready version)

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.protocol}://{self.url}/{self.model}" + (f"/{self.version}" if self.version else "")


def parse_server_url(text: str) -> ServerAddress:
    """Parse ``--server``; one sentence for anything else."""
    match = _URL_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ReconadError(
            f"--server must look like grpc://HOST:PORT/MODEL or http://HOST:PORT/MODEL[/VERSION], got {text!r}."
        )
    protocol, host, port, model, version = match.groups()
    if not 0 < int(port) < 65536:
        raise ReconadError(f"--server port must be 1..65535, got {port}.")
    return ServerAddress(protocol, host, int(port), model, version or "")


def _client_module(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise ReconadError("tritonclient is not installed; install it with pip install 'reconad[serve]'.") from None
    return module


_UNREACHABLE = ("unavailable", "failed to connect", "connection refused", "connection reset", "reset by peer",
                 "broken pipe", "timed out", "deadline exceeded", "socket closed", "connection closed")  # fmt: skip
# While a restarted server loads its models, requests name a model it does not have yet.
_RESTARTING = ("unknown model", "is not found", "is not ready", "no available versions")


def _error_text(error: BaseException) -> str:
    message = getattr(error, "message", None)
    text = message() if callable(message) else str(error)
    status = getattr(error, "status", None)
    return f"{text or type(error).__name__} {status() if callable(status) else ''}".strip()


def _is_unreachable(error: BaseException, text: str, restarting_counts: bool) -> bool:
    """A connection-level failure (refused, reset, unavailable, timed out) rather than a refused request."""
    lowered = text.lower()
    if isinstance(error, OSError) or any(marker in lowered for marker in _UNREACHABLE):
        return True
    return restarting_counts and any(marker in lowered for marker in _RESTARTING)


class TritonBackend:
    """One model on a Triton server behind the ``Backend`` protocol (``infer(images) -> dict``).

    Outputs come back in the graph's shapes: a per-frame ``[1]`` (Triton's dims for a graph output of
    shape ``[N]``) is ``[N]`` again, so ``image_score`` is float32 ``[N]`` as from a local backend.

    Args:
        address: from ``parse_server_url``.
        timeout_s: per request (gRPC deadline / HTTP network timeout).

    Raises:
        ServerUnavailableError: the server cannot be reached (at open and on every ``infer``).
        ReconadError: the model is unknown, not ready, or does not have the graph's input.
    """

    def __init__(self, address: ServerAddress, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._module = _client_module(address.protocol)
        self.name = f"triton-{address.protocol}"
        # tritonclient.http runs on gevent, whose client works only in the thread that made it: one per thread
        self._local = threading.local()
        self._clients: list[Any] = []
        self._closed = False
        try:
            client = self._thread_client()
            metadata = self._call(client.get_model_metadata, address.model, address.version)
            config = self._call(client.get_model_config, address.model, address.version)
        except BaseException:
            self.close()
            raise
        metadata = self._as_dict(metadata)
        config = self._as_dict(config)
        config = config.get("config", config)
        self.versions: tuple[str, ...] = tuple(metadata.get("versions", ()))
        self.config = config
        self.max_batch = int(config.get("max_batch_size", 0) or 0)
        self.batching = self.max_batch > 0
        self.inputs = tuple(self._tensor(tensor) for tensor in metadata["inputs"])
        self.outputs = tuple(self._tensor(tensor) for tensor in metadata["outputs"])
        if [tensor.name for tensor in self.inputs] != [INPUT_NAME]:
            raise ReconadError(f"Model {address} takes {[t.name for t in self.inputs]}, not the graph input {INPUT_NAME!r}.")
        image = self.inputs[0]
        if image.dtype != "uint8" or len(image.shape) != 4 or image.shape[3] != 3:
            raise ReconadError(f"Model {address} input {INPUT_NAME} is {image.dtype} {list(image.shape)}, not uint8 [N, H, W, 3].")
        self.min_batch = 1 if self.batching else image.shape[0]
        if not self.batching:
            self.max_batch = image.shape[0]
        self.metadata: dict[str, str] = {}  # a server has no model-file metadata; see manifest()
        # graph outputs of shape [N] are [N, 1] on the wire (dims [1]); gRPC JSON spells int64 dims as strings
        first = 1 if self.batching else 0
        self._squeeze = {
            tensor.name for tensor in self.outputs if self.batching and list(tensor.shape[first:]) == [1]
        }

    def use_batch_range(self, min_batch: int, max_batch: int) -> None:
        """The server fixes the batch range (its ``max_batch_size``); nothing to set."""

    @staticmethod
    def _as_dict(message: Any) -> dict:
        if isinstance(message, dict):
            return message
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(message, preserving_proto_field_name=True)

    def _tensor(self, tensor: dict) -> TensorInfo:
        shape = tuple(int(dim) for dim in tensor["shape"])
        return TensorInfo(tensor["name"], shape, _TRITON_DTYPES.get(tensor["datatype"], tensor["datatype"].lower()))

    def _thread_client(self) -> Any:
        if self._closed:
            raise ReconadError(f"The connection to {self.address} is closed.")
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._connect()
            self._clients.append(client)
        return client

    def _connect(self) -> Any:
        try:
            if self.address.protocol == "http":
                return self._module.InferenceServerClient(
                    self.address.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            return self._module.InferenceServerClient(self.address.url)
        except Exception as error:  # bad host names surface here
            raise ServerUnavailableError(f"Cannot connect to the Triton server {self.address}: {error}.") from None

    def _call(self, method: Any, *args: Any, serving: bool = False, **kwargs: Any) -> Any:
        """Call the client; ``serving``: the model was there before, so "unknown model" means a restart."""
        if self.address.protocol == "grpc":
            kwargs.setdefault("client_timeout", self.timeout_s)
            if method.__name__ in ("get_model_metadata", "get_model_config"):
                kwargs["as_json"] = True
        try:
            return method(*args, **kwargs)
        except Exception as error:  # tritonclient's InferenceServerException, gevent/grpc socket errors
            text = _error_text(error)
            first = text.splitlines()[0][:200] if text else type(error).__name__
            if _is_unreachable(error, text, serving):
                raise ServerUnavailableError(f"The Triton server {self.address} is unreachable ({first}).") from None
            raise ReconadError(f"The Triton server {self.address} refused the request: {first}.") from None

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """See ``Backend.infer``; batches larger than the server's ``max_batch_size`` are split."""
        module = self._module
        names = [tensor.name for tensor in self.outputs]

        def run_chunk(chunk: np.ndarray) -> dict[str, np.ndarray]:
            tensor = module.InferInput(INPUT_NAME, list(chunk.shape), "UINT8")
            tensor.set_data_from_numpy(chunk)
            requested = [module.InferRequestedOutput(name) for name in names]
            result = self._call(self._thread_client().infer, self.address.model, [tensor], model_version=self.address.version,
                                outputs=requested, serving=True)  # fmt: skip
            outputs = {}
            for name in names:
                value = np.array(result.as_numpy(name))  # a copy the caller owns
                outputs[name] = value.reshape(len(chunk)) if name in self._squeeze else value
            return outputs

        return infer_in_chunks(np.asarray(images), self.min_batch, self.max_batch, run_chunk)

    def manifest(self) -> Manifest | None:
        """The manifest the repository carries for the served version (``triton-repo``), else None."""
        parameters = self.config.get("parameters", {})
        version = self.address.version or (max(self.versions, key=int) if self.versions else "")
        entry = parameters.get(f"{MANIFEST_PARAMETER_PREFIX}{version}")
        if entry is None:
            return None
        try:
            return Manifest.from_json(entry.get("string_value", ""))
        except ReconadError as error:
            raise ReconadError(f"The manifest that {self.address} carries for version {version} is invalid: {error}.") from None

    def close(self) -> None:
        self._closed = True
        clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # a client of a server that went away, or a gevent client of another thread
                pass

    def __enter__(self) -> TritonBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RemoteInspector:
    """The Inspector's interface (``input_hw``, ``inspect``, ``manifest``, ``backend``, ``threshold``) on a server.

    Use ``RemoteInspector.open(url)``.

    Args:
        backend: a connected ``TritonBackend``.
        manifest: the repository's manifest of the served version, or None (``serve`` carries none).
        threshold: overrides every other threshold (raw score units).
    """

    def __init__(self, backend: TritonBackend, manifest: Manifest | None, threshold: float | None = None) -> None:
        self.backend = backend
        self.manifest = manifest
        if threshold is None and manifest is not None and manifest.image_threshold is not None:
            threshold = manifest.image_threshold.value
        self.threshold = threshold
        self._served_threshold = THRESHOLD_OUTPUT in {tensor.name for tensor in backend.outputs}
        names = {tensor.name for tensor in backend.outputs}
        missing = [name for name in (ANOMALY_MAP_NAME, IMAGE_SCORE_NAME) if name not in names]
        if missing:
            raise ReconadError(f"Model {backend.address} has no output {missing[0]!r}, which the graph contract promises.")

    @classmethod
    def open(cls, url: str, *, threshold: float | None = None, timeout_s: float = 30.0) -> RemoteInspector:
        """Connect to ``grpc://host:port/NAME[/VERSION]`` (or ``http://``) and read the model's description."""
        backend = TritonBackend(parse_server_url(url), timeout_s=timeout_s)
        try:
            return cls(backend, backend.manifest(), threshold)
        except BaseException:
            backend.close()
            raise

    @property
    def input_hw(self) -> tuple[int, int]:
        shape = self.backend.inputs[0].shape
        return (shape[1], shape[2])

    @property
    def calibrated(self) -> bool:
        """Whether a threshold is known before the first frame (else it may come with each answer)."""
        return self.threshold is not None or self._served_threshold

    def inspect(self, frames: Frame | Sequence[Frame], *, colour: str = "RGB", roi: Roi | None = None) -> list[Verdict]:
        """As ``Inspector.inspect``: the same preprocessing, the same rule ``score >= threshold``."""
        images = prepare_batch(frames, self.input_hw, colour=colour, roi=roi)  # [N, H, W, 3]
        outputs = self.backend.infer(images)
        anomaly_maps = outputs[ANOMALY_MAP_NAME][:, 0]  # [N, H, W]
        scores = outputs[IMAGE_SCORE_NAME].astype(np.float64)  # [N]
        if self.threshold is not None:
            thresholds = [self.threshold] * len(scores)
        elif self._served_threshold:
            thresholds = [None if math.isnan(value) else float(value) for value in outputs[THRESHOLD_OUTPUT].reshape(-1)]
        else:
            thresholds = [None] * len(scores)
        normalization = self.manifest.score_normalization if self.manifest is not None else None
        normalized = normalization.apply(scores) if normalization is not None else None
        return [
            Verdict(
                image_score=float(score),
                is_anomalous=None if cut is None else bool(Threshold.manual(cut).is_exceeded_by(score)),
                threshold=cut,
                anomaly_map=anomaly_maps[index],
                normalized_score=None if normalized is None else float(normalized[index]),
            )
            for index, (score, cut) in enumerate(zip(scores, thresholds))
        ]

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> RemoteInspector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
