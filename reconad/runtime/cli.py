"""recon-inspect: calibrate thresholds and run the inspection loop on an exported artifact."""

from pathlib import Path
from typing import Annotated, Optional

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
def run(
    source: Annotated[str, typer.Argument(help="An image folder (camera, video and stream sources: issue 6).")],
    model: Annotated[Path, typer.Option(help="The .onnx or .engine artifact, with its manifest.")],
    out: Annotated[Path, typer.Option(help="Output folder for verdicts.jsonl and overlays/.")],
    backend: Annotated[str, typer.Option(help="auto, ort, ort-cpu, ort-cuda, ort-trt or trt.")] = "auto",
    threshold: Annotated[
        Optional[float], typer.Option(help="Image threshold in raw score units; overrides the manifest's.")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per inference call.")] = None,
    roi: Annotated[Optional[str], typer.Option(help="Crop X,Y,W,H (pixels) of every image before inference.")] = None,
    overlays: Annotated[str, typer.Option(help="Heatmap overlays for: anomalies, all or none.")] = "anomalies",
) -> None:
    """Inspect frames from a camera, video file or image folder."""
    from reconad.runtime.errors import ReconadError
    from reconad.runtime.folder import inspect_folder, parse_roi

    try:
        if "://" in source:
            raise ReconadError(
                f"Source {source} is a stream; this build inspects image folders only (cameras: issue 6)."
            )
        summary = inspect_folder(
            source,
            model,
            out,
            backend=backend,
            threshold=threshold,
            batch_size=batch_size,
            roi=parse_roi(roi) if roi else None,
            overlays=overlays,
        )
    except ReconadError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(error.exit_code) from None
    if summary.threshold is None:
        typer.echo(
            "No image threshold: is_anomalous is null; run recon-inspect calibrate or pass --threshold.", err=True
        )
    typer.echo(
        f"{summary.n_images} images inspected on {summary.backend}: {summary.n_anomalous} anomalous, "
        f"{summary.n_unreadable} unreadable, {summary.n_overlays} overlays; verdicts in {summary.verdicts_path}"
    )
