"""Operating points on the demo data: per-category vs one global threshold, and category recognition.

For each sample-data seed: write the synthetic data set (``recon-train sample-data``), train the demo's
model (lite0-256, 3 epochs, lr 1e-3, batch 8, no validation: ``scripts/demo.sh``), then

- ``evaluate`` (PyTorch): per category the image AUROC, and the recall and false-alarm rate at the
  calibration rule's threshold (max-fpr 0.01, margin 0.05) on the category's good test images, vs at the
  one global threshold the same rule gives on all good test images; the category head's accuracy;
- the deployed path: export the fp16 ONNX, ``recon-inspect calibrate`` it on the data root (each
  category on its test/good) and read the operating points calibrate reports from the ONNX Runtime run;
  plus how many synthetic foreign images (noise, smooth surfaces, stripes: no training category) it
  flags UNKNOWN, and how many defective test images it wrongly flags UNKNOWN.

Targets (issue 11): no category below 0.9 recall where its image AUROC >= 0.98; recognition >= 0.99.
The false-alarm rates at the thresholds are in-sample (the good test images set them); the
leave-one-out rate is the out-of-sample estimate: each good image judged at the threshold the rule
gives on the other good images (of its category, or of all categories for the global one). Writes
``benchmarks/results/bench_operating_point.json`` and a markdown table, with the load average.

    nice -n 5 .venv/bin/python benchmarks/bench_operating_point.py [--seeds 0 1] [--work /tmp/bench-op]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path


RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RECALL, TARGET_AUROC, TARGET_RECOGNITION = 0.9, 0.98, 0.99


def leave_one_out_false_alarms(pool: list[float], judged: list[int], max_fpr: float, margin: float) -> float:
    """Fraction of the good images ``pool[i]``, ``i`` in ``judged``, at or above the threshold the
    calibration rule gives on ``pool`` without image ``i``."""
    from reconad.runtime.calibration import threshold_at_fpr

    flagged = [pool[i] >= threshold_at_fpr(pool[:i] + pool[i + 1 :], max_fpr, margin) for i in judged]
    return sum(flagged) / len(flagged)


def read_scores(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


def run_seed(seed: int, work: Path, args: argparse.Namespace) -> dict:
    from reconad.export.onnx import export_onnx, synthetic_reference_images
    from reconad.runtime.calibration import CalibrationConfig, calibrate_artifact
    from reconad.runtime.inspector import Inspector
    from reconad.train.config import TrainConfig
    from reconad.train.evaluate import evaluate_checkpoint
    from reconad.train.fit import fit
    from reconad.train.sample_data import write_sample_data

    folder = work / f"seed{seed}"
    data = folder / "data"
    write_sample_data(data, seed=seed, overwrite=True)
    started = time.perf_counter()
    checkpoint = folder / "run" / "model.ckpt"
    if not checkpoint.is_file():
        config = TrainConfig(preset=args.preset, epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size,
                             val_every_epochs=0, seed=0)  # fmt: skip
        fit(data, folder / "run", config)
    train_seconds = time.perf_counter() - started
    report = evaluate_checkpoint(checkpoint, data, folder / "report", num_heatmaps=0, max_fpr=args.max_fpr)
    points = report.result["operating_points"]

    paths = export_onnx(checkpoint, folder / "onnx", precision="fp16", max_batch=8, overwrite=True)
    (onnx_path,) = [path for path in paths if path.suffix == ".onnx"]
    calibration = calibrate_artifact(onnx_path, data, CalibrationConfig(max_fpr=args.max_fpr), report=lambda line: None)
    deployed = {}
    for result in calibration.points:
        if result.category is None or result.counts is None:
            continue
        counts = result.counts
        deployed[result.category] = {
            "threshold": counts.threshold, "recall": counts.recall, "false_alarm_rate": counts.false_alarm_rate,
            "unknown": counts.unknown, "recognition_accuracy": result.recognition_accuracy,
            "distance_limit": result.point.distance_limit.value if result.point.distance_limit else None,
        }  # fmt: skip
    foreign = synthetic_reference_images(calibration.manifest.input_hw, count=args.foreign_images)
    with Inspector.open(onnx_path, "ort-cpu") as inspector:
        foreign_unknown = sum(verdict.is_unknown for verdict in inspector.inspect(foreign))

    goods = [(row["category"], float(row["image_score"])) for row in read_scores(folder / "report" / "scores.csv")
             if row["label"] == "0"]  # fmt: skip
    pool = [score for _, score in goods]
    categories = {}
    for category, metrics in report.result["categories"].items():
        own, shared = points["per_category"][category], points["global"][category]
        mine = [score for name, score in goods if name == category]
        categories[category] = {
            "image_auroc": metrics["image_auroc"],
            "loo_false_alarm_rate_own": leave_one_out_false_alarms(mine, list(range(len(mine))), args.max_fpr, 0.05),
            "loo_false_alarm_rate_global": leave_one_out_false_alarms(
                pool, [i for i, (name, _) in enumerate(goods) if name == category], args.max_fpr, 0.05
            ),
            "num_good": metrics["num_images"] - metrics["num_anomalous"],
            "num_defective": metrics["num_anomalous"],
            "own": own,
            "global": shared,
            "deployed": deployed.get(category),
        }
    return {
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "categories": categories,
        "recognition_accuracy": points["recognition_accuracy"],
        "foreign_images": args.foreign_images,
        "foreign_unknown": int(foreign_unknown),
        "defects_unknown": int(sum(d["unknown"] for d in deployed.values())),
    }


def targets_met(run: dict) -> dict:
    below = [
        name for name, c in run["categories"].items()
        if c["image_auroc"] >= TARGET_AUROC and (c["own"]["recall"] or 0.0) < TARGET_RECALL
    ]  # fmt: skip
    return {"recall": not below, "categories_below": below,
            "recognition": (run["recognition_accuracy"] or 0.0) >= TARGET_RECOGNITION}  # fmt: skip


def _fmt(value, spec=".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(runs: list[dict], load: str) -> str:
    lines = [
        f"load average before / after: {load}",
        "",
        "| seed | category | image AUROC | own threshold | recall (own) | FAR (own) | FAR LOO (own) | global threshold "
        "| recall (global) | FAR (global) | FAR LOO (global) | recall (fp16 ONNX, calibrate) | recognition |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for name, c in run["categories"].items():
            own, shared, deployed = c["own"], c["global"], c["deployed"] or {}
            lines.append(
                f"| {run['seed']} | {name} | {_fmt(c['image_auroc'])} | {_fmt(own['threshold'], '.4g')} | "
                f"{_fmt(own['recall'])} | {_fmt(own['false_alarm_rate'])} | {_fmt(c['loo_false_alarm_rate_own'])} | "
                f"{_fmt(shared['threshold'], '.4g')} | {_fmt(shared['recall'])} | {_fmt(shared['false_alarm_rate'])} | "
                f"{_fmt(c['loo_false_alarm_rate_global'])} | {_fmt(deployed.get('recall'))} | "
                f"{_fmt(own['recognition_accuracy'])} |"
            )
    lines += ["", "| seed | recognition (all test images) | foreign images UNKNOWN | defects UNKNOWN | targets |", "|---|---:|---:|---:|---|"]
    for run in runs:
        met = targets_met(run)
        verdict = "met" if met["recall"] and met["recognition"] else f"NOT met ({met})"
        lines.append(
            f"| {run['seed']} | {_fmt(run['recognition_accuracy'], '.4f')} | {run['foreign_unknown']}/{run['foreign_images']} "
            f"| {run['defects_unknown']} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", type=Path, default=Path("/tmp/reconad-bench-operating-point"))
    parser.add_argument("--preset", default="lite0-256")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-fpr", type=float, default=0.01)
    parser.add_argument("--foreign-images", type=int, default=16)
    args = parser.parse_args()

    before = " ".join(f"{value:.2f}" for value in os.getloadavg())
    runs = [run_seed(seed, args.work, args) for seed in args.seeds]
    after = " ".join(f"{value:.2f}" for value in os.getloadavg())
    load = f"{before} / {after}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "load_average": load, "runs": runs,
               "targets": {str(run["seed"]): targets_met(run) for run in runs}}  # fmt: skip
    (RESULTS / "bench_operating_point.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    table = markdown(runs, load)
    (RESULTS / "bench_operating_point.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
