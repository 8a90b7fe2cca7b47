"""One table: PyTorch eager, ONNX Runtime fp32, its fused-attention variant, the fp16 graph and the int8 QDQ graph,
at 256 and 512, batch 1 and 8.

Presets lite0-256 and mvtec-512 (random weights, seed 0: no download). Per preset, one child process builds
the artifacts the asked variants need, once: a checkpoint, the fp32 and fp16 graphs through ``export_onnx`` (its
parity checks included), the ``--target ort-cpu`` fp32 graph (attention as ONNX Runtime's MultiHeadAttention,
also through ``export_onnx``), the int8 graph through ``reconad.export.int8.quantize_to_int8`` calibrated on
synthetic reference images (the export's int8 checks need a trained model's AUROC, so they are not run on random
weights here), and the eager model's GFLOP per image (torch's FLOP counter: 2 x multiply-accumulates of conv,
linear and matmul). Then every measurement is a fresh process (its own peak RSS), interleaved round by round
over variants and batch sizes (every other round in reverse order), with this CPU's ONNX Runtime GEMM peak
(1024^3 MatMuls back to back for 3 s, sustained: the number the graph can be held to) measured in every round
too. Reported per row: ms per image (median over rounds, and each round's), GFLOP/s, fraction of the GEMM peak
and speed against ORT fp32 (medians of per-round ratios: each cell against the ORT fp32 cell of its own round),
peak RSS, and parity against the eager model on the reference images (map p99 error as a fraction of the map's
range, image-score max error).

Writes benchmarks/results/bench_table.json and bench_table.md.

    .venv/bin/python benchmarks/bench_table.py [--rounds 3] [--presets lite0-256 mvtec-512] [--batches 1 8]
        [--variants eager ort-fp32 ort-fp32-arena ort-fp32-fused ort-fp16 ort-int8]
    # the fused-attention ratio alone:
    .venv/bin/python benchmarks/bench_table.py --presets mvtec-512 --batches 1 8 --rounds 5 \
        --variants ort-fp32 ort-fp32-arena ort-fp32-fused
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("eager", "ort-fp32", "ort-fp32-arena", "ort-fp32-fused", "ort-fp16", "ort-int8")
# Every ORT variant runs as the runtime opens it (OrtBackend's defaults: the CPU memory arena off, on for the
# ort-cpu graph) except ort-fp32-arena, the fp32 graph with the arena on: what the fused graph gains by the arena alone.
LABELS = {"eager": "PyTorch eager", "ort-fp32": "ORT fp32", "ort-fp32-arena": "ORT fp32, memory arena on",
          "ort-fp32-fused": "ORT fp32 fused attention (ort-cpu)",
          "ort-fp16": "fp16 graph (ORT)", "ort-int8": "int8 QDQ (ORT)"}
GEMM_N = 1024
GEMM_SECONDS = 3.0
WARMUP, TIMED = 1, 3


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def build(preset: str, work: Path, variants: tuple[str, ...] = VARIANTS) -> None:
    """The child that writes ``work/<preset>/``: model.ckpt, the graphs ``variants`` need (fp32 always), images,
    build.json (GFLOP per image and the artifact of each variant)."""
    import onnx
    import torch

    from reconad.export.int8 import quantize_to_int8
    from reconad.export.naming import artifact_name
    from reconad.export.onnx import export_onnx, run_torch, synthetic_reference_images
    from reconad.model import PRESETS, build_detector, load_detector, save_checkpoint
    from reconad.train.memory import retain_freed_memory

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_model import count_gflop

    retain_freed_memory()
    config = PRESETS[preset]
    folder = work / preset
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    checkpoint = folder / "model.ckpt"
    save_checkpoint(build_detector(config).eval(), checkpoint)
    export_onnx(checkpoint, folder, precision="both" if "ort-fp16" in variants else "fp32", max_batch=8, overwrite=True)
    paths = {"eager": str(checkpoint), "ort-fp32": str(folder / artifact_name(preset, config.input_hw, "fp32"))}
    paths["ort-fp32-arena"] = paths["ort-fp32"]
    if "ort-fp16" in variants:
        paths["ort-fp16"] = str(folder / artifact_name(preset, config.input_hw, "fp16"))
    if "ort-fp32-fused" in variants:
        export_onnx(checkpoint, folder, precision="fp32", max_batch=8, target="ort-cpu", overwrite=True)
        paths["ort-fp32-fused"] = str(folder / artifact_name(preset, config.input_hw, "fp32", "ort-cpu"))
    if "ort-int8" in variants:
        calibration = synthetic_reference_images(config.input_hw, 16)
        onnx.save(quantize_to_int8(onnx.load(paths["ort-fp32"]), calibration), folder / "int8.onnx")
        paths["ort-int8"] = str(folder / "int8.onnx")
    images = synthetic_reference_images(config.input_hw, 8)
    detector = load_detector(checkpoint).eval()
    reference = run_torch(detector, images, max_batch=8)
    np.savez(folder / "reference.npz", images=images, **reference)
    gflop = count_gflop(detector, torch.from_numpy(images[:1]))  # on the explicit (exported) attention form
    (folder / "build.json").write_text(json.dumps({"gflop_per_image": gflop, "paths": paths}))


def worker(variant: str, path: str, reference: Path, batch: int) -> dict:
    """One measurement in this fresh process: ms per image at ``batch`` and the outputs' parity."""
    data = np.load(reference)
    images = np.concatenate([data["images"]] * (batch // len(data["images"]) + 1))[:batch]
    if variant == "gemm":
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [GEMM_N, GEMM_N]) for n in "ab"],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [GEMM_N, GEMM_N])],
        )
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(helper.make_model(graph).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        a = np.random.default_rng(0).standard_normal((GEMM_N, GEMM_N), dtype=np.float32)
        session.run(None, {"a": a, "b": a})
        # Sustained, back to back for GEMM_SECONDS, as a graph run keeps the cores busy (measured here:
        # 464 GFLOP/s as the median of single calls, 472 sustained: this CPU's AVX-512 FMA peak, 2 cores).
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < GEMM_SECONDS:
            session.run(None, {"a": a, "b": a})
            calls += 1
        return {"gflop_per_s": 2 * GEMM_N**3 * calls / (time.perf_counter() - start) / 1e9}
    if variant == "eager":
        import torch

        from reconad.model import load_detector
        from reconad.train.memory import retain_freed_memory

        retain_freed_memory()  # as evaluate runs it
        detector = load_detector(path).eval()
        batch_images = torch.from_numpy(images)

        def run() -> tuple[np.ndarray, np.ndarray]:
            with torch.inference_mode():
                outputs = detector(batch_images)
            return outputs[0].numpy(), outputs[1].numpy()
    else:
        from reconad.runtime.backends.ort import OrtBackend

        backend = OrtBackend(path, "ort-cpu", max_batch=8, memory_arena=True if variant == "ort-fp32-arena" else None)

        def run() -> tuple[np.ndarray, np.ndarray]:
            outputs = backend.infer(images)
            return outputs["anomaly_map"], outputs["image_score"]
    for _ in range(WARMUP):
        anomaly_map, score = run()
    times = []
    for _ in range(TIMED):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    n = min(batch, len(data["images"]))
    map_error = np.abs(anomaly_map[:n].astype(np.float64) - data["anomaly_map"][:n])
    map_range = float(np.ptp(data["anomaly_map"]))
    return {
        "ms_per_image": 1e3 * statistics.median(times) / batch,
        "peak_rss_mib": peak_rss_mib(),
        "map_p99_fraction_of_range": float(np.percentile(map_error, 99)) / map_range if map_range else 0.0,
        "map_max_abs": float(map_error.max()),
        "score_max_abs": float(np.abs(score[:n].astype(np.float64) - data["image_score"][:n]).max()),
        "finite": bool(np.isfinite(anomaly_map).all() and np.isfinite(score).all()),
    }


def run_worker(*arguments: str) -> dict:
    command = [sys.executable, __file__, "--worker", *arguments]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"killed by signal {-done.returncode}" if done.returncode < 0 else \
            (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"failed": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["lite0-256", "mvtec-512"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=RESULTS / "bench_table_work")
    parser.add_argument("--reuse", action="store_true", help="reuse the artifacts of a previous run")
    parser.add_argument("--worker", nargs=4, metavar=("VARIANT", "PATH", "REFERENCE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--build", metavar="PRESET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = tuple(dict.fromkeys(args.variants))
    if args.worker:
        variant, path, reference, batch = args.worker
        print(json.dumps(worker(variant, path, Path(reference), int(batch))))
        return
    if args.build:
        build(args.build, args.work, variants)
        return

    load_before, started = os.getloadavg(), time.perf_counter()
    builds = {}
    for preset in args.presets:
        built = args.work / preset / "build.json"
        if not (args.reuse and built.is_file() and set(variants) <= set(json.loads(built.read_text())["paths"])):
            command = [sys.executable, __file__, "--build", preset, "--work", str(args.work), "--variants", *variants]
            subprocess.run(command, check=True)
        builds[preset] = json.loads(built.read_text())
    cells = [(preset, variant, batch) for preset in args.presets for variant in variants for batch in args.batches]
    measured: dict = {cell: [] for cell in cells}
    peaks = []
    for round_index in range(args.rounds):
        peaks.append(run_worker("gemm", "-", str(args.work / args.presets[0] / "reference.npz"), "1"))
        # interleaved: a busy machine affects every cell alike; every other round in reverse order, so that no
        # cell always follows the same neighbour (a large process just ended, a cold cache)
        for preset, variant, batch in cells if round_index % 2 == 0 else reversed(cells):
            reference = args.work / preset / "reference.npz"
            result = run_worker(variant, builds[preset]["paths"][variant], str(reference), str(batch))
            result["round_peak"] = peaks[-1].get("gflop_per_s")
            measured[(preset, variant, batch)].append(result)
        print(f"round {round_index + 1}/{args.rounds} done, GEMM peak {peaks[-1].get('gflop_per_s', 0):.0f} GFLOP/s",
              file=sys.stderr, flush=True)

    rows = []
    for preset, variant, batch in cells:
        runs = [r for r in measured[(preset, variant, batch)] if "failed" not in r]
        failed = [r["failed"] for r in measured[(preset, variant, batch)] if "failed" in r]
        row = {"preset": preset, "variant": variant, "batch": batch, "failed": failed}
        if runs:
            gflop = builds[preset]["gflop_per_image"]
            row.update({
                "ms_per_image": statistics.median(r["ms_per_image"] for r in runs),
                "ms_per_image_rounds": [r["ms_per_image"] for r in runs],
                "gflop_per_s": statistics.median(gflop / (r["ms_per_image"] / 1e3) for r in runs),
                "fraction_of_gemm_peak": statistics.median(
                    gflop / (r["ms_per_image"] / 1e3) / r["round_peak"] for r in runs if r["round_peak"]),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                **{key: runs[0][key] for key in ("map_p99_fraction_of_range", "map_max_abs", "score_max_abs", "finite")},
            })
        baseline = measured.get((preset, "ort-fp32", batch), [])
        ratios = [base["ms_per_image"] / run["ms_per_image"] for base, run in zip(baseline, measured[(preset, variant, batch)])
                  if "failed" not in base and "failed" not in run]
        row["vs_ort_fp32"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    meta = {
        "presets": args.presets, "batches": args.batches, "rounds": args.rounds,
        "gflop_per_image": {p: b["gflop_per_image"] for p, b in builds.items()},
        "gemm_peak_gflop_per_s": [p.get("gflop_per_s") for p in peaks],
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "seconds": time.perf_counter() - started,
    }
    result = {"meta": meta, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_table.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render_table(result)
    (RESULTS / "bench_table.md").write_text(table + "\n")
    print(table)


def render_table(result: dict) -> str:
    meta = result["meta"]
    peaks = [p for p in meta["gemm_peak_gflop_per_s"] if p]
    lines = [
        f"random weights, CPU ({meta['cpu_count']} cores), median of {meta['rounds']} interleaved rounds, a fresh "
        f"process per cell; ONNX Runtime GEMM peak {statistics.median(peaks):.0f} GFLOP/s (1024^3 MatMul, median "
        f"of rounds); GFLOP/image {', '.join(f'{p} {g:.1f}' for p, g in meta['gflop_per_image'].items())}; "
        f"load average {meta['load_average_before'][0]:.1f} before, {meta['load_average_after'][0]:.1f} after",
        "",
        "| preset | variant | batch | ms / image | vs ORT fp32 (per round) | GFLOP/s | of fp32 GEMM peak | peak RSS (MiB) "
        "| map p99 err / range | score max err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "ms_per_image" not in row:
            lines.append(f"| {row['preset']} | {LABELS[row['variant']]} | {row['batch']} | failed: "
                         f"{'; '.join(row['failed'])} | | | | | | |")
            continue
        ratio = f"{row['vs_ort_fp32']:.2f}x" if row.get("vs_ort_fp32") else "-"
        lines.append(
            f"| {row['preset']} | {LABELS[row['variant']]} | {row['batch']} | {row['ms_per_image']:.0f} | {ratio} "
            f"| {row['gflop_per_s']:.0f} | {row['fraction_of_gemm_peak']:.0%} | {row['peak_rss_mib']:.0f} "
            f"| {row['map_p99_fraction_of_range']:.2g} | {row['score_max_abs']:.2g} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
