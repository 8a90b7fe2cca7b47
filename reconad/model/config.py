"""ModelConfig and the named presets: everything needed to rebuild a detector, saved in every checkpoint.

Modelled on nanoGPT's GPTConfig; transformer field names follow torch.nn.Transformer / DETR.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Channels of the last block of each stage 1..5 (output strides 2, 4, 8, 16, 32), as in timm's
# FeatureInfo. The backbone module checks these against the network it builds.
BACKBONE_CHANNELS: dict[str, tuple[int, ...]] = {
    "efficientnet-b0": (16, 24, 40, 112, 320),
    "efficientnet-b1": (16, 24, 40, 112, 320),
    "efficientnet-b2": (16, 24, 48, 120, 352),
    "efficientnet-b3": (24, 32, 48, 136, 384),
    "efficientnet-b4": (24, 32, 56, 160, 448),
    "efficientnet-b5": (24, 40, 64, 176, 512),
    "efficientnet-b6": (32, 40, 72, 200, 576),
    "efficientnet-b7": (32, 48, 80, 224, 640),
    "efficientnet-lite0": (16, 24, 40, 112, 320),
}
STAGE_STRIDES = (2, 4, 8, 16, 32)
SCORE_REDUCERS = ("max_avgpool", "mean")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "mvtec-512"
    backbone: str = "efficientnet-b4"
    input_hw: tuple[int, int] = (512, 512)
    stages: tuple[int, ...] = (1, 2, 3, 4, 5)
    feature_stride: int = 16  # token grid = input_hw / feature_stride; all stages are resized to it
    # Image size the backbone's static SAME padding is computed for; None = input_hw. The official
    # UniAD builds EfficientNet-B4 for 380 px and feeds 224 px, so uniad-224 reproduces that.
    padding_hw: tuple[int, int] | None = None
    d_model: int = 256
    nhead: int = 8
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    neighbor_size: tuple[int, int] = (7, 7)
    # Neighbour masking per attention: (encoder, decoder attention 1, decoder attention 2).
    neighbor_mask: tuple[bool, bool, bool] = (True, True, True)
    jitter_scale: float = 20.0
    jitter_prob: float = 1.0
    score_reducer: str = "max_avgpool"  # "max_avgpool" (MVTec) or "mean" (CIFAR-10)
    score_pool_size: int = 16  # k of the k x k, stride-1 average pool before the max

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_CHANNELS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONE_CHANNELS)}")
        if not self.stages or any(s not in range(1, 6) for s in self.stages) or list(self.stages) != sorted(set(self.stages)):
            raise ValueError(f"stages must be increasing numbers from 1 to 5, got {self.stages}")
        h, w = self.input_hw
        if h % self.feature_stride or w % self.feature_stride:
            raise ValueError(f"input_hw {self.input_hw} must be divisible by feature_stride {self.feature_stride}")
        if self.d_model % self.nhead:
            raise ValueError(f"d_model {self.d_model} must be divisible by nhead {self.nhead}")
        if self.score_reducer not in SCORE_REDUCERS:
            raise ValueError(f"score_reducer must be one of {SCORE_REDUCERS}, got {self.score_reducer!r}")
        if self.score_reducer == "max_avgpool" and self.score_pool_size > min(h, w):
            raise ValueError(f"score_pool_size {self.score_pool_size} exceeds the input size {self.input_hw}")
        fh, fw = self.feature_hw
        nh, nw = self.neighbor_size
        if any(self.neighbor_mask) and fh <= 2 * (nh // 2) + 1 and fw <= 2 * (nw // 2) + 1:
            raise ValueError(
                f"a {nh}x{nw} neighbour mask would hide every key on a {fh}x{fw} token grid; "
                "use a smaller neighbor_size or a larger grid"
            )

    @property
    def feature_hw(self) -> tuple[int, int]:
        return (self.input_hw[0] // self.feature_stride, self.input_hw[1] // self.feature_stride)

    @property
    def num_tokens(self) -> int:
        return self.feature_hw[0] * self.feature_hw[1]

    @property
    def stage_channels(self) -> tuple[int, ...]:
        table = BACKBONE_CHANNELS[self.backbone]
        return tuple(table[s - 1] for s in self.stages)

    @property
    def channels(self) -> int:
        """Channels of the concatenated feature map (720 for EfficientNet-B4, stages 1-5)."""
        return sum(self.stage_channels)

    @property
    def normalization(self) -> str:
        """``imagenet`` mean/std for efficientnet-pytorch weights; ``tflite`` (x - 127) / 128 for Lite."""
        return "tflite" if self.backbone.startswith("efficientnet-lite") else "imagenet"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); ``from_dict`` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def tiny(cls) -> ModelConfig:
        """A small config for tests: B0 at 64 px, 8x8 tokens, a narrow 1+1-layer transformer."""
        return cls(
            preset="tiny",
            backbone="efficientnet-b0",
            input_hw=(64, 64),
            stages=(1, 2, 3),
            feature_stride=8,
            d_model=32,
            nhead=2,
            num_encoder_layers=1,
            num_decoder_layers=1,
            dim_feedforward=64,
            neighbor_size=(3, 3),
            score_pool_size=8,
        )


PRESETS: dict[str, ModelConfig] = {
    "mvtec-512": ModelConfig(),
    "uniad-224": ModelConfig(
        preset="uniad-224", input_hw=(224, 224), stages=(1, 2, 3, 4), padding_hw=(380, 380)
    ),
    # CIFAR-10 at 32 px: output stride 4 gives the seed's 8x8 grid; the image score is the mean.
    "cifar-32": ModelConfig(preset="cifar-32", input_hw=(32, 32), feature_stride=4, score_reducer="mean"),
    "lite0-256": ModelConfig(preset="lite0-256", backbone="efficientnet-lite0", input_hw=(256, 256)),
}
