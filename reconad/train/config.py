"""TrainConfig: every setting of a training run, saved with it; torch-free so the CLI's --help stays fast.

Precedence: the dataclass defaults < a TOML file (``--config``) < command-line flags.
"""

import dataclasses
import os
from dataclasses import dataclass

from reconad.runtime.config import load_toml, resolve
from reconad.runtime.errors import ReconadError

VAL_METRICS = ("image_auroc", "pixel_auroc")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "mvtec-512"
    backbone_weights: str = "pretrained"  # "pretrained", "none" (random, for tests) or a weights file
    epochs: int = 1000  # the official UniAD schedule
    batch_size: int = 8  # per process
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    lr_step_epochs: int = 0  # StepLR step size; 0 = 80% of the epochs (UniAD: 800 of 1000)
    lr_gamma: float = 0.1
    grad_clip_norm: float = 0.1
    categories: tuple[str, ...] = ()  # MVTec categories to train on; empty = all
    normal_classes: tuple[int, ...] = (0, 1, 2, 3, 4)  # CIFAR-10 only: the classes that are normal
    seed: int = 0
    val_every_epochs: int = 10  # validate on the test split every K epochs (and at the end); 0 = never
    val_metric: str = "image_auroc"  # mean over categories; the best epoch becomes model.ckpt
    hflip: bool = False  # augmentations; any of them turns the feature cache off
    vflip: bool = False
    cache_features: bool = True
    feature_cache_gib: float = 8.0  # per process; larger caches fall back to running the backbone
    skip_bad_files: bool = False
    bit_depth: int | None = None  # real depth of 16-bit images without an sBIT chunk (e.g. 12); None: 16
    device: str = "auto"  # "auto" = the local CUDA device when there is one, else CPU

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ReconadError("epochs and batch_size must be at least 1.")
        if self.val_metric not in VAL_METRICS:
            raise ReconadError(f"val_metric must be one of {VAL_METRICS}, not {self.val_metric!r}.")

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
