"""recon-inspect: calibrate thresholds, run the inspection loop, or serve an artifact from Triton."""

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from reconad.runtime.cli_common import ReconadCommand, choices, make_app, value_of

app = make_app("recon-inspect", __doc__.splitlines()[0])

# The spellings the library accepts (held equal to its constants by tests/test_cli_conventions.py; not
# imported from there so that --help and shell completion stay fast).
Backend = choices("Backend", ("auto", "ort", "ort-cpu", "ort-cuda", "ort-trt", "trt"))
Normalize = choices("Normalize", ("quantile", "minmax", "none"))
Overlays = choices("Overlays", ("anomalies", "all", "none"))
MqttEvents = choices("MqttEvents", ("all", "anomalies"))
BlindChecks = choices("BlindChecks", ("live", "always", "never"))
Flip = choices("Flip", ("none", "counterclockwise", "rotate-180", "clockwise", "horizontal", "upper-right-diagonal",
                        "vertical", "upper-left-diagonal"))
Codec = choices("Codec", ("raw", "mjpeg"))
Target = choices("Target", ("ort-cpu", "ort-cuda", "trt"))
_BACKEND_HELP = "ort: the best ONNX Runtime provider; auto: trt for engines, ort for ONNX."


class _PairOptionCommand(ReconadCommand):
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
        Optional[Normalize], typer.Option(help="0..1 score scale with the threshold at 0.5 [default: quantile].")
    ] = None,
    roi: Annotated[Optional[str], typer.Option(help="Crop X,Y,W,H (pixels), the same as for run [default: the whole image].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per inference call [default: 8].")] = None,
    bit_depth: Annotated[
        Optional[int], typer.Option(min=1, max=16, help="Real bit depth of 16-bit images without an sBIT chunk (e.g. 12) [default: 16].")
    ] = None,
    backend: Annotated[Backend, typer.Option(help=_BACKEND_HELP)] = Backend("auto"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Write thresholds computed from defect-free images into the manifest: per category and global.

    A data root's test split (its defect folders) reports each category's operating point: the
    threshold, recall and false-alarm rate at it, and the confusion counts.
    """
    import numpy as np

    from reconad.runtime.progress import configure

    configure(quiet=quiet)

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
                normalize=value_of(normalize),
                roi=parse_roi(roi) if roi else None,
                batch_size=batch_size,
                bit_depth=bit_depth,
            ),
            what="calibrate options",
        )
        result = calibrate_artifact(
            artifact,
            folders or [],
            config,
            categories=[(str(name), Path(folder)) for name, folder in category or []],
            backend=backend.value,
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
        Optional[str],
        typer.Argument(help="csi://N, v4l2:///dev/videoN, rtsp://..., a video file, or an image folder/file "
                            "(or source in --config).", show_default=False),
    ] = None,
    config: Annotated[
        Optional[Path],
        typer.Option(help="TOML file holding any of these options by name, with underscores (max_frames = 100, "
                          "in a [run] table or at the top level); flags given here win."),
    ] = None,
    model: Annotated[Optional[Path], typer.Option(help="The .onnx or .engine artifact, with its manifest.")] = None,
    server: Annotated[
        Optional[str],
        typer.Option(help="Infer on a Triton server instead of --model: grpc://HOST:8001/MODEL or http://HOST:8000/MODEL."),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Folder for verdicts.jsonl, overlays/ and summary.json; none if unset.")
    ] = None,
    max_frames: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many verdicts [default: at the end of the stream].")] = None,
    loop: Annotated[
        Optional[bool], typer.Option("--loop/--no-loop", help="Files and folders: start again at the end [default: off].", show_default=False)
    ] = None,
    roi: Annotated[Optional[str], typer.Option(help="Crop X,Y,W,H (pixels) of every frame before inference [default: the whole frame].")] = None,
    backend: Annotated[Optional[Backend], typer.Option(help=f"{_BACKEND_HELP} [default: auto]")] = None,
    threshold: Annotated[
        Optional[float], typer.Option(help="One image threshold for every image (raw score units), not the manifest's.")
    ] = None,
    no_threshold: Annotated[
        Optional[bool], typer.Option("--no-threshold", help="Scores only: judge no image (no calibration needed).")
    ] = None,
    category: Annotated[
        Optional[str], typer.Option(help="Judge every image as this category (its thresholds), whatever the model names.")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Frames per inference call [default: 1].")] = None,
    overlays: Annotated[Optional[Overlays], typer.Option(help="Heatmap overlays for [default: anomalies].")] = None,
    overlay_interval_s: Annotated[
        Optional[float], typer.Option(help="At most one overlay per this many seconds [default: 1 live, 0 files].")
    ] = None,
    overlay_quota_mb: Annotated[
        Optional[float], typer.Option(help="Stop saving overlays once overlays/ holds this much [default: 500].")
    ] = None,
    webhook: Annotated[
        Optional[str], typer.Option(help="http(s) URL receiving a JSON POST per anomaly and camera-blind episode.")
    ] = None,
    webhook_timeout_s: Annotated[Optional[float], typer.Option(help="Webhook timeout [default: 2].")] = None,
    webhook_retries: Annotated[
        Optional[int], typer.Option(min=0, help="Webhook attempts after a failure, with backoff [default: 3].")
    ] = None,
    webhook_header: Annotated[
        Optional[list[str]], typer.Option(help="'Name: value' request header for the webhook; repeatable.")
    ] = None,
    webhook_auth_file: Annotated[
        Optional[Path],
        typer.Option(help="File (chmod 600) whose first line is the webhook's Authorization header "
                          "[default: $RECONAD_WEBHOOK_AUTHORIZATION]."),
    ] = None,
    output: Annotated[
        Optional[list[str]],
        typer.Option(help="Annotated video out: display://0, rtsp://@:8554/inspect (loopback; "
                          "rtsp://0.0.0.0:8554/inspect for the network), or FILE.mp4/.m4v/.mov/.mkv/.avi; repeatable."),
    ] = None,
    mqtt: Annotated[
        Optional[str], typer.Option(help="Publish verdicts to mqtt://[user@]host[:port]/topic (mqtts:// for TLS).")
    ] = None,
    mqtt_qos: Annotated[Optional[int], typer.Option(min=0, max=2, help="MQTT QoS 0, 1 or 2 [default: 1].")] = None,
    mqtt_events: Annotated[
        Optional[MqttEvents], typer.Option(help="MQTT messages for every frame or anomalies only [default: all].")
    ] = None,
    mqtt_retain: Annotated[
        Optional[bool], typer.Option("--mqtt-retain", help="The broker keeps the last verdict for new subscribers.")
    ] = None,
    mqtt_client_id: Annotated[Optional[str], typer.Option(help="MQTT client id [default: reconad-<host>-<pid>].")] = None,
    mqtt_password_file: Annotated[
        Optional[Path],
        typer.Option(help="File (chmod 600) holding the MQTT password [default: $RECONAD_MQTT_PASSWORD]."),
    ] = None,
    mqtt_ca_file: Annotated[Optional[Path], typer.Option(help="mqtts: CA bundle for the broker [default: system's].")] = None,
    mqtt_cert_file: Annotated[Optional[Path], typer.Option(help="mqtts: client certificate.")] = None,
    mqtt_key_file: Annotated[Optional[Path], typer.Option(help="mqtts: the client certificate's key.")] = None,
    metrics_port: Annotated[
        Optional[int], typer.Option(min=0, max=65535, help="Serve Prometheus metrics at http://ADDRESS:PORT/metrics.")
    ] = None,
    metrics_address: Annotated[
        Optional[str], typer.Option(help="Address the metrics endpoint binds [default: 127.0.0.1, loopback only].")
    ] = None,
    jsonl_max_mb: Annotated[
        Optional[float], typer.Option(help="Rotate verdicts.jsonl past this size; 0 never [default: 100].")
    ] = None,
    jsonl_keep: Annotated[Optional[int], typer.Option(min=0, help="Rotated verdict logs kept [default: 20].")] = None,
    summary_interval_s: Annotated[
        Optional[float], typer.Option(help="Rewrite summary.json this often while running; 0 at the end only [default: 10].")
    ] = None,
    blind_checks: Annotated[
        Optional[BlindChecks], typer.Option(help="Camera-blind checks for live sources, always or never [default: live].")
    ] = None,
    black_level: Annotated[
        Optional[int], typer.Option(help="Black frame: 99% of gray levels at or below this [default: 30].")
    ] = None,
    saturated_level: Annotated[
        Optional[int], typer.Option(help="Saturated frame: 99% of gray levels at or above this [default: 225].")
    ] = None,
    flat_range: Annotated[
        Optional[int], typer.Option(help="Flat frame: 98% of gray levels within this range [default: 6].")
    ] = None,
    frozen_s: Annotated[
        Optional[float], typer.Option(help="Frozen camera: the identical frame for this long; 0 off [default: 3].")
    ] = None,
    width: Annotated[Optional[int], typer.Option(min=1, help="Capture width (files: rescale); with --height [default: the source's].")] = None,
    height: Annotated[Optional[int], typer.Option(min=1, help="Capture height [default: the source's].")] = None,
    fps: Annotated[Optional[float], typer.Option(help="Camera frame rate to request [default: the camera's].")] = None,
    flip: Annotated[Optional[Flip], typer.Option(help="Flip or rotate frames as nvvidconv does [default: none].")] = None,
    codec: Annotated[Optional[Codec], typer.Option(help="v4l2 cameras: raw or mjpeg [default: raw].")] = None,
    bit_depth: Annotated[
        Optional[int], typer.Option(min=1, max=16, help="Image files: real bit depth of 16-bit images without an sBIT chunk [default: 16].")
    ] = None,
    queue_size: Annotated[
        Optional[int], typer.Option(min=1, help="Frames waiting for inference before a camera drops the oldest [default: 4].")
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
    given = dict(locals())  # every option above, None where not given: the top layer over --config's
    flags = {name: value_of(value) for name, value in given.items() if name != "config"}
    from reconad.runtime.errors import ReconadError, exit_with
    from reconad.runtime.line.run_settings import read_run_settings
    from reconad.runtime.line.session import inspect_stream

    def report(line: str) -> None:
        typer.echo(line, err=True)

    try:
        settings = read_run_settings(config, flags)
        result = inspect_stream(
            settings.source,
            settings.model,
            settings.inspect_config(),
            settings.source_config(),
            backend=settings.backend,
            threshold=settings.threshold,
            category=settings.category,
            no_threshold=settings.no_threshold,
            num_threads=settings.num_threads,
            report=report,
            server=settings.server,
        )
    except ReconadError as error:
        exit_with(error)
    except KeyboardInterrupt:  # before the loop took over SIGINT (e.g. while the model loads)
        typer.echo("Interrupted before the loop started.", err=True)
        raise typer.Exit(130) from None
    typer.echo(result.headline())
    for line in result.stats.summary_lines():
        typer.echo(line)
    if settings.out is not None:
        typer.echo(f"stopped: {result.stop_reason}; verdicts in {settings.out / 'verdicts.jsonl'}")
    else:
        typer.echo(f"stopped: {result.stop_reason}")
    if result.failure is not None:
        typer.echo(result.failure, err=True)
        raise typer.Exit(result.exit_code)


@app.command("doctor")
def doctor(
    target: Annotated[Optional[Target], typer.Option("--for", help="Exit 1 unless this backend works here.")] = None,
    source: Annotated[
        Optional[str], typer.Option(help="Also open this camera, stream, video or folder and read one frame.")
    ] = None,
    json_report: Annotated[bool, typer.Option("--json", help="Print the environment and findings as JSON.")] = False,
    environment: Annotated[
        Optional[Path], typer.Option(help="Diagnose a recorded environment (a --json report) instead of this machine.")
    ] = None,
) -> None:
    """Say which backends, source kinds and video outputs work on this device, and what to install for the others (torch-free)."""
    import json

    from reconad.runtime import doctor as checks
    from reconad.runtime.config import read_text
    from reconad.runtime.errors import ReconadError, exit_with

    target = value_of(target)
    try:
        if environment is not None:
            try:
                recorded = json.loads(read_text(environment, "environment"))
            except json.JSONDecodeError as error:
                raise ReconadError(f"{environment} is not valid JSON ({error.msg} at line {error.lineno}).") from None
            env = checks.Environment.from_dict(recorded.get("environment", recorded))
        else:
            env = checks.probe_environment()
        findings = checks.diagnose(env)
        if source is not None:
            findings.append(checks.check_source(source))
    except ReconadError as error:
        exit_with(error)
    if json_report:
        payload = {"environment": env.to_dict(), "findings": [dataclasses.asdict(f) for f in findings]}
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(checks.render(findings))
    by_name = {finding.name: finding for finding in findings}
    failed = [name for name in ([target] if target else []) + ([source] if source else []) if not by_name[name].works]
    if failed or (target and not by_name["platform"].works):
        typer.echo(f"cannot work here: {', '.join(failed or ['platform'])}", err=True)
        raise typer.Exit(1)


@app.command("serve")
def serve(
    artifact: Annotated[Path, typer.Argument(help="The .onnx or .engine artifact, with its manifest.")],
    http_port: Annotated[Optional[int], typer.Option(help="Triton HTTP/REST port [default: 8000].")] = None,
    grpc_port: Annotated[Optional[int], typer.Option(help="Triton gRPC port [default: 8001].")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus metrics port [default: 8002].")] = None,
    address: Annotated[
        Optional[str], typer.Option(help="Address every endpoint binds to; loopback only unless named [default: 127.0.0.1].")
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="Triton model name [default: the artifact's run name].")] = None,
    max_batch: Annotated[
        Optional[int], typer.Option(help="Largest batch Triton forms [default: the manifest's max_batch].")
    ] = None,
    max_queue_delay_us: Annotated[
        Optional[int], typer.Option(help="How long a request may wait to be batched, in µs [default: 2000].")
    ] = None,
    backend: Annotated[Backend, typer.Option(help=_BACKEND_HELP)] = Backend("auto"),
    threshold: Annotated[
        Optional[float], typer.Option(help="Image threshold in raw score units [default: the manifest's].")
    ] = None,
    num_threads: Annotated[Optional[int], typer.Option(min=1, help="ONNX Runtime threads [default: all cores].")] = None,
    log_file: Annotated[
        Optional[Path], typer.Option(help="tritonserver's log [default: a new file in the temp folder].")
    ] = None,
) -> None:
    """Serve the Inspector from a Triton Inference Server (PyTriton) with dynamic batching across clients.

    Outputs per frame: the graph's (anomaly_map, image_score, ...) plus is_anomalous and threshold.
    Stops on Ctrl+C or SIGTERM (exit 0); exit 2 for bad input or a server that cannot start.
    """
    from reconad.runtime.config import resolve
    from reconad.runtime.errors import ReconadError, exit_with
    from reconad.runtime.serve import ServeConfig, serve_artifact

    try:
        config = resolve(
            ServeConfig,
            dict(
                http_port=http_port,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                address=address,
                model_name=name,
                max_batch=max_batch,
                max_queue_delay_us=max_queue_delay_us,
                log_file=log_file,
            ),
            what="serve options",
        )
        serve_artifact(
            artifact,
            config,
            backend=backend.value,
            threshold=threshold,
            num_threads=num_threads,
            report=lambda line: typer.echo(line, err=True),
        )
    except ReconadError as error:
        exit_with(error)
    typer.echo("server stopped", err=True)
