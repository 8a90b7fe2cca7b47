"""Inspection-loop throughput against bare backend throughput on the same artifact, and capture-to-decision latency.

Bare: ``backend.infer`` on one prepared batch, back to back. Loop: ``run_inspection`` over an in-memory
camera (camera-size BGR frames; crop, resize and colour conversion on the preprocessing workers) with the
JSONL sink, as a file source (not paced: it waits for inference and drops nothing). Live: the same camera
as a live source paced at ``--live-rate`` times the round's bare rate (default 1.5: inference is the
bottleneck and drops what it cannot take, the line's case), for as long as ``--frames`` verdicts take.
With ``--output`` each round runs twice more with those video outputs attached: as a file source (every
frame rendered and written: the loop waits for the outputs) and as the live camera (the outputs render
what they can, at most at their frame rate, below inference's priority: the case where rendering must not
slow inference; the headline is its live loop/bare). Each round measures its cells back to back; each
ratio is the median of the per-round ratios, which cancels slow drifts of a shared machine. (Until
2026-12-01 the live camera was not paced: it delivered its frames at once and the loop judged about five
of them, so the live numbers of earlier notes measured nothing.) Latency: a live camera paced at half the
bare rate (at most --camera-fps), so frames do not queue. Writes benchmarks/results/bench_loop.json and
bench_loop.md (git-ignored).

    .venv/bin/python benchmarks/bench_loop.py --model demo/model-256x256-fp32.onnx
    .venv/bin/python benchmarks/bench_loop.py        # the tiny contract graph of tests/runtime/onnx_graphs.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import reconad.runtime.line.loop as loop_module
from reconad.runtime.inspector import Inspector
from reconad.runtime.line.config import RENDER_MODES, InspectConfig
from reconad.runtime.line.loop import run_inspection
from reconad.runtime.line.preprocess import FramePreparer
from reconad.runtime.line.session import build_sinks
from reconad.runtime.frames import prepare_image
from reconad.runtime.line.sources import FrameSource, RawFrame

RESULTS = Path(__file__).resolve().parent / "results"


class MemoryCamera(FrameSource):
    """``count`` frames cycled from ``frames``; ``interval_s`` paces it like a camera (a live source)."""

    colour = "BGR"

    def __init__(self, frames: list[np.ndarray], count: int, interval_s: float = 0.0, live: bool | None = None) -> None:
        self.uri = "memory://camera"
        self.live = interval_s > 0 if live is None else live
        self.frames, self.count, self.interval_s = frames, count, interval_s
        self._read = 0
        self._next_s = 0.0

    def open(self) -> None:
        self._read = 0
        self._next_s = time.perf_counter()

    def read(self) -> RawFrame | None:
        if self._read >= self.count:
            return None
        if self.interval_s:
            self._next_s += self.interval_s
            time.sleep(max(0.0, self._next_s - time.perf_counter()))
        frame = self.frames[self._read % len(self.frames)]
        self._read += 1
        return RawFrame(frame, f"{self.uri}#{self._read}")

    def close(self) -> None:
        pass


def camera_frames(height: int, width: int, count: int = 8, scene: str = "noise") -> list[np.ndarray]:
    """``count`` BGR frames: uniform noise (the worst case for resizing and encoding), or ``"part"``: a lit
    part on a conveyor with sensor noise, as a line camera sees it (what video encoders are built for)."""
    rng = np.random.default_rng(0)
    if scene == "noise":
        return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(count)]
    rows, columns = np.mgrid[0:height, 0:width]
    radius = min(height, width) * 0.4
    base = np.where(((rows - height / 2) ** 2 + (columns - width / 2) ** 2) < radius**2, 150, 70)
    base = (base + 20 * np.sin(columns / 37.0))[:, :, None] * np.array([0.9, 1.0, 1.1])
    return [np.clip(base + rng.normal(0, 4, size=(height, width, 3)), 0, 255).astype(np.uint8) for _ in range(count)]


def bare_fps(inspector: Inspector, batch: np.ndarray, frames: int) -> float:
    calls = max(1, frames // len(batch))
    started = time.perf_counter()
    for _ in range(calls):
        inspector.backend.infer(batch)
    return calls * len(batch) / (time.perf_counter() - started)


class NormalPriorityPreparer(FramePreparer):
    """The preprocessing design before 2026-12-01: workers at normal priority, OpenCV's own threads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "background": False})


