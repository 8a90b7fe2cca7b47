"""ONNX graph -> TensorRT engine plus manifest, built on the target (TensorRT 8.5 to 11); no torch.

``plan_precision`` is the one place that knows what each TensorRT version needs for an FP16 engine.
``EngineBuilder`` follows TensorRT's ``samples/python/detectron2/build_engine.py`` (parse, configure,
build, serialize) minus its ``sys.exit``; the built engine's layer precisions are checked with the
engine inspector before the engine and its manifest are written, atomically.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from reconad.export.precision_check import (
    FLOAT_DTYPES,
    LayerPrecisionReport,
    NetworkLayer,
    analyze_layer_precisions,
    select_island_layers,
    typed_layer_names,
)
from reconad.runtime.atomic import write_bytes_atomic
from reconad.runtime.backends.cuda import GpuInfo, probe_gpu
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import (
    INPUT_NAME,
    EngineInfo,
    InputTensor,
    Manifest,
    Precision,
    check_artifact_sha256,
    manifest_path_for,
)
from reconad.runtime.backends.trt import import_tensorrt, parse_version

PRECISIONS = ("fp16", "fp32")
NETWORK_TYPINGS = ("auto", "strong", "weak")
WEAK_TYPING_DEPRECATED = (10, 12)  # TensorRT deprecates weak typing here and removes it in 11
STRONG_TYPING_FROM = (10, 0)
# The ONNX parser imports LayerNormalization (INormalizationLayer) from 8.6 on; before, export.layernorm
# rewrites it into primitive ops for the parse.
LAYER_NORM_FROM = (8, 6)


def _fail(message: str) -> None:
    raise ReconadError(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """How to build one engine. Precedence: these defaults < a TOML profile < command-line flags.

    Field names are the profile keys and, with dashes, the ``build-engine`` options.
    """

    precision: str = "fp16"
    workspace_mib: int = 1024  # TensorRT's scratch-memory cap; Jetsons share RAM with the CPU
    min_batch: int = 1
    opt_batch: int = 1  # the batch TensorRT tunes its kernels for: the inspection loop's usual batch
    max_batch: int = 8
    timing_cache: Path | None = None  # reused across builds: rebuilds take seconds instead of minutes
    dla_core: int | None = None  # Jetson Orin's deep-learning accelerator; unsupported layers fall back to the GPU
    version_compatible: bool = False  # the engine also runs on later TensorRT releases of the same major (8.6+)
    hardware_compatible: bool = False  # the engine runs on any Ampere-or-newer discrete GPU (8.6+)
    builder_optimization_level: int | None = None  # 0..5; None keeps TensorRT's default (3)
    network_typing: str = "auto"  # "auto": weak on 8.x, strong on 10+; "weak" is accepted before 10.12

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            _fail(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}.")
        if self.network_typing not in NETWORK_TYPINGS:
            _fail(f"network_typing must be one of {list(NETWORK_TYPINGS)}, got {self.network_typing!r}.")
        if self.workspace_mib < 1:
            _fail(f"workspace_mib must be at least 1, got {self.workspace_mib}.")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            _fail(
                "the batch range must satisfy 1 <= min_batch <= opt_batch <= max_batch, "
                f"got {self.min_batch}, {self.opt_batch}, {self.max_batch}."
            )
        if self.dla_core is not None and self.dla_core < 0:
            _fail(f"dla_core must be 0 or more, got {self.dla_core}.")
        if self.builder_optimization_level is not None and not 0 <= self.builder_optimization_level <= 5:
            _fail(f"builder_optimization_level must be 0..5, got {self.builder_optimization_level}.")
        if self.dla_core is not None and self.hardware_compatible:
            _fail("A DLA engine cannot be hardware compatible; drop dla_core or hardware_compatible.")
        if self.timing_cache is not None and not isinstance(self.timing_cache, Path):
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))


_FIELD_TYPES: dict[str, type] = {
    "precision": str,
    "workspace_mib": int,
    "min_batch": int,
    "opt_batch": int,
    "max_batch": int,
    "timing_cache": str,
    "dla_core": int,
    "version_compatible": bool,
    "hardware_compatible": bool,
    "builder_optimization_level": int,
    "network_typing": str,
}


@dataclasses.dataclass(frozen=True)
class BuildProfile:
    """A TOML build profile (``engines/profiles/*.toml``): a description plus ``BuildConfig`` fields."""

    name: str
    description: str
    overrides: dict[str, Any]


def _load_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (JetPack 6): the tomli backport
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ReconadError("Reading a build profile on Python 3.10 needs tomli; pip install tomli.") from None
    return tomllib.loads(text)


def load_build_profile(path: str | os.PathLike) -> BuildProfile:
    """Read and check a profile; unknown keys and wrong types are refused in one sentence."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ReconadError(f"Cannot read build profile {path}: {error.strerror or type(error).__name__}.") from None
    try:
        data = _load_toml(text)
    except ValueError as error:  # tomllib.TOMLDecodeError
        raise ReconadError(f"Build profile {path} is not valid TOML ({error}).") from None
    description = data.pop("description", "")
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise ReconadError(f"Build profile {path} has unknown key(s) {unknown}; known: {sorted(_FIELD_TYPES)}.")
    for key, value in data.items():
        wanted = _FIELD_TYPES[key]
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise ReconadError(f"Build profile {path} key {key} must be {wanted.__name__}, got {value!r}.")
    if "timing_cache" in data:
        data["timing_cache"] = Path(data["timing_cache"])
    return BuildProfile(name=path.stem, description=str(description), overrides=data)


def resolve_build_config(profile: BuildProfile | None = None, **flags: Any) -> BuildConfig:
    """Defaults < profile < flags (a flag of None means "not given").

    A ``max_batch`` flag below the profile's ``opt_batch``/``min_batch`` pulls those down with it, so
    ``--max-batch 1`` works with any profile.
    """
    values: dict[str, Any] = dict(profile.overrides) if profile else {}
    given = {key: value for key, value in flags.items() if value is not None}
    unknown = sorted(set(given) - set(_FIELD_TYPES))
    if unknown:
        raise TypeError(f"unknown build options {unknown}")
    if "max_batch" in given:
        defaults = BuildConfig()
        for key in ("opt_batch", "min_batch"):
            if key not in given:
                values[key] = min(values.get(key, getattr(defaults, key)), given["max_batch"])
    values.update(given)
    return BuildConfig(**values)


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """What to parse and which flags to set for one requested precision on one TensorRT version.

    Attributes:
        tensorrt_version: the builder's version.
        precision: the engine precision asked for.
        onnx_precision: which exported graph to parse (``"fp32"`` or ``"fp16"``).
        strongly_typed: the network takes its types from the graph (``STRONGLY_TYPED``; always on in 11).
        explicit_batch_flag: set ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` (needed before 10).
        fp16_flag: set ``BuilderFlag.FP16`` (weak typing: TensorRT may pick FP16 kernels).
        constrain_islands: put FP32 layer precision and output types on the FP32-island layers and
            set ``OBEY_PRECISION_CONSTRAINTS``.
        disable_tf32: clear ``BuilderFlag.TF32`` so an fp32 engine keeps full FP32 matmuls/convolutions.
        decompose_layer_norm: rewrite every LayerNormalization into ReduceMean/Sub/Mul/Add/Sqrt/Div
            (``export.layernorm``) before parsing, because this parser cannot import the op (8.5).
        description: one line for the manifest.
    """

    tensorrt_version: tuple[int, ...]
    precision: str
    onnx_precision: str
    strongly_typed: bool
    explicit_batch_flag: bool
    fp16_flag: bool
    constrain_islands: bool
    disable_tf32: bool
    decompose_layer_norm: bool
    description: str

    @property
    def builder_flags(self) -> tuple[str, ...]:
        """``trt.BuilderFlag`` names to set."""
        return ("FP16",) * self.fp16_flag + ("OBEY_PRECISION_CONSTRAINTS",) * self.constrain_islands


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def plan_precision(
    tensorrt_version: tuple[int, ...], precision: str = "fp16", network_typing: str = "auto"
) -> PrecisionPlan:
    """The precision policy, per TensorRT version (DESIGN.md "Precision plan").

    - 8.5/8.6 (JetPack 5.1, 6.0; also 9.x): the fp32 graph, EXPLICIT_BATCH, the FP16 builder flag,
      FP32 precision and output types on the island layers, OBEY_PRECISION_CONSTRAINTS. 8.5's parser
      has no LayerNormalization, so there each one is decomposed into primitive ops before parsing and
      all of those ops are island layers: FP32 like the single op on 8.6.
    - 10.x (JetPack 6.1+, 7): strongly typed from the fp16 graph; the weak 8.x recipe (without
      EXPLICIT_BATCH, which 10 ignores) only when ``network_typing="weak"`` and before 10.12.
    - 11+: strongly typed only (there is no FP16 builder flag).

    An fp32 engine is built from the fp32 graph with TF32 off, strongly typed on 10+.

    Raises:
        ReconadError: the version is older than 8.5, or the typing asked for does not exist there.
    """
    if precision not in PRECISIONS:
        raise ReconadError(f"Precision must be one of {list(PRECISIONS)}, got {precision!r}.")
    if network_typing not in NETWORK_TYPINGS:
        raise ReconadError(f"Network typing must be one of {list(NETWORK_TYPINGS)}, got {network_typing!r}.")
    version = tuple(tensorrt_version)
    text = _version_text(version)
    if version[:2] < (8, 5):
        raise ReconadError(f"TensorRT {text} is older than 8.5, the oldest release this builder supports.")
    typing = network_typing
    if typing == "auto":
        typing = "strong" if version[:2] >= STRONG_TYPING_FROM else "weak"
    if typing == "strong" and version[:2] < STRONG_TYPING_FROM:
        raise ReconadError(f"Strongly typed builds need TensorRT 10 or later; this is TensorRT {text}.")
    if typing == "weak" and version[:2] >= WEAK_TYPING_DEPRECATED:
        raise ReconadError(
            f"TensorRT {text} has deprecated (10.12) or removed (11) weak typing and the FP16 builder flag; "
            "build strongly typed from the fp16 ONNX instead (network_typing auto)."
        )
    if typing == "strong":
        return PrecisionPlan(
            tensorrt_version=version,
            precision=precision,
            onnx_precision=precision,
            strongly_typed=True,
            explicit_batch_flag=False,
            fp16_flag=False,
            constrain_islands=False,
            disable_tf32=precision == "fp32",
            decompose_layer_norm=False,
            description=f"strongly typed from the {precision} ONNX (TensorRT {text})",
        )
    fp16 = precision == "fp16"
    decompose = version[:2] < LAYER_NORM_FROM
    graph = "fp32 ONNX (LayerNormalization decomposed)" if decompose else "fp32 ONNX"
    description = (
        f"{graph} with the FP16 builder flag and FP32 constraints on the islands, obeyed (TensorRT {text})"
        if fp16
        else f"{graph} built in FP32, TF32 off (TensorRT {text})"
    )
    return PrecisionPlan(
        tensorrt_version=version,
        precision=precision,
        onnx_precision="fp32",
        strongly_typed=False,
        explicit_batch_flag=version[0] < 10,
        fp16_flag=fp16,
        constrain_islands=fp16,
        disable_tf32=not fp16,
        decompose_layer_norm=decompose,
        description=description,
    )


def check_build_options(tensorrt_version: tuple[int, ...], config: BuildConfig) -> None:
    """Refuse options this TensorRT does not have, in one sentence."""
    if tensorrt_version[:2] >= (8, 6):
        return
    for option in ("version_compatible", "hardware_compatible", "builder_optimization_level"):
        if getattr(config, option) not in (None, False):
            version = _version_text(tensorrt_version)
            raise ReconadError(f"{option} needs TensorRT 8.6 or later; this is TensorRT {version}.")


def describe_parser_errors(onnx_name: str, tensorrt_version: str, errors: list[Mapping[str, Any]]) -> str:
    """One sentence from ``OnnxParser`` errors (dicts with ``desc`` and, when known, ``node_name``/``operator``)."""
    if not errors:
        return f"TensorRT {tensorrt_version} could not parse {onnx_name} (the parser gave no reason)."
    first = errors[0]
    where = ""
    if first.get("node_name"):
        where = f" at node {first['node_name']}" + (f" ({first['operator']})" if first.get("operator") else "")
    elif first.get("node", -1) not in (None, -1):
        where = f" at node #{first['node']}"
    more = f"; {len(errors) - 1} more error(s) above" if len(errors) > 1 else ""
    reason = " ".join(str(first.get("desc", "")).split()).rstrip(".") or "no description"
    return f"TensorRT {tensorrt_version} could not parse {onnx_name}{where}: {reason}{more}."


def device_slug(gpu_name: str) -> str:
    """``"NVIDIA GeForce RTX 4090"`` -> ``"rtx-4090"``, ``"Orin"`` -> ``"orin"``."""
    words = re.sub(r"(?i)\b(nvidia|geforce|tesla|jetson)\b", " ", gpu_name).lower()
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-") or "gpu"


def engine_file_name(run: str, input_hw: tuple[int, int], precision: str, tensorrt_version: str, gpu_name: str) -> str:
    """``<run>-<H>x<W>-<precision>-trt<major.minor.patch>-<device>.engine`` (STYLE.md, "Naming")."""
    version = ".".join(str(part) for part in parse_version(tensorrt_version)[:3])
    height, width = input_hw
    return f"{run}-{height}x{width}-{precision}-trt{version}-{device_slug(gpu_name)}.engine"


_PRECISION_TAG = re.compile(r"(?P<sep>[.-])(?P<precision>fp16|fp32)$")


def run_name(onnx_path: Path) -> str:
    """``weave-512x512-fp16.onnx`` (``export_onnx``'s naming) -> ``weave``; ``model.fp16.onnx`` -> ``model``."""
    stem = onnx_path.name.removesuffix(".onnx")
    stem = _PRECISION_TAG.sub("", stem)
    return re.sub(r"-\d+x\d+$", "", stem)


def sibling_onnx_path(onnx_path: Path, precision: str) -> Path:
    """The graph of the other precision beside ``onnx_path``: ``w-512x512-fp16.onnx`` <-> ``w-512x512-fp32.onnx``."""
    stem = onnx_path.name.removesuffix(".onnx")
    if _PRECISION_TAG.search(stem):
        return onnx_path.with_name(_PRECISION_TAG.sub(rf"\g<sep>{precision}", stem) + ".onnx")
    return onnx_path.with_name(f"{stem}-{precision}.onnx")


def parse_l4t_release(text: str) -> str | None:
    """``"# R36 (release), REVISION: 4.0, GCID: ..."`` (``/etc/nv_tegra_release``) -> ``"36.4.0"``."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _dpkg_version(package: str, run: Callable[..., Any]) -> str | None:
    try:
        result = run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def read_jetson_release(
    release_file: Path = Path("/etc/nv_tegra_release"), run: Callable[..., Any] = subprocess.run
) -> tuple[str | None, str | None]:
    """``(jetpack, l4t)`` on a Jetson, ``(None, None)`` elsewhere.

    L4T comes from ``/etc/nv_tegra_release``, else the ``nvidia-l4t-core`` package version; JetPack
    from the ``nvidia-jetpack`` package when it is installed (it is not on minimal images).
    """
    l4t = None
    try:
        l4t = parse_l4t_release(release_file.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        pass
    if l4t is None:
        core = _dpkg_version("nvidia-l4t-core", run)
        match = re.match(r"\d+(\.\d+)+", core or "")
        l4t = match.group() if match else None
    jetpack = None
    if l4t is not None:
        match = re.match(r"\d+(\.\d+)+", _dpkg_version("nvidia-jetpack", run) or "")
        jetpack = match.group() if match else None
    return jetpack, l4t


def resolve_batch_range(config: BuildConfig, input_tensor: InputTensor) -> tuple[int, int, int]:
    """``(min, opt, max)`` batch for the optimisation profile; a fixed-batch graph keeps its batch."""
    if not input_tensor.dynamic_batch:
        fixed = input_tensor.shape[0]
        return fixed, fixed, fixed
    if config.max_batch > input_tensor.max_batch:
        raise ReconadError(
            f"max_batch {config.max_batch} is above the {input_tensor.max_batch} the ONNX graph was exported for; "
            "lower --max-batch or re-export with a larger batch."
        )
    return config.min_batch, config.opt_batch, config.max_batch


def _load_onnx_manifest(onnx_path: Path) -> Manifest:
    sidecar = manifest_path_for(onnx_path)
    if not sidecar.is_file():
        raise ReconadError(
            f"{onnx_path} has no manifest {sidecar.name} beside it; export it with recon-export to-onnx."
        )
    manifest = Manifest.load(sidecar)
    if manifest.artifact_kind != "onnx":
        raise ReconadError(f"{sidecar} describes an {manifest.artifact_kind}, not an ONNX graph.")
    return manifest


def resolve_onnx(onnx_path: Path, plan: PrecisionPlan) -> tuple[Path, Manifest]:
    """The graph ``plan`` parses: ``onnx_path`` itself, or its sibling of the other precision."""
    if not onnx_path.is_file():
        raise ReconadError(f"ONNX file {onnx_path} does not exist.")
    manifest = _load_onnx_manifest(onnx_path)
    if manifest.precision.mode == plan.onnx_precision:
        return onnx_path, manifest
    sibling = sibling_onnx_path(onnx_path, plan.onnx_precision)
    if sibling.is_file():
        sibling_manifest = _load_onnx_manifest(sibling)
        if sibling_manifest.precision.mode == plan.onnx_precision:
            return sibling, sibling_manifest
    raise ReconadError(
        f"A {plan.precision} engine on TensorRT {_version_text(plan.tensorrt_version)} is built from the "
        f"{plan.onnx_precision} ONNX, but {onnx_path.name} is {manifest.precision.mode} and {sibling.name} is not "
        "beside it; export both with recon-export to-onnx --precision both."
    )


class EnginePrecisionError(ReconadError):
    """The built engine is not the precision that was asked for (exit code 1, like a failed verify)."""

    exit_code = 1


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress_monitor(trt: Any, log: Callable[[str], None]) -> Any:
    """A thread-safe ``trt.IProgressMonitor`` logging the builder's top two phase levels."""

    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, tuple[int, float]] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    depth = 0 if parent_phase is None else self._phases.get(parent_phase, (0, 0.0))[0] + 1
                    self._phases[phase_name] = (depth, time.monotonic())
                if depth <= 1:
                    log(f"  {'  ' * depth}{phase_name} ({num_steps} steps)")
            except Exception:  # an exception must not cross into TensorRT's C++ threads
                pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self._lock:
                    depth, started = self._phases.pop(phase_name, (1, time.monotonic()))
                if depth == 0:
                    log(f"  {phase_name} done in {time.monotonic() - started:.1f} s")
            except Exception:
                pass

    return ProgressMonitor()


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What ``build_engine`` wrote."""

    engine_path: Path
    manifest_path: Path
    manifest: Manifest
    report: LayerPrecisionReport
    build_seconds: float


class EngineBuilder:
    """One engine build: parse the ONNX graph, configure the builder, build, inspect.

    Args:
        trt: the ``tensorrt`` module.
        config: the resolved build configuration.
        plan: ``plan_precision`` for this TensorRT.
        log: where progress lines go.
    """

    def __init__(self, trt: Any, config: BuildConfig, plan: PrecisionPlan, log: Callable[[str], None]) -> None:
        self.trt = trt
        self.config = config
        self.plan = plan
        self.log = log
        self.logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self.logger, "")
        self.builder = trt.Builder(self.logger)
        self.network: Any = None
        self.parser: Any = None
        self.builder_config: Any = None
        self._monitor: Any = None  # must outlive the build: TensorRT holds only a raw pointer

    def parse(self, onnx_path: Path, model_bytes: bytes | None = None) -> list[NetworkLayer]:
        """Create the network with the plan's flags and parse the graph into it; returns its layers.

        Args:
            onnx_path: the exported graph (named in messages).
            model_bytes: a rewritten copy of it to parse instead (``prepare_graph``), weights inline.
        """
        trt = self.trt
        flags = 0
        creation = trt.NetworkDefinitionCreationFlag
        if self.plan.explicit_batch_flag:
            flags |= 1 << int(creation.EXPLICIT_BATCH)
        if self.plan.strongly_typed:
            strongly_typed = getattr(creation, "STRONGLY_TYPED", None)
            if strongly_typed is not None:
                flags |= 1 << int(strongly_typed)
            elif self.plan.tensorrt_version[0] < 11:  # 11 types every network strongly
                raise ReconadError(f"TensorRT {trt.__version__} has no STRONGLY_TYPED network flag.")
        self.network = self.builder.create_network(flags)
        self.parser = trt.OnnxParser(self.network, self.logger)
        self.log(f"Parsing {onnx_path} ({self.plan.description})")
        if model_bytes is None:
            parsed = self.parser.parse_from_file(str(onnx_path))
        else:
            parsed = self.parser.parse(model_bytes)
        if not parsed or self.parser.num_errors:
            errors = [self._parser_error(self.parser.get_error(i)) for i in range(self.parser.num_errors)]
            raise ReconadError(describe_parser_errors(onnx_path.name, trt.__version__, errors))
        for index in range(self.network.num_inputs):
            tensor = self.network.get_input(index)
            self.log(f"  input {tensor.name} {tuple(tensor.shape)} {tensor.dtype.name}")
        for index in range(self.network.num_outputs):
            tensor = self.network.get_output(index)
            self.log(f"  output {tensor.name} {tuple(tensor.shape)} {tensor.dtype.name}")
        return self.network_layers()

    @staticmethod
    def _parser_error(error: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        methods = (("desc", "desc"), ("node", "node"), ("node_name", "node_name"), ("operator", "node_operator"))
        for key, method in methods:
            try:
                fields[key] = getattr(error, method)()
            except (AttributeError, TypeError):  # node_name/node_operator arrived after 8.5
                pass
        return fields

    def network_layers(self) -> list[NetworkLayer]:
        layers = []
        for index in range(self.network.num_layers):
            layer = self.network.get_layer(index)
            outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
            layers.append(
                NetworkLayer(
                    index=index,
                    name=layer.name,
                    type_name=layer.type.name,
                    output_names=tuple(tensor.name for tensor in outputs),
                    output_dtypes=tuple(tensor.dtype.name for tensor in outputs),
                    metadata=getattr(layer, "metadata", "") or "",
                )
            )
        return layers

    def constrain(self, layers: list[NetworkLayer]) -> None:
        """FP32 compute precision and FP32 float outputs on ``layers`` (weak typing; OBEY is set in ``configure``)."""
        trt = self.trt
        for entry in layers:
            layer = self.network.get_layer(entry.index)
            layer.precision = trt.float32
            for position, dtype in enumerate(entry.output_dtypes):
                if dtype in FLOAT_DTYPES:
                    layer.set_output_type(position, trt.float32)

    def configure(self, batch_range: tuple[int, int, int]) -> Any:
        """The builder config: workspace, precision flags, profile, timing cache, DLA, compatibility, progress."""
        trt, config, plan = self.trt, self.config, self.plan
        built = self.builder.create_builder_config()
        workspace = config.workspace_mib << 20
        if hasattr(built, "set_memory_pool_limit"):
            built.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        else:
            built.max_workspace_size = workspace
        for name in plan.builder_flags:
            flag = getattr(trt.BuilderFlag, name, None)
            if flag is None:
                raise ReconadError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}; this plan cannot be built.")
            built.set_flag(flag)
        if plan.disable_tf32 and hasattr(trt.BuilderFlag, "TF32"):
            built.clear_flag(trt.BuilderFlag.TF32)
        built.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector check needs layer formats
        network_input = self.network.get_input(0)
        if tuple(network_input.shape)[0] == -1:
            low, opt, high = batch_range
            rest = tuple(network_input.shape)[1:]
            profile = self.builder.create_optimization_profile()
            profile.set_shape(network_input.name, (low, *rest), (opt, *rest), (high, *rest))
            built.add_optimization_profile(profile)
        self._set_timing_cache(built)
        if config.dla_core is not None:
            built.default_device_type = trt.DeviceType.DLA
            built.DLA_core = config.dla_core
            built.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        if config.version_compatible:
            built.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if config.hardware_compatible:
            built.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        if config.builder_optimization_level is not None:
            built.builder_optimization_level = config.builder_optimization_level
        if hasattr(trt, "IProgressMonitor") and hasattr(built, "progress_monitor"):
            self._monitor = _progress_monitor(trt, self.log)
            built.progress_monitor = self._monitor
        self.builder_config = built
        return built

    def _set_timing_cache(self, built: Any) -> None:
        path = self.config.timing_cache
        data = b""
        if path is not None and path.is_file():
            data = path.read_bytes()
            self.log(f"  timing cache {path} ({len(data)} bytes)")
        try:
            cache = built.create_timing_cache(data)
        except (RuntimeError, TypeError, ValueError):
            cache = None
        if cache is None and data:
            self.log(f"  timing cache {path} is unusable (another TensorRT?); starting an empty one")
            cache = built.create_timing_cache(b"")
        built.set_timing_cache(cache, ignore_mismatch=False)

    def build(self) -> bytes:
        """Build and serialize; saves the timing cache when one was configured."""
        if self._monitor is None:
            self.log("Building the engine (TensorRT reports no progress on this version; this takes minutes)")
        else:
            self.log("Building the engine")
        serialized = self.builder.build_serialized_network(self.network, self.builder_config)
        if serialized is None:
            raise ReconadError(f"TensorRT {self.trt.__version__} could not build the engine (see its messages above).")
        path = self.config.timing_cache
        if path is not None:
            cache = self.builder_config.get_timing_cache()
            if cache is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(path, bytes(cache.serialize()))
                self.log(f"  saved timing cache {path}")
        return bytes(serialized)

    def inspect(self, serialized: bytes, input_shape: tuple[int, ...]) -> str:
        """The engine inspector's JSON for ``serialized`` at ``input_shape`` (so formats are resolved)."""
        trt = self.trt
        runtime = trt.Runtime(self.logger)
        if self.config.version_compatible:
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise ReconadError("TensorRT could not load the engine it just built, so its precision cannot be checked.")
        context = engine.create_execution_context()
        inspector = engine.create_engine_inspector()
        if context is not None and context.set_input_shape(INPUT_NAME, input_shape):
            for attribute in ("execution_context", "context"):  # the name changed after 8.x
                try:
                    setattr(inspector, attribute, context)
                    break
                except AttributeError:
                    continue
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        del inspector, context, engine, runtime
        return text


@dataclasses.dataclass(frozen=True)
class GraphToParse:
    """The graph the ONNX parser reads and the FP32 islands in it.

    Attributes:
        model_bytes: the rewritten graph (LayerNormalization decomposed) to parse from memory; None
            to parse the ONNX file itself.
        islands: the parsed graph's FP32-island node names in graph order; empty unless the plan
            constrains islands.
        node_outputs: ``(node name, output tensor names)`` of every node of the parsed graph, empty
            when the graph was not read.
        island_kinds: the island kinds present (``islands.ISLAND_NAMES``).
    """

    model_bytes: bytes | None = None
    islands: tuple[str, ...] = ()
    node_outputs: tuple[tuple[str, list[str]], ...] = ()
    island_kinds: tuple[str, ...] = ()


def prepare_graph(onnx_path: Path, plan: PrecisionPlan) -> GraphToParse:
    """Read the graph where the plan needs it: to decompose LayerNormalization (8.5), to find its islands.

    The islands are found on the graph as exported, where each LayerNormalization is one node; a
    decomposed LayerNormalization is then an island made of every node it became.
    """
    if not (plan.decompose_layer_norm or plan.constrain_islands):
        return GraphToParse()
    try:
        import onnx

        from reconad.export.islands import find_fp32_island_groups
        from reconad.export.layernorm import decompose_layer_norm, decomposed_node_names
    except ImportError:
        raise ReconadError(
            f"A TensorRT {_version_text(plan.tensorrt_version)} build reads the ONNX graph (to find its FP32 "
            "islands or rewrite its LayerNormalization); pip install onnx."
        ) from None
    model = onnx.load(str(onnx_path))
    parsed = decompose_layer_norm(model) if plan.decompose_layer_norm else model
    model_bytes = parsed.SerializeToString() if plan.decompose_layer_norm else None
    node_outputs = tuple((node.name, list(node.output)) for node in parsed.graph.node)
    if not plan.constrain_islands:
        return GraphToParse(model_bytes, (), node_outputs, ())
    groups = find_fp32_island_groups(model)
    if plan.decompose_layer_norm:
        layer_norms = {node.name for node in model.graph.node if node.op_type == "LayerNormalization"}
        steps = decomposed_node_names(parsed, layer_norms)
        groups = {kind: [step for name in names for step in steps.get(name, [name])] for kind, names in groups.items()}
    wanted = {name for names in groups.values() for name in names}
    islands = tuple(node.name for node in parsed.graph.node if node.name in wanted)
    return GraphToParse(model_bytes, islands, node_outputs, tuple(kind for kind, names in groups.items() if names))


def _cuda_runtime_version() -> str | None:
    """The CUDA runtime version through whichever binding is installed; None without one."""
    try:
        from reconad.runtime.backends.cuda import open_cuda

        driver = open_cuda()
    except ReconadError:
        return None
    try:
        return driver.runtime_version()
    except ReconadError:
        return None
    finally:
        driver.close()


def build_details(
    config: BuildConfig,
    plan: PrecisionPlan,
    gpu: GpuInfo,
    report: LayerPrecisionReport,
    batch_range: tuple[int, int, int],
    *,
    onnx_file: str,
    constrained_layers: int,
    profile_name: str | None,
    build_seconds: float,
) -> dict[str, Any]:
    """The manifest's ``engine.build_details``: how the engine was built and what the inspector saw.

    ``version_compatible`` and ``hardware_compatible`` are read back by the runtime's compatibility check.
    """
    return {
        "profile": profile_name,
        "plan": {
            "onnx_file": onnx_file,
            "onnx_precision": plan.onnx_precision,
            "strongly_typed": plan.strongly_typed,
            "builder_flags": list(plan.builder_flags),
            "layer_norm_decomposed": plan.decompose_layer_norm,
            "constrained_layers": constrained_layers,
        },
        "batch": {"min": batch_range[0], "opt": batch_range[1], "max": batch_range[2]},
        "workspace_mib": config.workspace_mib,
        "timing_cache": str(config.timing_cache) if config.timing_cache else None,
        "dla_core": config.dla_core,
        "version_compatible": config.version_compatible,
        "hardware_compatible": config.hardware_compatible,
        "builder_optimization_level": config.builder_optimization_level,
        "layer_precisions": report.summary(),
        "driver_cuda_version": gpu.driver_cuda_version,
        "gpu_memory_mib": gpu.total_memory_mib,
        "build_seconds": round(build_seconds, 1),
    }


def write_engine(
    target: Path,
    serialized: bytes,
    onnx_manifest: Manifest,
    engine_info: EngineInfo,
    precision: Precision,
    batch_range: tuple[int, int, int],
) -> tuple[Manifest, Path]:
    """Write the engine, then its manifest (each atomically); no engine stays behind without its manifest."""
    write_bytes_atomic(target, serialized)
    try:
        manifest = onnx_manifest.for_engine(
            engine_file=target,
            engine=engine_info,
            precision=precision,
            min_batch=batch_range[0],
            max_batch=batch_range[2],
        )
        manifest_path = manifest_path_for(target)
        manifest.save(manifest_path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return manifest, manifest_path


def resolve_engine_path(
    engine_path: Path | None, onnx_path: Path, manifest: Manifest, precision: str, tensorrt_version: str, gpu: GpuInfo
) -> Path:
    """``--out`` as given when it ends in ``.engine``; a folder (or nothing: the ONNX's folder) gets the
    self-describing name."""
    if engine_path is not None and engine_path.suffix == ".engine":
        return engine_path
    name = engine_file_name(run_name(onnx_path), manifest.input_hw, precision, tensorrt_version, gpu.name)
    return (onnx_path.parent if engine_path is None else engine_path) / name


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike | None = None,
    config: BuildConfig | None = None,
    *,
    profile_name: str | None = None,
    log: Callable[[str], None] = _stderr_line,
) -> BuildResult:
    """Build ``onnx_path`` into a TensorRT engine and write it with its ``<stem>.json`` manifest.

    The graph actually parsed depends on the TensorRT version (``plan_precision``): passing either
    ``model.fp16.onnx`` or ``model.fp32.onnx`` works when both were exported side by side. The engine
    is written only after the inspector confirms its precision; otherwise the inspector's layer JSON
    is written to ``<stem>.layers.json`` and ``EnginePrecisionError`` is raised.

    Args:
        onnx_path: an exported graph with its manifest beside it.
        engine_path: the ``.engine`` to write, a folder for it, or None for beside the ONNX; the
            default name is ``<run>-<H>x<W>-<precision>-trt<version>-<device>.engine``.
        config: the build configuration; defaults to ``BuildConfig()``.
        profile_name: recorded in the manifest's ``build_details``.
        log: receives one line per build phase.

    Raises:
        ReconadError: missing TensorRT (exit 2), bad input, a parse or build failure; or
            ``EnginePrecisionError`` (exit 1) when the engine is not the precision asked for.
    """
    config = config or BuildConfig()
    onnx_path = Path(onnx_path)
    trt = import_tensorrt()
    version = parse_version(trt.__version__)
    plan = plan_precision(version, config.precision, config.network_typing)
    check_build_options(version, config)
    source_path, onnx_manifest = resolve_onnx(onnx_path, plan)
    check_artifact_sha256(onnx_manifest, source_path)
    batch_range = resolve_batch_range(config, onnx_manifest.input_tensor)
    gpu = probe_gpu()
    target = resolve_engine_path(
        Path(engine_path) if engine_path is not None else None,
        source_path,
        onnx_manifest,
        config.precision,
        trt.__version__,
        gpu,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability}); batch {batch_range}")
    started = time.monotonic()

    constrained_count = 0
    graph = prepare_graph(source_path, plan)
    islands, node_outputs = graph.islands, graph.node_outputs
    island_kinds = tuple(onnx_manifest.precision.fp32_islands) if config.precision == "fp16" else ()
    if plan.constrain_islands:
        island_kinds = graph.island_kinds
    builder = EngineBuilder(trt, config, plan, log)
    layers = builder.parse(source_path, graph.model_bytes)
    if plan.constrain_islands:
        chosen, missing = select_island_layers(layers, node_outputs, islands)
        builder.constrain(chosen)
        log(f"  FP32 constraints on {len(chosen)} layers for {len(islands)} island nodes")
        if missing:
            log(f"  {len(missing)} island nodes have no float layer of their own (e.g. {missing[0]})")
        constrained_count = len(chosen)
        fp32_names = {layer.name for layer in chosen} | set(islands)
        constrained = {layer.index for layer in chosen}
        other_names = {layer.name for layer in layers if layer.index not in constrained}
        other_names |= {node for node, _ in node_outputs if node not in set(islands)}
    elif plan.strongly_typed and config.precision == "fp16":
        fp32_names, other_names = typed_layer_names(layers)
        if not other_names:
            raise ReconadError(
                f"{source_path.name} parsed into a network with no FP16 layer, so a strongly typed build would be "
                "FP32; pass the fp16 ONNX written by recon-export to-onnx."
            )
    else:
        fp32_names, other_names = set(), set()
    builder.configure(batch_range)
    serialized = builder.build()
    input_shape = (batch_range[1], *onnx_manifest.input_tensor.shape[1:])
    engine_information = builder.inspect(serialized, input_shape)
    report = analyze_layer_precisions(engine_information, fp32_names, other_names)
    problems = report.problems(config.precision)
    if problems:
        layer_report = target.with_suffix(".layers.json")
        layer_report.write_text(engine_information, encoding="utf-8")
        raise EnginePrecisionError(f"{problems[0]}; nothing was written but the layer report {layer_report}.")
    log(
        f"  layer precisions: {report.tensor_counts} over {report.layer_count} layers; "
        f"{len(report.island_layers)} island layers checked FP32, {len(report.islands_unverified)} fused out of sight"
    )
    build_seconds = time.monotonic() - started

    jetpack, l4t = read_jetson_release()
    engine_info = EngineInfo(
        tensorrt_version=trt.__version__,
        cuda_version=_cuda_runtime_version(),
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        jetpack=jetpack,
        l4t=l4t,
        build_details=build_details(
            config,
            plan,
            gpu,
            report,
            batch_range,
            onnx_file=source_path.name,
            constrained_layers=constrained_count,
            profile_name=profile_name,
            build_seconds=build_seconds,
        ),
    )
    precision = Precision(mode=config.precision, fp32_islands=island_kinds, description=plan.description)
    manifest, manifest_path = write_engine(target, serialized, onnx_manifest, engine_info, precision, batch_range)
    log(f"Wrote {target} ({len(serialized) >> 20} MiB) and {manifest_path.name} in {build_seconds:.0f} s")
    return BuildResult(target, manifest_path, manifest, report, build_seconds)
