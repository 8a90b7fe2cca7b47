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
from reconad.runtime.thresholds import OperatingPoint
from reconad.runtime.line.loop import InspectConfig, LoopResult, run_inspection
from reconad.runtime.line.report import report_stderr
from reconad.runtime.line.sinks import VERDICTS_FILE, JsonlSink, OverlaySink, Sink, WebhookSink, describe_error
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
            low, high, pixel = overlay_scales(manifest.global_operating_point) if manifest else (None, None, None)
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
                    pixel_threshold=pixel,
                    scales=(lambda category: overlay_scales(manifest.operating_point(category))) if manifest else None,
                    warn=warn,
                )
            )
    if config.webhook:
        sinks.append(WebhookSink(config.webhook, timeout_s=config.webhook_timeout_s))
    return sinks


def inspect_stream(
    uri: str,
    artifact: str | os.PathLike,
    config: InspectConfig = InspectConfig(),
    source_config: SourceConfig = SourceConfig(),
    *,
    backend: str = "auto",
    threshold: float | None = None,
    category: str | None = None,
    no_threshold: bool = False,
    num_threads: int | None = None,
    report: Callable[[str], None] = report_stderr,
) -> LoopResult:
    """``recon-inspect run``: open the artifact and the source, run the loop, write ``summary.json``.

    Args:
        uri: ``csi://N``, ``v4l2:///dev/videoN``, ``rtsp://...``, a video file or an image folder.
        artifact: ``.onnx`` or ``.engine`` with its manifest.
        backend: see ``reconad.runtime.inspector.BACKEND_CHOICES``.
        threshold: one image threshold for every image (raw score units), instead of the manifest's.
        category: judge every image as this category, whatever the model names.
        no_threshold: scores only: no image is judged.
        num_threads: ONNX Runtime intra-op threads; None for all cores.

    Raises:
        ReconadError: among others, the artifact carries no calibration for some image it may judge
            (``Inspector.missing_calibration``) and neither ``threshold`` nor ``no_threshold`` is given.
    """
    with Inspector.open(
        artifact, backend, threshold=threshold, category=category, no_threshold=no_threshold, num_threads=num_threads
    ) as inspector:
        inspector.require_calibration()  # before the source opens: a camera is not claimed for nothing
        source = open_source(uri, source_config)
        run_id = _iso_now_ms()
        if no_threshold:
            report("Scores only (--no-threshold): no image is judged; decision and is_anomalous are null.")
        by_file = isinstance(source, ImageFolderSource)
        sinks = build_sinks(config, inspector.manifest, live=source.live, name_by_file=by_file, run_id=run_id, warn=report)
        batch_size = min(config.batch_size, inspector.backend.max_batch)
        result = run_inspection(source, inspector, dataclasses.replace(config, batch_size=batch_size), sinks, report=report)
        result = dataclasses.replace(result, backend=inspector.backend.name)
    if config.out is not None:
        summary = {
            "run": run_id,
            "source": uri,
            "model": str(artifact),
            "backend": inspector.backend.name,
            "judged": {"category": category, "threshold": threshold, "no_threshold": no_threshold},
            "stop_reason": result.stop_reason,
            "failure": result.failure,
            **result.stats.to_dict(),
        }
        try:
            write_text_atomic(Path(config.out) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        except OSError as error:
            report(f"warning: cannot write {SUMMARY_FILE}: {describe_error(error)}")
    return result
