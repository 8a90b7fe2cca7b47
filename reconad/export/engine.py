"""``build_engine``: an exported ONNX graph -> a TensorRT engine plus its manifest, on the target; no torch.

The steps: plan the precision for this TensorRT (``precision_plan``), pick the graph it parses and
check it against its manifest, build (``builder``), check the engine's layer precisions
(``precision_check``), then write the engine and its manifest, each atomically. The manifest names
the ONNX and the ``.reference.npz`` the engine came from (``source_files``), so ``verify`` finds both.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconad.export.build_config import BuildConfig
from reconad.export.builder import EngineBuilder, prepare_graph
from reconad.export.naming import resolve_engine_path, sibling_onnx_path
from reconad.export.precision_check import LayerPrecisionReport, analyze_layer_precisions, select_island_layers, typed_layer_names
from reconad.export.precision_plan import PrecisionPlan, check_build_options, plan_precision, version_text
from reconad.runtime.atomic import write_bytes_atomic
from reconad.runtime.backends.device import GpuInfo, probe_gpu, read_jetson_release
from reconad.runtime.backends.trt import import_tensorrt, parse_version
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import EngineInfo, InputTensor, Manifest, Precision, check_artifact_sha256, manifest_path_for, reference_path_for, sha256_file


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


def check_tensorrt_target(onnx_path: Path) -> None:
    """Refuse a graph exported for another target than TensorRT (``--target ort-cpu``), before TensorRT is loaded."""
    if onnx_path.is_file() and manifest_path_for(onnx_path).is_file():
        manifest = _load_onnx_manifest(onnx_path)
        if manifest.target != "tensorrt":
            raise ReconadError(
                f"{onnx_path.name} is the {manifest.target} graph (attention as ONNX Runtime's own MultiHeadAttention, "
                "which TensorRT does not parse): build the engine from the graph exported without --target."
            )


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
        f"A {plan.precision} engine on TensorRT {version_text(plan.tensorrt_version)} is built from the "
        f"{plan.onnx_precision} ONNX, but {onnx_path.name} is {manifest.precision.mode} and {sibling.name} is not "
        "beside it; export both with recon-export to-onnx --precision both."
    )


def int8_check_names(islands: tuple[str, ...], node_outputs) -> tuple[set[str], set[str]]:
    """For a strongly typed int8 build: (island node names, which must run FP32; every other node name)."""
    island_set = set(islands)
    return island_set, {node for node, _ in node_outputs if node not in island_set}


class EnginePrecisionError(ReconadError):
    """The built engine is not the precision that was asked for (exit code 1, like a failed verify)."""

    exit_code = 1


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What ``build_engine`` wrote."""

    engine_path: Path
    manifest_path: Path
    manifest: Manifest
    report: LayerPrecisionReport
    build_seconds: float


def _cuda_versions() -> dict[str, str | None]:
    """``{"runtime": CUDA runtime version or None, "binding": "cuda-python 12.6.2" / "pycuda 2024.1 (CUDA 12.2)"}``
    through whichever binding is installed; empty without one (the driver's version comes from ``probe_gpu``)."""
    try:
        from reconad.runtime.backends.cuda import open_cuda

        driver = open_cuda()
    except ReconadError:
        return {}
    try:
        return {"runtime": driver.runtime_version(), "binding": driver.binding_version()}
    except ReconadError:
        return {"binding": driver.binding}
    finally:
        driver.close()


def source_files(source_path: Path, engine_path: Path) -> dict[str, str | None]:
    """The ``EngineInfo`` fields naming the ONNX an engine is built from and that ONNX's ``.reference.npz``.

    Paths are relative to the engine's folder where they can be (the export and engine folders move
    together), else absolute; the reference's sha256 lets ``verify`` tell a changed file. Without a
    reference beside the ONNX, ``reference_path`` and ``reference_sha256`` are None.
    """

    def located(path: Path) -> str:
        try:
            return Path(os.path.relpath(path.resolve(), engine_path.parent.resolve())).as_posix()
        except ValueError:  # another drive (Windows): no relative path
            return path.resolve().as_posix()

    reference = reference_path_for(source_path)
    has_reference = reference.is_file()
    return {
        "onnx_path": located(source_path),
        "reference_path": located(reference) if has_reference else None,
        "reference_sha256": sha256_file(reference) if has_reference else None,
    }


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
    output_dtypes: dict[str, str] | None = None,
) -> tuple[Manifest, Path]:
    """Write the engine, then its manifest (each atomically); no engine stays behind without its manifest.

    ``output_dtypes``: the engine's real output dtypes (``category`` is int32 on TensorRT 8.x).
    """
    write_bytes_atomic(target, serialized)
    try:
        manifest = onnx_manifest.for_engine(
            engine_file=target,
            engine=engine_info,
            precision=precision,
            min_batch=batch_range[0],
            max_batch=batch_range[2],
            output_dtypes=output_dtypes,
        )
        manifest_path = manifest_path_for(target)
        manifest.save(manifest_path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return manifest, manifest_path


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
        ReconadError: a graph for another target than TensorRT (``to-onnx --target ort-cpu``), missing
            TensorRT (exit 2), bad input, a parse or build failure; or
            ``EnginePrecisionError`` (exit 1) when the engine is not the precision asked for.
    """
    config = config or BuildConfig()
    onnx_path = Path(onnx_path)
    check_tensorrt_target(onnx_path)
    trt = import_tensorrt()
    version = parse_version(trt.__version__)
    plan = plan_precision(version, config.precision, config.network_typing)
    source_path, onnx_manifest = resolve_onnx(onnx_path, plan)
    check_artifact_sha256(onnx_manifest, source_path)
    batch_range = resolve_batch_range(config, onnx_manifest.input_tensor)
    gpu = probe_gpu()
    jetpack, l4t = read_jetson_release()
    check_build_options(version, config, jetson=l4t is not None or gpu.integrated, integrated_gpu=gpu.integrated)
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
    if plan.constrain_islands or config.precision == "int8":
        island_kinds = graph.island_kinds
    builder = EngineBuilder(trt, config, plan, log)
    layers = builder.parse(source_path, graph.model_bytes)
    promised = [output.name for output in onnx_manifest.output_tensors]
    if sorted(builder.output_dtypes) != sorted(promised):
        raise ReconadError(
            f"{source_path.name} parsed into a network with outputs {sorted(builder.output_dtypes)} but its manifest "
            f"promises {promised}; re-export it with recon-export to-onnx."
        )
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
    elif config.precision == "int8":  # strongly typed: the Q/DQ nodes and the graph's types decide
        fp32_names, other_names = int8_check_names(islands, node_outputs)
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

    cuda = _cuda_versions()
    engine_info = EngineInfo(
        tensorrt_version=trt.__version__,
        cuda_runtime_version=cuda.get("runtime"),
        cuda_driver_version=gpu.driver_cuda_version,
        cuda_binding=cuda.get("binding"),
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
        **source_files(source_path, target),
    )
    if engine_info.reference_path is None:
        log(f"  {reference_path_for(source_path).name} is not beside {source_path.name}: verify will need --reference")
    calibration = onnx_manifest.precision.calibration if config.precision == "int8" else None
    precision = Precision(mode=config.precision, fp32_islands=island_kinds, description=plan.description, calibration=calibration)
    manifest, manifest_path = write_engine(
        target, serialized, onnx_manifest, engine_info, precision, batch_range, builder.output_dtypes
    )
    log(f"Wrote {target} ({len(serialized) >> 20} MiB) and {manifest_path.name} in {build_seconds:.0f} s")
    return BuildResult(target, manifest_path, manifest, report, build_seconds)
