"""recon-export: checkpoint → ONNX, ONNX → TensorRT engine, verify an artifact, write a Triton model repository.

Thin Typer commands delegating to plain functions; torch is imported only inside ``to-onnx``.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from reconad.runtime.cli_common import choices, make_app, value_of

app = make_app("recon-export", __doc__.splitlines()[0])

# The spellings the library accepts (held equal to its constants by tests/test_cli_conventions.py).
Precision = choices("Precision", ("fp32", "fp16", "both", "int8"))
Target = choices("Target", ("tensorrt", "ort-cpu"))
EnginePrecision = choices("EnginePrecision", ("fp16", "fp32", "int8"))
CalibrationMethod = choices("CalibrationMethod", ("minmax", "percentile", "entropy"))
NetworkTyping = choices("NetworkTyping", ("auto", "strong", "weak"))
Backend = choices("Backend", ("auto", "ort", "ort-cpu", "ort-cuda", "ort-trt", "trt"))
InstanceKind = choices("InstanceKind", ("auto", "cpu", "gpu"))


@app.command("to-onnx")
def to_onnx(
    checkpoint: Annotated[Path, typer.Argument(help="A reconad checkpoint (model.ckpt).")],
    out: Annotated[Path, typer.Option(help="Folder for <stem>-<H>x<W>-<precision>.onnx, .json and .reference.npz.")],
    precision: Annotated[
        Precision,
        typer.Option(help="fp32, the mixed-precision fp16 graph (FP32 islands), both, or int8 (QDQ, calibrated)."),
    ] = Precision("fp32"),
    target: Annotated[
        Target,
        typer.Option(help="tensorrt: the graph every backend runs and build-engine takes; ort-cpu: fp32 with attention as ONNX Runtime's fused MultiHeadAttention, faster on CPU, ONNX Runtime only (<stem>-<H>x<W>-fp32-ort-cpu.onnx)."),
    ] = Target("tensorrt"),
    max_batch: Annotated[int, typer.Option(min=1, help="The batch axis accepts 1..N (1: a static batch of 1).")] = 8,
    opset: Annotated[int, typer.Option(min=17, help="ONNX opset (17 or later: LayerNormalization is one op).")] = 17,
    reference_images: Annotated[
        Optional[Path],
        typer.Option(help="Folder of images for <stem>.reference.npz (up to 16) [default: 4 synthetic images]."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace manifests in --out that hold a calibration (it is discarded).")
    ] = False,
    calibration_images: Annotated[
        Optional[list[Path]],
        typer.Option(help="int8: a folder of good images to calibrate activation ranges on; repeatable; evenly spaced images of them are used: 64 at 128 px, 16 at 256, 8 at 512 (onnxruntime keeps every image's activations) [default: none; needed for int8]."),
    ] = None,
    calibration_method: Annotated[
        CalibrationMethod, typer.Option(help="int8: how activation ranges are calibrated (onnxruntime.quantization).")
    ] = CalibrationMethod("minmax"),
    evaluation_data: Annotated[
        Optional[Path],
        typer.Option(help="int8: MVTec-layout folder; its test split's image AUROC must be within 0.5 point of fp32 [default: none; needed for int8]."),
    ] = None,
    evaluation_categories: Annotated[
        Optional[str], typer.Option(help="int8: comma-separated categories of --evaluation-data [default: the checkpoint's].")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Export a checkpoint to the fused ONNX graph, checked against PyTorch with ONNX Runtime before writing.

    A calibrated manifest already in --out is never replaced without --overwrite: the new graph's scores
    need a new calibration. Exit 1 when a graph is over tolerance (nothing is written), 2 for bad input.
    An int8 graph is also refused (exit 1) when its image AUROC on --evaluation-data is not within 0.5
    point of the fp32 graph's.
    """
    import logging

    from reconad.runtime.errors import ReconadError, exit_with
    from reconad.runtime.progress import configure

    configure(quiet=quiet)
    progress = logging.StreamHandler()  # the parity numbers, on stderr
    progress.setFormatter(logging.Formatter("%(message)s"))
    export_logger = logging.getLogger("reconad.export")
    export_logger.addHandler(progress)
    export_logger.setLevel(logging.INFO)
    export_logger.propagate = False  # onnxruntime's quantizer gives the root logger a handler: no second copy
    try:
        from reconad.export.onnx import export_onnx

        int8 = _int8_options(precision.value, calibration_images, calibration_method.value, evaluation_data,
                             evaluation_categories)
        paths = export_onnx(
            checkpoint=checkpoint,
            out_dir=out,
            precision=precision.value,
            max_batch=max_batch,
            opset=opset,
            reference_images=reference_images,
            overwrite=overwrite,
            int8=int8,
            target=target.value,
        )
    except ReconadError as error:
        exit_with(error)
    finally:
        export_logger.removeHandler(progress)
    for path in paths:
        typer.echo(f"wrote {path}")


