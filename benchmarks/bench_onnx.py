"""PyTorch eager vs ONNX Runtime fp32 vs the fp16 graph at 512 (mvtec-512, random weights), side by side.

One run: export (to-onnx --precision both), per-image latency at batch 1 (median of interleaved rounds),
peak RSS of a runtime-only process (reconad.runtime + onnxruntime, fp32 graph) vs a PyTorch process, and
parity on the reference set. Writes benchmarks/results/bench_onnx.json and bench_onnx.md.

    .venv/bin/python benchmarks/bench_onnx.py [--rounds 7] [--preset mvtec-512] [--reuse] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "ort_fp32_speedup_min": 1.6,
    "runtime_rss_ratio_max": 0.8,
    "fp32_map_max_abs": 1e-4,
    "fp16_map_p99_fraction_of_range": 0.01,
}

# Peak RSS is VmHWM of the process's own memory map: ru_maxrss would carry the (large) parent's peak
# over fork + exec on Linux.
PEAK_RSS_KIB = """
def peak_rss_kib():
    try:
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

RUNTIME_PROCESS = PEAK_RSS_KIB + """
import sys
import numpy as np
import onnxruntime
from reconad.runtime import Inspector
images = np.load(sys.argv[2])["images"][:1]
with Inspector.open(sys.argv[1], backend="ort-cpu") as inspector:
    for _ in range(3):
        inspector.infer(images)
assert "torch" not in sys.modules, "the runtime process imported torch"
print(peak_rss_kib())
"""

TORCH_PROCESS = PEAK_RSS_KIB + """
import sys
import numpy as np
import torch
from reconad.model import load_detector
images = torch.from_numpy(np.load(sys.argv[2])["images"][:1])
detector = load_detector(sys.argv[1])
with torch.inference_mode():
    for _ in range(3):
        detector(images)
print(peak_rss_kib())
"""