def loop_run(inspector: Inspector, frames: list[np.ndarray], count: int, batch_size: int, out: Path, interval_s=0.0,
             outputs: tuple[str, ...] = (), live: bool | None = None, render: str = "idle-process",
             preprocess: str = "background"):
    """One loop run; ``live`` (default: paced) makes the camera a live source, which drops what it must;
    ``preprocess="normal"`` runs it with the earlier preprocessing design (``NormalPriorityPreparer``)."""
    live = interval_s > 0 if live is None else live
    loop_module.FramePreparer = NormalPriorityPreparer if preprocess == "normal" else FramePreparer
    config = InspectConfig(out=out, batch_size=batch_size, overlays="none", stats_interval_s=0, outputs=outputs,
                           blind_checks="never", render=render)
    sinks = build_sinks(config, inspector.manifest, live=live)
    result = run_inspection(MemoryCamera(frames, count, interval_s, live), inspector, config, sinks, handle_signals=False)
    counters = result.stats.counters
    complete = counters["inspected"] + counters["dropped"] == count if live else counters["inspected"] == count
    if result.failure or not complete:
        raise SystemExit(f"loop run failed: {result.failure or counters}")
    return result.stats


def contract_artifact(folder: Path, input_hw: tuple[int, int]) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.runtime.onnx_graphs import write_artifact

    return write_artifact(folder, name="contract.onnx", input_hw=input_hw, max_batch=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path,
                        help="an .onnx or .engine artifact (give one: the default, a tiny contract graph that infers "
                             "at ~1500 fps, makes every ratio about the loop's own overhead, not a line's)")
    parser.add_argument("--backend", default="auto", help="as recon-inspect run --backend")
    parser.add_argument("--frames", type=int, default=300, help="verdicts per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every cell; ratios are medians over them")
    parser.add_argument("--batch-size", type=int, default=1, help="frames per inference call")
    parser.add_argument("--camera", default="720x1280", help="camera frame size HxW")
    parser.add_argument("--camera-fps", type=float, default=30.0, help="upper bound of the paced latency run")
    parser.add_argument("--num-threads", type=int, default=None, help="ONNX Runtime threads")
    parser.add_argument("--live-rate", type=float, default=1.5,
                        help="the live camera's frame rate as a multiple of the round's bare rate (> 1: inference is the bottleneck)")
    parser.add_argument("--render-modes", nargs="+", default=["idle-process"], choices=RENDER_MODES,
                        help="where the outputs render (InspectConfig.render): the first is the headline's, each "
                             "further one adds a live-camera-with-outputs cell per round, side by side")
    parser.add_argument("--scene", choices=("noise", "part"), default="noise", help="what the camera frames show")
    parser.add_argument("--compare-preprocess", action="store_true",
                        help="add a live-camera cell per round (no outputs) with the earlier preprocessing design: "
                             "workers at normal priority with OpenCV's own threads (line/preprocess.py)")
    parser.add_argument("--output", action="append", default=[],
                        help="also run each round with this video output attached (e.g. OUT.mp4, rtsp://@:8554/x); "
                             "'{round}' in it is replaced by the round number; repeatable")
    args = parser.parse_args()

    height, width = (int(value) for value in args.camera.split("x"))
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = args.model or contract_artifact(scratch / "model", (256, 256))
        with Inspector.open(model, args.backend, num_threads=args.num_threads) as inspector:
            frames = camera_frames(height, width, scene=args.scene)
            prepared = np.stack([prepare_image(frame, inspector.input_hw, colour="BGR") for frame in frames])
            batch = np.ascontiguousarray(prepared[np.arange(args.batch_size) % len(prepared)])  # [B, H, W, 3]
            inspector.backend.infer(batch)  # warm-up
            bare, loop, live, with_output, with_output_live, rendered = [], [], [], [], [], []
            other_modes = {mode: [] for mode in args.render_modes[1:]}
            normal_preprocess = []
            for round_index in range(args.rounds):
                first_bare = bare_fps(inspector, batch, args.frames)
                # A live camera faster than inference (the line's case): paced at --live-rate x this round's
                # bare rate for as long as the loop needs for --frames verdicts, so inference never waits for
                # a frame and the camera never ends before the measurement does.
                camera_fps = args.live_rate * first_bare
                live_count = int(args.frames * args.live_rate)
                live_outputs = tuple(uri.replace("{round}", f"{round_index}-live") for uri in args.output)
                # the live cells in turn, reversed every other round (no cell always follows the same one)
                cells = [None] + (list(args.render_modes) if args.output else [])
                cells += ["normal-preprocess"] if args.compare_preprocess else []
                results = {}
                for cell in cells if round_index % 2 == 0 else cells[::-1]:
                    with_outputs = cell in RENDER_MODES
                    stats = loop_run(inspector, frames, live_count, args.batch_size,
                                     scratch / f"live-{cell}{round_index}", 1.0 / camera_fps,
                                     outputs=live_outputs if with_outputs else (),
                                     render=cell if with_outputs else "idle-process",
                                     preprocess="normal" if cell == "normal-preprocess" else "background")
                    video = stats.sinks.get("video")
                    results[cell] = (stats.mean_fps, (video.written if video else 0) / max(1, stats.counters["inspected"]),
                                     stats.counters["inspected"])
                live.append(results[None][0])
                if args.compare_preprocess:
                    normal_preprocess.append(results["normal-preprocess"][0])
                stats = loop_run(inspector, frames, args.frames, args.batch_size, scratch / f"loop{round_index}")
                loop.append(stats.mean_fps)
                if args.output:
                    outputs = tuple(uri.replace("{round}", str(round_index)) for uri in args.output)
                    stats = loop_run(inspector, frames, args.frames, args.batch_size, scratch / f"out{round_index}",
                                     outputs=outputs)
                    with_output.append(stats.mean_fps)
                # the round's bare rate: the mean of one measured before and one after its cells
                bare.append(0.5 * (first_bare + bare_fps(inspector, batch, args.frames)))
                line = (f"round {round_index + 1}: bare {bare[-1]:.1f} fps, loop {loop[-1]:.1f} fps, "
                        f"live camera at {camera_fps:.0f} fps {live[-1]:.1f} fps")
                if args.output:
                    line += f", file source with {len(outputs)} output(s) {with_output[-1]:.1f} fps"
                    fps, fraction, inspected = results[args.render_modes[0]]
                    with_output_live.append(fps)
                    rendered.append(fraction)
                    line += f", live camera with output(s) {fps:.1f} fps ({inspected} inspected, {fraction:.0%} rendered)"
                    for mode in args.render_modes[1:]:
                        fps, fraction, _ = results[mode]
                        other_modes[mode].append((fps, fraction))
                        line += f", rendered as {mode} {fps:.1f} fps ({fraction:.0%} rendered)"
                if args.compare_preprocess:
                    line += f", live camera with the earlier preprocessing {normal_preprocess[-1]:.1f} fps"
                print(line, flush=True)
            paced_fps = min(args.camera_fps, 0.5 * statistics.median(bare))
            paced_frames = max(50, min(args.frames, int(paced_fps * 20)))  # at most ~20 s
            paced = loop_run(inspector, frames, paced_frames, args.batch_size, scratch / "paced", 1.0 / paced_fps)
            latency_p50 = paced.latency_ms["capture_to_decision"]["p50"]
            latency_p99 = paced.latency_ms["capture_to_decision"]["p99"]
            backend = inspector.backend.name
            input_hw = inspector.input_hw
    bare_median, loop_median = statistics.median(bare), statistics.median(loop)
    ratios = [loop_fps / bare_fps for bare_fps, loop_fps in zip(bare, loop)]
    record = {
        "model": str(args.model) if args.model else "tiny contract graph (tests/runtime/onnx_graphs.py)",
        "input_hw": list(input_hw),
        "camera_hw": [height, width],
        "scene": args.scene,
        "backend": backend,
        "batch_size": args.batch_size,
        "frames_per_measurement": args.frames,
        "rounds": args.rounds,
        "bare_fps": [round(value, 2) for value in bare],
        "loop_fps": [round(value, 2) for value in loop],
        "bare_fps_median": round(bare_median, 2),
        "loop_fps_median": round(loop_median, 2),
        "loop_to_bare_per_round": [round(ratio, 3) for ratio in ratios],
        "loop_to_bare": round(statistics.median(ratios), 3),
        "live_rate": args.live_rate,
        "live_fps": [round(value, 2) for value in live],
        "live_to_bare_per_round": [round(w / b, 3) for b, w in zip(bare, live)],
        "live_to_bare": round(statistics.median([w / b for b, w in zip(bare, live)]), 3),
        "outputs": args.output,
        "loop_with_outputs_fps": [round(value, 2) for value in with_output],
        "loop_with_outputs_to_bare_per_round": [round(w / b, 3) for b, w in zip(bare, with_output)],
        "loop_with_outputs_to_bare": round(statistics.median([w / b for b, w in zip(bare, with_output)]), 3)
        if with_output else None,
        "live_with_outputs_fps": [round(value, 2) for value in with_output_live],
        "live_with_outputs_to_bare_per_round": [round(w / b, 3) for b, w in zip(bare, with_output_live)],
        "live_with_outputs_to_bare": round(statistics.median([w / b for b, w in zip(bare, with_output_live)]), 3)
        if with_output_live else None,
        "live_outputs_rendered_fraction": [round(value, 3) for value in rendered],
        "live_with_outputs_to_live": round(statistics.median([w / b for b, w in zip(live, with_output_live)]), 3)
        if with_output_live else None,
        "render_mode": args.render_modes[0],
        "other_render_modes": {
            mode: {"live_fps": [round(fps, 2) for fps, _ in cells],
                   "live_to_bare": round(statistics.median([fps / b for b, (fps, _) in zip(bare, cells)]), 3),
                   "rendered_fraction": [round(fraction, 3) for _, fraction in cells]}
            for mode, cells in other_modes.items()
        },
        "live_normal_preprocess_fps": [round(value, 2) for value in normal_preprocess],
        "live_normal_preprocess_to_bare": round(statistics.median([w / b for b, w in zip(bare, normal_preprocess)]), 3)
        if normal_preprocess else None,
        "num_threads": args.num_threads,
        "paced_fps": round(paced_fps, 2),
        "paced_frames": paced_frames,
        "capture_to_decision_ms": {"p50": latency_p50, "p99": latency_p99},
        "paced_latency_ms": paced.latency_ms,
        "load_average_before": load_before,
        "load_average_after": round(os.getloadavg()[0], 2),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_loop.json").write_text(json.dumps(record, indent=2) + "\n")
    table = [
        "| model | backend | threads | input | camera | batch | bare fps | loop fps | loop/bare | live/bare "
        "| live/bare with outputs | loop/bare with outputs | paced fps | capture→decision p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {Path(record['model']).name if args.model else 'contract graph'} | {backend} | "
        f"{args.num_threads or 'all cores'} | {input_hw[0]}x{input_hw[1]} "
        f"| {height}x{width} | {args.batch_size} | {bare_median:.1f} | {loop_median:.1f} | {record['loop_to_bare']:.3f} "
        f"| {record['live_to_bare']:.3f} "
        f"| {format(record['live_with_outputs_to_bare'], '.3f') if with_output_live else '-'} "
        f"| {format(record['loop_with_outputs_to_bare'], '.3f') if with_output else '-'} "
        f"| {paced_fps:.1f} | {latency_p50:.1f} / {latency_p99:.1f} |",
        "",
        f"ONNX Runtime threads: {args.num_threads or 'all cores'}; "
        f"load average {record['load_average_before']} before, {record['load_average_after']} after; live camera at "
        f"{args.live_rate}x the bare rate (per round: live/bare {record['live_to_bare_per_round']})",
    ]
    if with_output:
        table += ["", f"with outputs {', '.join(args.output)} (rendered as {args.render_modes[0]}): loop/bare {record['loop_with_outputs_to_bare']:.3f} as a file "
                      f"source (every frame rendered and written; median of {record['loop_with_outputs_to_bare_per_round']}), "
                      f"**{record['live_with_outputs_to_bare']:.3f} as a live camera** (median of "
                      f"{record['live_with_outputs_to_bare_per_round']}; {record['live_with_outputs_to_live']:.3f} of the "
                      f"live loop without outputs; outputs rendered {[f'{value:.0%}' for value in rendered]} of the "
                      "inspected frames)"]
    for mode, cells in record["other_render_modes"].items():
        table += ["", f"rendered as {mode} instead: live loop/bare {cells['live_to_bare']:.3f} (per round "
                      f"{[round(fps / b, 3) for b, fps in zip(bare, cells['live_fps'])]}; rendered "
                      f"{[f'{value:.0%}' for value in cells['rendered_fraction']]})"]
    if normal_preprocess:
        table += ["", f"with the earlier preprocessing (workers at normal priority, OpenCV's own threads): live/bare "
                      f"{record['live_normal_preprocess_to_bare']:.3f} (per round "
                      f"{[round(w / b, 3) for b, w in zip(bare, normal_preprocess)]})"]
    (RESULTS / "bench_loop.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