def _int8_options(precision, calibration_images, method, evaluation_data, evaluation_categories):  # -> Int8Options | None
    from reconad.runtime.errors import ReconadError

    given = [flag for flag, value in (("--calibration-images", calibration_images), ("--evaluation-data", evaluation_data),
                                      ("--evaluation-categories", evaluation_categories)) if value]
    if precision != "int8":
        if given or method != "minmax":
            raise ReconadError(f"{(given or ['--calibration-method'])[0]} is for --precision int8 only.")
        return None
    if not calibration_images or evaluation_data is None:
        raise ReconadError(
            "--precision int8 needs --calibration-images (good images) and --evaluation-data (an MVTec-layout "
            "folder with defects, to measure the AUROC against fp32)."
        )
    from reconad.export.int8_checks import Int8Options
    from reconad.runtime.manifest import CALIBRATION_METHODS

    if method not in CALIBRATION_METHODS:
        raise ReconadError(f"--calibration-method must be one of {list(CALIBRATION_METHODS)}, got {method!r}.")
    categories = tuple(c.strip() for c in evaluation_categories.split(",") if c.strip()) if evaluation_categories else None
    return Int8Options(tuple(calibration_images), evaluation_data, method, categories)


@app.command("build-engine")
def build_engine_command(
    model: Annotated[Path, typer.Argument(help="The exported .onnx (fp16, fp32 or int8; its sibling is used when needed).")],
    out: Annotated[
        Optional[Path],
        typer.Option(help="The .engine to write, or a folder for <run>-<H>x<W>-<precision>-trt<version>-<device>.engine [default: the ONNX's folder]."),
    ] = None,
    profile: Annotated[
        Optional[Path], typer.Option(help="Build profile TOML, e.g. engines/profiles/orin-nano.toml [default: none, the built-in defaults].")
    ] = None,
    precision: Annotated[
        Optional[EnginePrecision], typer.Option(help="Engine precision; int8 builds from the int8 (QDQ) ONNX [default: the profile's, else fp16].")
    ] = None,
    workspace_mib: Annotated[
        Optional[int], typer.Option(help="TensorRT scratch-memory cap in MiB [default: the profile's, else 1024].")
    ] = None,
    min_batch: Annotated[
        Optional[int], typer.Option(help="Smallest batch of the optimisation profile [default: the profile's, else 1].")
    ] = None,
    opt_batch: Annotated[
        Optional[int], typer.Option(help="Batch TensorRT tunes its kernels for [default: the profile's, else 1].")
    ] = None,
    max_batch: Annotated[
        Optional[int], typer.Option(help="Largest batch of the optimisation profile [default: the profile's, else 8].")
    ] = None,
    timing_cache: Annotated[
        Optional[Path], typer.Option(help="Timing cache file, read if present and saved after the build [default: none].")
    ] = None,
    dla_core: Annotated[Optional[int], typer.Option(help="Run on this DLA core (Jetson Orin), GPU fallback on [default: the GPU].")] = None,
    version_compatible: Annotated[
        Optional[bool],
        typer.Option("--version-compatible/--no-version-compatible", help="Also run on later TensorRT (8.6+) [default: off]."),
    ] = None,
    hardware_compatible: Annotated[
        Optional[bool],
        typer.Option("--hardware-compatible/--no-hardware-compatible", help="Run on any Ampere+ dGPU (8.6+) [default: off]."),
    ] = None,
    builder_optimization_level: Annotated[
        Optional[int], typer.Option(help="0..5; higher builds longer for faster engines (8.6+) [default: TensorRT's, 3].")
    ] = None,
    network_typing: Annotated[
        Optional[NetworkTyping], typer.Option(help="auto: weak on 8.x, strong on 10+; weak exists before 10.12 [default: auto].")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Build a TensorRT engine from an exported ONNX graph, on the target; no torch needed.

    Precedence: built-in defaults < --profile < these flags. Exit 2 for bad input or no TensorRT,
    1 when the built engine is not the precision asked for.
    """
    from reconad.export import engine
    from reconad.export.build_config import load_build_profile, resolve_build_config
    from reconad.runtime.errors import ReconadError, exit_with
    from reconad.runtime.progress import configure

    configure(quiet=quiet)
    try:
        loaded = load_build_profile(profile) if profile is not None else None
        config = resolve_build_config(
            loaded,
            precision=value_of(precision),
            workspace_mib=workspace_mib,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch,
            timing_cache=timing_cache,
            dla_core=dla_core,
            version_compatible=version_compatible,
            hardware_compatible=hardware_compatible,
            builder_optimization_level=builder_optimization_level,
            network_typing=value_of(network_typing),
        )
        result = engine.build_engine(
            onnx_path=model, engine_path=out, config=config, profile_name=loaded.name if loaded else None
        )
    except ReconadError as error:
        exit_with(error)
    typer.echo(str(result.engine_path))


@app.command("verify")
def verify(
    artifact: Annotated[Path, typer.Argument(help="The .onnx or .engine file, with its manifest beside it.")],
    backend: Annotated[
        Backend, typer.Option(help="ort: the best ONNX Runtime provider; auto: trt for engines, ort for ONNX.")
    ] = Backend("auto"),
    reference: Annotated[
        Optional[Path], typer.Option(help="Reference .npz [default: <stem>.reference.npz beside the artifact; for an engine, the one its manifest records].")
    ] = None,
    json_report: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of a table.")] = False,
) -> None:
    """Run an artifact against its reference outputs (torch-free); exit 1 when over tolerance, 2 for bad input."""
    import json

    from reconad.runtime.errors import ReconadError, exit_with
    from reconad.runtime.verify import render_report, verify_artifact

    try:
        report = verify_artifact(artifact, backend.value, reference)
    except ReconadError as error:
        exit_with(error)
    typer.echo(json.dumps(report.to_dict(), indent=2) if json_report else render_report(report))
    if not report.passed:
        raise typer.Exit(1)


@app.command("triton-repo")
def triton_repo(
    artifacts: Annotated[
        list[Path], typer.Argument(help="Exported .onnx or built .engine files (with manifests): versions 1, 2, ...")
    ],
    out: Annotated[Path, typer.Option(help="The model repository folder (created, or versions appended).")],
    name: Annotated[Optional[str], typer.Option(help="Model name [default: the first artifact's run name].")] = None,
    max_batch: Annotated[
        Optional[int], typer.Option(help="Triton max_batch_size [default: the manifests' smallest max_batch].")
    ] = None,
    instances: Annotated[Optional[int], typer.Option(help="Model instances (instance_group count) [default: 1].")] = None,
    instance_kind: Annotated[
        Optional[InstanceKind], typer.Option(help="auto: GPU when present [default: gpu for engines, auto for ONNX].")
    ] = None,
    preferred_batch_size: Annotated[
        Optional[list[int]], typer.Option(help="A batch size the dynamic batcher aims for; repeatable [default: max].")
    ] = None,
    max_queue_delay_us: Annotated[
        Optional[int], typer.Option(help="How long a request may wait to be batched, in µs [default: 2000].")
    ] = None,
) -> None:
    """Write a Triton Inference Server model repository (config.pbtxt, versions, manifests); torch-free.

    Appending to an existing model adds versions after its last; a failed run leaves the repository
    as it was. Exit 2 for bad input.
    """
    from reconad.export.triton import TritonRepoConfig, write_triton_repo
    from reconad.runtime.errors import ReconadError, exit_with

    try:
        config = TritonRepoConfig(
            name=name,
            max_batch=max_batch,
            instances=instances,
            instance_kind=value_of(instance_kind),
            preferred_batch_sizes=tuple(preferred_batch_size) if preferred_batch_size else None,
            max_queue_delay_us=max_queue_delay_us,
        )
        write_triton_repo(artifacts, out, config, report=typer.echo)
    except ReconadError as error:
        exit_with(error)