def peak_rss_mib(script: str, *arguments: str) -> float:
    """Peak resident memory of a fresh interpreter running ``script`` (it prints its peak in KiB)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *arguments], capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def export(preset: str, work: Path, reuse: bool) -> tuple[Path, Path, Path, float | None]:
    """A random-weight checkpoint of ``preset`` and its fp32 and fp16 graphs (exported unless reused)."""
    import torch

    from reconad.export.naming import artifact_name
    from reconad.export.onnx import export_onnx
    from reconad.model import PRESETS, build_detector, save_checkpoint

    config = PRESETS[preset]
    checkpoint = work / preset / "model.ckpt"
    fp32 = work / artifact_name(preset, config.input_hw, "fp32")
    fp16 = work / artifact_name(preset, config.input_hw, "fp16")
    if reuse and checkpoint.is_file() and fp32.is_file() and fp16.is_file():
        return checkpoint, fp32, fp16, None
    torch.manual_seed(0)
    save_checkpoint(build_detector(config).eval(), checkpoint)
    start = time.perf_counter()
    export_onnx(checkpoint, work, precision="both", max_batch=8)
    return checkpoint, fp32, fp16, time.perf_counter() - start


def parity(artifact: Path, reference: dict[str, np.ndarray], precision: str, emulate: bool = False) -> dict:
    """verify's comparison of ``artifact`` (or its FP16-storage emulation) with the PyTorch reference."""
    import onnx

    from reconad.export.fp16 import emulate_fp16_storage
    from reconad.export.onnx import run_onnx
    from reconad.runtime.verify import compare_outputs

    model = onnx.load(artifact)
    if emulate:
        model = emulate_fp16_storage(model)
    outputs = run_onnx(model, reference["images"], max_batch=8)
    report = compare_outputs(outputs, reference, precision=precision, threshold=None)
    map_range = float(np.ptp(reference["anomaly_map"]))
    return {
        "map_max_abs": report.anomaly_map.max_abs,
        "map_p99_abs": report.anomaly_map.p99_abs,
        "map_p99_fraction_of_range": report.anomaly_map.p99_abs / map_range,
        "map_range": map_range,
        "score_max_abs": report.image_score.max_abs,
        "decision_flips": report.decision_flips,
        "nan_inf": report.anomaly_map.nan_count + report.anomaly_map.inf_count,
        "passed": report.passed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mvtec-512")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=Path, default=RESULTS / "bench_onnx_work")
    parser.add_argument("--reuse", action="store_true", help="reuse the checkpoint and graphs of a previous run")
    parser.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--threads", type=int, help="intra-op threads for PyTorch and ONNX Runtime alike (default: each its own)"
    )
    args = parser.parse_args()

    import onnxruntime
    import torch

    from reconad.model import load_detector
    from reconad.runtime import Inspector
    from reconad.runtime.manifest import reference_path_for

    args.work.mkdir(parents=True, exist_ok=True)
    if args.export_only:
        export(args.preset, args.work, reuse=False)
        return
    if not args.reuse:
        # Export in a child process: an in-process export leaves glibc's heap grown (its mmap threshold
        # raised), which made the eager runs after it ~1.8x faster than in a fresh process.
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--export-only", "--preset", args.preset, "--work", str(args.work)], check=True
        )
        export_child_s = time.perf_counter() - start
    checkpoint, fp32, fp16, _ = export(args.preset, args.work, reuse=True)
    export_s = None if args.reuse else export_child_s
    reference = dict(np.load(reference_path_for(fp32)))
    images = reference["images"][:1]  # [1, H, W, 3]

    if args.threads:
        torch.set_num_threads(args.threads)
    detector = load_detector(checkpoint)
    torch_images = torch.from_numpy(images)
    ort_fp32 = Inspector.open(fp32, backend="ort-cpu", num_threads=args.threads)
    ort_fp16 = Inspector.open(fp16, backend="ort-cpu", num_threads=args.threads)

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return detector(torch_images)[0].numpy()

    runners = {
        "pytorch_eager": run_torch,
        "ort_fp32": lambda: ort_fp32.infer(images)["anomaly_map"],
        "ort_fp16": lambda: ort_fp16.infer(images)["anomaly_map"],
    }
    latencies = {name: [] for name in runners}
    maps = {name: run() for name, run in runners.items()}  # warm-up, and the outputs compared below
    for _ in range(args.rounds):
        for name, run in runners.items():  # interleaved: a noisy machine affects all three alike
            start = time.perf_counter()
            run()
            latencies[name].append((time.perf_counter() - start) * 1000)
    ort_fp32.close()
    ort_fp16.close()

    reference_npz = str(reference_path_for(fp32))
    rss = {
        "runtime_ort_fp32_mib": peak_rss_mib(RUNTIME_PROCESS, str(fp32), reference_npz),
        "pytorch_eager_mib": peak_rss_mib(TORCH_PROCESS, str(checkpoint), reference_npz),
    }
    accuracy = {
        "fp32": parity(fp32, reference, "fp32"),
        "fp16_ort": parity(fp16, reference, "fp16"),
        "fp16_storage_emulated": parity(fp16, reference, "fp16", emulate=True),
    }
    median = {name: statistics.median(values) for name, values in latencies.items()}
    speedup = median["pytorch_eager"] / median["ort_fp32"]
    rss_ratio = rss["runtime_ort_fp32_mib"] / rss["pytorch_eager_mib"]
    fp16_worst = max(accuracy["fp16_ort"]["map_p99_fraction_of_range"], accuracy["fp16_storage_emulated"]["map_p99_fraction_of_range"])
    checks = {
        "ort_fp32_speedup": (speedup, speedup >= TARGETS["ort_fp32_speedup_min"]),
        "runtime_rss_ratio": (rss_ratio, rss_ratio <= TARGETS["runtime_rss_ratio_max"]),
        "fp32_map_max_abs": (accuracy["fp32"]["map_max_abs"], accuracy["fp32"]["map_max_abs"] <= TARGETS["fp32_map_max_abs"]),
        "fp16_map_p99_fraction_of_range": (fp16_worst, fp16_worst <= TARGETS["fp16_map_p99_fraction_of_range"]),
        "fp16_decision_flips": (
            accuracy["fp16_ort"]["decision_flips"] + accuracy["fp16_storage_emulated"]["decision_flips"],
            accuracy["fp16_ort"]["decision_flips"] + accuracy["fp16_storage_emulated"]["decision_flips"] == 0,
        ),
    }
    meta = {
        "preset": args.preset,
        "rounds": args.rounds,
        "batch": 1,
        "export_s": export_s,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ort_threads": args.threads or "default (one per core)",
        "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "reference_images": int(len(reference["images"])),
    }
    result = {
        "meta": meta,
        "latency_ms": {name: {"median": median[name], "min": min(v), "all": v} for name, v in latencies.items()},
        "bench_image_map_max_abs_vs_eager": {
            name: float(np.abs(maps[name] - maps["pytorch_eager"]).max()) for name in ("ort_fp32", "ort_fp16")
        },
        "peak_rss_mib": rss,
        "parity": accuracy,
        "targets": TARGETS,
        "checks": {name: {"value": value, "passed": bool(ok)} for name, (value, ok) in checks.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_onnx.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render_table(result)
    (RESULTS / "bench_onnx.md").write_text(table + "\n")
    print(table)


def render_table(result: dict) -> str:
    meta, latency, rss, accuracy = result["meta"], result["latency_ms"], result["peak_rss_mib"], result["parity"]
    eager = latency["pytorch_eager"]["median"]
    lines = [
        f"{meta['preset']}, batch 1, median of {meta['rounds']} interleaved rounds; torch {meta['torch']} "
        f"({meta['torch_threads']} threads), onnxruntime {meta['onnxruntime']} ({meta['ort_threads']} threads), "
        f"{meta['cpu_count']} CPUs, "
        f"load average {meta['load_average'][0]:.1f}",
        "",
        "| path | latency median (ms) | min (ms) | speed-up vs eager | peak RSS (MiB) | map max abs | map p99 / range | flips |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = (
        ("PyTorch eager", "pytorch_eager", rss["pytorch_eager_mib"], None),
        ("ONNX Runtime fp32", "ort_fp32", rss["runtime_ort_fp32_mib"], accuracy["fp32"]),
        ("ONNX Runtime fp16 graph", "ort_fp16", None, accuracy["fp16_ort"]),
        ("fp16, FP16 storage emulated", None, None, accuracy["fp16_storage_emulated"]),
    )
    for label, key, memory, parity in rows:
        cells = [label]
        if key:
            cells += [f"{latency[key]['median']:.0f}", f"{latency[key]['min']:.0f}", f"{eager / latency[key]['median']:.2f}x"]
        else:
            cells += ["-", "-", "-"]
        cells.append(f"{memory:.0f}" if memory else "-")
        if parity:
            cells += [f"{parity['map_max_abs']:.2g}", f"{100 * parity['map_p99_fraction_of_range']:.3f}%", str(parity["decision_flips"])]
        else:
            cells += ["(reference)" if key == "pytorch_eager" else "-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, check in result["checks"].items():
        lines.append(f"- {name}: {check['value']:.4g} ({'pass' if check['passed'] else 'FAIL'})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
