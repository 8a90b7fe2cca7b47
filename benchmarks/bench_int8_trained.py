"""The int8 recipe on a trained checkpoint, step by step: the checks' numbers, where the error sits, and speed.

For one checkpoint (e.g. the demo's lite0-256 run) and its MVTec-layout data: the fp32 graph, then the int8
graph of the recipe before the trained-model fix (``quantize_to_int8(without=RECIPE_STEPS)``) and with each
step of ``reconad.export.int8.RECIPE_STEPS`` added in turn, calibrated as ``to-onnx`` calibrates (the
categories' ``train/good``). Per variant: ``to-onnx``'s int8 check against PyTorch on its default reference
images (map p99 and score max error as fractions of the map range, category distance, decision flips, the
verdict) and the mean image AUROC of the test split against the fp32 graph's. onnxruntime's own
``qdq_loss_debug`` (``collect_activations`` / ``create_activation_matching`` / ``compute_activation_error``)
gives each variant's signal-to-quantization-noise ratio (dB, against the fp32 graph) of the two sides of the
anomaly head's difference ``f - f_hat`` (backbone features, reconstruction) as the difference reads them, and
of the worst Conv output; the fp32 graph gives the
reconstruction's amplification ``rms(f) / rms(f - f_hat)`` (the factor by which a relative feature error
grows into a relative map error). Then ms/image through ONNX Runtime CPU (the runtime's session settings)
at batch 1 and 8, fp32 and the int8 variants interleaved in one run, with the load average before and after.
Writes benchmarks/results/bench_int8_trained.json and .md.

    .venv/bin/python benchmarks/bench_int8_trained.py RUN/model.ckpt DATA [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"before": ("inputs-only", "depthwise-float", "float-reads"), "+inputs-only": ("depthwise-float", "float-reads"),
            "+depthwise-float": ("float-reads",), "current": ()}  # fmt: skip


def checks(model, reference_images, reference) -> dict:
    from reconad.runtime.backends.ort import OrtBackend
    from reconad.runtime.verify import compare_outputs

    with OrtBackend(model.SerializeToString(), "ort-cpu", max_batch=8, memory_arena=True) as backend:
        outputs = backend.infer(reference_images)
    report = compare_outputs(outputs, {"images": reference_images, **reference}, precision="int8", threshold=None)
    return {"map_p99_of_range": report.anomaly_map.p99_abs / report.map_scale, "map_p99_abs": report.anomaly_map.p99_abs,
            "score_max_of_range": report.image_score.max_abs / report.map_scale, "score_max_abs": report.image_score.max_abs,
            "distance_max_abs": report.category_distance.max_abs if report.category_distance else None,
            "decision_flips": report.decision_flips, "map_range": report.map_scale, "passed": not report.failures,
            "failures": list(report.failures)}  # fmt: skip


def sqnr(models: dict, images: np.ndarray, work: Path) -> dict:
    """qdq_loss_debug's cross-model SQNR (dB) of f, f_hat (the anomaly head's Sub inputs) and the worst Conv output."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import qdq_loss_debug as debug

    from reconad.export.islands import find_fp32_island_groups

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": images[i : i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    activations = {}
    for name, model in models.items():
        path = work / f"{name}.onnx"
        onnx.save(model, path)
        debug.modify_model_output_intermediate_tensors(path, work / f"{name}-saved.onnx")
        activations[name] = debug.collect_activations(str(work / f"{name}-saved.onnx"), Reader())
    fp32 = models["fp32"]
    head = set(find_fp32_island_groups(fp32)["anomaly head"])
    difference = next(node for node in fp32.graph.node if node.name in head and node.op_type == "Sub")
    producer = {name: node for node in fp32.graph.node for name in node.output}

    def after_layer_norm(tensor: str) -> bool:  # f_hat comes out of the transformer, f straight from the backbone
        seen, queue = set(), [tensor]
        while queue:
            node = producer.get(queue.pop())
            if node is not None and node.name not in seen:
                if node.op_type == "LayerNormalization":
                    return True
                seen.add(node.name)
                queue += list(node.input)
        return False

    f_hat, f = sorted(difference.input[:2], key=after_layer_norm, reverse=True)
    convs = [node.output[0] for node in fp32.graph.node if node.op_type == "Conv"]
    f_values = np.concatenate([a.ravel() for a in activations["fp32"][f]]).astype(np.float64)
    f_hat_values = np.concatenate([a.ravel() for a in activations["fp32"][f_hat]]).astype(np.float64)
    result = {"amplification_rms_f_over_rms_residual": float(np.sqrt(np.mean(f_values**2) / np.mean((f_values - f_hat_values) ** 2)))}
    for name in models:
        if name == "fp32":
            continue
        # Cross-model SQNR of the float tensors themselves (compute_activation_error's xmodel_err covers only
        # the tensors its QDQ model quantizes; f and f_hat are not quantized in the current recipe).
        def db(tensor: str, read: str | None = None) -> float:
            return float(debug.compute_signal_to_quantization_noice_ratio(activations["fp32"][tensor], activations[name][read or tensor]))

        # What the difference reads in this graph: a shared Q/DQ pair's rounded copy in the recipe before the fix.
        reads = dict(zip(difference.input, next(node for node in models[name].graph.node if node.name == difference.name).input))
        read_f, read_f_hat = reads[f], reads[f_hat]
        conv_errors = {t: db(t) for t in convs if t in activations[name]}
        worst = min(conv_errors, key=conv_errors.get)
        result[name] = {"f_db": db(f, read_f), "f_hat_db": db(f_hat, read_f_hat), "worst_conv_output": worst,
                        "worst_conv_db": conv_errors[worst]}  # fmt: skip
    return result


