"""The int8 QDQ graph vs the fp32 graph through ONNX Runtime CPU at 256 (lite0-256) and 512 (mvtec-512), one run.

Random weights (no download). Per preset: trace the fp32 graph, quantize it with ``reconad.export.int8``
(calibrated on synthetic images, as many as ``max_calibration_images`` allows; the shipped recipe: symmetric INT8, TensorRT-buildable), and, for
measurement only, the ONNX-Runtime-only U8S8 variant (uint8 asymmetric activations, which TensorRT does not
build). Then: ms/image at batch 1 (median of interleaved rounds, the runtime's session settings), peak RSS of
a process that loads and runs each graph, parity of each int8 graph against the fp32 graph on 4 reference
images (``recon-export verify``'s int8 tolerances), and ONNX Runtime's profile shares by op type at 512.
With ``--methods``, first the calibration methods side by side on the tiny model and synthetic sample data
(random weights, categories' head fitted): map p99 / score error against the fp32 graph and the image AUROC
gap, the measurement behind ``DEFAULT_CALIBRATION_METHOD``.
Writes benchmarks/results/bench_int8.json and bench_int8.md.

    .venv/bin/python benchmarks/bench_int8.py [--rounds 5] [--threads N] [--presets lite0-256,mvtec-512|none] [--methods]
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
TARGET_SPEEDUP_512 = 1.8

RSS_PROCESS = """
import sys, numpy as np
from reconad.runtime.backends.ort import OrtBackend
images = np.load(sys.argv[2])
with OrtBackend(sys.argv[1], "ort-cpu", max_batch=1) as backend:
    for _ in range(3):
        backend.infer(images)
with open("/proc/self/status") as status:
    print(int(next(line for line in status if line.startswith("VmHWM:")).split()[1]))
