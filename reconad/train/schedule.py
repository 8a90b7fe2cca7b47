"""Learning-rate schedules, weight averaging, the time budget and held-out goods: what a recipe is made of.

``build_optimizer`` gives the official UniAD optimiser and StepLR (recipe "official") or a warm-up +
cosine schedule stepped per batch (recipe "budget"); ``WeightAverage`` keeps an exponential moving
average of the reconstructor's weights; ``Budget`` turns ``--minutes`` into a number of epochs from the
epochs' measured time; ``split_holdout`` holds some good training images out for model selection.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from reconad.runtime.errors import ReconadError
from reconad.train.config import TrainConfig


class WarmupCosine:
    """Linear warm-up from 0 to the base rate over ``warmup_epochs``, then cosine decay to 0 at the end
    of ``total_epochs`` (Goyal et al. 2017; Loshchilov & Hutter, SGDR, 2017), stepped once per batch.

    ``set_total_epochs`` changes the end (the time budget re-plans it as epochs are measured); the rate
    follows from the step count, so a change moves the rest of the curve, never the steps already taken.
    Same interface as torch's schedulers where the trainer uses one (``step``, ``get_last_lr``,
    ``state_dict``, ``load_state_dict``); ``per_batch`` tells the trainer when to step it.
    """

    per_batch = True

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, warmup_epochs: float, total_epochs: int):
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.warmup_epochs = warmup_epochs
        self.total_epochs = total_epochs
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        """The rate at 0-based ``step`` as a fraction of the base rate."""
        warmup = self.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        total = max(self.total_epochs * self.steps_per_epoch, warmup + 1)
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        factor = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def set_total_epochs(self, epochs: int) -> None:
        self.total_epochs = epochs
        self._apply()

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_epochs": self.total_epochs, "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.total_epochs = int(state["step_count"]), int(state["total_epochs"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()


def build_optimizer(reconstructor: torch.nn.Module, config: TrainConfig, steps_per_epoch: int = 1):
    """AdamW on every reconstructor parameter (weight decay on all of them, as the official trainer) and
    the recipe's schedule.

    ``schedule`` "step": a StepLR stepped once per epoch, ``lr_gamma`` after every ``lr_step_epochs``
    (0 = 80% of the epochs). The official trainer calls ``StepLR.step(epoch)`` with the 0-based epoch
    just finished, which decays one epoch later than this (801 epochs at the first rate in its
    1000-epoch schedule, here 800). ``schedule`` "cosine": ``WarmupCosine`` over ``config.epochs``
    with ``steps_per_epoch`` batches per epoch.

    Returns:
        ``(optimizer, scheduler)``; ``getattr(scheduler, "per_batch", False)`` says when to step it.
    """
    optimizer = torch.optim.AdamW(reconstructor.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.schedule == "cosine":
        return optimizer, WarmupCosine(optimizer, steps_per_epoch, config.warmup_epochs, config.epochs)
    step_epochs = config.lr_step_epochs or max(1, int(0.8 * config.epochs))
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_epochs, gamma=config.lr_gamma)


def replan(scheduler, config: TrainConfig, epochs: int) -> None:
    """Fit the schedule to ``epochs`` total epochs (the time budget's estimate)."""
    if isinstance(scheduler, WarmupCosine):
        scheduler.set_total_epochs(epochs)
    elif isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and not config.lr_step_epochs:
        scheduler.step_size = max(1, int(0.8 * epochs))


class WeightAverage:
    """An exponential moving average of a module's weights (Polyak & Juditsky 1992), updated after each
    optimiser step through ``torch.optim.swa_utils.AveragedModel``, with the warm-up of the decay that
    TensorFlow's ExponentialMovingAverage(num_updates) and timm's ModelEmaV2 use:
    ``decay_t = min(decay, (1 + t) / (10 + t))``, so the random initial weights fade out quickly.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay

        def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
            t = float(num_averaged)
            d = min(decay, (1.0 + t) / (10.0 + t))
            return averaged + (current - averaged) * (1.0 - d)

        self.model = torch.optim.swa_utils.AveragedModel(module, avg_fn=average, use_buffers=True)

    def update(self, module: torch.nn.Module) -> None:
        self.model.update_parameters(module)

    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module):
        """Within the block ``module`` holds the averaged weights; its own come back afterwards."""
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.model.module.state_dict())
        try:
            yield module
        finally:
            module.load_state_dict(own)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class Budget:
    """``minutes`` for the whole fit, counted from ``started`` (``time.perf_counter``): after each epoch,
    how many epochs in all fit, from the mean measured time per epoch (training and validation) so far.
    Time the caller ``exclude``s (a benchmark's own evaluations) is not counted."""

    def __init__(self, minutes: float, started: float, max_epochs: int):
        self.seconds = minutes * 60.0
        self.started = started
        self.max_epochs = max_epochs
        self.excluded = 0.0
        self.epoch_seconds: list[float] = []

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started - self.excluded

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def record(self, seconds: float) -> None:
        self.epoch_seconds.append(seconds)

    def planned_epochs(self, epochs_done: int) -> int:
        """Total epochs (done ones included) that fit: at least ``epochs_done``, at most ``max_epochs``."""
        if not self.enabled:
            return self.max_epochs
        if not self.epoch_seconds:
            return self.max_epochs
        per_epoch = float(np.mean(self.epoch_seconds))
        more = int((self.seconds - self.elapsed()) // per_epoch) if per_epoch > 0 else self.max_epochs
        return max(epochs_done, min(self.max_epochs, epochs_done + max(0, more)))


def split_holdout(categories: list[str], names: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) of a training set: ``fraction`` of each category's images (at least one,
    chosen by ``seed``) held out, the rest kept; both sorted.

    Raises:
        ReconadError: a category has fewer than two images.
    """
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for category in dict.fromkeys(categories):
        idx = np.array([i for i, c in enumerate(categories) if c == category])
        if len(idx) < 2:
            raise ReconadError(f"{category} has {len(idx)} training image(s); holding some out needs at least 2.")
        idx = idx[rng.permutation(len(idx))]
        n_held = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        held.extend(idx[:n_held].tolist())
        keep.extend(idx[n_held:].tolist())
    return np.array(sorted(keep)), np.array(sorted(held))


@torch.no_grad()
def reconstruction_errors(reconstructor: torch.nn.Module, features: torch.Tensor, batch_size: int,
                          device: torch.device) -> np.ndarray:
    """Per image mean squared error between features [N, C, h, w] and their reconstruction, float64 [N],
    in eval mode (no jitter, no dropout); the module's mode is restored."""
    was_training = reconstructor.training
    reconstructor.eval()
    errors = []
    for start in range(0, len(features), batch_size):
        batch = features[start : start + batch_size].to(device)
        errors.append((reconstructor(batch) - batch).pow(2).mean(dim=(1, 2, 3)).double().cpu())
    reconstructor.train(was_training)
    return torch.cat(errors).numpy()
