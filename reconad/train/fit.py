"""Fitting one reconstruction model for all categories: single process, or DDP under torchrun.

Like DETR's engine.py: ``train_one_epoch`` and ``validate`` are plain functions and ``fit`` is the short
orchestration around them. Only the reconstructor trains (AdamW, the recipe's schedule and weight average
from ``schedule.py``, gradient clipping, MSE on the frozen backbone's features); without augmentation the
features are extracted once and cached.
"""

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reconad.model import PRESETS, AnomalyDetector, ModelConfig, build_detector, save_checkpoint
from reconad.runtime.atomic import atomic_path, write_text_atomic
from reconad.runtime.errors import ReconadError
from reconad.runtime.progress import Progress, format_seconds, note
from reconad.train.config import TrainConfig
from reconad.train.data import ImageDataset, load_dataset
from reconad.train.distributed import DistributedContext, _from_rank0, setup_distributed
from reconad.train.features import extract_all_features, fit_category_head, predict_from_features, validate
from reconad.train.memory import retain_freed_memory
from reconad.train.step import micro_batch_size_for, training_step
from reconad.train.schedule import (Budget, WeightAverage, build_optimizer, reconstruction_errors, replan,
                                    split_holdout)

__all__ = ["DistributedContext", "build_optimizer", "extract_all_features", "fit", "fit_category_head",  # re-exported
           "micro_batch_size_for", "predict_from_features", "setup_distributed", "train_one_epoch", "training_step", "validate"]

CHECKPOINT_NAME = "model.ckpt"
CONFIG_NAME = "config.json"
LOG_NAME = "train_log.jsonl"
RESUME_NAME = "resume.pt"


def resolve_model_config(preset: str) -> ModelConfig:
    """A named preset; ``tiny`` is the test-sized config (random-weight smoke runs only)."""
    if preset == "tiny":
        return ModelConfig.tiny()
    if preset not in PRESETS:
        raise ReconadError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]


def _echo(context: DistributedContext, message: str) -> None:
    if context.is_main:
        note(message)


