"""Where the fp32 ONNX graph spends its time on the CPU: ONNX Runtime's profiler, time shares by op type.

Exports a random-weight checkpoint of the preset (mvtec-512 by default) with ``export_onnx`` in a child
process (an in-process export grows the heap, see bench_onnx.py), then runs it on ONNX Runtime as the runtime
does (CPU provider, all graph optimisations, spinning off) with ``enable_profiling``, and sums the kernel time
of every node by op type, as run: after ONNX Runtime's fusions (``FusedConv`` is Conv + activation,
``FusedMatMul`` a MatMul with a folded transpose or scale, e.g. Q.K^T). MatMul, Gemm and Conv also get GFLOP/s from the
shapes the profiler records. The first run is a warm-up and left out. Measurement only: the graph is not
changed. Writes benchmarks/results/profile_onnx.json and profile_onnx.md.

    .venv/bin/python benchmarks/profile_onnx.py [--preset mvtec-512] [--runs 5] [--batch 1] [--threads N] [--reuse]
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
}


def export(preset: str, work: Path) -> Path:
    """A random-weight checkpoint of ``preset`` (seed 0) and its fp32 graph; returns the ONNX path."""
    import torch

    from reconad.export.onnx import artifact_name, export_onnx
    from reconad.model import PRESETS, build_detector, save_checkpoint

    config = PRESETS[preset]
    checkpoint = work / preset / "model.ckpt"
    torch.manual_seed(0)
    save_checkpoint(build_detector(config).eval(), checkpoint)
    export_onnx(checkpoint, work, precision="fp32", max_batch=8)
    return work / artifact_name(preset, config.input_hw, "fp32")


def node_gflop(op_type: str, args: dict) -> float | None:
    """Multiply-adds x 2 of a MatMul / Gemm / Conv node from the profiler's recorded shapes, else None."""
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
    if op_type in ("Conv", "FusedConv") and len(inputs) > 1 and len(inputs[1]) == 4:
        weight = inputs[1]  # [C_out, C_in / group, kh, kw]
        return 2 * math.prod(output) * math.prod(weight[1:]) / 1e9
    return None


def profile_session(model_path: Path, images: np.ndarray, runs: int, threads: int | None, out_dir: Path) -> dict:
    """Run ``images`` ``runs`` + 1 times under the profiler; per op type kernel ms per run, shares, GFLOP/s."""
    import onnxruntime as ort

    from reconad.runtime.manifest import INPUT_NAME

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(out_dir / "ort_profile")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    wall_ms = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: images})
        wall_ms.append((time.perf_counter() - start) * 1000)
    trace_path = Path(session.end_profiling())
    events = json.loads(trace_path.read_text())
    trace_path.unlink()

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
    parser.add_argument("--work", type=Path, default=RESULTS / "profile_onnx_work")
    parser.add_argument("--reuse", action="store_true", help="reuse the graph of a previous run")
    parser.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import onnxruntime

    from reconad.export.onnx import artifact_name, synthetic_reference_images
    from reconad.model import PRESETS

    args.work.mkdir(parents=True, exist_ok=True)
    config = PRESETS[args.preset]
    model_path = args.work / artifact_name(args.preset, config.input_hw, "fp32")
    if args.export_only:
        export(args.preset, args.work)
        return
    export_s = None
    if not (args.reuse and model_path.is_file()):
        start = time.perf_counter()
        command = [sys.executable, __file__, "--export-only", "--preset", args.preset, "--work", str(args.work)]
        subprocess.run(command, check=True)
        export_s = time.perf_counter() - start

    images = synthetic_reference_images(config.input_hw, max(args.batch, 4))[: args.batch]
    load_before = os.getloadavg()
    profile = profile_session(model_path, images, args.runs, args.threads, args.work)
    meta = {
        "preset": args.preset,
        "batch": args.batch,
        "runs": args.runs,
        "export_s": export_s,
        "onnxruntime": onnxruntime.__version__,
        "ort_threads": args.threads or "default (one per core)",
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    result = {"meta": meta, **profile}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile_onnx.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render_table(result)
    (RESULTS / "profile_onnx.md").write_text(table + "\n")
    print(table)


def render_table(result: dict) -> str:
    meta = result["meta"]
    matrix_share = sum(row["share"] for row in result["ops"] if row["op_type"] in MATRIX_OPS)
    lines = [
        f"{meta['preset']} fp32 graph, batch {meta['batch']}, ONNX Runtime {meta['onnxruntime']} CPU "
        f"({meta['ort_threads']} threads, {meta['cpu_count']} CPUs), {meta['runs']} profiled runs after a warm-up; "
        f"load average {meta['load_average_before'][0]:.1f} before, {meta['load_average_after'][0]:.1f} after",
        "",
        f"Wall time per run: median {result['wall_ms_per_run_median']:.0f} ms, mean "
        f"{result['wall_ms_per_run_mean']:.0f} ms; kernel time per run (mean) {result['kernel_ms_per_run']:.0f} ms; "
        f"matrix ops ({', '.join(MATRIX_OPS)}): {100 * matrix_share:.1f}% of the kernel time.",
        "",
        "| op type (as run) | nodes | ms per run | share | GFLOP per run | GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["ops"]:
        gflop = f"{row['gflop_per_run']:.2f}" if row["gflop_per_run"] is not None else "-"
        rate = f"{row['gflop_per_s']:.0f}" if row["gflop_per_s"] is not None else "-"
        lines.append(f"| {row['op_type']} | {row['nodes']} | {row['ms_per_run']:.1f} | {100 * row['share']:.1f}% "
                     f"| {gflop} | {rate} |")
    present = [op for op in FUSED_OPS if any(row["op_type"] == op for row in result["ops"])]
    if present:
        lines.append("")
        lines += [f"- {op}: {FUSED_OPS[op]}" for op in present]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
