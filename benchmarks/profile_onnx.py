"""Where the fp32 ONNX graph spends its time on the CPU: ONNX Runtime's profiler, time shares by op type.

Exports a random-weight checkpoint of the preset (mvtec-512 by default) with ``export_onnx`` in a child
process (an in-process export grows the heap, see bench_onnx.py), then runs it on ONNX Runtime as the runtime
does (CPU provider, all graph optimisations, spinning off; the CPU memory arena on, ONNX Runtime's default, which
the runtime keeps only for the ort-cpu graph) with ``enable_profiling``, and sums the kernel time
of every node by op type, as run: after ONNX Runtime's fusions (``FusedConv`` is Conv + activation,
``FusedMatMul`` a MatMul with a folded transpose or scale, e.g. Q.K^T). MatMul, Gemm and Conv also get GFLOP/s from the
shapes the profiler records. The first run is a warm-up and left out. Measurement only: the graph is not
changed. ``--target ort-cpu`` profiles the ``to-onnx --target ort-cpu`` graph instead (attention as ONNX
Runtime's MultiHeadAttention); ``--target both`` exports both and profiles them in one process, run by run
interleaved (a busy machine slows both alike), with a before/after table by op type and the median of the
per-run wall-time ratios. Writes benchmarks/results/profile_onnx.json and profile_onnx.md.

    .venv/bin/python benchmarks/profile_onnx.py [--preset mvtec-512] [--runs 5] [--batch 1] [--threads N] [--reuse]
        [--target tensorrt|ort-cpu|both]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MATRIX_OPS = ("MatMul", "FusedMatMul", "Gemm", "Conv", "FusedConv")
# What ONNX Runtime's fused and layout op types stand for in the exported graph.
FUSED_OPS = {
    "FusedMatMul": "MatMul with a scale and/or an input Transpose folded in: the Q.K^T products (the "
                   "1/sqrt(head_dim) scale as alpha) and the input projection of the transposed tokens",
    "FusedConv": "Conv with its activation",
    "SkipLayerNormalization": "residual Add + LayerNormalization",
    "QuickGelu": "x * Sigmoid(x) (EfficientNet's Swish), alpha 1",
    "ReorderInput": "layout change to the NCHWc blocked format of its Conv kernels",
    "ReorderOutput": "layout change back from NCHWc",
    "MultiHeadAttention": "com.microsoft.MultiHeadAttention (ort-cpu graph): bias add and head split, "
                          "scale.Q.K^T + neighbour mask, Softmax and the V product of one attention",
}
TARGETS = ("tensorrt", "ort-cpu")


def export(preset: str, work: Path, targets: tuple[str, ...] = ("tensorrt",)) -> None:
    """A random-weight checkpoint of ``preset`` (seed 0) and its fp32 graph for each of ``targets`` (parity checked)."""
    import torch

    from reconad.export.onnx import export_onnx
    from reconad.model import PRESETS, build_detector, save_checkpoint

    config = PRESETS[preset]
    checkpoint = work / preset / "model.ckpt"
    torch.manual_seed(0)
    save_checkpoint(build_detector(config).eval(), checkpoint)
    for target in targets:
        export_onnx(checkpoint, work, precision="fp32", max_batch=8, target=target, overwrite=True)


def node_gflop(op_type: str, args: dict) -> float | None:
    """Multiply-adds x 2 of a MatMul / Gemm / Conv / MultiHeadAttention node from the profiler's recorded shapes, else None."""
    try:
        inputs = [list(next(iter(shape.values()))) for shape in args["input_type_shape"]]
        output = list(next(iter(args["output_type_shape"][0].values())))
    except (KeyError, IndexError, StopIteration):
        return None
    if op_type in ("MatMul", "FusedMatMul", "Gemm"):
        # [.., M, K] x [.., K, N] -> [.., M, N]: 2 * (output elements) * K; A may be stored transposed
        a = inputs[0]
        k = a[-1] if len(a) < 2 or a[-2] == output[-2] else a[-2]
        return 2 * math.prod(output) * k / 1e9
    if op_type == "MultiHeadAttention" and len(inputs) > 1 and len(inputs[0]) == len(inputs[1]) == 3:
        # query [N, S, D], key [N, L, D]: Q.K^T and weights.V, 2 * N * S * L * D multiply-adds each
        (n, s, d), length = inputs[0], inputs[1][1]
        return 4 * n * s * length * d / 1e9
    if op_type in ("Conv", "FusedConv") and len(inputs) > 1 and len(inputs[1]) == 4:
        weight = inputs[1]  # [C_out, C_in / group, kh, kw]
        return 2 * math.prod(output) * math.prod(weight[1:]) / 1e9
    return None


