"""recon-inspect: calibrate thresholds and run the inspection loop on an exported artifact."""

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])


def _not_built(command: str) -> None:
    typer.echo(f"recon-inspect {command} is not built yet.", err=True)
    raise typer.Exit(2)


@app.command("calibrate")
def calibrate() -> None:
    """Write thresholds computed from defect-free images into the manifest."""
    _not_built("calibrate")


@app.command("run")
def run() -> None:
    """Inspect frames from a camera, video file or image folder."""
    _not_built("run")
