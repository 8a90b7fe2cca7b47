"""TensorRT engine latency per batch size, with and without CUDA graphs (torch-free; needs a GPU).

Each timing is one ``TrtBackend.infer(images, copy=False)``: host-to-device copy, the engine (or its
captured graph), device-to-host copy and the stream synchronisation. Writes a JSON record and a
markdown table (default ``benchmarks/results/bench_trt.json`` / ``.md``).

    .venv/bin/python benchmarks/bench_trt.py --model engines/artifacts/weave-512x512-fp16-trt10.3.0-orin.engine
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from reconad.runtime.backends.device import probe_gpu
from reconad.runtime.manifest import Manifest, manifest_path_for
from reconad.runtime.backends.trt import TrtBackend

RESULTS = Path(__file__).resolve().parent / "results"


def time_backend(backend: TrtBackend, batch: int, iterations: int, warmup: int) -> dict[str, float]:
    """Latency percentiles (ms) and throughput (images/s) of ``iterations`` back-to-back calls."""
    images = np.random.default_rng(0).integers(0, 256, size=(batch, *backend.input_hw, 3), dtype=np.uint8)
    for _ in range(warmup):  # the first calls also capture the CUDA graph of this batch size
        backend.infer(images, copy=False)
    latencies_ms = []
    for _ in range(iterations):
        started = time.perf_counter()
        backend.infer(images, copy=False)
        latencies_ms.append((time.perf_counter() - started) * 1e3)
    latencies_ms.sort()
    mean_ms = statistics.fmean(latencies_ms)
    return {
        "batch": batch,
        "latency_p50_ms": round(latencies_ms[len(latencies_ms) // 2], 3),
        "latency_p99_ms": round(latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))], 3),
        "latency_mean_ms": round(mean_ms, 3),
        "images_per_s": round(batch * 1e3 / mean_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an .engine with its manifest")
    parser.add_argument("--batch-sizes", default="1,max", help="comma-separated; 'max' is the engine's largest")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_trt.json")
    args = parser.parse_args()

    manifest = Manifest.load(manifest_path_for(args.model))
    rows = []
    for cuda_graph in (False, True):
        with TrtBackend(args.model, cuda_graph=cuda_graph) as backend:
            sizes = sorted({backend.max_batch if s == "max" else int(s) for s in args.batch_sizes.split(",")})
            for batch in sizes:
                row = time_backend(backend, batch, args.iterations, args.warmup)
                row["cuda_graph"] = backend.cuda_graph  # False when capture failed and it fell back
                row["cuda_graph_requested"] = cuda_graph
                rows.append(row)
                print(json.dumps(row), flush=True)
    gpu = probe_gpu()
    record = {
        "model": str(args.model),
        "precision": manifest.precision.mode,
        "input_hw": list(manifest.input_hw),
        "tensorrt_version": backend.tensorrt_version,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "host": platform.node(),
        "iterations": args.iterations,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"TensorRT {record['tensorrt_version']} on {gpu.name}, {args.model.name} "
        f"({record['precision']}, {manifest.input_hw[0]}x{manifest.input_hw[1]})",
        "",
        "| batch | CUDA graph | p50 ms | p99 ms | images/s |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['batch']} | {'on' if row['cuda_graph'] else 'off'} | {row['latency_p50_ms']} | "
        f"{row['latency_p99_ms']} | {row['images_per_s']} |"
        for row in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
