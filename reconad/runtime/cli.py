"""recon-inspect: calibrate thresholds and run the inspection loop on an exported artifact."""

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])


class _PairOptionCommand(TyperCommand):
    """``--category NAME DIR``: Typer has no repeatable two-value option, so the option is given two values here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.name == "category":
                param.nargs = 2


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1%}"


@app.command("calibrate", cls=_PairOptionCommand)
def calibrate(
    artifact: Annotated[Path, typer.Argument(help="The .onnx or .engine artifact; its <stem>.json manifest is updated.")],
    folders: Annotated[
        Optional[list[Path]],
        typer.Argument(
            help="An MVTec-layout data root (each category on its test/good, the global thresholds on all), "
            "or folder(s) of defect-free images for the global thresholds (recursive).",
            show_default=False,
        ),
    ] = None,
    category: Annotated[
        Optional[list[Any]],
        typer.Option(
            "--category", metavar="NAME DIR", help="Thresholds of category NAME from the good images in DIR (repeatable)."
        ),
    ] = None,
    max_fpr: Annotated[
        Optional[float], typer.Option(help="False-positive rate allowed on good images [default: 0.01].")
    ] = None,
    pixel_max_fpr: Annotated[
        Optional[float], typer.Option(help="The same for anomaly-map pixels [default: --max-fpr].")
    ] = None,
    margin: Annotated[
        Optional[float], typer.Option(help="Fraction of (quantile - median) added above the quantile [default: 0.05].")
    ] = None,
    normalize: Annotated[
        Optional[str], typer.Option(help="0..1 score scale with the threshold at 0.5: quantile, minmax or none.")
    ] = None,
    roi: Annotated[Optional[str], typer.Option(help="Crop X,Y,W,H (pixels), the same as for run.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per inference call.")] = None,
    backend: Annotated[str, typer.Option(help="auto, ort, ort-cpu, ort-cuda, ort-trt or trt.")] = "auto",
) -> None:
    """Write thresholds computed from defect-free images into the manifest: per category and global.

    A data root's test split (its defect folders) reports each category's operating point: the
    threshold, recall and false-alarm rate at it, and the confusion counts.
    """
    import numpy as np

    from reconad.runtime.calibration import CalibrationConfig, calibrate_artifact
    from reconad.runtime.config import resolve
    from reconad.runtime.errors import ReconadError, exit_with
    from reconad.runtime.frames import parse_roi

    try:
        config = resolve(
            CalibrationConfig,
            dict(
                max_fpr=max_fpr,
                pixel_max_fpr=pixel_max_fpr,
                margin=margin,
                normalize=normalize,
                roi=parse_roi(roi) if roi else None,
                batch_size=batch_size,
            ),
            what="calibrate options",
        )
        result = calibrate_artifact(
            artifact,
            folders or [],
            config,
            categories=[(str(name), Path(folder)) for name, folder in category or []],
            backend=backend,
            report=lambda line: typer.echo(line, err=True),
        )
    except ReconadError as error:
        exit_with(error)
    for point in result.points:
        name = "global" if point.category is None else point.category
        scores, thresholds = point.scores, point.point
        line = (
            f"{name}: {point.n_images} good images ({point.n_unreadable} unreadable), scores min {scores.min():.6g}, "
            f"median {float(np.median(scores)):.6g}, max {scores.max():.6g}; image threshold "
            f"{thresholds.image_threshold.value:.6g} ({point.false_positive_rate:.2%} of these good images at or "
            f"above it), pixel threshold {thresholds.pixel_threshold.value:.6g}"
        )
        if thresholds.distance_limit is not None:
            line += f", distance limit {thresholds.distance_limit.value:.4g}"
        if point.recognized is not None:
            line += f", {_percent(point.recognized)} of them recognised as {name}"
        typer.echo(line)
        if point.counts is not None:
            counts = point.counts
            typer.echo(
                f"  {name} operating point on its test split: recall {_percent(counts.recall)}, false-alarm rate "
                f"{_percent(counts.false_alarm_rate)} (on the good images it was calibrated on); "
                f"TP {counts.true_positives} FN {counts.false_negatives} FP {counts.false_positives} "
                f"TN {counts.true_negatives}, {counts.unknown} unknown"
                + (f"; recognition {_percent(point.recognition_accuracy)}" if point.recognition_accuracy is not None else "")
            )
        if point.replaced is not None:
            typer.echo(f"  replaced {name}: {point.replaced.describe()}")
    typer.echo(f"wrote {result.manifest_path}")


@app.command("run")
def run(
    source: Annotated[
        str, typer.Argument(help="csi://N, v4l2:///dev/videoN, rtsp://..., a video file, or an image folder/file.")
    ],
    model: Annotated[Path, typer.Option(help="The .onnx or .engine artifact, with its manifest.")],
    out: Annotated[
        Optional[Path], typer.Option(help="Folder for verdicts.jsonl, overlays/ and summary.json; none if unset.")
    ] = None,
    max_frames: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many verdicts.")] = None,
    loop: Annotated[bool, typer.Option("--loop", help="Files and folders: start again at the end.")] = False,
    roi: Annotated[Optional[str], typer.Option(help="Crop X,Y,W,H (pixels) of every frame before inference.")] = None,
    backend: Annotated[str, typer.Option(help="auto, ort, ort-cpu, ort-cuda, ort-trt or trt.")] = "auto",
    threshold: Annotated[
        Optional[float], typer.Option(help="One image threshold for every image (raw score units), not the manifest's.")
    ] = None,
    no_threshold: Annotated[
        bool, typer.Option("--no-threshold", help="Scores only: judge no image (no calibration needed).")
    ] = False,
    category: Annotated[
        Optional[str], typer.Option(help="Judge every image as this category (its thresholds), whatever the model names.")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Frames per inference call [default: 1].")] = None,
    overlays: Annotated[Optional[str], typer.Option(help="Heatmap overlays for: anomalies, all or none.")] = None,
    overlay_interval_s: Annotated[
        Optional[float], typer.Option(help="At most one overlay per this many seconds [default: 1 live, 0 files].")
    ] = None,
    overlay_quota_mb: Annotated[
        Optional[float], typer.Option(help="Stop saving overlays once overlays/ holds this much [default: 500].")
    ] = None,
    webhook: Annotated[Optional[str], typer.Option(help="http(s) URL receiving a JSON POST per anomaly.")] = None,
    webhook_timeout_s: Annotated[Optional[float], typer.Option(help="Webhook timeout [default: 2].")] = None,
    width: Annotated[Optional[int], typer.Option(min=1, help="Capture width (files: rescale); with --height.")] = None,
    height: Annotated[Optional[int], typer.Option(min=1, help="Capture height.")] = None,
    fps: Annotated[Optional[float], typer.Option(help="Camera frame rate to request.")] = None,
    flip: Annotated[
        Optional[str],
        typer.Option(help="none, counterclockwise, rotate-180, clockwise, horizontal, vertical, upper-right-diagonal, upper-left-diagonal."),
    ] = None,
    codec: Annotated[Optional[str], typer.Option(help="v4l2 cameras: raw or mjpeg [default: raw].")] = None,
    queue_size: Annotated[
        Optional[int], typer.Option(min=1, help="Frames waiting for inference before a camera drops the oldest.")
    ] = None,
    preprocess_threads: Annotated[
        Optional[int], typer.Option(min=1, help="Threads cropping and resizing frames [default: 2].")
    ] = None,
    stats_interval_s: Annotated[Optional[float], typer.Option(help="Status line period; 0 for none [default: 5].")] = None,
    inference_timeout_s: Annotated[
        Optional[float], typer.Option(help="A call slower than this is a hung backend: exit 3 [default: 60].")
    ] = None,
    num_threads: Annotated[Optional[int], typer.Option(min=1, help="ONNX Runtime threads [default: all cores].")] = None,
) -> None:
    """Inspect frames from a camera, stream, video file or image folder until it ends or Ctrl+C.

    The model names each image's category and judges it with that category's thresholds (or the
    global ones); an image unlike every category is UNKNOWN. Without a calibration for every category
    it may judge, run refuses (exit 2) unless --threshold or --no-threshold is given.

    Exit codes: 0 at the end of the stream, --max-frames, SIGINT or SIGTERM; 2 for bad input; 3 when
    inference fails or hangs.
    """
    from reconad.runtime.config import resolve
    from reconad.runtime.errors import ReconadError, exit_with
    from reconad.runtime.frames import parse_roi
    from reconad.runtime.line.loop import InspectConfig
    from reconad.runtime.line.session import inspect_stream
    from reconad.runtime.line.sources import SourceConfig

    def report(line: str) -> None:
        typer.echo(line, err=True)

    try:
        config = resolve(
            InspectConfig,
            dict(
                out=out,
                max_frames=max_frames,
                roi=parse_roi(roi) if roi else None,
                batch_size=batch_size,
                overlays=overlays,
                overlay_interval_s=overlay_interval_s,
                overlay_quota_mb=overlay_quota_mb,
                webhook=webhook,
                webhook_timeout_s=webhook_timeout_s,
                queue_size=queue_size,
                preprocess_threads=preprocess_threads,
                stats_interval_s=stats_interval_s,
                inference_timeout_s=inference_timeout_s,
            ),
            what="run options",
        )
        source_config = resolve(
            SourceConfig, dict(width=width, height=height, fps=fps, flip=flip, codec=codec, loop=loop), what="run options"
        )
        result = inspect_stream(
            source, model, config, source_config, backend=backend, threshold=threshold, category=category,
            no_threshold=no_threshold, num_threads=num_threads, report=report,
        )  # fmt: skip
    except ReconadError as error:
        exit_with(error)
    except KeyboardInterrupt:  # before the loop took over SIGINT (e.g. while the model loads)
        typer.echo("Interrupted before the loop started.", err=True)
        raise typer.Exit(130) from None
    typer.echo(result.headline())
    for line in result.stats.summary_lines():
        typer.echo(line)
    if out is not None:
        typer.echo(f"stopped: {result.stop_reason}; verdicts in {out / 'verdicts.jsonl'}")
    else:
        typer.echo(f"stopped: {result.stop_reason}")
    if result.failure is not None:
        typer.echo(result.failure, err=True)
        raise typer.Exit(result.exit_code)
