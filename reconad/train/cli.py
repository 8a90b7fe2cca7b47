"""recon-train: synthetic sample data, fitting, evaluation and import of official UniAD checkpoints."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from reconad.runtime.cli_common import choices, make_app, value_of
from reconad.runtime.errors import ReconadError, exit_with
from reconad.train.config import SCHEDULES, SELECT_ON, VAL_METRICS, TrainConfig

app = make_app(
    "recon-train", "Train UniAD on defect-free images of all products at once, evaluate it, import official checkpoints."
)

_DEFAULTS = TrainConfig()  # option defaults are None ("not given") so a --config file can set them
# reconad.model.PRESETS and "tiny" (resolve_model_config; held equal by tests/test_cli_conventions.py; importing
# them would load torch)
Preset = choices("Preset", ("mvtec-512", "uniad-224", "cifar-32", "lite0-256", "tiny"))
ValMetric = choices("ValMetric", VAL_METRICS)
Recipe = choices("Recipe", ("auto", "official", "budget"))
Schedule = choices("Schedule", SCHEDULES)
SelectOn = choices("SelectOn", SELECT_ON)


def _split_names(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@app.command("sample-data")
def sample_data_command(
    out: Annotated[Path, typer.Argument(help="Folder to write the data set to (MVTec-AD layout).")],
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same files.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")] = False,
) -> None:
    """Write the deterministic synthetic data set: textures and objects with scratches, holes, stains, patches."""
    from reconad.train.sample_data import write_sample_data

    try:
        summary = write_sample_data(out, seed=seed, overwrite=overwrite)
    except ReconadError as error:
        exit_with(error)
    typer.echo(f"wrote {summary.root}: {len(summary.categories)} categories ({', '.join(summary.categories)}), "
               f"{summary.num_train} train and {summary.num_test} test images")


@app.command("fit")
def fit_command(
    data: Annotated[Path, typer.Argument(help="MVTec-layout folder, or a folder holding cifar-10-batches-py.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: model.ckpt, config.json, train_log.jsonl.")],
    preset: Annotated[Optional[Preset], typer.Option("--preset", help=f"Model preset [default: {_DEFAULTS.preset}].")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with TrainConfig keys (flags win).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help=f"Epochs to train ({_DEFAULTS.epochs}: the official UniAD schedule); with --minutes, the most the budget may take [default: {_DEFAULTS.epochs}].")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="Time budget for the whole fit; the schedule is fitted to the epochs that fit [default: none].")] = None,
    recipe: Annotated[Optional[Recipe], typer.Option("--recipe", help="official (UniAD's: 1e-4, StepLR), budget (warm-up + cosine) or auto (budget for lite0-256) [default: auto].")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Per process [default: the recipe's].")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--learning-rate", "--lr", help="AdamW peak rate [default: the recipe's].")] = None,
    schedule: Annotated[Optional[Schedule], typer.Option("--schedule", help="step (StepLR, stepped per epoch) or cosine (linear warm-up, then cosine decay to 0, stepped per batch) [default: the recipe's].")] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help="Cosine: linear warm-up length [default: the recipe's].")] = None,
    ema_decay: Annotated[Optional[float], typer.Option("--ema-decay", help="Weight average per step; 0 = off [default: the recipe's].")] = None,
    lr_step_epochs: Annotated[Optional[int], typer.Option("--lr-step-epochs", help="StepLR step; 0 = 80% of the epochs [default: 0].")] = None,
    categories: Annotated[Optional[str], typer.Option("--categories", help="Comma-separated [default: all].")] = None,
    normal_classes: Annotated[Optional[str], typer.Option("--normal-classes", help="CIFAR-10: the normal classes [default: 0,1,2,3,4].")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help=f"Seed of the initial weights, the batch order, feature jitter, dropout, flips and the held-out split [default: {_DEFAULTS.seed}].")] = None,
    select_on: Annotated[Optional[SelectOn], typer.Option("--select-on", help="Which epoch becomes model.ckpt: last (no selection), held-out (lowest reconstruction error on --holdout-fraction of the good training images) or test (optimistic) [default: last].")] = None,
    holdout_fraction: Annotated[Optional[float], typer.Option("--holdout-fraction", help="Good training images per category left out of training and scored every --val-every-epochs [default: 0].")] = None,
    val_every_epochs: Annotated[Optional[int], typer.Option("--val-every-epochs", help=f"Held-out (or test) evaluation every K epochs and at the end; 0 = never [default: {_DEFAULTS.val_every_epochs}].")] = None,
    val_metric: Annotated[Optional[ValMetric], typer.Option("--val-metric", help=f"--select-on test only [default: {_DEFAULTS.val_metric}].")] = None,
    keep_resume: Annotated[Optional[bool], typer.Option("--keep-resume", help="Keep resume.pt after the last epoch (to --resume with more --epochs).")] = None,
    hflip: Annotated[Optional[bool], typer.Option("--hflip/--no-hflip", help="Augmentation: flip half the training images left-right each epoch; turns the feature cache off [default: off].")] = None,
    vflip: Annotated[Optional[bool], typer.Option("--vflip/--no-vflip", help="Augmentation: flip half the training images upside down each epoch; turns the feature cache off [default: off].")] = None,
    cache_features: Annotated[Optional[bool], typer.Option("--cache-features/--no-cache-features", help=f"Run the frozen backbone once and train on its cached features (only the transformer runs after the first epoch); augmentation, or a cache over {_DEFAULTS.feature_cache_gib:g} GiB per process, turns it off [default: on].")] = None,
    backbone_weights: Annotated[Optional[str], typer.Option("--backbone-weights", help=f"pretrained, none, or a file [default: {_DEFAULTS.backbone_weights}].")] = None,
    skip_bad_files: Annotated[Optional[bool], typer.Option("--skip-bad-files", help="Leave bad files out (listed) instead of stopping.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help=f"auto, cpu, cuda, cuda:1 ... [default: {_DEFAULTS.device}]")] = None,
    bit_depth: Annotated[Optional[int], typer.Option("--bit-depth", min=1, max=16, help="Real bit depth of 16-bit images without an sBIT chunk (e.g. 12) [default: 16].")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Train one model for all categories. Multi-GPU / multi-node: torchrun --nproc-per-node N $(which recon-train) fit ..."""
    from reconad.runtime.progress import configure
    from reconad.train.config import read_train_config

    configure(quiet=quiet)
    try:
        classes = tuple(int(c) for c in _split_names(normal_classes)) if normal_classes else None
    except ValueError:
        message = f"--normal-classes must be comma-separated integers, got {normal_classes!r}."
        exit_with(ReconadError(message))
    try:
        train_config = read_train_config(
            config, preset=value_of(preset), epochs=epochs, minutes=minutes, recipe=value_of(recipe), batch_size=batch_size,
            learning_rate=learning_rate, schedule=value_of(schedule), warmup_epochs=warmup_epochs, ema_decay=ema_decay,
            select_on=value_of(select_on), holdout_fraction=holdout_fraction, keep_resume=keep_resume,
            lr_step_epochs=lr_step_epochs, categories=_split_names(categories), normal_classes=classes, seed=seed,
            val_every_epochs=val_every_epochs, val_metric=value_of(val_metric), hflip=hflip, vflip=vflip,
            cache_features=cache_features, backbone_weights=backbone_weights, skip_bad_files=skip_bad_files,
            device=device, bit_depth=bit_depth,
        )
        from reconad.train.fit import fit

        result = fit(data, out, train_config, resume=resume)
    except ReconadError as error:
        exit_with(error)
    finally:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # joined by fit under torchrun
    if result.is_main:
        chosen = f", epoch {result.best_epoch} chosen by {result.selected_by}" if result.best_epoch else ", last epoch, no selection"
        budget = f" (stopped at the {train_config.minutes:g}-minute budget)" if result.stopped_by_budget else ""
        typer.echo(f"wrote {result.checkpoint}: {result.epochs_trained} epochs in {result.seconds:.0f} s{budget}, "
                   f"final loss {result.final_loss:.4f}{chosen}")


