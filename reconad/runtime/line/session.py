"""One ``recon-inspect run``: open the artifact and the source, build the sinks (and the metrics endpoint),
run the loop, keep summary.json up to date.

The loop itself (``loop.py``) knows nothing of files and URIs; this module turns the command's settings
into a source, an Inspector and sinks, and leaves the run's summary beside its verdicts.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path

from reconad.runtime.atomic import write_text_atomic
from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Inspector
from reconad.runtime.thresholds import OperatingPoint
from reconad.runtime.line.config import InspectConfig, LoopResult
from reconad.runtime.line.loop import run_inspection
from reconad.runtime.line.stats import StatsSnapshot
from reconad.runtime.line.report import report_stderr
from reconad.runtime.line.secrets import secret_from
from reconad.runtime.line.sinks import (
    VERDICTS_FILE,
    JsonlSink,
    OverlaySink,
    Sink,
    describe_error,
)
from reconad.runtime.line.webhook import WEBHOOK_AUTHORIZATION_ENV, WebhookSink, parse_headers
from reconad.runtime.line.sources import ImageFolderSource, SourceConfig, open_source
from reconad.runtime.manifest import Manifest

SUMMARY_FILE = "summary.json"


def _iso_now_ms() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def overlay_scales(point: OperatingPoint) -> tuple[float | None, float | None, float | None]:
    """(low, high, pixel threshold) of an overlay's heat scale, from an operating point."""
    normalization, pixel = point.score_normalization, point.pixel_threshold
    return (
        normalization.low if normalization else None,
        normalization.high if normalization else None,
        pixel.value if pixel else None,
    )


