"""TrainConfig: every setting of a training run, saved with it; torch-free so the CLI's --help stays fast.

Precedence: the dataclass defaults < a TOML file (``--config``) < command-line flags. The fields a
recipe sets (``RECIPE_FIELDS``) default to None, "the recipe's": ``__post_init__`` fills them from
``RECIPES[recipe]``, so every constructed config holds concrete values and ``to_dict`` records them.
"""

import dataclasses
import os
from dataclasses import dataclass

from reconad.runtime.config import load_toml, resolve
from reconad.runtime.errors import ReconadError

VAL_METRICS = ("image_auroc", "pixel_auroc")
SCHEDULES = ("step", "cosine")
SELECT_ON = ("last", "held-out", "test")

# "official": the UniAD trainer's (You et al. 2022, configs/mvtec/config.yaml): AdamW at 1e-4, StepLR x0.1
# at 80% of the epochs, batch 8, no averaging. "budget": for runs of minutes, not 1000 epochs: AdamW at
# 5e-4, linear warm-up then cosine decay to zero, stepped per batch (Loshchilov & Hutter, SGDR, 2017;
# Goyal et al. 2017 for the warm-up). Measured on the real-image validation set (benchmarks/README.md,
# "A recipe for a budget"): 5e-4 beat 1e-4 (official) and matched 1e-3; a weight average (--ema-decay,
# Polyak & Juditsky 1992) changed nothing after a cosine to zero, so it is off by default.
RECIPES: dict[str, dict] = {
    "official": {"learning_rate": 1e-4, "schedule": "step", "warmup_epochs": 0.0, "ema_decay": 0.0, "batch_size": 8},
    "budget": {"learning_rate": 5e-4, "schedule": "cosine", "warmup_epochs": 1.0, "ema_decay": 0.0, "batch_size": 8},
}
RECIPE_FIELDS = ("learning_rate", "schedule", "warmup_epochs", "ema_decay", "batch_size")
BUDGET_PRESETS = ("lite0-256",)  # recipe "auto" means "budget" for these presets, "official" for the others


def recipe_for(recipe: str, preset: str) -> str:
    """The concrete recipe ("official" or "budget") that ``recipe`` ("auto" or either) means for ``preset``."""
    if recipe == "auto":
        return "budget" if preset in BUDGET_PRESETS else "official"
    return recipe


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "mvtec-512"
    backbone_weights: str = "pretrained"  # "pretrained", "none" (random, for tests) or a weights file
    epochs: int = 1000  # the official UniAD schedule; with ``minutes`` the most epochs the budget may take
    recipe: str = "auto"  # "official", "budget", or "auto" (budget for BUDGET_PRESETS, else official)
    batch_size: int | None = None  # per process; None = the recipe's
    learning_rate: float | None = None  # AdamW's peak rate; None = the recipe's
    schedule: str | None = None  # "step" (StepLR, per epoch) or "cosine" (warm-up + cosine, per batch)
    warmup_epochs: float | None = None  # cosine only: linear warm-up from 0 over this many epochs
    ema_decay: float | None = None  # EMA of the weights per step (the EMA is evaluated and saved); 0 = off
    minutes: float = 0.0  # time budget for the whole fit; 0 = none (train ``epochs``)
    weight_decay: float = 1e-4
    lr_step_epochs: int = 0  # StepLR step size; 0 = 80% of the epochs (UniAD: 800 of 1000)
    lr_gamma: float = 0.1
    grad_clip_norm: float = 0.1
    categories: tuple[str, ...] = ()  # MVTec categories to train on; empty = all
    normal_classes: tuple[int, ...] = (0, 1, 2, 3, 4)  # CIFAR-10 only: the classes that are normal
    seed: int = 0
    # Model selection. "last": the last epoch, no selection; "held-out": the epoch with the lowest
    # reconstruction error on ``holdout_fraction`` of each category's good TRAINING images (left out of
    # training; needs no defects); "test": the best ``val_metric`` on the test split (optimistic: the
    # test data choose the epoch, and then evaluate it).
    select_on: str = "last"
    holdout_fraction: float = 0.0  # > 0: held out and their error logged every val_every_epochs
    val_every_epochs: int = 1  # held-out (or test) evaluation every K epochs and at the end; 0 = never
    val_metric: str = "image_auroc"  # select_on "test": mean over categories
    keep_resume: bool = False  # keep resume.pt after the last epoch (it is always written while training)
    hflip: bool = False  # augmentations; any of them turns the feature cache off
    vflip: bool = False
    cache_features: bool = True
    feature_cache_gib: float = 8.0  # per process; larger caches fall back to running the backbone
    skip_bad_files: bool = False
    bit_depth: int | None = None  # real depth of 16-bit images without an sBIT chunk (e.g. 12); None: 16
    device: str = "auto"  # "auto" = the local CUDA device when there is one, else CPU

    def __post_init__(self) -> None:
        if self.recipe not in (*RECIPES, "auto"):
            raise ReconadError(f"recipe must be one of {(*RECIPES, 'auto')}, not {self.recipe!r}.")
        values = RECIPES[recipe_for(self.recipe, self.preset)]
        for name in RECIPE_FIELDS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, values[name])
        if self.epochs < 1 or self.batch_size < 1:
            raise ReconadError("epochs and batch_size must be at least 1.")
        if self.val_metric not in VAL_METRICS:
            raise ReconadError(f"val_metric must be one of {VAL_METRICS}, not {self.val_metric!r}.")
        if self.schedule not in SCHEDULES:
            raise ReconadError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}.")
        if self.select_on not in SELECT_ON:
            raise ReconadError(f"select_on must be one of {SELECT_ON}, not {self.select_on!r}.")
        if not 0 <= self.holdout_fraction < 1:
            raise ReconadError(f"holdout_fraction must be in [0, 1), not {self.holdout_fraction}.")
        if self.select_on == "held-out" and self.holdout_fraction == 0:
            raise ReconadError("select_on held-out needs a holdout_fraction above 0 (e.g. --holdout-fraction 0.1).")
        if self.select_on != "last" and self.val_every_epochs < 1:
            raise ReconadError(f"select_on {self.select_on} needs val_every_epochs of at least 1.")
        if not 0 <= self.ema_decay < 1 or self.warmup_epochs < 0 or self.minutes < 0 or self.learning_rate <= 0:
            raise ReconadError("ema_decay must be in [0, 1), learning_rate above 0, warmup_epochs and minutes not negative.")

    @property
    def augmented(self) -> bool:
        return self.hflip or self.vflip

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def read_train_config(toml_path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """Dataclass defaults < the ``[train]`` table (or top level) of a TOML file < ``overrides`` (CLI flags).

    ``None`` overrides mean "not given" and are ignored. Decoded by the project's one record decoder
    (``reconad.runtime.config``): unknown keys and wrong types are refused in one sentence.
    """
    table = {}
    what = "train config"
    if toml_path is not None:
        what = f"train config {toml_path}"
        data = load_toml(toml_path, "train config")
        table = data.get("train", data)
    return resolve(TrainConfig, table, overrides, what=what)