@app.command("evaluate")
def evaluate_command(
    checkpoint: Annotated[Path, typer.Argument(help="A model.ckpt written by fit (or import-uniad), or an exported .onnx / .engine (run through the runtime).")],
    data: Annotated[Path, typer.Argument(help="MVTec-layout folder, or a folder holding cifar-10-batches-py.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder: metrics.json, report.md, roc/, heatmaps/.")],
    categories: Annotated[Optional[str], typer.Option("--categories", help="Comma-separated [default: the checkpoint's].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per inference call.")] = 8,
    num_heatmaps: Annotated[int, typer.Option("--num-heatmaps", help="Overlays per category.")] = 6,
    skip_bad_files: Annotated[bool, typer.Option("--skip-bad-files", help="Leave unreadable images and missing or mis-sized masks out (listed) instead of stopping.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    bit_depth: Annotated[Optional[int], typer.Option("--bit-depth", min=1, max=16, help="Real bit depth of 16-bit images without an sBIT chunk [default: the training run's].")] = None,
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="A calibrated artifact manifest (.json): "
                        "report the operating points at its thresholds.")] = None,
    max_fpr: Annotated[float, typer.Option("--max-fpr", help="Without --manifest: the calibration rule's "
                       "false-positive rate on the good test images.")] = 0.01,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Image/pixel AUROC, AU-PRO, AP and F1-max per category and mean, and the operating point per category
    (threshold, recall, false-alarm rate, confusion counts, recognition); prints the tables, writes the report."""
    from reconad.runtime.progress import configure
    from reconad.train.evaluate import evaluate_checkpoint

    configure(quiet=quiet)
    try:
        report = evaluate_checkpoint(checkpoint, data, out, _split_names(categories), batch_size, device,
                                     num_heatmaps, skip_bad_files, bit_depth=bit_depth, manifest=manifest,
                                     max_fpr=max_fpr)
    except ReconadError as error:
        exit_with(error)
    typer.echo(report.table)
    typer.echo("")
    typer.echo(report.points_table)
    for note in report.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")


@app.command("import-uniad")
def import_uniad_command(
    checkpoint: Annotated[Path, typer.Argument(help="Official UniAD ckpt.pth.tar (github zhiyuanyou/UniAD).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the reconad checkpoint.")],
) -> None:
    """Convert an official UniAD checkpoint (MVTec config, EfficientNet-B4 at 224 px) into preset uniad-224."""
    from reconad.model import save_checkpoint
    from reconad.model.uniad_import import import_uniad

    try:
        detector = import_uniad(checkpoint)
        save_checkpoint(detector, out, **detector.provenance)
    except ReconadError as error:
        exit_with(error)
    typer.echo(f"wrote {out} (preset {detector.config.preset})")
