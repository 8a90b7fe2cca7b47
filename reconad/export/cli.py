"""recon-export: checkpoint → ONNX, ONNX → TensorRT engine, verify an artifact, write a Triton model repository.

Thin Typer commands delegating to plain functions; torch is imported only inside ``to-onnx``.
"""

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])


@app.command("to-onnx")
def to_onnx(
    checkpoint: Annotated[Path, typer.Argument(help="A reconad checkpoint (model.ckpt).")],
    out: Annotated[Path, typer.Option(help="Folder for <stem>-<H>x<W>-<precision>.onnx, .json and .reference.npz.")],
    precision: Annotated[
        Literal["fp32", "fp16", "both"],
        typer.Option(help="fp32, the mixed-precision fp16 graph (FP32 islands), or both."),
    ] = "fp32",
    max_batch: Annotated[int, typer.Option(min=1, help="The batch axis accepts 1..N (1: a static batch of 1).")] = 8,
    opset: Annotated[int, typer.Option(min=17, help="ONNX opset (17 or later: LayerNormalization is one op).")] = 17,
    reference_images: Annotated[
        Optional[Path],
        typer.Option(help="Folder of images for <stem>.reference.npz (up to 16); default 4 synthetic images."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace manifests in --out that hold a calibration (it is discarded).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Export a checkpoint to the fused ONNX graph, checked against PyTorch with ONNX Runtime before writing.

    A calibrated manifest already in --out is never replaced without --overwrite: the new graph's scores
    need a new calibration. Exit 1 when a graph is over tolerance (nothing is written), 2 for bad input.
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
    try:
        from reconad.export.onnx import export_onnx

        paths = export_onnx(
            checkpoint=checkpoint,
            out_dir=out,
            precision=precision,
            max_batch=max_batch,
            opset=opset,
            reference_images=reference_images,
            overwrite=overwrite,
        )
    except ReconadError as error:
        exit_with(error)
    finally:
        export_logger.removeHandler(progress)
    for path in paths:
        typer.echo(f"wrote {path}")


@app.command("build-engine")
def build_engine_command(
    model: Annotated[Path, typer.Argument(help="The exported .onnx (fp16 or fp32; its sibling is used when needed).")],
    out: Annotated[
        Optional[Path],
        typer.Option(help="The .engine to write, or a folder for <run>-<H>x<W>-<precision>-trt<version>-<device>.engine."),
    ] = None,
    profile: Annotated[
        Optional[Path], typer.Option(help="Build profile TOML, e.g. engines/profiles/orin-nano.toml.")
    ] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp16 or fp32 (default: the profile's, else built in).")] = None,
    workspace_mib: Annotated[Optional[int], typer.Option(help="TensorRT scratch-memory cap in MiB.")] = None,
    min_batch: Annotated[Optional[int], typer.Option(help="Smallest batch of the optimisation profile.")] = None,
    opt_batch: Annotated[Optional[int], typer.Option(help="Batch TensorRT tunes its kernels for.")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="Largest batch of the optimisation profile.")] = None,
    timing_cache: Annotated[
        Optional[Path], typer.Option(help="Timing cache file, read if present and saved after the build.")
    ] = None,
    dla_core: Annotated[Optional[int], typer.Option(help="Run on this DLA core (Jetson Orin), GPU fallback on.")] = None,
    version_compatible: Annotated[
        Optional[bool],
        typer.Option("--version-compatible/--no-version-compatible", help="Also run on later TensorRT (8.6+)."),
    ] = None,
    hardware_compatible: Annotated[
        Optional[bool],
        typer.Option("--hardware-compatible/--no-hardware-compatible", help="Run on any Ampere+ dGPU (8.6+)."),
    ] = None,
    builder_optimization_level: Annotated[
        Optional[int], typer.Option(help="0..5; higher builds longer for faster engines (8.6+).")
    ] = None,
    network_typing: Annotated[
        Optional[str], typer.Option(help="auto (weak on 8.x, strong on 10+), strong, or weak (before 10.12).")
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
            precision=precision,
            workspace_mib=workspace_mib,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch,
            timing_cache=timing_cache,
            dla_core=dla_core,
            version_compatible=version_compatible,
            hardware_compatible=hardware_compatible,
            builder_optimization_level=builder_optimization_level,
            network_typing=network_typing,
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
        str, typer.Option(help="auto, ort (best ONNX Runtime provider), ort-cpu, ort-cuda, ort-trt or trt.")
    ] = "auto",
    reference: Annotated[
        Optional[Path], typer.Option(help="Reference .npz; default <stem>.reference.npz beside the artifact.")
    ] = None,
    json_report: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of a table.")] = False,
) -> None:
    """Run an artifact against its reference outputs (torch-free); exit 1 when over tolerance, 2 for bad input."""
    import json

    from reconad.runtime.errors import ReconadError, exit_with
    from reconad.runtime.verify import render_report, verify_artifact

    try:
        report = verify_artifact(artifact, backend, reference)
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
        Optional[str], typer.Option(help="gpu, cpu or auto (GPU when present) [default: gpu for engines, auto for ONNX].")
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
            instance_kind=instance_kind,
            preferred_batch_sizes=tuple(preferred_batch_size) if preferred_batch_size else None,
            max_queue_delay_us=max_queue_delay_us,
        )
        write_triton_repo(artifacts, out, config, report=typer.echo)
    except ReconadError as error:
        exit_with(error)
