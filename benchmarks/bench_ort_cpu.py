"""The ort-cpu graph (fused attention) against the fp32 graph, in one process, run by run: the speed ratio on a busy machine.

bench_table.py measures every cell in a fresh process (its own peak RSS), seconds apart; on a shared machine
other processes come and go between cells, and its ratios swing by 2x from round to round. Here the graphs run
in one process, one call each in turn (the order rotating every round), so that each round's ratio compares
calls made within a second of each other. Variants, all through the runtime's ``OrtBackend``: ``fp32`` (the
tensorrt graph as the runtime opens it: CPU memory arena off), ``fp32-arena`` (the same graph, arena on: what
the arena alone gives), ``ort-cpu`` (``to-onnx --target ort-cpu`` as the runtime opens it: arena on). The
graphs come from bench_table.py's build (random weights, seed 0, exported with their parity checks).
Reported per batch: each variant's median ms per image, and per variant the median and the interquartile
range of its per-round ratio to fp32 (> 1: faster). Writes benchmarks/results/bench_ort_cpu.json and .md.

    .venv/bin/python benchmarks/bench_ort_cpu.py [--preset mvtec-512] [--batches 1 8] [--rounds 12] [--reuse]
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
BENCH_TABLE = Path(__file__).resolve().parent / "bench_table.py"
VARIANTS = {"fp32": ("ort-fp32", False), "fp32-arena": ("ort-fp32", True), "ort-cpu": ("ort-fp32-fused", None)}


def measure(paths: dict[str, str], images: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """ms per image of every variant, one call each per round, the order rotated each round (after one warm-up)."""
    from reconad.runtime.backends.ort import OrtBackend

    backends = {name: OrtBackend(paths[VARIANTS[name][0]], "ort-cpu", max_batch=8, memory_arena=VARIANTS[name][1])
                for name in VARIANTS}
    for backend in backends.values():
        backend.infer(images)
    names = list(backends)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            backends[name].infer(images)
            times[name].append((time.perf_counter() - start) * 1000 / len(images))
    for backend in backends.values():
        backend.close()
    return times


def summarize(times: dict[str, list[float]]) -> dict:
    rows = {}
    for name, values in times.items():
        ratios = [base / value for base, value in zip(times["fp32"], values)]
        quartiles = np.percentile(ratios, [25, 75])
        rows[name] = {"ms_per_image_median": statistics.median(values), "ms_per_image_all": values,
                      "vs_fp32_median": statistics.median(ratios), "vs_fp32_iqr": [float(q) for q in quartiles]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mvtec-512")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--work", type=Path, default=RESULTS / "bench_table_work")
    parser.add_argument("--reuse", action="store_true", help="reuse bench_table.py's artifacts of a previous run")
    args = parser.parse_args()

    import onnxruntime

    built = args.work / args.preset / "build.json"
    wanted = {"ort-fp32", "ort-fp32-fused"}
    if not (args.reuse and built.is_file() and wanted <= set(json.loads(built.read_text())["paths"])):
        command = [sys.executable, str(BENCH_TABLE), "--build", args.preset, "--work", str(args.work),
                   "--variants", "ort-fp32", "ort-fp32-fused"]
        subprocess.run(command, check=True)
    paths = json.loads(built.read_text())["paths"]
    reference = np.load(args.work / args.preset / "reference.npz")["images"]
    result: dict = {"meta": {
        "preset": args.preset, "rounds": args.rounds, "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }, "batches": {}}
    for batch in args.batches:
        images = np.concatenate([reference] * (batch // len(reference) + 1))[:batch]
        load = os.getloadavg()
        times = measure(paths, images, args.rounds)
        result["batches"][str(batch)] = {"load_average_before": load, "load_average_after": os.getloadavg(),
                                         "variants": summarize(times)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_ort_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    (RESULTS / "bench_ort_cpu.md").write_text(table + "\n")
    print(table)


def render(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"{meta['preset']}, random weights, ONNX Runtime {meta['onnxruntime']} CPU ({meta['cpu_count']} cores), one "
        f"process, {meta['rounds']} rounds of one call per variant (order rotated); ratio = fp32 ms / variant ms "
        "per round",
        "",
        "| batch | variant | ms / image (median) | vs fp32, median of rounds | interquartile range | load before / after |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for batch, entry in result["batches"].items():
        load = f"{entry['load_average_before'][0]:.1f} / {entry['load_average_after'][0]:.1f}"
        for name, row in entry["variants"].items():
            low, high = row["vs_fp32_iqr"]
            lines.append(f"| {batch} | {name} | {row['ms_per_image_median']:.0f} | {row['vs_fp32_median']:.2f}x "
                         f"| {low:.2f}-{high:.2f} | {load} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