def _flip(images: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal / vertical flips of uint8 [N, H, W, 3], each with probability 0.5 per image."""
    for enabled, axis in ((config.hflip, 2), (config.vflip, 1)):
        if enabled:
            chosen = torch.rand(len(images), generator=generator) < 0.5
            images = torch.where(chosen[:, None, None, None], images.flip(axis), images)
    return images


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def train_one_epoch(
    detector: AnomalyDetector,
    reconstructor: torch.nn.Module,
    source: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    context: DistributedContext,
    config: TrainConfig,
    epoch: int,
    on_step: Callable[[], None] | None = None,
    epochs: int | None = None,
) -> dict:
    """One pass over this process's shard of ``source``.

    Args:
        detector: the detector; its backbone runs here only when ``source`` holds images.
        reconstructor: ``detector.reconstructor``, or its DDP wrapper.
        source: cached features float32 [N, C, h, w], or uint8 images [N, H, W, 3] (augmentation on).
        context: rank, world size and device.
        on_step: called after every optimiser step (a per-batch schedule, the weight average).
        epochs: the total shown in the progress line (default ``config.epochs``; a budget's estimate).

    Returns:
        ``loss`` (mean over all processes), ``images_per_s`` (all processes), ``seconds``,
        ``backbone_seconds`` (time in the backbone on this process; 0 with cached features).
    """
    generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, context.rank))
    torch.manual_seed(_epoch_seed(config.seed, epoch, context.rank))  # feature jitter and dropout
    sampler = torch.utils.data.DistributedSampler(
        range(len(source)), num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed
    )
    sampler.set_epoch(epoch)
    indices = torch.tensor(list(sampler))
    batches = indices.split(config.batch_size)
    progress = Progress(f"epoch {epoch}/{epochs or config.epochs}", len(batches), unit="batches",
                        rate_unit="img/s", rate_scale=config.batch_size * context.world_size, enabled=context.is_main)
    detector.train()
    start = time.perf_counter()
    backbone_seconds = 0.0
    loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of loss x batch size, images]
    for batch in batches:
        if source.dtype == torch.uint8:
            images = _flip(source[batch], config, generator).to(context.device)
            tick = time.perf_counter()
            features = detector.extract_features(images)
            backbone_seconds += time.perf_counter() - tick
        else:
            features = source[batch].to(context.device, non_blocking=True)
        loss, _ = training_step(reconstructor, features, optimizer, config.grad_clip_norm,
                                parameters=detector.reconstructor.parameters(), where=f" at epoch {epoch}")
        if on_step is not None:
            on_step()
        loss_sum += torch.tensor([loss * len(batch), len(batch)], dtype=torch.float64)
        progress.advance(1, loss=round(loss_sum[0].item() / loss_sum[1].item(), 4))
    if context.enabled:
        torch.distributed.all_reduce(loss_sum)
    seconds = time.perf_counter() - start
    stats = {
        "loss": loss_sum[0].item() / loss_sum[1].item(),
        "images_per_s": loss_sum[1].item() / seconds,
        "seconds": seconds,
        "backbone_seconds": backbone_seconds,
    }
    progress.close(f"loss {stats['loss']:.4f} {stats['images_per_s']:.1f} img/s {seconds:.1f} s")
    return stats


def _write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def _save_resume_state(path: Path, detector, optimizer, scheduler, average, epoch: int, best: dict | None,
                       planned: int) -> None:
    state = {
        "reconstructor": detector.reconstructor.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "average": average.state_dict() if average is not None else None,
        "epoch": epoch,
        "planned_epochs": planned,
        "best": json.dumps(best),
    }
    with atomic_path(path) as temp:
        torch.save(state, temp)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _check_run_dir(run_dir: Path, model_config: ModelConfig, config: TrainConfig, resume: bool) -> str | None:
    """Why ``run_dir`` cannot take this run, or None."""
    if not resume:
        if (run_dir / CHECKPOINT_NAME).exists() or (run_dir / RESUME_NAME).exists():
            return f"{run_dir} already holds a run; pass --resume to continue it or choose another --out."
        return None
    if not (run_dir / RESUME_NAME).is_file():
        finished = " (a finished run keeps it only with --keep-resume)" if (run_dir / CHECKPOINT_NAME).exists() else ""
        return f"Nothing to resume: {run_dir / RESUME_NAME} does not exist{finished}."
    try:
        saved = json.loads((run_dir / CONFIG_NAME).read_text())["model_config"]
    except (OSError, ValueError, KeyError):
        return f"{run_dir / CONFIG_NAME} is missing or unreadable; cannot resume."
    if saved != model_config.to_dict():
        return f"{run_dir} was trained with preset {saved.get('preset')!r}, not {config.preset!r}."
    return None


def selection_text(config: TrainConfig, num_held: int = 0) -> str:
    """Which split chose the saved epoch, in the words the report uses."""
    if config.select_on == "held-out":
        return f"lowest reconstruction error on {num_held} held-out good training images"
    if config.select_on == "test":
        return f"best mean {config.val_metric} on the test split (optimistic: the test data chose the epoch)"
    return "last epoch, no selection"


@dataclass(frozen=True)
class FitResult:
    run_dir: Path
    checkpoint: Path
    epochs_trained: int
    best_epoch: int | None
    best_value: float | None
    final_loss: float
    feature_cache: bool
    seconds: float
    is_main: bool  # rank 0 (the process that wrote the run)
    detector: AnomalyDetector  # as trained to the last epoch (averaged weights where the recipe averages)
    selected_by: str = "last epoch, no selection"
    stopped_by_budget: bool = False


def _hold_out(train_set: ImageDataset, config: TrainConfig) -> tuple[ImageDataset, np.ndarray | None]:
    """(training images, held-out good images uint8 [M, H, W, 3] or None) per ``config.holdout_fraction``."""
    if config.holdout_fraction <= 0:
        return train_set, None
    keep, held = split_holdout(train_set.categories, train_set.names, config.holdout_fraction, config.seed)
    pick = lambda values, idx: [values[i] for i in idx]  # noqa: E731
    kept = dataclasses.replace(train_set, images=train_set.images[keep], masks=train_set.masks[keep],
                               labels=train_set.labels[keep], categories=pick(train_set.categories, keep),
                               names=pick(train_set.names, keep))
    return kept, train_set.images[held]


def fit(
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: TrainConfig = TrainConfig(),
    resume: bool = False,
    on_epoch_end: Callable[[int, AnomalyDetector, dict], None] | None = None,
) -> FitResult:
    """Train one detector on every (or the chosen) category of ``data_root``; write the run to ``run_dir``.

    Writes (rank 0 only) ``model.ckpt`` (the selected epoch, see ``config.select_on``; by default the
    last), ``config.json``, ``train_log.jsonl`` (one JSON object per epoch: loss, lr, seconds, minutes
    since the start, held-out error and test metrics where measured) and, while training, ``resume.pt``
    (optimizer, schedule and weight-average state for ``resume``; removed at the end unless
    ``config.keep_resume``). With ``config.minutes`` the fit stops before the epoch that would not end
    within the budget (estimated from the epochs' mean measured time) and the schedule is re-planned to
    the epochs that fit. Launched by torchrun, every process trains on its shard and DDP averages the
    gradients. The process keeps the memory it frees for reuse from here on (``retain_freed_memory``).
    ``on_epoch_end(epoch, detector, record)`` runs on rank 0 after each epoch (e.g. a benchmark's own
    evaluation; its time is not counted in the budget); the detector holds the weights that would be
    saved and is put back in training mode afterwards.
    """
    started = time.perf_counter()
    budget = Budget(config.minutes, started, config.epochs)
    retain_freed_memory()
    context = setup_distributed(config.device)
    run_dir = Path(run_dir)
    model_config = resolve_model_config(config.preset)
    log_path = run_dir / LOG_NAME
    resume_path = run_dir / RESUME_NAME
    problem, resume_state = None, None
    if context.is_main:
        problem = _check_run_dir(run_dir, model_config, config, resume)
        if problem is None and resume:
            resume_state = torch.load(resume_path, map_location="cpu", weights_only=True)
    problem = _from_rank0(context, problem)  # every rank raises, so none waits forever
    if problem is not None:
        raise ReconadError(problem)
    resume_state = _from_rank0(context, resume_state)

    on_bad_file = "skip" if config.skip_bad_files else "fail"
    categories = config.categories or None
    train_set = load_dataset(data_root, "train", model_config.input_hw, categories, on_bad_file, config.normal_classes,
                             bit_depth=config.bit_depth)
    for message in train_set.skipped:
        _echo(context, f"skipped: {message}")
    train_set, held_images = _hold_out(train_set, config)
    val_set, problem = None, None
    if config.select_on == "test" and context.is_main:  # rank 0 alone validates
        try:
            val_set = load_dataset(data_root, "test", model_config.input_hw, categories, on_bad_file,
                                   config.normal_classes, bit_depth=config.bit_depth)
        except ReconadError as error:
            problem = str(error)
    problem = _from_rank0(context, problem)
    if problem is not None:
        raise ReconadError(problem)
    for message in val_set.skipped if val_set is not None else []:
        _echo(context, f"skipped: {message}")

    torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    weights = None if config.backbone_weights == "none" else config.backbone_weights
    detector = build_detector(model_config, backbone_weights=weights).to(context.device)

    cache_bytes = len(train_set) * model_config.channels * model_config.num_tokens * 4
    use_cache = config.cache_features and not config.augmented and cache_bytes <= config.feature_cache_gib * 2**30
    if config.cache_features and not config.augmented and not use_cache:
        _echo(context, f"feature cache off: it would need {cache_bytes / 2**30:.1f} GiB (> {config.feature_cache_gib}).")
    extract_seconds = 0.0
    if use_cache:
        tick = time.perf_counter()
        source = extract_all_features(detector.eval(), train_set.images, config.batch_size, context.device,
                                      show=context.is_main)
        extract_seconds = time.perf_counter() - tick
        _echo(context, f"cached features of {len(train_set)} training images in {extract_seconds:.1f} s "
                       f"({len(train_set) / extract_seconds:.1f} img/s, {cache_bytes / 2**20:.0f} MiB)")
    else:
        source = torch.from_numpy(train_set.images)
    category_head = fit_category_head(
        detector.eval(), train_set, source if use_cache else None, config.batch_size, context.device, data_root
    )
    val_features = held_features = None
    if val_set is not None and use_cache:
        val_features = extract_all_features(detector.eval(), val_set.images, config.batch_size, context.device,
                                            description="caching test features")
    if held_images is not None and context.is_main:
        held_features = extract_all_features(detector.eval(), held_images, config.batch_size, context.device,
                                             description="caching held-out features")

    reconstructor: torch.nn.Module = detector.reconstructor
    if context.enabled:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        reconstructor = torch.nn.parallel.DistributedDataParallel(detector.reconstructor, device_ids=device_ids)
    steps_per_epoch = math.ceil(math.ceil(len(source) / context.world_size) / config.batch_size)
    optimizer, scheduler = build_optimizer(detector.reconstructor, config, steps_per_epoch)
    average = WeightAverage(detector.reconstructor, config.ema_decay) if config.ema_decay > 0 else None

    first_epoch, best, planned = 1, None, config.epochs
    if resume_state is not None:
        state = resume_state
        detector.reconstructor.load_state_dict(state["reconstructor"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if average is not None and state.get("average") is not None:
            average.load_state_dict(state["average"])
        first_epoch, best = state["epoch"] + 1, json.loads(state["best"])
        planned = max(state.get("planned_epochs", config.epochs), state["epoch"]) if config.minutes else config.epochs
        _echo(context, f"resuming {run_dir} at epoch {first_epoch}")
        if first_epoch > config.epochs:
            raise ReconadError(f"{run_dir} already trained {state['epoch']} epochs; raise --epochs to continue.")
        budget.max_epochs = config.epochs
    selected_by = selection_text(config, 0 if held_images is None else len(held_images))

    def on_step() -> None:
        if getattr(scheduler, "per_batch", False):
            scheduler.step()
        if average is not None:
            average.update(detector.reconstructor)

    provenance = {
        "categories": list(train_set.category_names),
        "category_head": category_head,
        "data": str(Path(data_root).resolve()),
        "normal_classes": list(config.normal_classes) if not train_set.has_masks else None,
        "bit_depth": config.bit_depth,
        "train_config": config.to_dict(),
        "world_size": context.world_size,
        "torch_version": str(torch.__version__),
        "selected_by": selected_by,
    }
    detector.provenance = dict(provenance)  # as load_detector gives it back (category_names reads it)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(run_dir / CONFIG_NAME, {
            "train_config": config.to_dict(),
            "model_config": model_config.to_dict(),
            "data": provenance["data"],
            "categories": provenance["categories"],
            "num_train_images": len(train_set),
            "num_heldout_images": 0 if held_images is None else len(held_images),
            "selected_by": selected_by,
            "world_size": context.world_size,
            "feature_cache": use_cache,
            "feature_cache_seconds": round(extract_seconds, 3),
        })

    stats, epoch = {"loss": float("nan")}, first_epoch - 1
    while epoch < planned:
        epoch += 1
        epoch_started, hook_seconds = time.perf_counter(), 0.0
        stats = train_one_epoch(detector, reconstructor, source, optimizer, context, config, epoch, on_step,
                                epochs=planned)
        record = {"epoch": epoch, "planned_epochs": planned, "lr": scheduler.get_last_lr()[0],
                  **{k: round(v, 6) for k, v in stats.items()}}
        scheduler.step() if not getattr(scheduler, "per_batch", False) else None
        last = epoch == planned
        weights = average.applied(detector.reconstructor) if average is not None else contextlib.nullcontext()
        with weights:  # validate, save and hand over the weights the run keeps (the average, if any)
            validating = config.val_every_epochs > 0 and (epoch % config.val_every_epochs == 0 or last)
            value = None
            if validating and held_features is not None:
                errors = reconstruction_errors(detector.reconstructor, held_features, config.batch_size, context.device)
                record["heldout_error"] = round(float(errors.mean()), 6)
                if config.select_on == "held-out":
                    value = -float(errors.mean())
            if validating and val_set is not None:
                if val_features is not None:
                    maps, scores = predict_from_features(detector, val_features, config.batch_size, context.device)
                else:
                    from reconad.train.evaluate import predict

                    maps, scores = predict(detector, val_set.images, config.batch_size, context.device)
                    detector.train()
                result = validate(val_set, maps, scores)
                record["val"] = _json_safe(result)
                value = result[config.val_metric]
            if value is not None and math.isfinite(value) and (best is None or value > best["value"]):
                best = {"epoch": epoch, "value": value}
                if context.is_main:
                    save_checkpoint(detector, run_dir / CHECKPOINT_NAME, **provenance, epoch=epoch,
                                    val_metric="heldout_error" if config.select_on == "held-out" else config.val_metric,
                                    val_value=abs(value) if config.select_on == "held-out" else value)
                record["best"] = True
            if value is not None and best is not None:
                shown = (lambda v: f"held-out error {abs(v):.5f}") if config.select_on == "held-out" \
                    else (lambda v: f"mean {config.val_metric} {v:.4f}")
                _echo(context, f"validation epoch {epoch}: {shown(value)}"
                               + (" (best)" if record.get("best") else f" (best {shown(best['value'])} at epoch {best['epoch']})"))
            elif "heldout_error" in record:
                _echo(context, f"validation epoch {epoch}: held-out error {record['heldout_error']:.5f}")
            if on_epoch_end is not None and context.is_main:
                tick = time.perf_counter()
                on_epoch_end(epoch, detector, record)
                detector.train()
                hook_seconds = time.perf_counter() - tick
                budget.exclude(hook_seconds)
        budget.record(time.perf_counter() - epoch_started - hook_seconds)
        record["minutes"] = round(budget.elapsed() / 60, 4)
        if budget.enabled:  # re-planned from the epochs measured so far, before the ETA: it is the budget's
            planned = _from_rank0(context, budget.planned_epochs(epoch))
            if planned > epoch:
                replan(scheduler, config, planned)
        if epoch < planned:  # the run's ETA from the mean epoch so far (validation included)
            left = float(np.mean(budget.epoch_seconds)) * (planned - epoch)
            _echo(context, f"run: {epoch}/{planned} epochs after {format_seconds(budget.elapsed())}, "
                           f"{format_seconds(left)} left")
        if context.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(_json_safe(record)) + "\n")
            _save_resume_state(resume_path, detector, optimizer, scheduler, average, epoch, best, planned)
        if context.enabled:
            torch.distributed.barrier()  # the others wait while rank 0 validates and writes

    stopped_by_budget = budget.enabled and epoch < config.epochs
    if stopped_by_budget:
        _echo(context, f"time budget of {config.minutes:g} min: stopped after epoch {epoch} "
                       f"({budget.elapsed() / 60:.1f} min used)")
    if context.is_main:
        weights = average.applied(detector.reconstructor) if average is not None else contextlib.nullcontext()
        with weights:
            if best is None:
                save_checkpoint(detector, run_dir / CHECKPOINT_NAME, **provenance, epoch=epoch,
                                stopped_by_budget=stopped_by_budget)
        if not config.keep_resume:
            resume_path.unlink(missing_ok=True)
    if context.enabled:
        torch.distributed.barrier()
    if average is not None:
        detector.reconstructor.load_state_dict(average.model.module.state_dict())
    return FitResult(
        run_dir=run_dir,
        checkpoint=run_dir / CHECKPOINT_NAME,
        epochs_trained=epoch,
        best_epoch=best["epoch"] if best else None,
        best_value=(abs(best["value"]) if config.select_on == "held-out" else best["value"]) if best else None,
        final_loss=stats["loss"],
        feature_cache=use_cache,
        seconds=time.perf_counter() - started,
        is_main=context.is_main,
        detector=detector.eval(),
        selected_by=selected_by,
        stopped_by_budget=stopped_by_budget,
    )
