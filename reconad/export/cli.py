"""recon-export: checkpoint → ONNX, ONNX → TensorRT engine, verify an artifact against its reference.

Thin Typer commands delegating to plain functions; torch is imported only inside ``to-onnx``.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])


def _not_built(command: str) -> None:
    typer.echo(f"recon-export {command} is not built yet.", err=True)
    raise typer.Exit(2)


@app.command("to-onnx")
def to_onnx() -> None:
    """Export a checkpoint to the fused ONNX graph."""
    _not_built("to-onnx")


@app.command("build-engine")
def build_engine() -> None:
    """Build a TensorRT engine from an exported ONNX graph."""
    _not_built("build-engine")


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

    from reconad.runtime.errors import ReconadError
    from reconad.runtime.verify import render_report, verify_artifact

    try:
        report = verify_artifact(artifact, backend, reference)
    except ReconadError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(error.exit_code) from None
    typer.echo(json.dumps(report.to_dict(), indent=2) if json_report else render_report(report))
    if not report.passed:
        raise typer.Exit(1)
