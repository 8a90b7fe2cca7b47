"""The learning curve of a training run, from its ``train_log.jsonl``: for ``recon-train evaluate``'s report.

Per epoch: the training loss, the learning rate, the minutes since the fit started and, where the run
measured them, the held-out reconstruction error (``--holdout-fraction``) and the test metric
(``--select-on test``). Shown against epochs and against minutes, with the saved epoch and the split
that chose it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

LOG_NAME = "train_log.jsonl"  # as reconad.train.fit writes it


def read_train_log(checkpoint: str | Path) -> list[dict]:
    """The records of ``train_log.jsonl`` beside ``checkpoint``; [] when there is none (an imported
    checkpoint) or a line is unreadable (a log cut off mid-write keeps its earlier lines)."""
    path = Path(checkpoint).parent / LOG_NAME
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if isinstance(record, dict) and "epoch" in record:
            records.append(record)
    return records


def _num(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def selection_sentence(provenance: dict) -> str:
    """Which split chose the saved epoch, e.g. "epoch 7 of 9, chosen by lowest reconstruction error on 48
    held-out good training images", or "epoch 9, last epoch, no selection"."""
    epoch = provenance.get("epoch")
    chosen = provenance.get("selected_by") or "unknown (a checkpoint from before the selection was recorded)"
    budget = " (the fit stopped at its time budget)" if provenance.get("stopped_by_budget") else ""
    if epoch is None:
        return f"Model selection: {chosen}."
    if chosen == "last epoch, no selection":
        return f"Saved epoch {epoch}: the last epoch, no selection{budget}."
    return f"Saved epoch {epoch}, chosen by {chosen}{budget}."


def format_learning_curve(records: list[dict], saved_epoch: int | None = None) -> str:
    """A markdown table: epoch, minutes, lr, train loss, held-out error, test metric (where measured)."""
    has_held = any("heldout_error" in r for r in records)
    has_val = any("val" in r for r in records)
    header = ["epoch", "minutes", "lr", "train loss"] + (["held-out error"] if has_held else []) + \
        (["test image AUROC (selection only)"] if has_val else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in records:
        mark = " (saved)" if r["epoch"] == saved_epoch else ""
        cells = [f"{r['epoch']}{mark}", _num(r.get("minutes"), ".1f"), _num(r.get("lr"), ".2g"), _num(r.get("loss"), ".4f")]
        if has_held:
            cells.append(_num(r.get("heldout_error"), ".5f"))
        if has_val:
            cells.append(_num((r.get("val") or {}).get("image_auroc"), ".4f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_learning_curve(path: Path, records: list[dict], saved_epoch: int | None = None) -> None:
    """Loss (and held-out error) against epochs and against minutes, the saved epoch marked; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100, sharey=True)
    for axis, key, label in ((axes[0], "epoch", "epoch"), (axes[1], "minutes", "minutes since the fit started")):
        points = [r for r in records if isinstance(r.get(key), (int, float))]
        axis.plot([r[key] for r in points], [r.get("loss") for r in points], marker="o", label="train loss")
        held = [r for r in points if isinstance(r.get("heldout_error"), (int, float))]
        if held:
            axis.plot([r[key] for r in held], [r["heldout_error"] for r in held], marker="s", label="held-out error")
        saved = [r[key] for r in points if r["epoch"] == saved_epoch]
        if saved:
            axis.axvline(saved[0], color="grey", linestyle=":", label="saved epoch")
        axis.set(xlabel=label, yscale="log")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("feature MSE")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
