"""Evaluation of a checkpoint on the test split: metrics per category and mean, with a report.

Runs the same ``AnomalyDetector.forward`` that is exported, or an exported artifact itself (``.onnx`` /
``.engine``, through the runtime's Inspector: ``reconad.train.artifacts``). Writes ``metrics.json``, ``report.md``,
``scores.csv`` (every test image's score and category), ROC plots (``roc/<category>.png``, the
operating point marked) and heatmap overlays (``heatmaps/<category>/*.png``). The operating point per
category: the threshold of a calibrated manifest, or ``recon-inspect calibrate``'s rule applied to the
category's good test images, never tuned on its defects; recall, false-alarm rate and confusion counts
at it, and how often the category head names the category.
"""

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reconad.model import AnomalyDetector, category_names, load_detector
from reconad.runtime.atomic import write_text_atomic
from reconad.runtime.config import utc_now_iso
from reconad.runtime.calibration import UNRELATED_DISTANCE, distance_limit_for, threshold_at_fpr
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import Manifest
from reconad.runtime.progress import Progress
from reconad.runtime.thresholds import Calibration, OperatingPointCounts, Threshold
from reconad.train.artifacts import ModelFacts, Predictions, facts_from_manifest, is_artifact, predict_artifact
from reconad.train.metrics import compute_detection_metrics, roc_curve
from reconad.train.data import ImageDataset, list_categories, load_dataset
from reconad.train.learning_curve import format_learning_curve, plot_learning_curve, read_train_log, selection_sentence
from reconad.train.memory import retain_freed_memory

METRIC_COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("au_pro", "AU-PRO@0.3"),
    ("image_ap", "image AP"),
    ("image_f1_max", "image F1-max"),
    ("pixel_ap", "pixel AP"),
    ("pixel_f1_max", "pixel F1-max"),
)


@torch.no_grad()
def predict_outputs(detector: AnomalyDetector, images: np.ndarray, batch_size: int, device: torch.device) -> Predictions:
    """Run the fused forward in eval mode on uint8 [N, H, W, 3] images."""
    detector.eval()
    outputs: list[list[np.ndarray]] = [[], [], [], []]
    with Progress("evaluating", len(images), unit="images", rate_unit="img/s") as progress:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)
            anomaly_map, *rest = detector(batch)
            for pieces, value in zip(outputs, (anomaly_map[:, 0], *rest)):
                pieces.append(value.cpu().numpy())
            progress.advance(len(batch))
    return Predictions(*(np.concatenate(pieces) for pieces in outputs))