def profile_session(model_path: Path, images: np.ndarray, runs: int, threads: int | None, out_dir: Path) -> dict:
    """Run ``images`` ``runs`` + 1 times under the profiler; per op type kernel ms per run, shares, GFLOP/s."""
    return profile_sessions({"graph": model_path}, images, runs, threads, out_dir)["graph"]


def profile_sessions(models: dict[str, Path], images: np.ndarray, runs: int, threads: int | None, out_dir: Path) -> dict:
    """``profile_session`` for each of ``models`` (label -> path), their runs interleaved; per label its profile."""
    import onnxruntime as ort

    from reconad.runtime.manifest import INPUT_NAME

    sessions = {}
    for label, model_path in models.items():
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(out_dir / f"ort_profile_{label}")
        sessions[label] = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    wall_ms: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(runs + 1):
        for label, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {INPUT_NAME: images})
            wall_ms[label].append((time.perf_counter() - start) * 1000)
    profiles = {}
    for label, session in sessions.items():
        trace_path = Path(session.end_profiling())
        events = json.loads(trace_path.read_text())
        trace_path.unlink()
        profiles[label] = summarize(events, wall_ms[label])
    return profiles


def summarize(events: list[dict], wall_ms: list[float]) -> dict:
    """One session's profiler events (its first run the warm-up) as kernel time per op type."""
    run_windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    timed = run_windows[1:]  # the first run is the warm-up
    by_op = defaultdict(lambda: {"us": 0.0, "gflop": 0.0, "flop_us": 0.0, "nodes": set()})
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if not any(begin <= event["ts"] <= end for begin, end in timed):
            continue
        op_type = event["args"].get("op_name", "?")
        entry = by_op[op_type]
        entry["us"] += event["dur"]
        entry["nodes"].add(event["name"])
        gflop = node_gflop(op_type, event["args"])
        if gflop is not None:
            entry["gflop"] += gflop
            entry["flop_us"] += event["dur"]
    total_us = sum(entry["us"] for entry in by_op.values())
    rows = []
    for op_type, entry in sorted(by_op.items(), key=lambda item: -item[1]["us"]):
        rows.append({
            "op_type": op_type,
            "ms_per_run": entry["us"] / 1000 / len(timed),
            "share": entry["us"] / total_us,
            "nodes": len(entry["nodes"]),
            "gflop_per_run": entry["gflop"] / len(timed) if entry["flop_us"] else None,
            "gflop_per_s": entry["gflop"] / (entry["flop_us"] / 1e6) if entry["flop_us"] else None,
        })
    return {
        "wall_ms_per_run_median": statistics.median(wall_ms[1:]),
        "wall_ms_per_run_mean": statistics.mean(wall_ms[1:]),
        "wall_ms_per_run_all": wall_ms[1:],
        "kernel_ms_per_run": total_us / 1000 / len(timed),
        "ops": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mvtec-512")
    parser.add_argument("--runs", type=int, default=5, help="profiled runs after one warm-up")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: one per core)")
    parser.add_argument("--target", choices=(*TARGETS, "both"), default="tensorrt",
                        help="the graph of to-onnx --target; both: the two, interleaved, with a before/after table")
    parser.add_argument("--work", type=Path, default=RESULTS / "profile_onnx_work")
    parser.add_argument("--reuse", action="store_true", help="reuse the graph of a previous run")
    parser.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import onnxruntime

    from reconad.export.onnx import artifact_name, synthetic_reference_images
    from reconad.model import PRESETS

    args.work.mkdir(parents=True, exist_ok=True)
    config = PRESETS[args.preset]
    targets = TARGETS if args.target == "both" else (args.target,)
    paths = {target: args.work / artifact_name(args.preset, config.input_hw, "fp32", target) for target in targets}
    if args.export_only:
        export(args.preset, args.work, targets)
        return
    export_s = None
    if not (args.reuse and all(path.is_file() for path in paths.values())):
        start = time.perf_counter()
        command = [sys.executable, __file__, "--export-only", "--preset", args.preset, "--work", str(args.work),
                   "--target", args.target]
        subprocess.run(command, check=True)
        export_s = time.perf_counter() - start

    images = synthetic_reference_images(config.input_hw, max(args.batch, 4))[: args.batch]
    load_before = os.getloadavg()
    profiles = profile_sessions(paths, images, args.runs, args.threads, args.work)
    meta = {
        "preset": args.preset,
        "batch": args.batch,
        "runs": args.runs,
        "targets": list(targets),
        "export_s": export_s,
        "onnxruntime": onnxruntime.__version__,
        "ort_threads": args.threads or "default (one per core)",
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    result = {"meta": meta, "profiles": profiles}
    if len(targets) == 2:  # run r of one beside run r of the other
        pairs = zip(profiles[TARGETS[0]]["wall_ms_per_run_all"], profiles[TARGETS[1]]["wall_ms_per_run_all"])
        result["wall_ratio_median"] = statistics.median(before / after for before, after in pairs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile_onnx.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render_tables(result)
    (RESULTS / "profile_onnx.md").write_text(table + "\n")
    print(table)


def render_tables(result: dict) -> str:
    meta, profiles = result["meta"], result["profiles"]
    lines = [
        f"{meta['preset']} fp32 graph ({' and '.join(meta['targets'])}), batch {meta['batch']}, ONNX Runtime "
        f"{meta['onnxruntime']} CPU ({meta['ort_threads']} threads, {meta['cpu_count']} CPUs), {meta['runs']} profiled "
        f"runs after a warm-up{', interleaved' if len(profiles) > 1 else ''}; load average "
        f"{meta['load_average_before'][0]:.1f} before, {meta['load_average_after'][0]:.1f} after",
    ]
    if "wall_ratio_median" in result:
        first, second = meta["targets"]
        lines += ["", f"Wall time {first} / {second}, median of the per-run ratios: {result['wall_ratio_median']:.2f}x.",
                  "", render_comparison(profiles[first], profiles[second], first, second)]
    for target, profile in profiles.items():
        lines += ["", f"### {target}", "", render_table(profile)]
    present = [op for op in FUSED_OPS if any(row["op_type"] == op for p in profiles.values() for row in p["ops"])]
    if present:
        lines.append("")
        lines += [f"- {op}: {FUSED_OPS[op]}" for op in present]
    return "\n".join(lines)


def render_comparison(before: dict, after: dict, first: str, second: str) -> str:
    """Kernel ms per run and share by op type, the two graphs side by side (ops of either)."""
    lines = [f"| op type (as run) | {first} ms | share | {second} ms | share |", "|---|---:|---:|---:|---:|"]
    rows = {row["op_type"]: [row, None] for row in before["ops"]}
    for row in after["ops"]:
        rows.setdefault(row["op_type"], [None, None])[1] = row
    for op_type, pair in sorted(rows.items(), key=lambda item: -max(r["ms_per_run"] for r in item[1] if r)):
        cells = [f"{r['ms_per_run']:.1f} | {100 * r['share']:.1f}%" if r else "- | -" for r in pair]
        lines.append(f"| {op_type} | {cells[0]} | {cells[1]} |")
    lines.append(f"| **kernel total** | {before['kernel_ms_per_run']:.1f} | | {after['kernel_ms_per_run']:.1f} | |")
    lines.append(f"| **wall (median)** | {before['wall_ms_per_run_median']:.1f} | | {after['wall_ms_per_run_median']:.1f} | |")
    return "\n".join(lines)


def render_table(profile: dict) -> str:
    matrix_share = sum(row["share"] for row in profile["ops"] if row["op_type"] in MATRIX_OPS)
    attention = sum(row["share"] for row in profile["ops"] if row["op_type"] == "MultiHeadAttention")
    fused = f"; MultiHeadAttention (its GEMMs with the mask add and softmax): {100 * attention:.1f}%" if attention else ""
    lines = [
        f"Wall time per run: median {profile['wall_ms_per_run_median']:.0f} ms, mean "
        f"{profile['wall_ms_per_run_mean']:.0f} ms; kernel time per run (mean) {profile['kernel_ms_per_run']:.0f} ms; "
        f"matrix ops ({', '.join(MATRIX_OPS)}): {100 * matrix_share:.1f}% of the kernel time{fused}.",
        "",
        "| op type (as run) | nodes | ms per run | share | GFLOP per run | GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in profile["ops"]:
        gflop = f"{row['gflop_per_run']:.2f}" if row["gflop_per_run"] is not None else "-"
        rate = f"{row['gflop_per_s']:.0f}" if row["gflop_per_s"] is not None else "-"
        lines.append(f"| {row['op_type']} | {row['nodes']} | {row['ms_per_run']:.1f} | {100 * row['share']:.1f}% "
                     f"| {gflop} | {rate} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
