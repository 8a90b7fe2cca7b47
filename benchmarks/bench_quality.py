"""Detection quality: the unified UniAD model against a patch-kNN baseline on the same images, and UniAD's
learning curve (AUROC against epochs and against wall-clock minutes), with model selection on held-out
GOOD training images only.

On any MVTec-layout folder (e.g. the one benchmarks/make_real_set.py builds). A fraction of every
category's train/good images (``--holdout``, default 10%) is held out; both methods learn from the rest.
UniAD trains through ``reconad.train.fit.fit`` (what ``recon-train fit`` runs, validation off); after every
``--eval-every`` epochs the benchmark measures the reconstruction error on the held-out goods (which needs
no defects) and, for the curve only, the test metrics. The selected epoch is the one with the lowest
held-out error: the test split never chooses anything. The kNN baseline (``reconad.train.baseline``) uses
the same backbone taps. Metrics (image/pixel AUROC, AU-PRO, per category and mean) come from
``reconad.train.evaluate.evaluate_predictions``, as ``recon-train evaluate`` reports them. Minutes are
the time ``fit`` took so far (loading, feature cache, epochs), without the benchmark's evaluations.

Writes ``<out-dir>/quality-<tag>.json``, ``.md`` and ``-curve.png``.

    .venv/bin/python benchmarks/bench_quality.py data/real --epochs 3 --tag short
    .venv/bin/python benchmarks/bench_quality.py data/real --no-uniad --tag knn       # the baseline alone
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reconad.model import AnomalyDetector, build_detector
from reconad.runtime.errors import ReconadError
from reconad.train.baseline import SUBSAMPLING, PatchKnn, PatchKnnConfig
from reconad.train.config import TrainConfig
from reconad.train.data import ImageDataset, load_dataset
from reconad.train.evaluate import evaluate_predictions
from reconad.train.fit import extract_all_features, fit, predict_from_features, resolve_model_config

RESULTS = Path(__file__).resolve().parent / "results"
HEADLINE = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("au_pro", "AU-PRO"))


def split_holdout(dataset: ImageDataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held out) of ``dataset``: ``fraction`` of each category's images, at least one, held out.

    Raises:
        ReconadError: a category has fewer than two images.
    """
    rng = np.random.default_rng(seed)
    fit_idx, held_idx = [], []
    for category in dataset.category_names:
        idx = np.array([i for i, c in enumerate(dataset.categories) if c == category])
        if len(idx) < 2:
            raise ReconadError(f"{category} has {len(idx)} training image(s); holding some out needs at least 2.")
        idx = idx[rng.permutation(len(idx))]
        n_held = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        held_idx.extend(sorted(idx[:n_held]))
        fit_idx.extend(sorted(idx[n_held:]))
    return np.array(fit_idx), np.array(held_idx)


def make_fit_view(data_root: Path, names: list[str], view_dir: Path) -> Path:
    """A folder whose ``<category>/train/good`` holds links to just ``names`` (paths relative to data_root)."""
    for name in names:
        link = view_dir / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((data_root / name).resolve())
    return view_dir


@torch.no_grad()
def reconstruction_error(detector: AnomalyDetector, features: torch.Tensor, batch_size: int,
                         device: torch.device) -> float:
    """Mean squared error between features [N, C, h, w] and their reconstruction, in eval mode (no jitter)."""
    was_training = detector.training
    detector.eval()
    total = 0.0
    for start in range(0, len(features), batch_size):
        batch = features[start : start + batch_size].to(device)
        total += (detector.reconstructor(batch) - batch).pow(2).mean(dim=(1, 2, 3)).sum().item()
    detector.train(was_training)
    return total / len(features)


def _headline(result: dict) -> dict:
    return {k: result["mean"].get(k) for k, _ in HEADLINE}


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def run_knn(preset: str, backbone_weights: str | None, fit_images: np.ndarray, test_set: ImageDataset,
            config: PatchKnnConfig) -> dict:
    tick = time.perf_counter()
    torch.manual_seed(config.seed)  # the same backbone as fit() builds when it is random ("none")
    detector = build_detector(resolve_model_config(preset), backbone_weights=backbone_weights)
    knn = PatchKnn(detector, config).fit(fit_images)
    fit_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    maps, scores = knn.predict(test_set.images)
    predict_seconds = time.perf_counter() - tick
    result = evaluate_predictions(test_set, maps, scores)
    return {
        "config": config.__dict__,
        "bank_patches": int(len(knn.bank)),
        "training_patches": knn.num_training_patches,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "metrics": result,
    }


