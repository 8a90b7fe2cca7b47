"""One TensorRT engine build: parse the ONNX graph, constrain its FP32 islands, configure, build, inspect.

``EngineBuilder`` follows TensorRT's ``samples/python/detectron2/build_engine.py`` (parse network, then
build and serialize, logging the I/O tensors) minus its ``sys.exit``. It carries out a ``PrecisionPlan``;
``prepare_graph`` reads the graph where the plan needs it (islands, the 8.5 LayerNormalization rewrite).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from reconad.export.build_config import BuildConfig
from reconad.export.precision_check import FLOAT_DTYPES, NetworkLayer
from reconad.export.precision_plan import PrecisionPlan, version_text
from reconad.runtime.progress import Progress
from reconad.runtime.atomic import write_bytes_atomic
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import INPUT_NAME

# trt.DataType names -> numpy dtype names, as the manifest and the runtime's TensorInfo write them.
NUMPY_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                "INT32": "int32", "INT64": "int64", "BOOL": "bool"}  # fmt: skip


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
        self.output_dtypes: dict[str, str] = {}  # the network's (so the engine's) output dtypes, numpy names
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
            # 8.x maps an int64 ONNX output to INT32 (its ArgMin is a TopK with INT32 indices); 10.x keeps INT64.
            self.output_dtypes[tensor.name] = NUMPY_DTYPES.get(tensor.dtype.name, tensor.dtype.name.lower())
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
            cores = int(getattr(self.builder, "num_DLA_cores", 0) or 0)
            if config.dla_core >= cores:
                have = f"has {cores} DLA core{'s' if cores != 1 else ''}" if cores else "has no DLA"
                raise ReconadError(f"--dla-core {config.dla_core} cannot be used: this device {have} (TensorRT {trt.__version__}).")
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
        # set_timing_cache returns False when the cache was made on another device or TensorRT (with
        # ignore_mismatch=False it is then not used): replace it with an empty one, saved after the build.
        if not built.set_timing_cache(cache, ignore_mismatch=False):
            self.log(f"  warning: timing cache {path} was made on another device or TensorRT; replacing it")
            if not built.set_timing_cache(built.create_timing_cache(b""), ignore_mismatch=False):
                raise ReconadError("TensorRT refused an empty timing cache; build without --timing-cache.")

    def build(self) -> bytes:
        """Build and serialize; saves the timing cache when one was configured."""
        if self._monitor is None:
            self.log("Building the engine (TensorRT reports no progress on this version; this takes minutes)")
        else:
            self.log("Building the engine")
        if self._monitor is None:  # a plain line every interval off a terminal, a clock on one
            with Progress("building the engine", None) as progress, progress.heartbeat():
                serialized = self.builder.build_serialized_network(self.network, self.builder_config)
        else:
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
            # IEngineInspector.execution_context (the Python name on 8.5 to 11): with it the inspector reports
            # the formats of this shape; the C++ API's setExecutionContext is the same call.
            inspector.execution_context = context
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
    # An int8 engine is checked against the islands even when strongly typed (nothing to constrain there).
    find_islands = plan.constrain_islands or plan.precision == "int8"
    if not (plan.decompose_layer_norm or find_islands):
        return GraphToParse()
    try:
        import onnx

        from reconad.export.islands import find_fp32_island_groups
        from reconad.export.layernorm import decompose_layer_norm, decomposed_node_names
    except ImportError:
        raise ReconadError(
            f"A TensorRT {version_text(plan.tensorrt_version)} build reads the ONNX graph (to find its FP32 "
            "islands or rewrite its LayerNormalization); pip install onnx."
        ) from None
    model = onnx.load(str(onnx_path))
    parsed = decompose_layer_norm(model) if plan.decompose_layer_norm else model
    model_bytes = parsed.SerializeToString() if plan.decompose_layer_norm else None
    node_outputs = tuple((node.name, list(node.output)) for node in parsed.graph.node)
    if not find_islands:
        return GraphToParse(model_bytes, (), node_outputs, ())
    groups = find_fp32_island_groups(model)
    if plan.decompose_layer_norm:
        layer_norms = {node.name for node in model.graph.node if node.op_type == "LayerNormalization"}
        steps = decomposed_node_names(parsed, layer_norms)
        groups = {kind: [step for name in names for step in steps.get(name, [name])] for kind, names in groups.items()}
    wanted = {name for names in groups.values() for name in names}
    islands = tuple(node.name for node in parsed.graph.node if node.name in wanted)
    return GraphToParse(model_bytes, islands, node_outputs, tuple(kind for kind, names in groups.items() if names))
