"""What one inspection run is given and what it returns: ``InspectConfig`` (every ``recon-inspect run``
option the loop and its sinks read, checked when built), what the loop needs of its inspector and its
metrics (``FrameInspector``, ``StatsObserver``), and ``LoopResult`` (how the run ended)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import numpy as np

from reconad.runtime.errors import ReconadError
from reconad.runtime.frames import Roi
from reconad.runtime.inspector import Verdict
from reconad.runtime.line.blind import BLIND_CHECKS, BlindConfig
from reconad.runtime.line.mqtt import MqttConfig
from reconad.runtime.line.outputs import check_output_files
from reconad.runtime.line.sinks import OVERLAY_MODES, OverlaySink
from reconad.runtime.line.stats import LoopStats, StatsSnapshot

EXIT_INFERENCE_FAILED = 3  # the model raised or hung: not the operator's input (that is exit code 2)
# idle-process: a child process under SCHED_IDLE (it runs only on a core nothing else wants, and any waking
# inference thread preempts it at once); low-priority-process: a child at nice 19; thread: a sink thread
# of the loop's own process at nice +10 (shares the interpreter lock with inference)
RENDER_MODES = ("idle-process", "low-priority-process", "thread")


@dataclasses.dataclass(frozen=True)
class InspectConfig:
    """Settings of one ``recon-inspect run``; each field is the option of the same name."""

    max_frames: int | None = None  # stop after this many verdicts; None: until the stream ends or a signal
    roi: Roi | None = None  # (x, y, width, height) of every frame the model sees
    batch_size: int = 1  # frames per inference call: more raises throughput and latency
    queue_size: int = 4  # frames waiting for inference; a live source drops the oldest beyond this
    preprocess_threads: int = 2  # crop/resize workers: one core cannot resize 720p+ as fast as a GPU infers
    blind_checks: str = "live"  # camera-blind checks for: live sources (a folder may hold dark images), always, never
    blind: BlindConfig = BlindConfig()  # their thresholds (black, saturated, flat, frozen)
    reconnect_initial_s: float = 0.5  # first wait before reopening a lost camera; doubles per failure
    reconnect_max_s: float = 10.0
    stall_s: float = 5.0  # a live source silent this long is reported as stalled
    stats_interval_s: float = 5.0  # status line period; 0 for none
    inference_timeout_s: float = 60.0  # a batch that has not returned after this long is a hung backend
    drain_timeout_s: float = 10.0  # at stop, how long queues may take to drain
    summary_interval_s: float = 10.0  # summary.json is rewritten this often while running; 0: only at the end
    out: Path | None = None  # folder of verdicts.jsonl, overlays/ and summary.json; None: no files
    jsonl_max_mb: float = 100.0  # verdicts.jsonl is rotated (verdicts.jsonl.1, .2...) past this size; 0: never
    jsonl_keep: int = 20  # rotated files kept (the oldest is deleted)
    overlays: str = "anomalies"  # which frames get a heatmap overlay PNG: anomalies, all or none
    overlay_interval_s: float | None = None  # at most one overlay per this many s; None: 1 live, 0 files
    overlay_quota_mb: float = 500.0  # no more overlays once overlays/ holds this much
    overlay_min_free_mb: float = 200.0  # nor while the disk has less free than this
    webhook: str | None = None  # http(s) URL receiving a JSON POST per anomaly and camera-blind episode
    webhook_timeout_s: float = 2.0
    webhook_retries: int = 3  # more attempts after a failure, with exponential backoff
    webhook_headers: tuple[str, ...] = ()  # "Name: value" request headers (not Authorization: see below)
    webhook_auth_file: Path | None = None  # first line is the Authorization header; else $RECONAD_WEBHOOK_AUTHORIZATION
    mqtt: MqttConfig | None = None  # verdicts to an MQTT broker (line/mqtt.py)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: any free one)
    metrics_address: str | None = None  # the address it binds; None: 127.0.0.1 (loopback only)
    outputs: tuple[str, ...] = ()  # video outputs: display://0, rtsp://[address]:port/path, FILE.mp4 (line/outputs.py)
    render: str = "idle-process"  # where video outputs render and encode: RENDER_MODES (line/render_process.py)

    def __post_init__(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise ReconadError(f"max_frames must be at least 1, got {self.max_frames}.")
        if self.batch_size < 1 or self.queue_size < 1 or self.preprocess_threads < 1:
            raise ReconadError("batch_size, queue_size and preprocess_threads must be at least 1.")
        if self.overlays not in OVERLAY_MODES:
            raise ReconadError(f"Overlay mode must be one of {list(OVERLAY_MODES)}, got {self.overlays!r}.")
        if self.blind_checks not in BLIND_CHECKS:
            raise ReconadError(f"Camera-blind checks must be one of {list(BLIND_CHECKS)}, got {self.blind_checks!r}.")
        if self.render not in RENDER_MODES:
            raise ReconadError(f"render must be one of {list(RENDER_MODES)}, got {self.render!r}.")
        check_output_files(self.outputs)  # each URI parsed and no file named twice, before any model loads
        if self.jsonl_max_mb < 0 or self.jsonl_keep < 0 or self.summary_interval_s < 0:
            raise ReconadError("jsonl_max_mb, jsonl_keep and summary_interval_s must be >= 0.")


@dataclasses.dataclass(frozen=True)
class LoopResult:
    """How a run ended.

    Attributes:
        stop_reason: ``"end of stream"``, ``"max frames"``, ``"SIGINT"``, ``"SIGTERM"`` or ``"failure"``.
        stats: the final statistics.
        failure: one sentence when the run failed, else None.
        exit_code: 0; 2 for bad input found while running (e.g. a ROI outside the frames);
            ``EXIT_INFERENCE_FAILED`` when inference raised or hung.
        backend: the backend that ran, when known (``reconad.runtime.line.session.inspect_stream`` sets it).
    """

    stop_reason: str
    stats: StatsSnapshot
    failure: str | None = None
    exit_code: int = 0
    backend: str | None = None

    def headline(self) -> str:
        """``3 frames inspected on ort-cpu: 2 anomalous, 0 unknown, 1 unreadable, 0 camera-blind, 0 dropped, 2 overlays``."""
        counters = self.stats.counters
        overlays = self.stats.sinks.get(OverlaySink.name)
        text = f"{counters['inspected']} frames inspected on {self.backend or 'an inspector'}: "
        text += f"{counters['anomalous']} anomalous, {counters['unknown']} unknown, "
        text += f"{counters['corrupt']} unreadable, {counters['blind']} camera-blind, "
        text += f"{counters['dropped']} dropped"
        return text + (f", {overlays.written} overlays" if overlays is not None else "")


class StatsObserver(Protocol):
    """What the loop needs from ``line/prometheus.LineMetrics``: the run's stats, and every latency sample."""

    def bind(self, stats: LoopStats) -> None: ...

    def observe_latency(self, stage: str, latency_ms: float) -> None: ...


class FrameInspector(Protocol):
    """What the loop needs from ``reconad.runtime.Inspector``."""

    @property
    def input_hw(self) -> tuple[int, int]: ...

    def inspect(self, frames: np.ndarray) -> list[Verdict]:
        """Verdicts for uint8 [N, H, W, 3] RGB frames at ``input_hw``."""
        ...
