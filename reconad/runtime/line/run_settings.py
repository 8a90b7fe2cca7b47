"""Every ``recon-inspect run`` option as one record, so a TOML file (``--config``) can hold any of them.

Precedence, through ``reconad.runtime.config.resolve`` as for the train config and build profiles:
these defaults < the file (its ``[run]`` table, or its top level) < the flags given on the command line.
Keys are the flags' names with underscores (``max_frames = 100``, ``output = ["line.mp4"]``,
``mqtt = "mqtt://broker/line1"``); an unknown key or a wrong type is refused in one sentence naming it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reconad.runtime.config import load_toml, resolve
from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import parse_roi
from reconad.runtime.line.config import InspectConfig
from reconad.runtime.line.sources import SourceConfig

_MQTT_DETAILS = ("qos", "events", "retain", "client_id", "password_file", "ca_file", "cert_file", "key_file")
_BLIND = ("black_level", "saturated_level", "flat_range", "frozen_s")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The options of ``recon-inspect run``, each named as its flag (``--max-frames`` is ``max_frames``).

    None means "not given": the default of the record the option feeds (``InspectConfig``,
    ``SourceConfig``, ``MqttConfig``, ``BlindConfig``, the Inspector) applies. Choices and ranges are
    checked by those records, in one sentence each.
    """

    source: str | None = None  # the SOURCE argument: csi://N, v4l2:///dev/videoN, rtsp://..., a file or folder
    model: Path | None = None
    server: str | None = None
    out: Path | None = None
    max_frames: int | None = None
    loop: bool = False
    roi: str | None = None  # "X,Y,W,H"
    backend: str = "auto"
    threshold: float | None = None
    no_threshold: bool = False
    category: str | None = None
    batch_size: int | None = None
    overlays: str | None = None
    overlay_interval_s: float | None = None
    overlay_quota_mb: float | None = None
    webhook: str | None = None
    webhook_timeout_s: float | None = None
    webhook_retries: int | None = None
    webhook_header: tuple[str, ...] = ()
    webhook_auth_file: Path | None = None
    output: tuple[str, ...] = ()
    mqtt: str | None = None
    mqtt_qos: int | None = None
    mqtt_events: str | None = None
    mqtt_retain: bool | None = None
    mqtt_client_id: str | None = None
    mqtt_password_file: Path | None = None
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    metrics_port: int | None = None
    metrics_address: str | None = None
    jsonl_max_mb: float | None = None
    jsonl_keep: int | None = None
    summary_interval_s: float | None = None
    blind_checks: str | None = None
    black_level: int | None = None
    saturated_level: int | None = None
    flat_range: int | None = None
    frozen_s: float | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    flip: str | None = None
    codec: str | None = None
    bit_depth: int | None = None
    queue_size: int | None = None
    preprocess_threads: int | None = None
    stats_interval_s: float | None = None
    inference_timeout_s: float | None = None
    num_threads: int | None = None

    def inspect_config(self) -> InspectConfig:
        """The loop's settings. Raises ReconadError for ``--mqtt-*`` details without ``--mqtt`` or a bad value."""
        mqtt = None
        if self.mqtt is not None:
            mqtt = {"uri": self.mqtt, **{name: getattr(self, f"mqtt_{name}") for name in _MQTT_DETAILS}}
        elif any(getattr(self, f"mqtt_{name}") is not None for name in _MQTT_DETAILS):
            raise ReconadError("The --mqtt-* options need --mqtt URI.")
        blind = {name: getattr(self, name) for name in _BLIND if getattr(self, name) is not None}
        return resolve(
            InspectConfig,
            dict(
                blind=blind or None,
                blind_checks=self.blind_checks,
                mqtt={key: value for key, value in mqtt.items() if value is not None} if mqtt else None,
                outputs=self.output or None,
                metrics_port=self.metrics_port,
                metrics_address=self.metrics_address,
                webhook_retries=self.webhook_retries,
                webhook_headers=self.webhook_header or None,
                webhook_auth_file=self.webhook_auth_file,
                jsonl_max_mb=self.jsonl_max_mb,
                jsonl_keep=self.jsonl_keep,
                summary_interval_s=self.summary_interval_s,
                out=self.out,
                max_frames=self.max_frames,
                roi=parse_roi(self.roi) if self.roi else None,
                batch_size=self.batch_size,
                overlays=self.overlays,
                overlay_interval_s=self.overlay_interval_s,
                overlay_quota_mb=self.overlay_quota_mb,
                webhook=self.webhook,
                webhook_timeout_s=self.webhook_timeout_s,
                queue_size=self.queue_size,
                preprocess_threads=self.preprocess_threads,
                stats_interval_s=self.stats_interval_s,
                inference_timeout_s=self.inference_timeout_s,
            ),
            what="run options",
        )

    def source_config(self) -> SourceConfig:
        """How to open the source. Raises ReconadError for a bad flip, codec or size."""
        fields = ("width", "height", "fps", "flip", "codec", "loop", "bit_depth")
        return resolve(SourceConfig, {name: getattr(self, name) for name in fields}, what="run options")


def read_run_settings(config_file: str | os.PathLike | None, flags: Mapping[str, Any]) -> RunSettings:
    """The defaults < ``config_file``'s ``[run]`` table (or top level) < ``flags`` (None: not given).

    Raises:
        ReconadError: an unreadable or invalid file; ``"run config line.toml has unknown key(s) 'colour'
            (known: ...)"``; ``"run config line.toml key max_frames must be an integer, got '10'"``; no
            source in either.
    """
    table: Mapping[str, Any] = {}
    what = "run options"
    if config_file is not None:
        what = f"run config {config_file}"
        data = load_toml(config_file, "run config")
        table = data.get("run", data) if isinstance(data.get("run"), Mapping) else data
    settings = resolve(RunSettings, table, flags, what=what)
    if settings.source is None:
        raise ReconadError(f"Give the SOURCE to inspect on the command line{' or as source in ' + str(config_file) if config_file else ''}.")
    return settings
