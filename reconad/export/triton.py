"""``recon-export triton-repo``: a Triton Inference Server model repository from exported artifacts.

ONNX graphs become ``platform: "onnxruntime_onnx"`` models, TensorRT engines ``"tensorrt_plan"``;
several artifacts are versions 1, 2, ... of one model, served side by side. The manifest of every
version travels with it (``<version>/manifest.json`` and the config's ``parameters``), so a client
fetches the threshold, which stays outside the graph. ``config.pbtxt`` is written from, and checked
against, Triton's own ``ModelConfig`` protobuf as shipped in ``tritonclient`` (torch- and onnx-free).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import load_artifact_manifest
from reconad.runtime.manifest import Manifest, manifest_path_for
from reconad.runtime.serve import (
    SERVE_INSTALL_HINT,
    TritonTensor,
    check_model_name,
    default_model_name,
    triton_tensors,
)

PLATFORMS = {"onnx": "onnxruntime_onnx", "engine": "tensorrt_plan"}
MODEL_FILES = {"onnx": "model.onnx", "engine": "model.plan"}  # Triton's default file names per platform
CONFIG_FILE = "config.pbtxt"
MANIFEST_FILE = "manifest.json"
MANIFEST_PARAMETER_PREFIX = "reconad_manifest_v"  # + version: the config parameter holding its manifest JSON
INSTANCE_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TritonRepoConfig:
    """Options of ``triton-repo``; None takes the existing model's setting when appending, else the default.

    Attributes:
        name: the model (folder) name; default: the run part of the first artifact's name.
        max_batch: Triton's ``max_batch_size``; default: the smallest ``max_batch`` of the manifests
            (0 for fixed-batch artifacts, which Triton then runs without batching).
        instances: model instances (``instance_group.count``); default 1.
        instance_kind: ``"gpu"``, ``"cpu"`` or ``"auto"`` (GPU when present); engines are always ``"gpu"``.
            Default: ``"gpu"`` for engines, ``"auto"`` for ONNX.
        preferred_batch_sizes: batch sizes the dynamic batcher aims for; default ``(max_batch,)``.
        max_queue_delay_us: how long a request may wait to be batched with others; default 2000.
    """

    name: str | None = None
    max_batch: int | None = None
    instances: int | None = None
    instance_kind: str | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_us: int | None = None

    def __post_init__(self) -> None:
        if self.name is not None:
            check_model_name(self.name)
        if self.max_batch is not None and self.max_batch < 1:
            raise ReconadError(f"--max-batch must be at least 1, got {self.max_batch}.")
        if self.instances is not None and self.instances < 1:
            raise ReconadError(f"--instances must be at least 1, got {self.instances}.")
        if self.instance_kind is not None and self.instance_kind not in INSTANCE_KINDS:
            raise ReconadError(f"--instance-kind must be one of {list(INSTANCE_KINDS)}, got {self.instance_kind!r}.")
        if self.preferred_batch_sizes is not None and any(size < 1 for size in self.preferred_batch_sizes):
            raise ReconadError(f"Preferred batch sizes must be at least 1, got {list(self.preferred_batch_sizes)}.")
        if self.max_queue_delay_us is not None and self.max_queue_delay_us < 0:
            raise ReconadError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}.")


@dataclasses.dataclass(frozen=True)
class TritonRepoResult:
    """What ``write_triton_repo`` wrote.

    Attributes:
        model_dir: ``REPO/NAME``.
        config_path: ``REPO/NAME/config.pbtxt``.
        versions: the version numbers added by this run, in artifact order.
        config_text: the ``config.pbtxt`` text as written.
    """

    model_dir: Path
    config_path: Path
    versions: tuple[int, ...]
    config_text: str


def import_model_config() -> tuple[Any, Any]:
    """``(model_config_pb2, text_format)``: Triton's model-config schema as shipped in tritonclient."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ReconadError(
            f"tritonclient (with its gRPC protobufs) is needed to write and check config.pbtxt; {SERVE_INSTALL_HINT}."
        ) from None
    return model_config_pb2, text_format