def run_uniad(data_root: Path, train_set: ImageDataset, fit_idx: np.ndarray, held_idx: np.ndarray,
              test_set: ImageDataset, train_config: TrainConfig, eval_every: int, run_dir: Path | None) -> dict:
    """Train through ``fit`` on the fit images; the learning curve from its epoch hook."""
    curve: list[dict] = []
    cache: dict = {}
    clock = {"start": 0.0, "outside": 0.0}  # seconds spent in the hook are not training time

    def on_epoch_end(epoch: int, detector: AnomalyDetector, record: dict) -> None:
        entered = time.perf_counter()
        device = next(detector.reconstructor.parameters()).device
        if epoch % eval_every == 0 or epoch == record.get("planned_epochs", train_config.epochs):
            if not cache:
                detector.eval()
                cache["held"] = extract_all_features(detector, train_set.images[held_idx], train_config.batch_size, device)
                cache["test"] = extract_all_features(detector, test_set.images, train_config.batch_size, device)
            held_error = reconstruction_error(detector, cache["held"], train_config.batch_size, device)
            maps, scores = predict_from_features(detector, cache["test"], train_config.batch_size, device)
            result = evaluate_predictions(test_set, maps, scores)
            curve.append({
                "epoch": epoch,
                "minutes": (entered - clock["start"] - clock["outside"]) / 60,
                "epoch_seconds": record.get("seconds"),
                "lr": record.get("lr"),
                "train_loss": record.get("loss"),
                "heldout_error": held_error,
                "test": result,
            })
            print(f"epoch {epoch}: held-out error {held_error:.4f}, test image AUROC "
                  f"{result['mean']['image_auroc']:.4f}, pixel AUROC {result['mean']['pixel_auroc']:.4f} "
                  f"(evaluation {time.perf_counter() - entered:.0f} s, not counted)", file=sys.stderr, flush=True)
        clock["outside"] += time.perf_counter() - entered

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as temp:
        view = make_fit_view(data_root, [train_set.names[i] for i in fit_idx], Path(temp) / "fit-view")
        clock["start"] = time.perf_counter()
        result = fit(view, run_dir or Path(temp) / "run", train_config, on_epoch_end=on_epoch_end)
        total_minutes = (time.perf_counter() - clock["start"] - clock["outside"]) / 60
        if not curve or curve[-1]["epoch"] != result.epochs_trained:  # the budget stopped before a planned end
            record = {"planned_epochs": result.epochs_trained, "loss": result.final_loss}
            on_epoch_end(result.epochs_trained, result.detector, record)
            curve[-1]["minutes"] = total_minutes
    selected = min(curve, key=lambda point: point["heldout_error"])
    epoch_seconds = [p["epoch_seconds"] for p in curve if p["epoch_seconds"] is not None]
    return {
        "train_config": train_config.to_dict(),
        "feature_cache": result.feature_cache,
        "total_minutes": total_minutes,
        "epochs_trained": result.epochs_trained,
        "stopped_by_budget": result.stopped_by_budget,
        "curve": curve,
        "selected_epoch": selected["epoch"],
        "selected_by": "lowest reconstruction error on the held-out good training images",
        "selected": selected["test"],
        "last": curve[-1]["test"],
        "epoch_seconds_median": float(np.median(epoch_seconds)) if epoch_seconds else None,
    }


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def format_report(report: dict) -> str:
    knn, uniad = report.get("knn"), report.get("uniad")
    meta = report["meta"]
    lines = [f"# Quality on {meta['data']}", "",
             f"{meta['num_fit_images']} training images ({meta['num_heldout_images']} more held out), "
             f"{meta['num_test_images']} test images, {len(meta['categories'])} categories; preset {meta['preset']}; "
             f"torch {meta['torch']} with {meta['threads']} threads; load average {meta['load_average_start']} at "
             f"the start, {meta['load_average_end']} at the end.", ""]
    columns = []
    if knn:
        columns.append(("kNN", knn["metrics"]))
    if uniad:
        columns.append((f"UniAD ep {uniad['selected_epoch']} (selected)", uniad["selected"]))
        if uniad["curve"][-1]["epoch"] != uniad["selected_epoch"]:
            columns.append((f"UniAD ep {uniad['curve'][-1]['epoch']} (last)", uniad["last"]))
    header = "| category | " + " | ".join(f"{name} {label}" for key, label in HEADLINE for name, _ in columns) + " |"
    lines += [header, "|---|" + "---:|" * (len(HEADLINE) * len(columns))]
    for category in meta["categories"]:
        cells = [_fmt(result["categories"][category].get(key)) for key, _ in HEADLINE for _, result in columns]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    cells = [_fmt(result["mean"].get(key)) for key, _ in HEADLINE for _, result in columns]
    lines.append("| **mean** | " + " | ".join(f"**{c}**" for c in cells) + " |")
    if knn:
        lines += ["", f"kNN: bank of {knn['bank_patches']} of {knn['training_patches']} patches "
                      f"({knn['config']['subsample']}), fit {knn['fit_seconds']:.0f} s, predict {knn['predict_seconds']:.0f} s."]
    if uniad:
        lines += ["", f"UniAD learning curve ({uniad['selected_by']} selects; test numbers are for the curve only; "
                      f"median epoch {_fmt(uniad['epoch_seconds_median'])} s):", "",
                  "| epoch | minutes | lr | train loss | held-out error | image AUROC | pixel AUROC | AU-PRO |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for point in uniad["curve"]:
            mark = " **(selected)**" if point["epoch"] == uniad["selected_epoch"] else ""
            head = _headline(point["test"])
            lines.append(f"| {point['epoch']}{mark} | {point['minutes']:.1f} | {'n/a' if point['lr'] is None else format(point['lr'], '.2g')} | {_fmt(point['train_loss'])} "
                         f"| {point['heldout_error']:.4f} | {_fmt(head['image_auroc'])} | {_fmt(head['pixel_auroc'])} "
                         f"| {_fmt(head['au_pro'])} |")
    return "\n".join(lines) + "\n"


def plot_curve(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    uniad, knn = report["uniad"], report.get("knn")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=100, sharey=True)
    values = [v for p in uniad["curve"] for v in _headline(p["test"]).values() if v is not None]
    values += [v for v in (_headline(knn["metrics"]).values() if knn else []) if v is not None]
    bottom = max(0.0, min(0.5, min(values, default=0.5) - 0.05))
    for axis, x_key, x_label in ((axes[0], "epoch", "epoch"), (axes[1], "minutes", "training minutes (this machine)")):
        x = [p[x_key] for p in uniad["curve"]]
        for (key, label), colour in zip(HEADLINE, ("tab:blue", "tab:orange", "tab:green")):
            axis.plot(x, [_headline(p["test"])[key] for p in uniad["curve"]], marker="o", color=colour,
                      label=f"UniAD {label}")
            if knn:
                axis.axhline(knn["metrics"]["mean"][key], color=colour, linestyle="--", linewidth=1,
                             label=f"kNN {label}")
        selected = next(p for p in uniad["curve"] if p["epoch"] == uniad["selected_epoch"])
        axis.axvline(selected[x_key], color="grey", linestyle=":", linewidth=1, label="selected (held-out error)")
        axis.set(xlabel=x_label, ylim=(bottom, 1.0))
        axis.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_ylabel("mean over categories (test split)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle(f"UniAD ({report['meta']['preset']}) learning curve vs patch-kNN", fontsize=10)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path)
    plt.close(figure)


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="MVTec-layout folder")
    parser.add_argument("--preset", default="lite0-256")
    parser.add_argument("--backbone-weights", default="pretrained", help='"pretrained", "none" (random) or a file')
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=1, help="epochs between held-out/test evaluations")
    parser.add_argument("--minutes", type=float, default=0.0, help="time budget of fit (--epochs is then the most)")
    parser.add_argument("--recipe", default="auto", help="official, budget or auto (TrainConfig.recipe)")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's")
    parser.add_argument("--learning-rate", "--lr", type=float, help="default: the recipe's")
    parser.add_argument("--schedule", choices=("step", "cosine"), help="default: the recipe's")
    parser.add_argument("--warmup-epochs", type=float, help="default: the recipe's")
    parser.add_argument("--ema-decay", type=float, help="0 = off; default: the recipe's")
    parser.add_argument("--lr-step-epochs", type=int, default=TrainConfig.lr_step_epochs)
    parser.add_argument("--holdout", type=float, default=0.1, help="fraction of each category's good training images")
    parser.add_argument("--categories", help="comma-separated; default all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--knn-subsample", choices=SUBSAMPLING, default=PatchKnnConfig.subsample)
    parser.add_argument("--knn-bank-fraction", type=float, default=PatchKnnConfig.bank_fraction)
    parser.add_argument("--no-knn", dest="knn", action="store_false")
    parser.add_argument("--no-uniad", dest="uniad", action="store_false")
    parser.add_argument("--run-dir", type=Path, help="keep the UniAD run here (default: a temporary folder)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="real")
    args = parser.parse_args(argv)
    try:
        if args.epochs < 1 or args.eval_every < 1 or not 0 < args.holdout < 1:
            raise ReconadError("--epochs and --eval-every must be at least 1 and --holdout in (0, 1).")
        if not (args.knn or args.uniad):
            raise ReconadError("Nothing to do: --no-knn and --no-uniad together.")
        weights = None if args.backbone_weights == "none" else args.backbone_weights
        model_config = resolve_model_config(args.preset)
        categories = tuple(c.strip() for c in args.categories.split(",") if c.strip()) if args.categories else None
        load_average_start = _load_average()
        train_set = load_dataset(args.data, "train", model_config.input_hw, categories)
        test_set = load_dataset(args.data, "test", model_config.input_hw, categories)
        if not test_set.has_masks:
            raise ReconadError(f"{args.data} has no pixel masks; the benchmark needs an MVTec-layout folder.")
        fit_idx, held_idx = split_holdout(train_set, args.holdout, args.seed)
        report = {"meta": {
            "data": str(args.data.resolve()),
            "categories": list(train_set.category_names),
            "preset": args.preset,
            "backbone_weights": args.backbone_weights,
            "num_fit_images": len(fit_idx),
            "num_heldout_images": len(held_idx),
            "heldout_images": [train_set.names[i] for i in held_idx],
            "num_test_images": len(test_set),
            "torch": str(torch.__version__),
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "load_average_start": load_average_start,
            "command": " ".join(sys.argv),
        }}
        real_set = args.data / "real_set.json"
        if real_set.is_file():
            report["meta"]["real_set"] = json.loads(real_set.read_text())["config"]
        if args.knn:
            knn_config = PatchKnnConfig(subsample=args.knn_subsample, bank_fraction=args.knn_bank_fraction, seed=args.seed)
            report["knn"] = run_knn(args.preset, weights, train_set.images[fit_idx], test_set, knn_config)
            print(f"kNN: mean image AUROC {report['knn']['metrics']['mean']['image_auroc']:.4f}, pixel AUROC "
                  f"{report['knn']['metrics']['mean']['pixel_auroc']:.4f}", file=sys.stderr, flush=True)
        if args.uniad:
            train_config = TrainConfig(
                preset=args.preset, backbone_weights=args.backbone_weights, epochs=args.epochs, minutes=args.minutes,
                recipe=args.recipe, batch_size=args.batch_size, learning_rate=args.learning_rate,
                schedule=args.schedule, warmup_epochs=args.warmup_epochs, ema_decay=args.ema_decay,
                lr_step_epochs=args.lr_step_epochs, seed=args.seed, val_every_epochs=0,
                categories=tuple(train_set.category_names),
            )
            report["uniad"] = run_uniad(args.data, train_set, fit_idx, held_idx, test_set, train_config,
                                        args.eval_every, args.run_dir)
        report["meta"]["load_average_end"] = _load_average()
    except ReconadError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"quality-{args.tag}"
    Path(f"{stem}.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    table = format_report(report)
    Path(f"{stem}.md").write_text(table)
    if "uniad" in report:
        plot_curve(report, Path(f"{stem}-curve.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
