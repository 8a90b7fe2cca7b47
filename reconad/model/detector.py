"""AnomalyDetector: the fused, exportable pipeline (uint8 images -> anomaly map, image score and category).

Like anomalib's AnomalibModule: forward = pre-processing -> model -> post-processing, with the
normalisation constants as buffers, so the evaluated forward is exactly the exported forward. The
category head names the product from the same backbone features: nearest class centroid (Mensink et
al., TPAMI 2013) of the globally pooled, L2-normalised features, centroids fitted on the training images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reconad.model.backbone import FeaturePyramid, read_backbone_weights
from reconad.model.config import ModelConfig
from reconad.model.transformer import Reconstructor

# Per-channel mean and std in 0..255 units, by the backbone's training recipe.
NORMALIZATION = {
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    # TF-Lite EfficientNet-Lite weights: (x - 127) / 128, the recipe of the TensorFlow originals.
    "tflite": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
}


class AnomalyDetector(nn.Module):
    """UniAD: frozen EfficientNet features, reconstructed by a neighbour-masked transformer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.provenance: dict = {}  # filled by load_detector from the checkpoint; JSON-able
        self.backbone = FeaturePyramid(config.backbone, config.stages, config.padding_hw or config.input_hw)
        self.reconstructor = Reconstructor(config)
        mean, std = NORMALIZATION[config.normalization]
        # Buffers so the cast and normalisation live inside the exported graph.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # One L2-normalised centroid per category, rows in provenance["category_head"]["names"] order,
        # fitted by ``fit_category_centroids``; none (0 rows): the model names no category. A buffer, so
        # it travels in the checkpoint and is folded into the exported graph.
        self.register_buffer("category_centroids", torch.zeros(0, config.channels))

    def train(self, mode: bool = True) -> AnomalyDetector:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics never move
        return self

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] RGB -> features [N, C, h, w], every tapped stage resized to the token grid."""
        x = images.permute(0, 3, 1, 2).float()  # [N, 3, H, W]
        x = (x - self.pixel_mean) / self.pixel_std
        resized = []
        for feature in self.backbone(x):
            if tuple(feature.shape[-2:]) != self.config.feature_hw:
                # align_corners=True: the official nn.UpsamplingBilinear2d
                feature = F.interpolate(feature, size=self.config.feature_hw, mode="bilinear", align_corners=True)
            resized.append(feature)
        return torch.cat(resized, dim=1)

    def score(self, features: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The anomaly head: per-token L2 distance, upsampled to the input, reduced to one score."""
        distance = (reconstruction - features).pow(2).sum(dim=1, keepdim=True).sqrt()  # [N, 1, h, w]
        anomaly_map = F.interpolate(distance, size=self.config.input_hw, mode="bilinear", align_corners=True)
        if self.config.score_reducer == "mean":
            image_score = anomaly_map.flatten(1).mean(dim=1)
        else:
            k = self.config.score_pool_size
            image_score = F.avg_pool2d(anomaly_map, k, stride=1).flatten(1).amax(dim=1)
        return anomaly_map, image_score

    @staticmethod
    def pooled_features(features: torch.Tensor) -> torch.Tensor:
        """Features [N, C, h, w] -> their mean over the token grid, L2-normalised: float32 [N, C]."""
        return F.normalize(features.mean(dim=(2, 3)), dim=1)

    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The category head: the nearest centroid to the pooled features, by cosine distance.

        Returns:
            category: int64 [N], a row of ``category_centroids`` (0 for all when there are none).
            category_distance: float32 [N], 1 - cosine similarity to that centroid, in [0, 2] (0 for all
            when there are none).
        """
        if len(self.category_centroids) == 0:  # static at export: the graph outputs constant zeros
            zeros = torch.zeros_like(features[:, 0, 0, 0])  # [N]
            return zeros.long(), zeros
        distance = 1.0 - self.pooled_features(features) @ self.category_centroids.T  # [N, K]
        category_distance, category = distance.min(dim=1)  # the first index among exact ties
        return category, category_distance

    def fit_category_centroids(self, pooled: torch.Tensor, categories: Sequence[str], names: Sequence[str]) -> None:
        """Set one centroid per name: the normalised mean of its images' ``pooled_features``.

        Args:
            pooled: ``pooled_features`` of the training images, float32 [N, C].
            categories: the category of each row of ``pooled`` [N].
            names: the categories in centroid order; each must have at least one image.

        Raises:
            ValueError: a name without images, or ``categories`` not parallel to ``pooled``.
        """
        if len(categories) != len(pooled):
            raise ValueError(f"{len(categories)} categories for {len(pooled)} pooled feature vectors")
        rows = []
        for name in names:
            keep = torch.tensor([category == name for category in categories])
            if not keep.any():
                raise ValueError(f"category {name!r} has no training images to fit its centroid on")
            rows.append(F.normalize(pooled[keep].mean(dim=0), dim=0))
        self.category_centroids = torch.stack(rows).to(self.category_centroids.device)  # [K, C]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inspect a batch.

        Args:
            images: uint8 [N, H, W, 3], RGB, H x W = ``config.input_hw``, any N >= 1.

        Returns:
            anomaly_map: float32 [N, 1, H, W], >= 0, feature-space distance at input resolution.
            image_score: float32 [N], >= 0; higher is more anomalous. Uncalibrated: the threshold
            lives in the artifact manifest.
            category: int64 [N], the nearest category centroid (see ``classify``).
            category_distance: float32 [N], its cosine distance, in [0, 2].
        """
        features = self.extract_features(images)
        reconstruction = self.reconstructor(features)
        anomaly_map, image_score = self.score(features, reconstruction)
        category, category_distance = self.classify(features)
        return anomaly_map, image_score, category, category_distance


def build_detector(config: ModelConfig, backbone_weights: str | Path | None = None) -> AnomalyDetector:
    """Build a detector; ``backbone_weights``: None (random, for tests), ``"pretrained"`` or a file."""
    detector = AnomalyDetector(config)
    if backbone_weights is not None:
        state = read_backbone_weights(config.backbone, backbone_weights)
        detector.backbone.load_pretrained(state, str(backbone_weights))
    return detector
