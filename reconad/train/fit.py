"""Fitting one reconstruction model for all categories: single process, or DDP under torchrun.

Like DETR's engine.py: ``train_one_epoch`` and ``validate`` are plain functions and ``fit`` is the short
orchestration around them. Only the reconstructor trains (AdamW, StepLR, gradient clipping, MSE on the
frozen backbone's features); without augmentation the features are extracted once and cached.
"""

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reconad.model import PRESETS, AnomalyDetector, ModelConfig, build_detector, save_checkpoint
from reconad.runtime.atomic import atomic_path, write_text_atomic
from reconad.runtime.errors import ReconadError
from reconad.train.metrics import ranking_metrics
from reconad.train.config import VAL_METRICS, TrainConfig
from reconad.train.data import ImageDataset, load_dataset
from reconad.train.memory import retain_freed_memory

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


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        chosen = torch.device("cuda", local_rank) if device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu" if device == "auto" else device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, chosen)


class ProgressBar:
    """One line per epoch: batches done, running loss and images/s; redrawn in place on a terminal."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, num_batches: int):
        self.enabled = enabled
        self.prefix = f"epoch {epoch}/{epochs}"
        self.num_batches = num_batches
        self.interactive = enabled and sys.stderr.isatty()
        self.last_draw = 0.0

    def update(self, done: int, loss: float, images_per_s: float) -> None:
        if not self.interactive or (time.monotonic() - self.last_draw < 0.5 and done < self.num_batches):
            return
        self.last_draw = time.monotonic()
        filled = int(20 * done / self.num_batches)
        bar = "#" * filled + "." * (20 - filled)
        print(f"\r{self.prefix} [{bar}] {done}/{self.num_batches} loss {loss:.4f} {images_per_s:.1f} img/s",
              end="", file=sys.stderr, flush=True)

    def close(self, summary: str) -> None:
        if self.interactive:
            print(f"\r{self.prefix} {summary}\033[K", file=sys.stderr, flush=True)
        elif self.enabled:
            print(f"{self.prefix} {summary}", file=sys.stderr, flush=True)


def _echo(context: DistributedContext, message: str) -> None:
    if context.is_main:
        print(message, file=sys.stderr, flush=True)


def _from_rank0(context: DistributedContext, value):
    """``value`` as rank 0 has it, on every rank (rank 0 alone reads the run folder)."""
    if not context.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def extract_all_features(
    detector: AnomalyDetector, images: np.ndarray, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Backbone features of uint8 [N, H, W, 3] images -> float32 [N, C, h, w] on the CPU."""
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        chunks.append(detector.extract_features(batch).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def fit_category_head(
    detector: AnomalyDetector,
    train_set: ImageDataset,
    features: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
    data_root: str | os.PathLike,
) -> dict:
    """Fit the detector's category centroids on the training images (``AnomalyDetector.fit_category_centroids``).

    Args:
        features: the cached backbone features of ``train_set`` [N, C, h, w], or None to extract them
            (one more backbone pass over the training images).

    Returns:
        The checkpoint provenance entry ``category_head``: ``names`` (centroid order), ``n_images``, ``source``.
    """
    pooled = []
    for start in range(0, len(train_set), batch_size):
        if features is not None:
            batch = features[start : start + batch_size].to(device)
        else:
            batch = detector.extract_features(torch.from_numpy(train_set.images[start : start + batch_size]).to(device))
        pooled.append(detector.pooled_features(batch).cpu())
    names = train_set.category_names
    detector.fit_category_centroids(torch.cat(pooled), train_set.categories, names)
    return {
        "names": list(names),
        "n_images": [train_set.categories.count(name) for name in names],
        "source": f"{len(train_set)} training images of {Path(data_root).resolve()}",
    }


def _flip(images: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal / vertical flips of uint8 [N, H, W, 3], each with probability 0.5 per image."""
    for enabled, axis in ((config.hflip, 2), (config.vflip, 1)):
        if enabled:
            chosen = torch.rand(len(images), generator=generator) < 0.5
            images = torch.where(chosen[:, None, None, None], images.flip(axis), images)
    return images


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def build_optimizer(
    reconstructor: torch.nn.Module, config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.StepLR]:
    """AdamW on every reconstructor parameter (weight decay on all of them, as the official trainer) and
    a StepLR stepped once per epoch: ``lr_gamma`` after every ``lr_step_epochs`` (0 = 80% of the epochs).

    The official trainer calls ``StepLR.step(epoch)`` with the 0-based epoch just finished, which decays
    one epoch later than this (801 epochs at the first rate in its 1000-epoch schedule, here 800).
    """
    optimizer = torch.optim.AdamW(reconstructor.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    step_epochs = config.lr_step_epochs or max(1, int(0.8 * config.epochs))
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_epochs, gamma=config.lr_gamma)


ATTENTION_LOGITS_BUDGET_BYTES = 64 << 20  # per attention-logits tensor [n, nhead, L, L] of one micro-batch


def micro_batch_size_for(reconstructor: torch.nn.Module, features: torch.Tensor,
                         budget_bytes: int = ATTENTION_LOGITS_BUDGET_BYTES) -> int:
    """How many images one forward/backward pass takes so that an attention-logits tensor
    [n, nhead, L, L] (float32) stays within ``budget_bytes`` (64 MiB: 2 images at mvtec-512, whose L is
    1024 tokens; a whole batch at lite0-256, whose L is 256).

    A training step keeps a dozen such tensors for the backward pass (softmax outputs, dropout masks): at
    mvtec-512 batch 8 that is over 10 GiB, and on the 2-core reference machine a step of 8 images in one
    pass ran at a quarter of the per-image rate of passes of 2 (memory traffic and reclaim, measured by
    benchmarks/bench_train.py).
    """
    from reconad.model.transformer import Attention

    module = getattr(reconstructor, "module", reconstructor)  # DDP wraps the reconstructor
    nhead = next((m.nhead for m in module.modules() if isinstance(m, Attention)), 1)
    tokens = features.shape[-2] * features.shape[-1]
    per_image = nhead * tokens * tokens * 4
    return max(1, min(len(features), budget_bytes // per_image))


def training_step(
    reconstructor: torch.nn.Module,
    features: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_clip_norm: float,
    parameters=None,
    jitter_noise: torch.Tensor | None = None,
    where: str = "",
    micro_batch_size: int | None = None,
) -> tuple[float, float]:
    """One optimisation step, the official UniAD trainer's: MSE between the (clean) features and the
    reconstruction of their jittered copy, backward, gradient clipping to ``grad_clip_norm``, optimizer step.

    The batch may pass forward and backward in micro-batches whose gradients add up to the whole batch's
    (gradient accumulation, each micro-batch's mean loss weighted by its share of the batch): the same
    update up to float rounding, in a fraction of the memory. What differs is only which random draws
    each image gets: dropout masks, and the jitter's coin (one per forward pass, as the official trainer
    flips it once per batch; an explicit ``jitter_noise`` is split with the batch).

    Args:
        reconstructor: in training mode (jitter and dropout on); a ``Reconstructor`` or its DDP wrapper
            (gradients are synchronised on the last micro-batch only).
        features: float32 [N, C, h, w], the frozen backbone's features (the reconstruction target).
        parameters: the parameters whose gradients are clipped; default ``reconstructor.parameters()``.
        jitter_noise: the jitter's standard-normal draw, [N, C, h, w]; None draws from torch's generator.
        where: appended to the error message (e.g. " at epoch 3").
        micro_batch_size: images per forward/backward pass; None: ``micro_batch_size_for`` (the whole
            batch when it is small).

    Returns:
        ``(loss, grad_norm)``: the batch's mean squared error and the total gradient norm before clipping.

    Raises:
        ReconadError: the loss is not finite (nothing is updated then).
    """
    chunk = micro_batch_size or micro_batch_size_for(reconstructor, features)
    starts = range(0, len(features), chunk)
    no_sync = getattr(reconstructor, "no_sync", None)  # DDP: reduce gradients once, after the last pass
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for index, start in enumerate(starts):
        part = features[start:start + chunk]
        noise = None if jitter_noise is None else jitter_noise[start:start + chunk]
        last = index == len(starts) - 1
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            reconstruction = reconstructor(part, noise)
            loss = F.mse_loss(reconstruction, part)
            if not torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                raise ReconadError(f"The loss became {loss.item()}{where}; lower the learning rate.")
            (loss * (len(part) / len(features))).backward()
        total += loss.item() * len(part)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        reconstructor.parameters() if parameters is None else parameters, grad_clip_norm
    )
    optimizer.step()
    return total / len(features), float(grad_norm)


def train_one_epoch(
    detector: AnomalyDetector,
    reconstructor: torch.nn.Module,
    source: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    context: DistributedContext,
    config: TrainConfig,
    epoch: int,
) -> dict:
    """One pass over this process's shard of ``source``.

    Args:
        detector: the detector; its backbone runs here only when ``source`` holds images.
        reconstructor: ``detector.reconstructor``, or its DDP wrapper.
        source: cached features float32 [N, C, h, w], or uint8 images [N, H, W, 3] (augmentation on).
        context: rank, world size and device.

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
    progress = ProgressBar(context.is_main, epoch, config.epochs, len(batches))
    detector.train()
    start = time.perf_counter()
    backbone_seconds = 0.0
    loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of loss x batch size, images]
    for done, batch in enumerate(batches, 1):
        if source.dtype == torch.uint8:
            images = _flip(source[batch], config, generator).to(context.device)
            tick = time.perf_counter()
            features = detector.extract_features(images)
            backbone_seconds += time.perf_counter() - tick
        else:
            features = source[batch].to(context.device, non_blocking=True)
        loss, _ = training_step(reconstructor, features, optimizer, config.grad_clip_norm,
                                parameters=detector.reconstructor.parameters(), where=f" at epoch {epoch}")
        loss_sum += torch.tensor([loss * len(batch), len(batch)], dtype=torch.float64)
        elapsed = time.perf_counter() - start
        progress.update(done, loss_sum[0].item() / loss_sum[1].item(), loss_sum[1].item() * context.world_size / elapsed)
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


@torch.no_grad()
def predict_from_features(
    detector: AnomalyDetector, features: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps float32 [N, H, W] and image scores [N] from cached features, in eval mode."""
    was_training = detector.training
    detector.eval()
    maps, scores = [], []
    for start in range(0, len(features), batch_size):
        batch = features[start : start + batch_size].to(device)
        anomaly_map, image_score = detector.score(batch, detector.reconstructor(batch))
        maps.append(anomaly_map[:, 0].cpu().numpy())
        scores.append(image_score.cpu().numpy())
    detector.train(was_training)
    return np.concatenate(maps), np.concatenate(scores)


def validate(dataset: ImageDataset, anomaly_maps: np.ndarray, image_scores: np.ndarray) -> dict:
    """Image AUROC (and pixel AUROC where there are masks) per category and their means."""
    result = {"categories": {}}
    for category in dataset.category_names:
        keep = np.array([c == category for c in dataset.categories])
        metrics = {"image_auroc": ranking_metrics(dataset.labels[keep], image_scores[keep])["auroc"]}
        if dataset.has_masks:
            metrics["pixel_auroc"] = ranking_metrics(dataset.masks[keep].ravel(), anomaly_maps[keep].ravel())["auroc"]
        result["categories"][category] = metrics
    for name in VAL_METRICS:
        values = [m[name] for m in result["categories"].values() if name in m and math.isfinite(m[name])]
        result[name] = float(np.mean(values)) if values else float("nan")
    return result


def _write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def _save_resume_state(path: Path, detector, optimizer, scheduler, epoch: int, best: dict | None) -> None:
    state = {
        "reconstructor": detector.reconstructor.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
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
        return f"Nothing to resume: {run_dir / RESUME_NAME} does not exist."
    try:
        saved = json.loads((run_dir / CONFIG_NAME).read_text())["model_config"]
    except (OSError, ValueError, KeyError):
        return f"{run_dir / CONFIG_NAME} is missing or unreadable; cannot resume."
    if saved != model_config.to_dict():
        return f"{run_dir} was trained with preset {saved.get('preset')!r}, not {config.preset!r}."
    return None


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
    detector: AnomalyDetector  # as trained to the last epoch (model.ckpt may hold an earlier, better one)


def fit(
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: TrainConfig = TrainConfig(),
    resume: bool = False,
    on_epoch_end: Callable[[int, AnomalyDetector, dict], None] | None = None,
) -> FitResult:
    """Train one detector on every (or the chosen) category of ``data_root``; write the run to ``run_dir``.

    Writes (rank 0 only) ``model.ckpt`` (the best validated epoch, else the last), ``config.json``,
    ``train_log.jsonl`` (one JSON object per epoch) and ``resume.pt`` (optimizer and scheduler state for
    ``resume``). Launched by torchrun, every process trains on its shard and DDP averages the gradients.
    The process keeps the memory it frees for reuse from here on (``retain_freed_memory``).
    ``on_epoch_end(epoch, detector, record)`` runs on rank 0 after each epoch (e.g. a benchmark's own
    held-out evaluation); the detector is put back in training mode afterwards.
    """
    started = time.perf_counter()
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
    val_set, problem = None, None
    if config.val_every_epochs > 0 and context.is_main:  # rank 0 alone validates
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
        source = extract_all_features(detector.eval(), train_set.images, config.batch_size, context.device)
        extract_seconds = time.perf_counter() - tick
        _echo(context, f"cached features of {len(train_set)} training images in {extract_seconds:.1f} s "
                       f"({len(train_set) / extract_seconds:.1f} img/s, {cache_bytes / 2**20:.0f} MiB)")
    else:
        source = torch.from_numpy(train_set.images)
    category_head = fit_category_head(
        detector.eval(), train_set, source if use_cache else None, config.batch_size, context.device, data_root
    )
    val_features = None
    if val_set is not None and use_cache:
        val_features = extract_all_features(detector.eval(), val_set.images, config.batch_size, context.device)

    reconstructor: torch.nn.Module = detector.reconstructor
    if context.enabled:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        reconstructor = torch.nn.parallel.DistributedDataParallel(detector.reconstructor, device_ids=device_ids)
    optimizer, scheduler = build_optimizer(detector.reconstructor, config)

    first_epoch, best = 1, None
    if resume_state is not None:
        state = resume_state
        detector.reconstructor.load_state_dict(state["reconstructor"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first_epoch, best = state["epoch"] + 1, json.loads(state["best"])
        _echo(context, f"resuming {run_dir} at epoch {first_epoch}")
        if first_epoch > config.epochs:
            raise ReconadError(f"{run_dir} already trained {state['epoch']} epochs; raise --epochs to continue.")

    provenance = {
        "categories": list(train_set.category_names),
        "category_head": category_head,
        "data": str(Path(data_root).resolve()),
        "normal_classes": list(config.normal_classes) if not train_set.has_masks else None,
        "bit_depth": config.bit_depth,
        "train_config": config.to_dict(),
        "world_size": context.world_size,
        "torch_version": str(torch.__version__),
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
            "world_size": context.world_size,
            "feature_cache": use_cache,
            "feature_cache_seconds": round(extract_seconds, 3),
        })

    stats = {"loss": float("nan")}
    for epoch in range(first_epoch, config.epochs + 1):
        stats = train_one_epoch(detector, reconstructor, source, optimizer, context, config, epoch)
        record = {"epoch": epoch, "lr": scheduler.get_last_lr()[0], **{k: round(v, 6) for k, v in stats.items()}}
        scheduler.step()
        last = epoch == config.epochs
        if val_set is not None and (epoch % config.val_every_epochs == 0 or last):
            if val_features is not None:
                maps, scores = predict_from_features(detector, val_features, config.batch_size, context.device)
            else:
                from reconad.train.evaluate import predict

                maps, scores = predict(detector, val_set.images, config.batch_size, context.device)
                detector.train()
            result = validate(val_set, maps, scores)
            value = result[config.val_metric]
            record["val"] = _json_safe(result)
            if math.isfinite(value) and (best is None or value > best["value"]):
                best = {"epoch": epoch, "value": value}
                save_checkpoint(detector, run_dir / CHECKPOINT_NAME, **provenance, epoch=epoch,
                                val_metric=config.val_metric, val_value=value)
                record["best"] = True
            _echo(context, f"validation epoch {epoch}: mean {config.val_metric} {value:.4f}"
                           + (" (best)" if record.get("best") else f" (best {best['value']:.4f} at epoch {best['epoch']})" if best else ""))
        if on_epoch_end is not None and context.is_main:
            on_epoch_end(epoch, detector, record)
            detector.train()
        if context.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(_json_safe(record)) + "\n")
            _save_resume_state(resume_path, detector, optimizer, scheduler, epoch, best)
        if context.enabled:
            torch.distributed.barrier()  # the others wait while rank 0 validates and writes

    if context.is_main and best is None:
        save_checkpoint(detector, run_dir / CHECKPOINT_NAME, **provenance, epoch=config.epochs)
    if context.enabled:
        torch.distributed.barrier()
    return FitResult(
        run_dir=run_dir,
        checkpoint=run_dir / CHECKPOINT_NAME,
        epochs_trained=config.epochs,
        best_epoch=best["epoch"] if best else None,
        best_value=best["value"] if best else None,
        final_loss=stats["loss"],
        feature_cache=use_cache,
        seconds=time.perf_counter() - started,
        is_main=context.is_main,
        detector=detector.eval(),
    )