def timing(models: dict, image: np.ndarray, rounds: int, threads: int | None) -> dict:
    from reconad.runtime.backends.ort import OrtBackend

    result = {}
    for batch in (1, 8):
        images = np.repeat(image[:1], batch, axis=0)
        backends = {name: OrtBackend(m.SerializeToString(), "ort-cpu", max_batch=batch, num_threads=threads) for name, m in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        try:
            for backend in backends.values():
                backend.infer(images)  # warm-up
            for _ in range(rounds):
                for name, backend in backends.items():
                    start = time.perf_counter()
                    backend.infer(images)
                    times[name].append((time.perf_counter() - start) * 1000 / batch)
        finally:
            for backend in backends.values():
                backend.close()
        medians = {name: statistics.median(values) for name, values in times.items()}
        result[batch] = {"ms_per_image": medians, "vs_fp32": {name: medians["fp32"] / value for name, value in medians.items()}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", type=Path, help="MVTec-layout folder: <category>/train/good calibrates, <category>/test is evaluated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from reconad.export.int8 import load_calibration_images, quantize_to_int8
    from reconad.export.onnx import category_margins, run_torch, synthetic_reference_images, trace_to_onnx
    from reconad.model import category_names, load_detector
    from reconad.runtime.verify import CATEGORY_MARGIN_KEY
    from reconad.train.artifacts import image_auroc_of_graphs

    load_start = os.getloadavg()
    detector = load_detector(args.checkpoint)
    config = detector.config
    fp32 = trace_to_onnx(detector, 8, 17)
    reference_images = synthetic_reference_images(config.input_hw)
    reference = {**run_torch(detector, reference_images, 8), CATEGORY_MARGIN_KEY: category_margins(detector, reference_images, 8)}
    categories = [c for c in category_names(detector) if (args.data / c / "train" / "good").is_dir()]
    calibration = load_calibration_images([args.data / c / "train" / "good" for c in categories], config.input_hw)
    models = {"fp32": fp32}
    for name, without in VARIANTS.items():
        models[name] = quantize_to_int8(fp32, calibration, "minmax", without=without)
    rows = {name: checks(models[name], reference_images, reference) for name in VARIANTS}
    aurocs, count = image_auroc_of_graphs({n: m.SerializeToString() for n, m in models.items()}, args.data, config.input_hw)
    for name in VARIANTS:
        rows[name].update(auroc_fp32=aurocs["fp32"], auroc_int8=aurocs[name], auroc_gap_points=100 * (aurocs[name] - aurocs["fp32"]))
        print(json.dumps({name: rows[name]}), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="int8-debug-") as work:
        noise = sqnr({n: models[n] for n in ("fp32", "before", "current")}, calibration[:8], Path(work))
    print(json.dumps(noise), file=sys.stderr)
    load_before_timing = os.getloadavg()
    speed = timing({n: models[n] for n in ("fp32", "before", "current")}, reference_images, args.rounds, args.threads)
    result = {"checkpoint": str(args.checkpoint), "preset": config.preset, "data": str(args.data), "test_images": count,
              "calibration_images": len(calibration), "cpu_count": os.cpu_count(), "threads": args.threads, "rounds": args.rounds,
              "load_average_start": load_start, "load_average_before_timing": load_before_timing,
              "load_average_end": os.getloadavg(), "variants": rows, "sqnr": noise, "timing": speed}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_int8_trained.json").write_text(json.dumps(result, indent=2))
    lines = [f"{config.preset} trained checkpoint {args.checkpoint}, {count} test images, {len(calibration)} calibration images; "
             f"load average {load_start[0]:.1f} at start, {load_before_timing[0]:.1f} before timing, {os.getloadavg()[0]:.1f} at end", "",
             "| variant | map p99 / range | score max / range | category distance | flips | AUROC fp32 | AUROC int8 | passes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, row in rows.items():
        lines.append(f"| {name} | {100 * row['map_p99_of_range']:.2f}% | {100 * row['score_max_of_range']:.2f}% | "
                     f"{row['distance_max_abs']:.4f} | {row['decision_flips']} | {row['auroc_fp32']:.4f} | {row['auroc_int8']:.4f} | "
                     f"{'yes' if row['passed'] else 'no'} |")  # fmt: skip
    lines += ["", f"amplification rms(f) / rms(f - f_hat): {noise['amplification_rms_f_over_rms_residual']:.3g}", "",
              "| variant | SQNR f (dB) | SQNR f_hat (dB) | worst Conv output (dB) |", "|---|---:|---:|---|"]  # fmt: skip
    for name in ("before", "current"):
        entry = noise[name]
        lines.append(f"| {name} | {entry['f_db']:.1f} | {entry['f_hat_db']:.1f} | {entry['worst_conv_output']} {entry['worst_conv_db']:.1f} |")
    lines += ["", "| batch | fp32 ms/image | int8 before ms/image | int8 current ms/image | before vs fp32 | current vs fp32 |",
              "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for batch, entry in speed.items():
        ms, ratio = entry["ms_per_image"], entry["vs_fp32"]
        lines.append(f"| {batch} | {ms['fp32']:.1f} | {ms['before']:.1f} | {ms['current']:.1f} | {ratio['before']:.2f}x | {ratio['current']:.2f}x |")
    (RESULTS / "bench_int8_trained.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