def build_sinks(
    config: InspectConfig,
    manifest: Manifest | None,
    *,
    live: bool = True,
    name_by_file: bool = False,
    run_id: str | None = None,
    fps: float | None = None,
    warn: Callable[[str], None] = report_stderr,
) -> list[Sink]:
    """The sinks ``config`` asks for: JSONL log and overlays in ``config.out``, the webhook, MQTT, video
    outputs and the Prometheus metrics sink (``LineMetrics``; its HTTP server is ``inspect_stream``'s).

    When one cannot be made (a bad URI, a taken port, a missing package) those already made are closed
    and the ``ReconadError`` is raised: nothing is left listening or half-open.

    Args:
        live: the source is a camera or stream, so overlays are rate-limited by default.
        name_by_file: the source is an image folder: overlays are named after its files, not frame numbers.
        fps: the source's frame rate (``--fps``, else what the source reports), for the video outputs'
            frame rate and a live source's rendering cap (None: 30).
    """
    sinks: list[Sink] = []
    try:
        _add_sinks(sinks, config, manifest, live=live, name_by_file=name_by_file, run_id=run_id, fps=fps, warn=warn)
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _add_sinks(sinks: list[Sink], config: InspectConfig, manifest: Manifest | None, *, live: bool, name_by_file: bool,
               run_id: str | None, fps: float | None, warn: Callable[[str], None]) -> None:
    normalization = manifest.score_normalization if manifest else None
    pixel = manifest.pixel_threshold if manifest else None
    low = normalization.low if normalization else None
    high = normalization.high if normalization else None
    global_scale = (low, high, pixel.value if pixel else None)
    product_scales = {category: overlay_scales(manifest.operating_point(category))
                      for category in manifest.category_thresholds} if manifest else {}
    if config.out is not None:
        out = Path(config.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ReconadError(f"Cannot create the output folder {out}: {error.strerror}.") from None
        sinks.append(JsonlSink(out / VERDICTS_FILE, run_id=run_id, max_bytes=int(config.jsonl_max_mb * 1e6),
                               keep=config.jsonl_keep))
        if config.overlays != "none":
            sinks.append(
                OverlaySink(
                    out,
                    mode=config.overlays,
                    name_by_file=name_by_file,
                    min_interval_s=config.overlay_interval_s if config.overlay_interval_s is not None else float(live),
                    quota_mb=config.overlay_quota_mb,
                    min_free_mb=config.overlay_min_free_mb,
                    low=low,
                    high=high,
                    pixel_threshold=pixel.value if pixel else None,
                    scales=(lambda category: product_scales.get(category, global_scale)) if manifest else None,
                    warn=warn,
                )
            )
    if config.webhook:
        authorization = secret_from(config.webhook_auth_file, WEBHOOK_AUTHORIZATION_ENV, "webhook authorization")
        sinks.append(WebhookSink(config.webhook, timeout_s=config.webhook_timeout_s, retries=config.webhook_retries,
                                 headers=parse_headers(config.webhook_headers), authorization=authorization))
    if config.mqtt is not None:
        from reconad.runtime.line.mqtt import MqttSink

        sinks.append(MqttSink(config.mqtt, run_id=run_id, warn=warn))
    if config.outputs:
        # a live source renders at most at the outputs' frame rate; a file source renders every frame
        options = {"low": low, "high": high, "pixel_threshold": pixel.value if pixel else None,
                   "max_fps": (fps or 30.0) if live else None,
                   "scales": product_scales}  # each product at its own scale and pixel threshold, as its overlays
        if config.render != "thread":
            from reconad.runtime.line.render_process import RenderProcessSink

            sinks.append(RenderProcessSink(config.outputs, fps=fps or 30.0, idle=config.render == "idle-process",
                                           **options))
        else:
            from reconad.runtime.line.outputs import open_outputs
            from reconad.runtime.line.video_sink import VideoOutputSink

            sinks.append(VideoOutputSink(open_outputs(config.outputs, fps=fps or 30.0), **options))
    if config.metrics_port is not None:
        from reconad.runtime.line.prometheus import LineMetrics

        metrics = LineMetrics()
        for sink in sinks:
            if sink.name == "mqtt":
                metrics.watch_mqtt(sink)
        sinks.append(metrics)


def _progress(summary: dict, sinks: list[Sink], snapshot: StatsSnapshot, running: bool) -> dict:
    """``summary`` with the run's state: running or not, when, the counters and the sinks' own counts."""
    progress = {"stop_reason": None, "failure": None, **summary, "running": running, "updated": _iso_now_ms(),
                **snapshot.to_dict()}
    for sink in sinks:
        if sink.name == "mqtt":
            progress["mqtt"] = dataclasses.asdict(sink.counters())
        elif sink.name == "video":
            progress["outputs"] = [
                {"uri": output.uri, "frames_written": output.frames_written,
                 **({"url": output.url} if getattr(output, "url", None) else {}),
                 **({"failed": output.failed} if getattr(output, "failed", None) else {})}
                for output in sink.outputs
            ]
    return progress


def inspect_stream(
    uri: str,
    artifact: str | os.PathLike | None,
    config: InspectConfig = InspectConfig(),
    source_config: SourceConfig = SourceConfig(),
    *,
    backend: str = "auto",
    threshold: float | None = None,
    category: str | None = None,
    no_threshold: bool = False,
    num_threads: int | None = None,
    report: Callable[[str], None] = report_stderr,
    server: str | None = None,
) -> LoopResult:
    """``recon-inspect run``: open the artifact (or server) and the source, run the loop, write ``summary.json``
    (every ``config.summary_interval_s`` while running, ``"running": true``, and at the end).

    The source is opened before any sink creates a file. When the run cannot start (bad artifact,
    source that does not open), ``summary.json`` says it failed and why, and the error is raised.

    Args:
        uri: ``csi://N``, ``v4l2:///dev/videoN``, ``rtsp://...``, a video file or an image folder.
        artifact: ``.onnx`` or ``.engine`` with its manifest; None with ``server``.
        backend: see ``reconad.runtime.inspector.BACKEND_CHOICES``.
        threshold: one image threshold for every image (raw score units), instead of the manifest's.
        category: judge every image as this category, whatever the model names.
        no_threshold: scores only: no image is judged.
        num_threads: ONNX Runtime intra-op threads; None for all cores.
        server: ``grpc://host:port/MODEL`` or ``http://...``: infer on a Triton server instead
            (``reconad.runtime.remote``); an unreachable server is retried like a lost camera.

    Raises:
        ReconadError: among others, the artifact carries no calibration for some image it may judge
            (``Inspector.missing_calibration``) and neither ``threshold`` nor ``no_threshold`` is given.
    """
    if (artifact is None) == (server is None):
        raise ReconadError("Give either --model ARTIFACT or --server URL.")
    if config.outputs:
        from reconad.runtime.line.outputs import check_output_files

        check_output_files(config.outputs, source=uri)  # the run would overwrite what it reads
    if server is not None and (category is not None or no_threshold):
        raise ReconadError("--category and --no-threshold work with --model; a Triton server judges with its own manifest.")
    if server is not None:
        from reconad.runtime.remote import RemoteInspector, parse_server_url

        parse_server_url(server)  # a malformed URL is named before the source is looked at
    run_id = _iso_now_ms()
    summary = {"run": run_id, "source": uri, "model": str(server or artifact),
               "judged": {"category": category, "threshold": threshold, "no_threshold": no_threshold}}
    try:
        source = open_source(uri, source_config)
        if server is not None:
            opened = RemoteInspector.open(server, threshold=threshold)
        else:
            opened = Inspector.open(artifact, backend, threshold=threshold, category=category, no_threshold=no_threshold,
                                    num_threads=num_threads)  # fmt: skip
        with opened as inspector:
            summary["backend"] = inspector.backend.name
            threads = getattr(inspector.backend, "num_threads", None)
            if threads is not None or inspector.backend.name == "ort-cpu":  # what --num-threads applied
                summary["num_threads"] = threads or "all cores"
            if server is not None:
                if not inspector.calibrated:  # a serve server sends its threshold with every answer
                    report("No image threshold: is_anomalous is null; run recon-inspect calibrate or pass --threshold.")
            else:
                inspector.require_calibration()  # before the source opens: a camera is not claimed for nothing
                if no_threshold:
                    report("Scores only (--no-threshold): no image is judged; decision and is_anomalous are null.")
            source.open()  # before any output exists: a source that cannot open leaves no empty verdict log
            shared = () if server is not None else inspector.judged_at_the_global_threshold()
            if shared:
                report(f"warning: {', '.join(shared)} "
                       f"{'has no threshold of its own' if len(shared) == 1 else 'have no thresholds of their own'} "
                       "and will be judged at the global one; calibrate per category "
                       f"(recon-inspect calibrate {artifact} DATA_ROOT, or --category NAME DIR).")
            try:
                by_file = isinstance(source, ImageFolderSource)
                sinks = build_sinks(config, inspector.manifest, live=source.live, name_by_file=by_file,
                                    run_id=run_id, fps=source_config.fps or source.frame_rate, warn=report)
            except BaseException:
                source.close()
                raise
            metrics = next((sink for sink in sinks if sink.name == "metrics"), None)
            endpoint = None
            try:
                if metrics is not None:
                    from reconad.runtime.line.prometheus import serve_metrics

                    endpoint = serve_metrics(metrics, config.metrics_port, config.metrics_address)
                    report(f"metrics on {endpoint.url}")
            except BaseException:
                source.close()
                for sink in sinks:
                    sink.close()
                raise
            for sink in sinks:
                for output in getattr(sink, "outputs", ()):
                    if getattr(output, "url", None):  # e.g. "rtsp://HOST:8554/inspect (listening on all ...)"
                        note = getattr(output, "note", None)
                        report(f"streaming to {output.url}" + (f" ({note})" if note else ""))

            def progress(snapshot: StatsSnapshot) -> None:
                _write_summary(config.out, _progress(summary, sinks, snapshot, running=True), report)

            batch_size = min(config.batch_size, inspector.backend.max_batch)
            try:
                result = run_inspection(
                    source, inspector, dataclasses.replace(config, batch_size=batch_size), sinks, report=report,
                    metrics=metrics, on_progress=progress if config.out is not None else None,
                )
            finally:
                if endpoint is not None:
                    endpoint.close()
            result = dataclasses.replace(result, backend=inspector.backend.name)
    except ReconadError as error:
        # Nothing was inspected: say so where monitoring looks, rather than leave no summary at all.
        _write_summary(config.out, {**summary, "running": False, "stop_reason": "failure", "failure": str(error)}, report)
        raise
    summary.update(stop_reason=result.stop_reason, failure=result.failure)
    _write_summary(config.out, _progress(summary, sinks, result.stats, running=False), report)
    return result


def _write_summary(out: Path | None, summary: dict, report: Callable[[str], None]) -> None:
    """Write ``out/summary.json`` atomically (no-op without ``out``); a failure to write is only reported."""
    if out is None:
        return
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(out) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    except OSError as error:
        report(f"warning: cannot write {SUMMARY_FILE}: {describe_error(error)}")
