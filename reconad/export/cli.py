"""recon-export: checkpoint → ONNX, ONNX → TensorRT engine, verify an artifact against its reference.

Thin Typer commands delegating to plain functions; torch is imported only inside ``to-onnx``.
"""

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
def verify() -> None:
    """Run an artifact against its reference outputs."""
    _not_built("verify")
