"""PyTorch training core: the only package that defines nn.Modules.

UniAD (NeurIPS 2022): frozen EfficientNet features reconstructed by a neighbour-masked transformer.
"""

from reconad.model.checkpoint import category_names, load_detector, read_checkpoint_metadata, save_checkpoint
from reconad.model.config import PRESETS, ModelConfig
from reconad.model.detector import AnomalyDetector, build_detector

__all__ = [
    "category_names",
    "PRESETS",
    "AnomalyDetector",
    "ModelConfig",
    "build_detector",
    "load_detector",
    "read_checkpoint_metadata",
    "save_checkpoint",
]
