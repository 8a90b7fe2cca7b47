"""One ``recon-inspect run``: open the artifact and the source, build the sinks, run the loop, write summary.json.

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
from reconad.runtime.line.report import report_stderr
from reconad.runtime.line.sinks import VERDICTS_FILE, JsonlSink, OverlaySink, Sink, WebhookSink, describe_error
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
    warn: Callable[[str], None] = report_stderr,
) -> list[Sink]:
    """The sinks ``config`` asks for: JSONL log and overlays in ``config.out``, and the webhook.

    Args:
        live: the source is a camera or stream, so overlays are rate-limited by default.
        name_by_file: the source is an image folder: overlays are named after its files, not frame numbers.
    """
    sinks: list[Sink] = []
    if config.out is not None:
        out = Path(config.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ReconadError(f"Cannot create the output folder {out}: {error.strerror}.") from None
        sinks.append(JsonlSink(out / VERDICTS_FILE, run_id=run_id))
        if config.overlays != "none":
            normalization = manifest.score_normalization if manifest else None
            pixel = manifest.pixel_threshold if manifest else None
            sinks.append(
                OverlaySink(
                    out,
                    mode=config.overlays,
                    name_by_file=name_by_file,
                    min_interval_s=config.overlay_interval_s if config.overlay_interval_s is not None else float(live),
                    quota_mb=config.overlay_quota_mb,
                    min_free_mb=config.overlay_min_free_mb,
                    low=normalization.low if normalization else None,
                    high=normalization.high if normalization else None,
                    pixel_threshold=pixel.value if pixel else None,
                    warn=warn,
                )
            )
    if config.webhook:
        sinks.append(WebhookSink(config.webhook, timeout_s=config.webhook_timeout_s))
    return sinks


def inspect_stream(
    uri: str,
    artifact: str | os.PathLike | None,
    config: InspectConfig = InspectConfig(),
    source_config: SourceConfig = SourceConfig(),
    *,
    backend: str = "auto",
    threshold: float | None = None,
    num_threads: int | None = None,
    report: Callable[[str], None] = report_stderr,
    server: str | None = None,
) -> LoopResult:
    """``recon-inspect run``: open the artifact (or server) and the source, run the loop, write ``summary.json``.

    The source is opened before any sink creates a file. When the run cannot start (bad artifact,
    source that does not open), ``summary.json`` says it failed and why, and the error is raised.

    Args:
        uri: ``csi://N``, ``v4l2:///dev/videoN``, ``rtsp://...``, a video file or an image folder.
        artifact: ``.onnx`` or ``.engine`` with its manifest; None with ``server``.
        backend: see ``reconad.runtime.inspector.BACKEND_CHOICES``.
        threshold: overrides the manifest's image threshold (raw score units).
        num_threads: ONNX Runtime intra-op threads; None for all cores.
        server: ``grpc://host:port/MODEL`` or ``http://...``: infer on a Triton server instead
            (``reconad.runtime.remote``); an unreachable server is retried like a lost camera.
    """
    if (artifact is None) == (server is None):
        raise ReconadError("Give either --model ARTIFACT or --server URL.")
    if server is not None:
        from reconad.runtime.remote import RemoteInspector, parse_server_url

        parse_server_url(server)  # a malformed URL is named before the source is looked at
    run_id = _iso_now_ms()
    summary = {"run": run_id, "source": uri, "model": str(server or artifact)}
    try:
        source = open_source(uri, source_config)
        if server is not None:
            opened = RemoteInspector.open(server, threshold=threshold)
        else:
            opened = Inspector.open(artifact, backend, threshold=threshold, num_threads=num_threads)
        with opened as inspector:
            summary["backend"] = inspector.backend.name
            # a serve server sends its threshold with every answer
            calibrated = inspector.calibrated if server is not None else inspector.threshold is not None
            if not calibrated:
                report("No image threshold: is_anomalous is null; run recon-inspect calibrate or pass --threshold.")
            source.open()  # before any output exists: a source that cannot open leaves no empty verdict log
            try:
                by_file = isinstance(source, ImageFolderSource)
                sinks = build_sinks(
                    config, inspector.manifest, live=source.live, name_by_file=by_file, run_id=run_id, warn=report
                )
            except BaseException:
                source.close()
                raise
            batch_size = min(config.batch_size, inspector.backend.max_batch)
            result = run_inspection(source, inspector, dataclasses.replace(config, batch_size=batch_size), sinks, report=report)
            result = dataclasses.replace(result, backend=inspector.backend.name)
    except ReconadError as error:
        # Nothing was inspected: say so where monitoring looks, rather than leave no summary at all.
        _write_summary(config.out, {**summary, "stop_reason": "failure", "failure": str(error)}, report)
        raise
    summary.update(stop_reason=result.stop_reason, failure=result.failure, **result.stats.to_dict())
    _write_summary(config.out, summary, report)
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