"""


def build_graphs(preset: str, work: Path) -> tuple[dict[str, Path], np.ndarray]:
    import onnx
    import torch

    from reconad.export.int8 import max_calibration_images, quantize_to_int8
    from reconad.export.onnx import synthetic_reference_images, trace_to_onnx
    from reconad.model import PRESETS, build_detector

    torch.manual_seed(0)
    config = PRESETS[preset]
    detector = build_detector(config).eval()
    fp32 = trace_to_onnx(detector, 8, 17)
    calibration = synthetic_reference_images(config.input_hw, max_calibration_images(config.input_hw))
    paths = {"fp32": work / f"{preset}-fp32.onnx", "int8": work / f"{preset}-int8.onnx", "int8-u8s8-ort-only": work / f"{preset}-u8s8.onnx"}
    onnx.save(fp32, paths["fp32"])
    started = time.perf_counter()
    onnx.save(quantize_to_int8(fp32, calibration, "minmax"), paths["int8"])
    quantize_seconds = time.perf_counter() - started
    onnx.save(quantize_to_int8(fp32, calibration, "minmax", activation_type="uint8"), paths["int8-u8s8-ort-only"])
    print(f"{preset}: graphs written, int8 quantization {quantize_seconds:.1f} s", file=sys.stderr)
    return paths, synthetic_reference_images(config.input_hw, 4)


def calibration_methods(work: Path) -> dict[str, dict]:
    """Each calibration method on the tiny model: error against the fp32 graph and the image AUROC gap."""
    import torch

    from reconad.export.int8 import load_calibration_images, quantize_to_int8
    from reconad.export.onnx import trace_to_onnx
    from reconad.model import ModelConfig, build_detector
    from reconad.runtime.backends.ort import OrtBackend
    from reconad.runtime.verify import compare_outputs
    from reconad.train.artifacts import image_auroc_of_graphs
    from reconad.train.data import load_mvtec
    from reconad.train.sample_data import SampleDataConfig, write_sample_data

    root = work / "sample-data"
    if not root.exists():
        write_sample_data(root, seed=0, config=SampleDataConfig(image_size=64, num_train=16, num_test_good=8,
                                                                num_test_per_defect=3, categories=("weave", "pill")))  # fmt: skip
    torch.manual_seed(0)
    config = ModelConfig.tiny()
    detector = build_detector(config).eval()
    fp32 = trace_to_onnx(detector, 8, 17)
    calibration = load_calibration_images([root / c / "train" / "good" for c in ("weave", "pill")], config.input_hw)
    test = load_mvtec(root, "test", config.input_hw, ("weave", "pill")).images
    with OrtBackend(fp32.SerializeToString(), "ort-cpu", max_batch=8) as backend:
        reference = backend.infer(test)
    reference = {"images": test, **reference, "category_margin": np.full(len(test), np.inf, np.float32)}
    result = {}
    for method in ("minmax", "percentile", "entropy"):
        model = quantize_to_int8(fp32, calibration, method)
        with OrtBackend(model.SerializeToString(), "ort-cpu", max_batch=8) as backend:
            report = compare_outputs(backend.infer(test), reference, precision="int8", threshold=None)
        aurocs, count = image_auroc_of_graphs({"fp32": fp32.SerializeToString(), "int8": model.SerializeToString()},
                                              root, config.input_hw, ("weave", "pill"))  # fmt: skip
        result[method] = {"map_p99_fraction_of_range": report.anomaly_map.p99_abs / report.map_scale,
                          "score_max_abs": report.image_score.max_abs, "auroc_fp32": aurocs["fp32"],
                          "auroc_int8": aurocs["int8"], "auroc_gap_points": 100 * (aurocs["int8"] - aurocs["fp32"]),
                          "test_images": count}  # fmt: skip
        print(f"method {method}: {result[method]}", file=sys.stderr)
    return result


def time_interleaved(paths: dict[str, Path], image: np.ndarray, rounds: int, threads: int | None) -> dict[str, list[float]]:
    from reconad.runtime.backends.ort import OrtBackend

    backends = {name: OrtBackend(path, "ort-cpu", max_batch=1, num_threads=threads) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for backend in backends.values():
            backend.infer(image)  # warm-up
        for _ in range(rounds):
            for name, backend in backends.items():
                start = time.perf_counter()
                backend.infer(image)
                times[name].append((time.perf_counter() - start) * 1000)
    finally:
        for backend in backends.values():
            backend.close()
    return times


def parity(paths: dict[str, Path], images: np.ndarray) -> dict[str, dict]:
    from reconad.runtime.backends.ort import OrtBackend
    from reconad.runtime.verify import compare_outputs

    outputs = {}
    for name, path in paths.items():
        with OrtBackend(path, "ort-cpu", max_batch=4) as backend:
            outputs[name] = backend.infer(images)
    reference = {"images": images, **outputs["fp32"], "category_margin": np.full(len(images), np.inf, np.float32)}
    result = {}
    for name in paths:
        if name == "fp32":
            continue
        report = compare_outputs(outputs[name], reference, precision="int8", threshold=None)
        result[name] = {
            "map_max_abs": report.anomaly_map.max_abs,
            "map_p99_abs": report.anomaly_map.p99_abs,
            "map_p99_fraction_of_range": report.anomaly_map.p99_abs / report.map_scale,
            "score_max_abs": report.image_score.max_abs,
            "decision_flips": report.decision_flips,
            "passed": report.passed,
            "failures": list(report.failures),
        }
    return result


def peak_rss_mib(path: Path, image_file: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    output = subprocess.run([sys.executable, "-c", RSS_PROCESS, str(path), str(image_file)], capture_output=True,
                            text=True, check=True, env=env).stdout  # fmt: skip
    return int(output.strip().splitlines()[-1]) / 1024


def profile_shares(path: Path, image: np.ndarray, threads: int | None, work: Path) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from profile_onnx import profile_session

    return profile_session(path, image, 2, threads, work)["ops"][:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--presets", default="lite0-256,mvtec-512")
    parser.add_argument("--methods", action="store_true", help="Also compare the calibration methods (tiny model).")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = RESULTS / "bench_int8_work"
    work.mkdir(exist_ok=True)
    result = {"host": platform.node(), "cpu_count": os.cpu_count(), "threads": args.threads, "rounds": args.rounds,
              "load_average_start": os.getloadavg(), "presets": {}}  # fmt: skip
    if args.methods:
        result["calibration_methods"] = calibration_methods(work)
    presets = [preset for preset in args.presets.split(",") if preset and preset != "none"]
    for preset in presets:
        paths, images = build_graphs(preset, work)
        image_file = work / f"{preset}-image.npy"
        np.save(image_file, images[:1])
        times = time_interleaved(paths, images[:1], args.rounds, args.threads)
        medians = {name: statistics.median(values) for name, values in times.items()}
        entry = {
            "ms_per_image": medians,
            "ms_all": times,
            "speedup_vs_fp32": {name: medians["fp32"] / value for name, value in medians.items()},
            "peak_rss_mib": {name: peak_rss_mib(path, image_file) for name, path in paths.items()},
            "parity_vs_fp32_graph": parity(paths, images),
        }
        if preset == "mvtec-512":
            entry["profile"] = {name: profile_shares(paths[name], images[:1], args.threads, work) for name in ("fp32", "int8")}
        result["presets"][preset] = entry
        print(json.dumps({preset: {"ms_per_image": medians, "speedup": entry["speedup_vs_fp32"]}}), file=sys.stderr)
    result["load_average_end"] = os.getloadavg()
    big = result["presets"].get("mvtec-512")
    if big:
        result["target_int8_speedup_512"] = TARGET_SPEEDUP_512
        result["target_met"] = big["speedup_vs_fp32"]["int8"] >= TARGET_SPEEDUP_512
    name = "bench_int8" if presets else "bench_int8_methods"  # --presets none: the method comparison alone
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    lines = [f"load average {result['load_average_start']} -> {result['load_average_end']}", "",
             "| preset | graph | ms/image | x fp32 | peak RSS MiB | map p99 / range | score max abs | flips |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for preset, entry in result["presets"].items():
        for name, ms in entry["ms_per_image"].items():
            check = entry["parity_vs_fp32_graph"].get(name, {})
            lines.append(
                f"| {preset} | {name} | {ms:.1f} | {entry['speedup_vs_fp32'][name]:.2f} | {entry['peak_rss_mib'][name]:.0f} | "
                f"{check.get('map_p99_fraction_of_range', 0):.2%} | {check.get('score_max_abs', 0):.3g} | {check.get('decision_flips', 0)} |"
            )
        for name, rows in entry.get("profile", {}).items():
            shares = ", ".join(f"{row['op_type']} {row['share']:.0%}" for row in rows[:8])
            lines.append(f"\n{preset} {name} profile: {shares}")
    for method, entry in result.get("calibration_methods", {}).items():
        lines.append(f"\ncalibration {method} (tiny model): map p99 {entry['map_p99_fraction_of_range']:.2%} of range, "
                     f"score max abs {entry['score_max_abs']:.3g}, image AUROC {entry['auroc_fp32']:.4f} -> "
                     f"{entry['auroc_int8']:.4f} ({entry['auroc_gap_points']:+.2f} points)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