def parse_model_config(text: str, source: str = CONFIG_FILE) -> Any:
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` message; any error is one sentence."""
    model_config_pb2, text_format = import_model_config()
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise ReconadError(f"{source} is not a valid Triton model configuration: {error}.") from None


@dataclasses.dataclass(frozen=True)
class _Version:
    artifact: Path
    manifest: Manifest


def _load_versions(artifacts: Sequence[str | os.PathLike]) -> list[_Version]:
    if not artifacts:
        raise ReconadError("Give at least one artifact (.onnx or .engine).")
    versions = []
    for artifact in map(Path, artifacts):
        if not artifact.is_file():
            raise ReconadError(f"Model file {artifact} does not exist.")
        if artifact.suffix.lower() not in (".onnx", ".engine"):
            raise ReconadError(f"{artifact} is neither an .onnx graph nor a TensorRT .engine.")
        manifest = load_artifact_manifest(artifact)  # hash-checked against the file
        if manifest is None:
            raise ReconadError(
                f"{artifact} has no {manifest_path_for(artifact).name} beside it; triton-repo carries the sidecar "
                "manifest that to-onnx and build-engine write."
            )
        versions.append(_Version(artifact, manifest))
    kinds = {version.manifest.artifact_kind for version in versions}
    if len(kinds) > 1:
        raise ReconadError(
            "ONNX graphs and TensorRT engines cannot be versions of one Triton model (one platform per model); "
            "write them under two --name values."
        )
    return versions


def _batching(version: _Version) -> tuple[bool, int]:
    """(whether Triton may send it any batch of 1..max, that max or the fixed batch)."""
    tensor = version.manifest.input_tensor
    if tensor.dynamic_batch:
        if tensor.min_batch != 1:
            raise ReconadError(
                f"{version.artifact} takes batches of {tensor.min_batch}..{tensor.max_batch} only, but Triton's "
                "dynamic batcher sends batches from 1; rebuild it with --min-batch 1."
            )
        return True, tensor.max_batch
    return False, tensor.max_batch


def _signature(inputs: Sequence[TritonTensor], outputs: Sequence[TritonTensor]) -> tuple:
    return tuple((tensor.name, tensor.dtype, tensor.dims, tensor.reshape) for tensor in (*inputs, *outputs))


def _existing_model(model_dir: Path) -> tuple[Any | None, list[int]]:
    if not model_dir.exists():
        return None, []
    config_path = model_dir / CONFIG_FILE
    if not model_dir.is_dir() or not config_path.is_file():
        raise ReconadError(f"{model_dir} exists but is not a Triton model folder (no {CONFIG_FILE}); choose another --name.")
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ReconadError(f"Cannot read {config_path}: {getattr(error, 'strerror', None) or type(error).__name__}.") from None
    existing = parse_model_config(text, str(config_path))
    numbers = sorted(int(entry.name) for entry in model_dir.iterdir() if entry.is_dir() and entry.name.isdigit())
    return existing, numbers


def _instance_kind(config: Any) -> str:
    """The ``INSTANCE_KINDS`` key of a parsed config's first instance group (Triton's default: auto)."""
    model_config_pb2, _ = import_model_config()
    if not config.instance_group:
        return "auto"
    kind = model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)
    return next((key for key, value in INSTANCE_KINDS.items() if value == kind), "auto")


def _tensor_message(message: Any, tensor: TritonTensor, model_config_pb2: Any) -> None:
    message.name = tensor.name
    message.data_type = model_config_pb2.DataType.Value(tensor.data_type)
    message.dims.extend(tensor.dims)
    if tensor.reshape is not None:
        message.reshape.SetInParent()  # an empty shape is meaningful: the model's [N] is the client's [N, 1]
        message.reshape.shape.extend(tensor.reshape)


def build_model_config(
    *,
    name: str,
    kind: str,
    inputs: Sequence[TritonTensor],
    outputs: Sequence[TritonTensor],
    max_batch: int,
    instances: int,
    instance_kind: str,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_us: int,
    manifests: dict[int, str],
) -> Any:
    """Triton's ``ModelConfig`` message for the repository.

    Args:
        name: the model name.
        kind: ``"onnx"`` or ``"engine"``.
        inputs: from ``triton_tensors``.
        outputs: from ``triton_tensors``.
        max_batch: ``max_batch_size``; 0 writes no dynamic batcher (Triton cannot batch such a model).
        instances: ``instance_group.count``.
        instance_kind: a key of ``INSTANCE_KINDS``.
        preferred_batch_sizes: ``dynamic_batching.preferred_batch_size``.
        max_queue_delay_us: ``dynamic_batching.max_queue_delay_microseconds``.
        manifests: version -> manifest JSON, written as ``parameters`` (``MANIFEST_PARAMETER_PREFIX`` + version).
    """
    model_config_pb2, _ = import_model_config()
    config = model_config_pb2.ModelConfig(name=name, platform=PLATFORMS[kind], max_batch_size=max_batch)
    config.version_policy.all.SetInParent()  # serve every version side by side (Triton's default: latest only)
    for tensor in inputs:
        _tensor_message(config.input.add(), tensor, model_config_pb2)
    for tensor in outputs:
        _tensor_message(config.output.add(), tensor, model_config_pb2)
    if max_batch > 0:
        config.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    group = config.instance_group.add()
    group.count = instances
    group.kind = model_config_pb2.ModelInstanceGroup.Kind.Value(INSTANCE_KINDS[instance_kind])
    for version, text in sorted(manifests.items()):
        config.parameters[f"{MANIFEST_PARAMETER_PREFIX}{version}"].string_value = text
    return config


def render_model_config(config: Any) -> str:
    """``config.pbtxt`` text for ``config``, parsed back into ``ModelConfig`` and compared before it is used."""
    _, text_format = import_model_config()
    text = text_format.MessageToString(config)
    if parse_model_config(text) != config:
        raise ReconadError("config.pbtxt does not read back as the model configuration it was written from.")
    return text


def write_triton_repo(
    artifacts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: TritonRepoConfig = TritonRepoConfig(),
    report: Callable[[str], None] = lambda line: None,
) -> TritonRepoResult:
    """Write (or append versions to) ``out/NAME`` in Triton's model-repository layout.

    ``out/NAME/config.pbtxt``; ``out/NAME/<version>/model.onnx|model.plan`` and ``manifest.json`` (the
    artifact's manifest, ``artifact_file`` renamed; the sha256 still matches). Versions continue after
    the highest existing one. All-or-nothing: everything is staged in a temporary folder beside
    ``out`` (same file system) and moved in at the end; a failure leaves the repository as it was.

    Args:
        artifacts: ``.onnx`` or ``.engine`` files with their sidecar manifests, all of one kind and with
            the same inputs and outputs (names, dtypes, shapes).
        out: the repository folder (created if missing).
        config: the options; see ``TritonRepoConfig``.
        report: receives one line per file written.

    Raises:
        ReconadError: a missing or mismatched artifact or manifest, options the artifacts cannot honour,
            an existing model with another platform or other inputs/outputs, tritonclient missing, a
            write that failed.
    """
    model_config_pb2, _ = import_model_config()
    versions = _load_versions(artifacts)
    kind = versions[0].manifest.artifact_kind
    name = config.name or default_model_name(versions[0].artifact)
    check_model_name(name)

    batching = {_batching(version) for version in versions}
    if len({dynamic for dynamic, _ in batching}) > 1:
        raise ReconadError("Some artifacts have a fixed batch and others a dynamic one; one Triton model cannot mix them.")
    dynamic = next(iter(batching))[0]
    if not dynamic and len(batching) > 1:
        raise ReconadError(f"The artifacts have different fixed batch sizes {sorted(size for _, size in batching)}.")
    signatures = {}
    for version in versions:
        inputs, outputs = triton_tensors(version.manifest, batching=dynamic)
        signatures.setdefault(_signature(inputs, outputs), version.artifact)
    if len(signatures) > 1:
        first, second = list(signatures.values())[:2]
        raise ReconadError(f"{first} and {second} have different inputs or outputs, so they cannot be versions of one model.")

    out = Path(out)
    model_dir = out / name
    existing, existing_numbers = _existing_model(model_dir)
    if existing is not None:
        if existing.platform != PLATFORMS[kind]:
            raise ReconadError(
                f"{model_dir} holds a {existing.platform} model; these artifacts are {PLATFORMS[kind]}: use another --name."
            )
        old_io = tuple(
            (
                tensor.name,
                tensor.data_type,
                tuple(tensor.dims),
                tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None,
            )
            for tensor in (*existing.input, *existing.output)
        )
        new_io = tuple(
            (tensor.name, model_config_pb2.DataType.Value(tensor.data_type), tensor.dims, tensor.reshape)
            for tensor in (*inputs, *outputs)
        )
        if old_io != new_io:
            raise ReconadError(f"{model_dir} serves other inputs or outputs than {versions[0].artifact}; use another --name.")
        if (existing.max_batch_size > 0) != dynamic:
            raise ReconadError(f"{model_dir} and {versions[0].artifact} differ in whether Triton may batch them.")

    def setting(option: Any, from_existing: Callable[[Any], Any], default: Any) -> Any:
        if option is not None:
            return option
        return from_existing(existing) if existing is not None else default

    manifests = {}  # version -> manifest JSON, the existing versions' first
    for key, value in (existing.parameters.items() if existing is not None else ()):
        suffix = key.removeprefix(MANIFEST_PARAMETER_PREFIX)
        if key.startswith(MANIFEST_PARAMETER_PREFIX) and suffix.isdigit():
            manifests[int(suffix)] = value.string_value
    capacities = {str(version.artifact): _batching(version)[1] for version in versions}
    for number, text in manifests.items():
        try:
            capacities[f"version {number} of {model_dir}"] = Manifest.from_json(text).input_tensor.max_batch
        except ReconadError:
            pass  # a manifest this reconad cannot read (another schema) does not limit the batch
    capacity = min(capacities.values())
    if dynamic:
        max_batch = setting(config.max_batch, lambda old: old.max_batch_size, capacity)
        too_small = [where for where, size in capacities.items() if size < max_batch]
        if too_small:
            raise ReconadError(
                f"{too_small[0]} takes batches up to {capacities[too_small[0]]} only, but the model's max_batch_size "
                f"would be {max_batch}; lower --max-batch or export/build it for larger batches."
            )
    else:
        if config.max_batch is not None:
            raise ReconadError(
                f"{versions[0].artifact} has a fixed batch of {capacity}, so Triton cannot batch it (no --max-batch)."
            )
        max_batch = 0
    instance_kind = setting(config.instance_kind, _instance_kind, "gpu" if kind == "engine" else "auto")
    if kind == "engine" and instance_kind != "gpu":
        raise ReconadError("TensorRT engines run on the GPU only: --instance-kind must be gpu.")
    instances = setting(config.instances, lambda old: old.instance_group[0].count if old.instance_group else 1, 1)
    preferred: tuple[int, ...] = (max_batch,)
    if config.preferred_batch_sizes is not None:
        preferred = tuple(config.preferred_batch_sizes)
    elif existing is not None and config.max_batch is None and existing.dynamic_batching.preferred_batch_size:
        preferred = tuple(existing.dynamic_batching.preferred_batch_size)  # kept with the kept max_batch_size
    if dynamic and any(size > max_batch for size in preferred):
        raise ReconadError(f"Preferred batch sizes {list(preferred)} exceed the max_batch_size {max_batch}.")
    delay = setting(config.max_queue_delay_us, lambda old: old.dynamic_batching.max_queue_delay_microseconds, 2000)

    first_number = (existing_numbers[-1] if existing_numbers else 0) + 1
    numbers = tuple(range(first_number, first_number + len(versions)))
    repo_manifests = {
        number: dataclasses.replace(version.manifest, artifact_file=MODEL_FILES[kind])
        for number, version in zip(numbers, versions)
    }
    manifests.update({number: json.dumps(manifest.to_dict(), separators=(",", ":")) for number, manifest in repo_manifests.items()})
    model_config = build_model_config(
        name=name,
        kind=kind,
        inputs=inputs,
        outputs=outputs,
        max_batch=max_batch,
        instances=instances,
        instance_kind=instance_kind,
        preferred_batch_sizes=preferred if dynamic else (),
        max_queue_delay_us=delay,
        manifests=manifests,
    )
    text = render_model_config(model_config)

    created_out = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        # staged beside the repository, not in it: a polling Triton would take a folder in it for a model
        staging = Path(tempfile.mkdtemp(prefix=f".{out.resolve().name}.{name}.staging-", dir=out.resolve().parent))
    except OSError as error:
        raise ReconadError(f"Cannot create the repository {out}: {error.strerror or type(error).__name__}.") from None
    moved: list[Path] = []
    try:
        stage_model = staging / name
        for number, version in zip(numbers, versions):
            folder = stage_model / str(number)
            folder.mkdir(parents=True)
            shutil.copyfile(version.artifact, folder / MODEL_FILES[kind])
            repo_manifests[number].save(folder / MANIFEST_FILE)
        (stage_model / CONFIG_FILE).write_text(text, encoding="utf-8")
        if existing is None:
            os.rename(stage_model, model_dir)
            moved.append(model_dir)
        else:
            for number in numbers:
                os.rename(stage_model / str(number), model_dir / str(number))
                moved.append(model_dir / str(number))
            os.replace(stage_model / CONFIG_FILE, model_dir / CONFIG_FILE)
    except BaseException as error:
        for path in reversed(moved):  # undo the moves: the repository is as it was
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        if created_out:
            shutil.rmtree(out, ignore_errors=True)
        if not isinstance(error, OSError):
            raise
        where = f" ({error.filename})" if error.filename else ""
        raise ReconadError(
            f"Writing the Triton repository {out} failed{where}: {error.strerror or type(error).__name__}; it is unchanged."
        ) from None
    shutil.rmtree(staging, ignore_errors=True)
    for number, version in zip(numbers, versions):
        report(f"wrote {model_dir / str(number) / MODEL_FILES[kind]} (from {version.artifact}) and {MANIFEST_FILE}")
    report(f"wrote {model_dir / CONFIG_FILE}")
    return TritonRepoResult(model_dir=model_dir, config_path=model_dir / CONFIG_FILE, versions=numbers, config_text=text)