def predict(
    detector: AnomalyDetector, images: np.ndarray, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Run the fused forward in eval mode: uint8 [N, H, W, 3] -> maps float32 [N, H, W], scores float32 [N]."""
    predictions = predict_outputs(detector, images, batch_size, device)
    return predictions.anomaly_maps, predictions.image_scores


def evaluate_predictions(dataset: ImageDataset, anomaly_maps: np.ndarray, image_scores: np.ndarray) -> dict:
    """All metrics per category and their mean over categories (NaN where a metric is undefined).

    Returns:
        ``{"categories": {name: {metric: value, "num_images", "num_anomalous"}}, "mean": {metric: value}}``.
    """
    per_category = {}
    for category in dataset.category_names:
        keep = np.array([c == category for c in dataset.categories])
        masked = dataset.category_has_masks(category)
        masks = dataset.masks[keep] if masked else None
        maps = anomaly_maps[keep] if masked else None
        metrics = compute_detection_metrics(dataset.labels[keep], image_scores[keep], masks, maps)
        metrics.update(num_images=int(keep.sum()), num_anomalous=int(dataset.labels[keep].sum()))
        per_category[category] = metrics
    mean = {}
    for name, _ in METRIC_COLUMNS:
        values = [m[name] for m in per_category.values() if name in m and math.isfinite(m[name])]
        mean[name] = float(np.mean(values)) if values else float("nan")
    return {"categories": per_category, "mean": mean}


def facts_from_detector(detector: AnomalyDetector) -> ModelFacts:
    """``ModelFacts`` of a checkpoint's detector (its config, category head and provenance)."""
    provenance = detector.provenance
    return ModelFacts(
        preset=detector.config.preset,
        input_hw=detector.config.input_hw,
        category_names=category_names(detector),
        separation=_centroid_separation(detector),
        trained_categories=tuple(provenance.get("categories") or ()),
        normal_classes=tuple(provenance["normal_classes"]) if provenance.get("normal_classes") else None,
        bit_depth=provenance.get("bit_depth"),
    )


def _centroid_separation(detector: AnomalyDetector) -> np.ndarray:
    """Per centroid, the cosine distance to the nearest other one (``UNRELATED_DISTANCE`` with one centroid)."""
    centroids = detector.category_centroids.detach().double().cpu()
    if len(centroids) < 2:
        return np.full(len(centroids), UNRELATED_DISTANCE)
    distance = 1.0 - centroids @ centroids.T
    distance.fill_diagonal_(float("inf"))
    return distance.min(dim=1).values.numpy()


def _rule_threshold(values: np.ndarray, max_fpr: float, margin: float, source: str) -> Threshold:
    calibration = Calibration(
        method="max_fpr", n_images=int(len(values)), max_fpr=max_fpr, date=utc_now_iso(), source=source, margin=margin
    )
    return Threshold(value=threshold_at_fpr(values, max_fpr, margin), calibration=calibration)


def operating_points(
    dataset: ImageDataset,
    predictions: Predictions,
    model: ModelFacts | AnomalyDetector,
    manifest: Manifest | None = None,
    max_fpr: float = 0.01,
    margin: float = 0.05,
) -> dict:
    """The operating point of every category, with its own threshold and with the one global threshold.

    Thresholds come from ``manifest`` (its category's operating point, else its global one) or, without
    one, from ``recon-inspect calibrate``'s rule (``threshold_at_fpr``) on the category's good test
    images (global: on all of them); defective images never set them. An image beyond the distance
    limit (the manifest's, or the rule's ``distance_limit_for``) counts as unknown, not judged.

    Returns:
        ``{"per_category": {name: point}, "global": {name: point}, "recognition_accuracy": float | None}``,
        each point ``OperatingPointCounts.to_dict()`` plus ``threshold_source`` and ``recognition_accuracy``
        (None where the model names no category); a category without good images or threshold: None.
    """
    facts = model if isinstance(model, ModelFacts) else facts_from_detector(model)
    names, separation = facts.category_names, facts.separation
    named = [names[index] if names else None for index in predictions.categories]
    in_category = {category: np.array([c == category for c in dataset.categories]) for category in dataset.category_names}
    goods = dataset.labels == 0
    global_threshold, global_limit = None, None
    if manifest is not None:
        global_threshold, global_limit = manifest.image_threshold, manifest.distance_limit
    elif goods.sum() >= 2:
        global_threshold = _rule_threshold(predictions.image_scores[goods], max_fpr, margin, "good test images")
        if names:
            limit = distance_limit_for(predictions.category_distances[goods], float(separation.min()), max_fpr, margin)
            global_limit = Threshold.manual(limit, source="rule on good test images")
    per_category, global_points = {}, {}
    for category, keep in in_category.items():
        labels, scores = dataset.labels[keep], predictions.image_scores[keep]
        distances = predictions.category_distances[keep]
        recognized = float(np.mean([named[i] == category for i in np.nonzero(keep)[0]])) if names else None
        threshold, limit, source = None, None, None
        if manifest is not None:
            point = manifest.operating_point(category)
            threshold, limit = point.image_threshold, point.distance_limit
            own = category in manifest.category_thresholds and point is manifest.category_thresholds[category]
            source = f"manifest ({'its own' if own else 'the global'} threshold)"
        elif (labels == 0).sum() >= 2:
            threshold = _rule_threshold(scores[labels == 0], max_fpr, margin, f"{category} good test images")
            source = f"rule on its {(labels == 0).sum()} good test images"
            if category in names:
                value = distance_limit_for(distances[labels == 0], float(separation[names.index(category)]), max_fpr, margin)
                limit = Threshold.manual(value, source="rule on good test images")

        def point_at(rule: Threshold | None, distance_limit: Threshold | None, label: str) -> dict | None:
            if rule is None:
                return None
            unknown = distance_limit.is_exceeded_by(distances) if distance_limit is not None else None
            counts = OperatingPointCounts.count(rule, labels, scores, unknown)
            return {**counts.to_dict(), "threshold_source": label, "recognition_accuracy": recognized}

        per_category[category] = point_at(threshold, limit, source)
        global_source = "manifest (global threshold)" if manifest is not None else "rule on all good test images"
        global_points[category] = point_at(global_threshold, global_limit, global_source)
    accuracy = None
    if names:
        accuracy = float(np.mean([named[i] == c for i, c in enumerate(dataset.categories)]))
    return {"per_category": per_category, "global": global_points, "recognition_accuracy": accuracy}


def format_operating_points(points: dict) -> str:
    """A markdown table: per category, its own and the global threshold with recall, false alarms and counts."""
    lines = [
        "| category | threshold | recall | false-alarm rate | TP | FN | FP | TN | unknown | global threshold | "
        "recall (global) | false-alarm rate (global) | recognition |",
        "|---|" + "---:|" * 12,
    ]
    for category, point in points["per_category"].items():
        own, shared = point or {}, points["global"].get(category) or {}
        row = [category, _fmt_value(own.get("threshold"), ".5g"), _fmt(own.get("recall")), _fmt(own.get("false_alarm_rate"))]
        row += [str(own.get(key, "n/a")) for key in ("true_positives", "false_negatives", "false_positives", "true_negatives", "unknown")]
        row += [_fmt_value(shared.get("threshold"), ".5g"), _fmt(shared.get("recall")), _fmt(shared.get("false_alarm_rate"))]
        row.append(_fmt(own.get("recognition_accuracy")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt_value(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


def format_metrics_table(result: dict) -> str:
    """A markdown table: one row per category and a mean row; n/a where undefined."""
    columns = [(k, label) for k, label in METRIC_COLUMNS if any(k in m for m in result["categories"].values())]
    lines = [
        "| category | " + " | ".join(label for _, label in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for category, metrics in result["categories"].items():
        lines.append(f"| {category} | " + " | ".join(_fmt(metrics.get(k)) for k, _ in columns) + " |")
    lines.append("| **mean** | " + " | ".join(_fmt(result["mean"].get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def _notes(result: dict) -> list[str]:
    """Why a metric is n/a, or below chance, per category."""
    notes = []
    for category, metrics in result["categories"].items():
        for key, label in METRIC_COLUMNS:
            value = metrics.get(key)
            if key.endswith("auroc") and value is not None and math.isfinite(value) and value < 0.5:
                notes.append(f"{category}: {label} is {value:.4f}, below chance: the scores rank defective "
                             "images/pixels LOWER than good ones (reported as is, not flipped).")
        undefined = [label for key, label in METRIC_COLUMNS if key in metrics and not math.isfinite(metrics[key])]
        if undefined:
            good, defective = metrics["num_images"] - metrics["num_anomalous"], metrics["num_anomalous"]
            notes.append(f"{category}: {', '.join(undefined)} n/a: they need both classes, and its test split has "
                         f"{good} good and {defective} defective images (pixels: defective or not); "
                         "left out of the mean.")
    return notes


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _plot_roc(path: Path, category: str, labels, scores, masks=None, maps=None, points=()) -> None:
    """ROC curves of the image (and pixel) scores; ``points``: (label, point dict) operating points to mark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    curves = [("image", labels, scores)]
    if masks is not None:
        curves.append(("pixel", masks.ravel(), maps.ravel()))
    grid = np.linspace(0, 1, 501)
    for name, y, s in curves:
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        if len(fpr) > len(grid):  # millions of pixel thresholds: plot the upper envelope on a grid
            tpr = np.maximum.accumulate(np.interp(grid, fpr, tpr))
            fpr = grid
        axis.plot(fpr, tpr, label=f"{name} AUROC {area:.3f}")
    for (label, point), marker in zip(points, ("o", "s")):
        if point is None or point["recall"] is None or point["false_alarm_rate"] is None:
            continue
        axis.plot(point["false_alarm_rate"], point["recall"], marker=marker, markersize=7, linestyle="none",
                  label=f"{label} {point['threshold']:.4g}: recall {point['recall']:.2f}, FAR {point['false_alarm_rate']:.2f}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {category}", xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _write_overlay(path: Path, image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None,
                   value_range: tuple[float, float], score: float) -> None:
    """Image | heatmap over the image (ground-truth outline in green), side by side.

    The heat is drawn by the line's renderer (``reconad.runtime.line.render.heat_overlay``), so the report
    shows anomalies as an operator sees them live.
    """
    import cv2

    from reconad.runtime.line.render import heat_overlay

    low, high = value_range
    truth = mask if mask is not None and mask.any() else None
    overlay = heat_overlay(image, anomaly_map, low=low, high=max(high, low + 1e-12), truth_mask=truth)  # RGB
    panel = np.ascontiguousarray(np.concatenate([image, overlay], axis=1)[..., ::-1])  # BGR for imwrite
    cv2.putText(panel, f"score {score:.3g}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), panel)


def _heatmap_sample(labels: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` indices: defective and good images alternating, first ones of each first."""
    defective = list(np.nonzero(labels)[0])
    good = list(np.nonzero(labels == 0)[0])
    chosen = []
    while len(chosen) < count and (defective or good):
        for pool in (defective, defective, good):  # two defective per good one
            if pool and len(chosen) < count:
                chosen.append(int(pool.pop(0)))
    return sorted(chosen)


@dataclass(frozen=True)
class EvaluationReport:
    out_dir: Path
    result: dict  # evaluate_predictions' dict, with "operating_points" (operating_points' dict)
    table: str  # markdown
    notes: list[str]
    points_table: str = ""  # markdown: format_operating_points


def _operating_point_text(calibrated, manifest_path, max_fpr: float, margin: float, accuracy: float | None) -> str:
    if calibrated is not None:
        where = (
            f"The thresholds are those of the calibrated manifest `{manifest_path}` (each category's own, else its "
            "global one). The false-alarm rate is measured on the good test images; it is an independent figure "
            "only if the manifest was calibrated on other good images."
        )
    else:
        where = (
            f"The thresholds follow `recon-inspect calibrate`'s rule (max_fpr {max_fpr:g}, margin {margin:g}) on "
            "the good test images: each category's own on its good images, the global one on all of them. The "
            "defective images never set a threshold, so recall is an honest figure; the false-alarm rate is "
            "measured on the same good images that set the threshold (in-sample, at most max_fpr by "
            "construction)."
        )
    where += " Images beyond the distance limit of their category count as unknown, not judged."
    if accuracy is not None:
        where += f" The category head names the right category for {accuracy:.2%} of the test images."
    return where


def _default_categories(facts: ModelFacts, data_root) -> tuple[str, ...] | None:
    """The model's training categories when the data holds all of them, else every category."""
    trained = facts.trained_categories
    try:
        available = set(list_categories(data_root))
    except ReconadError:
        return None  # CIFAR-10 or a layout error that load_dataset reports
    return tuple(trained) if trained and set(trained) <= available else None


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    categories: tuple[str, ...] | None = None,
    batch_size: int = 8,
    device: str = "auto",
    num_heatmaps: int = 6,
    skip_bad_files: bool = False,
    normal_classes: tuple[int, ...] | None = None,
    bit_depth: int | None = None,
    manifest: str | os.PathLike | None = None,
    max_fpr: float = 0.01,
    margin: float = 0.05,
) -> EvaluationReport:
    """Evaluate ``checkpoint`` on the test split of ``data_root`` and write the report to ``out_dir``.

    Args:
        checkpoint: a ``model.ckpt``, or an exported ``.onnx`` / ``.engine`` with its manifest, run through
            the runtime's Inspector (``device``: ``"auto"`` picks its best backend, ``"cpu"`` ONNX Runtime's CPU
            provider); its manifest gives the input size, category names and training categories.
        categories: MVTec categories; default: the checkpoint's training categories (else all).
        num_heatmaps: overlays written per category.
        normal_classes: CIFAR-10 normal classes; default: those the checkpoint was trained with.
        bit_depth: the real depth of 16-bit images that do not record it; default: the training run's.
        manifest: a calibrated artifact manifest (``.json``) whose thresholds give the operating points;
            default: ``recon-inspect calibrate``'s rule on each category's good test images.
        max_fpr: the rule's false-positive rate on good images (without ``manifest``).
        margin: the rule's margin (without ``manifest``).
    """
    retain_freed_memory()  # the process keeps what it frees for the next batch
    calibrated = Manifest.load(manifest) if manifest is not None else None
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                ("cpu" if device == "auto" else device))
    artifact = is_artifact(checkpoint)
    if artifact:
        from reconad.runtime.inspector import load_artifact_manifest

        recorded = load_artifact_manifest(checkpoint)
        if recorded is None:
            raise ReconadError(f"{checkpoint} has no manifest beside it; evaluate the artifact recon-export wrote.")
        facts = facts_from_manifest(recorded, UNRELATED_DISTANCE)
        provenance: dict = {}  # an artifact's manifest does not carry the training run's epoch selection
    else:
        detector = load_detector(checkpoint).to(torch_device)
        facts = facts_from_detector(detector)
        provenance = detector.provenance
    categories = categories or _default_categories(facts, data_root)
    classes = normal_classes or facts.normal_classes or (0, 1, 2, 3, 4)
    bit_depth = bit_depth or facts.bit_depth
    dataset = load_dataset(data_root, "test", facts.input_hw, categories,
                           "skip" if skip_bad_files else "fail", classes, bit_depth=bit_depth)
    for message in dataset.skipped:
        print(f"skipped: {message}", file=sys.stderr)
    if artifact:
        backend = {"auto": "auto", "cpu": "ort-cpu"}.get(device, device)
        _, predictions = predict_artifact(checkpoint, dataset.images, batch_size, backend)
    else:
        predictions = predict_outputs(detector, dataset.images, batch_size, torch_device)
    anomaly_maps, image_scores = predictions.anomaly_maps, predictions.image_scores
    result = evaluate_predictions(dataset, anomaly_maps, image_scores)
    points = operating_points(dataset, predictions, facts, calibrated, max_fpr, margin)
    result["operating_points"] = points
    table = format_metrics_table(result)
    points_table = format_operating_points(points)
    notes = dataset.notes + _notes(result)

    out_dir = Path(out_dir)
    (out_dir / "roc").mkdir(parents=True, exist_ok=True)
    curve = _json_safe(read_train_log(checkpoint))
    saved_epoch = provenance.get("epoch")
    if curve:
        plot_learning_curve(out_dir / "learning_curve.png", curve, saved_epoch)
    for category in dataset.category_names:
        keep = np.nonzero(np.array([c == category for c in dataset.categories]))[0]
        masked = dataset.category_has_masks(category)
        masks = dataset.masks[keep] if masked else None
        maps = anomaly_maps[keep] if masked else None
        marked = (("own threshold", points["per_category"][category]), ("global threshold", points["global"][category]))
        _plot_roc(out_dir / "roc" / f"{category}.png", category, dataset.labels[keep], image_scores[keep], masks, maps,
                  marked)
        value_range = (float(np.percentile(anomaly_maps[keep], 1)), float(np.percentile(anomaly_maps[keep], 99.9)))
        for index in keep[_heatmap_sample(dataset.labels[keep], num_heatmaps)]:
            name = dataset.names[index].replace("/", "_").rsplit(".", 1)[0]
            _write_overlay(out_dir / "heatmaps" / category / f"{name}.png", dataset.images[index],
                           anomaly_maps[index], dataset.masks[index] if masked else None,
                           value_range, float(image_scores[index]))

    payload = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "data": str(Path(data_root).resolve()),
        "preset": facts.preset,
        "input_hw": list(facts.input_hw),
        "pro_fpr_limit": 0.3,
        **_json_safe(result),
        "notes": notes,
        "training": {"selected_by": provenance.get("selected_by"), "epoch": provenance.get("epoch"),
                     "stopped_by_budget": provenance.get("stopped_by_budget", False), "curve": curve},
    }
    write_text_atomic(out_dir / "metrics.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    names = facts.category_names
    rows = ["name,category,label,image_score,recognized_category,category_distance"] + [
        f"{name},{category},{label},{score:.6g},{names[index] if names else ''},{distance:.6g}"
        for name, category, label, score, index, distance in zip(
            dataset.names, dataset.categories, dataset.labels, image_scores, predictions.categories,
            predictions.category_distances,
        )
    ]
    write_text_atomic(out_dir / "scores.csv", "\n".join(rows) + "\n")
    report = [
        f"# Evaluation: {Path(checkpoint).name} ({facts.preset})",
        "",
        f"Data: `{payload['data']}` (test split, {len(dataset)} images). AU-PRO is integrated to a false-positive "
        "rate of 0.3 and normalised, as MVTec AD's evaluation does. AUROCs below 0.5 are reported as they are.",
        "",
        table,
        "",
        "## Operating points",
        "",
        _operating_point_text(calibrated, manifest, max_fpr, margin, points["recognition_accuracy"]),
        "",
        points_table,
        "",
    ]
    if artifact:
        report += ["## Training run", "", "An exported artifact: its training run is the checkpoint's "
                   "(evaluate model.ckpt for the learning curve and the epoch selection).", ""]
    else:
        report += ["## Training run", "", selection_sentence(provenance), ""]
    if curve:
        report += [f"Learning curve from `{Path(checkpoint).parent / 'train_log.jsonl'}`:", "",
                   format_learning_curve(curve, saved_epoch), "", "![learning curve](learning_curve.png)", ""]
    else:
        report += ["No train_log.jsonl beside the checkpoint (an imported or copied checkpoint): no learning curve.", ""]
    if notes:
        report += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    report += ["## ROC curves", ""] + [f"![{c}](roc/{c}.png)" for c in dataset.category_names] + [""]
    report += ["## Heatmaps", "", "Left: the test image; right: the anomaly map over it, ground truth outlined in green.", ""]
    for category in dataset.category_names:
        folder = out_dir / "heatmaps" / category
        report += [f"### {category}", ""] + [
            f"![{p.stem}](heatmaps/{category}/{p.name})" for p in sorted(folder.glob("*.png"))
        ] + [""]
    write_text_atomic(out_dir / "report.md", "\n".join(report))
    return EvaluationReport(out_dir, result, table, notes, points_table)
