"""Convert a checkpoint of the official UniAD implementation (github zhiyuanyou/UniAD) into ours.

The official ``ckpt.pth.tar`` holds a ``state_dict`` of its DDP-wrapped ModelHelper: ``module.backbone.*``
(EfficientNet-B4 built for 380 px) and ``module.reconstruction.*`` (nn.MultiheadAttention layers, a
row/column position embedding, ``learned_embed`` queries). The result is preset ``uniad-224``.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
import torch

from reconad.model.config import PRESETS, ModelConfig
from reconad.model.detector import AnomalyDetector, build_detector
from reconad.runtime.errors import ReconadError


# Official reconstruction key (after "module.reconstruction.") -> ours (after "reconstructor."),
# first match wins.
_KEY_RULES = (
    (r"^transformer\.encoder\.layers\.(\d+)\.linear([12])\.", r"encoder.\1.ffn.linear\2."),
    (r"^transformer\.encoder\.layers\.(\d+)\.", r"encoder.\1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.learned_embed\.", r"decoder.\1.query_embed."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear([12])\.", r"decoder.\1.ffn.linear\2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.", r"decoder.\1."),
    (r"^transformer\.decoder\.norm\.", r"decoder_norm."),
    (r"^(input_proj|output_proj|pos_embed\.row_embed|pos_embed\.col_embed)\.", r"\1."),
)


def map_official_key(key: str) -> str | None:
    """Our state-dict key for an official one, or None for weights we do not use."""
    key = key.removeprefix("module.")
    if key.startswith("backbone."):
        return "backbone.net." + key.removeprefix("backbone.")
    if key.startswith("reconstruction."):
        rest = key.removeprefix("reconstruction.")
        for pattern, replacement in _KEY_RULES:
            if re.match(pattern, rest):
                return "reconstructor." + re.sub(pattern, replacement, rest)
    return None


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ReconadError(f"{path} does not exist.")
    try:
        # The official trainer pickles its easydict.EasyDict net config beside the weights; read it as a
        # plain OrderedDict so loading stays weights_only: nothing from the file is executed.
        with torch.serialization.safe_globals([(collections.OrderedDict, "easydict.EasyDict")]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ReconadError(
            f"{path} is not a readable official UniAD checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:120]})."
        ) from error
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not any(
        k.removeprefix("module.").startswith("reconstruction.") for k in state
    ):
        raise ReconadError(
            f"{path} is not an official UniAD checkpoint: it has no state_dict with reconstruction weights."
        )
    return state


def convert_official_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, source: str) -> AnomalyDetector:
    detector = build_detector(config)
    ours = detector.state_dict()
    converted = {}
    for key, value in state.items():
        target = map_official_key(key)
        if target is None or target not in ours:
            continue  # the classifier head, blocks past the deepest tap, BN counters of removed layers
        if tuple(value.shape) != tuple(ours[target].shape):
            raise ReconadError(
                f"{source} does not match preset {config.preset}: {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(ours[target].shape)}."
            )
        converted[target] = value
    converted["category_centroids"] = ours["category_centroids"]  # none: the official model names no category
    missing = sorted(set(ours) - set(converted))
    if missing:
        raise ReconadError(f"{source} lacks {len(missing)} weights preset {config.preset} needs, e.g. {missing[0]}.")
    detector.load_state_dict(converted)
    return detector.eval()


def import_uniad(path: str | Path, config: ModelConfig | None = None) -> AnomalyDetector:
    """Read an official ``ckpt.pth.tar`` and return an equivalent AnomalyDetector (eval mode)."""
    state = read_official_state_dict(path)
    detector = convert_official_state_dict(state, config or PRESETS["uniad-224"], str(path))
    detector.provenance = {"imported_from": str(path), "source": "github.com/zhiyuanyou/UniAD"}
    return detector
