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
from reconad.runtime.line.loop import InspectConfig, LoopResult, run_inspection
from reconad.runtime.line.stats import StatsSnapshot
from reconad.runtime.line.report import report_stderr
from reconad.runtime.line.secrets import secret_from
from reconad.runtime.line.sinks import (
    VERDICTS_FILE,
    WEBHOOK_AUTHORIZATION_ENV,
    JsonlSink,
    OverlaySink,
    Sink,
    WebhookSink,
    describe_error,
    parse_headers,
)
from reconad.runtime.line.sources import ImageFolderSource, SourceConfig, open_source
from reconad.runtime.manifest import Manifest

SUMMARY_FILE = "summary.json"


def _iso_now_ms() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


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
        fps: the source's frame rate, for video file outputs (None: 30).
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
        from reconad.runtime.line.outputs import VideoOutputSink, open_outputs

        outputs = open_outputs(config.outputs, fps=fps or 30.0)
        sinks.append(VideoOutputSink(outputs, low=low, high=high, pixel_threshold=pixel.value if pixel else None))
    if config.metrics_port is not None:
        from reconad.runtime.line.prometheus import LineMetrics

        metrics = LineMetrics()
        for sink in sinks:
            if sink.name == "mqtt":
                metrics.watch_mqtt(sink)
        sinks.append(metrics)


def _summary(run_id: str, uri: str, artifact: str | os.PathLike, backend: str, sinks: list[Sink],
             snapshot: StatsSnapshot, stop_reason: str | None, failure: str | None) -> str:
    summary = {
        "run": run_id,
        "source": uri,
        "model": str(artifact),
        "backend": backend,
        "running": stop_reason is None,
        "stop_reason": stop_reason,
        "failure": failure,
        "updated": _iso_now_ms(),
        **snapshot.to_dict(),
    }
    for sink in sinks:
        if sink.name == "mqtt":
            summary["mqtt"] = dataclasses.asdict(sink.counters())
        elif sink.name == "video":
            summary["outputs"] = [
                {"uri": output.uri, "frames_written": output.frames_written, **({"url": output.url} if hasattr(output, "url") else {})}
                for output in sink.outputs
            ]
    return json.dumps(summary, indent=2) + "\n"


def inspect_stream(
    uri: str,
    artifact: str | os.PathLike,
    config: InspectConfig = InspectConfig(),
    source_config: SourceConfig = SourceConfig(),
    *,
    backend: str = "auto",
    threshold: float | None = None,
    num_threads: int | None = None,
    report: Callable[[str], None] = report_stderr,
) -> LoopResult:
    """``recon-inspect run``: open the artifact and the source, run the loop, write ``summary.json``
    (every ``config.summary_interval_s`` while running, ``"running": true``, and at the end).

    Args:
        uri: ``csi://N``, ``v4l2:///dev/videoN``, ``rtsp://...``, a video file or an image folder.
        artifact: ``.onnx`` or ``.engine`` with its manifest.
        backend: see ``reconad.runtime.inspector.BACKEND_CHOICES``.
        threshold: overrides the manifest's image threshold (raw score units).
        num_threads: ONNX Runtime intra-op threads; None for all cores.
    """
    source = open_source(uri, source_config)
    run_id = _iso_now_ms()
    summary_path = Path(config.out) / SUMMARY_FILE if config.out is not None else None
    with Inspector.open(artifact, backend, threshold=threshold, num_threads=num_threads) as inspector:
        if inspector.threshold is None:
            report("No image threshold: is_anomalous is null; run recon-inspect calibrate or pass --threshold.")
        by_file = isinstance(source, ImageFolderSource)
        sinks = build_sinks(config, inspector.manifest, live=source.live, name_by_file=by_file, run_id=run_id,
                            fps=source_config.fps, warn=report)
        metrics = next((sink for sink in sinks if sink.name == "metrics"), None)
        server = None
        try:
            if metrics is not None:
                from reconad.runtime.line.prometheus import serve_metrics

                server = serve_metrics(metrics, config.metrics_port, config.metrics_address)
                report(f"metrics on {server.url}")
        except BaseException:
            for sink in sinks:
                sink.close()
            raise
        for sink in sinks:
            if getattr(sink, "outputs", None):
                for output in sink.outputs:
                    if hasattr(output, "url"):
                        report(f"streaming to {output.url}")

        def progress(snapshot: StatsSnapshot) -> None:
            text = _summary(run_id, uri, artifact, inspector.backend.name, sinks, snapshot, None, None)
            write_text_atomic(summary_path, text)

        batch_size = min(config.batch_size, inspector.backend.max_batch)
        try:
            result = run_inspection(source, inspector, dataclasses.replace(config, batch_size=batch_size), sinks,
                                    report=report, metrics=metrics, on_progress=progress if summary_path else None)
        finally:
            if server is not None:
                server.close()
        result = dataclasses.replace(result, backend=inspector.backend.name)
    if summary_path is not None:
        text = _summary(run_id, uri, artifact, inspector.backend.name, sinks, result.stats, result.stop_reason,
                        result.failure)
        try:
            write_text_atomic(summary_path, text)
        except OSError as error:
            report(f"warning: cannot write {SUMMARY_FILE}: {describe_error(error)}")
    return result
