"""Parameters, GFLOP and PyTorch eager forward latency per model preset (random weights, batch 1, CPU).

Presets are measured round-robin (interleaved) so a noisy machine affects them alike.
Writes benchmarks/results/bench_model.json and a markdown table.

    .venv/bin/python benchmarks/bench_model.py [--rounds 5] [--presets mvtec-512 lite0-256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from reconad.model import PRESETS, build_detector

RESULTS = Path(__file__).resolve().parent / "results"


def count_gflop(detector, images) -> float:
    """Multiply-accumulates x 2 of conv, linear and matmul ops, via torch's FLOP counter (on the explicit
    attention form, the exported graph's: the counter does not count the fused CPU SDPA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    from reconad.model.transformer import explicit_attention

    with explicit_attention(detector), FlopCounterMode(display=False) as counter, torch.no_grad():
        detector(images)
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS))
    args = parser.parse_args()

    torch.manual_seed(0)
    detectors = {name: build_detector(PRESETS[name]).eval() for name in args.presets}
    inputs = {
        name: torch.randint(0, 256, (1, *PRESETS[name].input_hw, 3), dtype=torch.uint8) for name in args.presets
    }
    latencies = {name: [] for name in args.presets}
    with torch.no_grad():
        for name in args.presets:  # warm-up
            detectors[name](inputs[name])
        for _ in range(args.rounds):
            for name in args.presets:
                start = time.perf_counter()
                detectors[name](inputs[name])
                latencies[name].append((time.perf_counter() - start) * 1000)
    rows = []
    for name in args.presets:
        detector = detectors[name]
        rows.append(
            {
                "preset": name,
                "input_hw": list(PRESETS[name].input_hw),
                "params_m": sum(p.numel() for p in detector.parameters()) / 1e6,
                "trainable_params_m": sum(p.numel() for p in detector.reconstructor.parameters()) / 1e6,
                "gflop": count_gflop(detector, inputs[name]),
                "latency_ms_median": statistics.median(latencies[name]),
                "latency_ms_min": min(latencies[name]),
            }
        )
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds}
    (RESULTS / "bench_model.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "| preset | input | params (M) | trainable (M) | GFLOP | eager latency median (ms) | min (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['input_hw'][0]}x{r['input_hw'][1]} | {r['params_m']:.2f} | {r['trainable_params_m']:.2f} "
            f"| {r['gflop']:.1f} | {r['latency_ms_median']:.0f} | {r['latency_ms_min']:.0f} |"
        )
    table = "\n".join(lines)
    (RESULTS / "bench_model.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
