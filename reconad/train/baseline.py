"""A patch-kNN baseline to measure UniAD against: PatchCore-like (Roth et al., "Towards Total Recall in
Industrial Anomaly Detection", CVPR 2022), with no training at all.

It reads the features of the same frozen backbone taps as the UniAD detector
(``AnomalyDetector.extract_features``), averages each patch with its p x p neighbours (PatchCore's locally
aware patch features), keeps ONE memory bank of the good images' patches for all categories (unified, as
UniAD), optionally thinned by greedy k-centre coreset selection on a random projection (PatchCore) or at
random. The anomaly map is each patch's distance to its nearest bank patch, upsampled to the input size and
smoothed with a Gaussian (sigma 4 px, PatchCore); the image score is the largest patch distance.
Not PatchCore: no WideResNet, no neighbourhood re-weighting of the image score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from reconad.model import AnomalyDetector
from reconad.runtime.errors import ReconadError

SUBSAMPLING = ("coreset", "random", "none")


@dataclass(frozen=True)
class PatchKnnConfig:
    neighbourhood: int = 3  # p of the p x p average over neighbouring patches (stride 1)
    subsample: str = "none"  # "none" (every patch: exact), "coreset" (greedy k-centre, slow) or "random"
    bank_fraction: float = 0.1  # of all training patches kept by "coreset" or "random"
    projection_dim: int = 128  # random projection used by the coreset selection only
    blur_sigma: float = 4.0  # Gaussian smoothing of the upsampled map, in input pixels; 0 = none
    batch_size: int = 16  # images per backbone batch
    query_chunk: int = 4096  # patches per nearest-neighbour distance block
    seed: int = 0

    def __post_init__(self) -> None:
        if self.subsample not in SUBSAMPLING:
            raise ReconadError(f"subsample must be one of {SUBSAMPLING}, not {self.subsample!r}.")
        if not 0 < self.bank_fraction <= 1:
            raise ReconadError(f"bank_fraction must be in (0, 1], not {self.bank_fraction}.")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ReconadError(f"neighbourhood must be an odd number >= 1, not {self.neighbourhood}.")


def greedy_coreset(features: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices [size] of a greedy k-centre coreset of ``features`` [M, D]: each new point is the one
    farthest from those already chosen (the first at random), so the bank covers every mode of the data."""
    m = len(features)
    if size >= m:
        return torch.arange(m)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = torch.randint(m, (1,), generator=generator)
    squared_norms = features.pow(2).sum(1)  # [M]
    nearest = torch.full((m,), math.inf, dtype=features.dtype)
    for i in range(1, size):
        latest = features[chosen[i - 1]]
        distance = squared_norms - 2 * features @ latest + latest.pow(2).sum()  # [M] squared distances
        nearest = torch.minimum(nearest, distance)
        chosen[i] = torch.argmax(nearest)
    return chosen


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance [Q] of each query [Q, D] to its nearest row of ``bank`` [M, D]."""
    bank_norms = bank.pow(2).sum(1)  # [M]
    out = torch.empty(len(queries), dtype=queries.dtype)
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        squared = q.pow(2).sum(1, keepdim=True) - 2 * q @ bank.T + bank_norms  # [q, M]
        out[start : start + chunk] = squared.amin(dim=1).clamp_min(0).sqrt()
    return out


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of [N, 1, H, W] (kernel 2 * ceil(4 sigma) + 1, mirrored borders)."""
    radius = int(math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    padded = F.pad(maps, (radius, radius, 0, 0), mode=mode)
    maps = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    padded = F.pad(maps, (0, 0, radius, radius), mode=mode)
    return F.conv2d(padded, kernel.view(1, 1, -1, 1))


class PatchKnn:
    """The baseline: ``fit`` on good images, ``predict`` anomaly maps and image scores.

    Args:
        detector: its frozen backbone (``extract_features``) gives the patch features; its transformer is unused.
        config: neighbourhood, subsampling and smoothing.
    """

    def __init__(self, detector: AnomalyDetector, config: PatchKnnConfig = PatchKnnConfig(),
                 device: torch.device | str = "cpu"):
        self.detector = detector.eval()
        self.config = config
        self.device = torch.device(device)
        self.bank: torch.Tensor | None = None  # [M, C] float32
        self.num_training_patches = 0

    @torch.no_grad()
    def patch_features(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> locally averaged patch features float32 [N, h, w, C] on the CPU."""
        p = self.config.neighbourhood
        chunks = []
        for start in range(0, len(images), self.config.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + self.config.batch_size]))
            features = self.detector.extract_features(batch.to(self.device))  # [n, C, h, w]
            if p > 1:
                features = F.avg_pool2d(features, p, stride=1, padding=p // 2, count_include_pad=False)
            chunks.append(features.permute(0, 2, 3, 1).cpu())  # [n, h, w, C]
        return torch.cat(chunks)

    def fit(self, images: np.ndarray) -> PatchKnn:
        """Build the memory bank from good images uint8 [N, H, W, 3] (all categories together)."""
        if len(images) == 0:
            raise ReconadError("The patch-kNN baseline needs at least one good training image.")
        patches = self.patch_features(images).flatten(0, 2)  # [N*h*w, C]
        self.num_training_patches = len(patches)
        size = max(1, int(round(self.config.bank_fraction * len(patches))))
        generator = torch.Generator().manual_seed(self.config.seed)
        if self.config.subsample == "none" or size >= len(patches):
            self.bank = patches
        elif self.config.subsample == "random":
            self.bank = patches[torch.randperm(len(patches), generator=generator)[:size]]
        else:
            projection = torch.randn(patches.shape[1], self.config.projection_dim, generator=generator)
            projected = patches @ (projection / math.sqrt(self.config.projection_dim))  # [M, d]
            self.bank = patches[greedy_coreset(projected, size, generator)]
        return self

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps float32 [N, H, W] (input resolution) and image scores float32 [N] for uint8 [N, H, W, 3].

        Raises:
            ReconadError: ``fit`` has not run.
        """
        if self.bank is None:
            raise ReconadError("Call fit() with good images before predict().")
        input_hw = self.detector.config.input_hw
        maps, scores = [], []
        for start in range(0, len(images), self.config.batch_size):
            patches = self.patch_features(images[start : start + self.config.batch_size])  # [n, h, w, C]
            n, h, w, c = patches.shape
            distance = nearest_distance(patches.reshape(-1, c), self.bank, self.config.query_chunk).view(n, 1, h, w)
            scores.append(distance.flatten(1).amax(1).numpy())
            # align_corners=True as the UniAD head, so both maps are resampled alike
            anomaly_map = F.interpolate(distance, size=input_hw, mode="bilinear", align_corners=True)
            if self.config.blur_sigma > 0:
                anomaly_map = _gaussian_blur(anomaly_map, self.config.blur_sigma)
            maps.append(anomaly_map[:, 0].numpy())
        return np.concatenate(maps).astype(np.float32), np.concatenate(scores).astype(np.float32)
