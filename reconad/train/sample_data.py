"""A deterministic synthetic data set in the MVTec-AD folder layout: the embedded default for the demo.

Procedural textures (``weave``, ``wood``) and simple objects (``washer``, ``pill``), with scratches,
holes, stains and foreign patches plus their ground-truth masks. numpy + OpenCV only; one seed gives
the same files (OpenCV's SIMD code paths could differ in a last bit on other CPUs; not checked).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reconad.runtime.atomic import atomic_folder
from reconad.runtime.errors import ReconadError

CATEGORIES = ("weave", "wood", "washer", "pill")
DEFECT_TYPES = ("scratch", "hole", "stain", "foreign_patch")


@dataclass(frozen=True)
class SampleDataConfig:
    image_size: int = 256
    num_train: int = 40  # defect-free training images per category
    num_test_good: int = 8  # per category
    num_test_per_defect: int = 3  # per category and defect type
    categories: tuple[str, ...] = CATEGORIES


@dataclass(frozen=True)
class SampleDataSummary:
    root: Path
    num_train: int
    num_test: int
    categories: tuple[str, ...]


def _cv2():
    try:
        import cv2
    except ImportError as error:
        raise ReconadError("OpenCV is needed for sample data: pip install opencv-python-headless.") from error
    return cv2


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, octaves: int = 3) -> np.ndarray:
    """Fractal value noise in roughly [0, 1], float32 [size, size]."""
    cv2 = _cv2()
    total = np.zeros((size, size), np.float32)
    weight_sum = 0.0
    for octave in range(octaves):
        n = cells * 2**octave
        grid = rng.random((n + 1, n + 1)).astype(np.float32)
        weight = 0.5**octave
        total += weight * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
        weight_sum += weight
    return np.clip(total / weight_sum, 0.0, 1.0)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _render_weave(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Basket-weave fabric: alternating cells of horizontal and vertical threads."""
    y, x = _coords(size)
    period = 16.0
    y = y + rng.uniform(0, period)
    x = x + rng.uniform(0, period)
    checker = ((x // period + y // period) % 2).astype(bool)
    thread = period / 4
    horizontal = 0.5 + 0.5 * np.cos(2 * np.pi * y / thread)
    vertical = 0.5 + 0.5 * np.cos(2 * np.pi * x / thread)
    value = np.where(checker, horizontal, vertical) * 0.35 + 0.65
    value *= 0.9 + 0.2 * _smooth_noise(rng, size, 8)
    base = np.array([70, 95, 150], np.float32) * rng.uniform(0.95, 1.05, 3)
    image = value[..., None] * base
    return image, np.ones((size, size), bool)


def _render_wood(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Wood grain: warped sinusoidal rings between a light and a dark brown."""
    y, x = _coords(size)
    period = rng.uniform(20, 26)
    warp = 2.5 * _smooth_noise(rng, size, 3) + 0.6 * _smooth_noise(rng, size, 12)
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * (x / period + warp + y / (8 * size)))
    grain = grain**1.5
    light = np.array([214, 170, 118], np.float32)
    dark = np.array([150, 98, 56], np.float32)
    image = light + (dark - light) * grain[..., None]
    image *= (0.95 + 0.1 * _smooth_noise(rng, size, 24, octaves=1))[..., None]
    return image, np.ones((size, size), bool)


def _render_washer(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A shaded metal ring on a grey, slightly mottled background."""
    y, x = _coords(size)
    cy, cx = size / 2 + rng.uniform(-3, 3, 2)
    dy, dx = y - cy, x - cx
    radius = np.hypot(dx, dy)
    outer, inner = 0.36 * size, 0.16 * size
    alpha = np.clip(outer - radius + 0.5, 0, 1) * np.clip(radius - inner + 0.5, 0, 1)
    angle = np.arctan2(dy, dx)
    light_angle = rng.uniform(-0.2, 0.2) - np.pi / 4
    radial = (radius - inner) / (outer - inner)
    shade = 0.7 + 0.2 * np.cos(angle - light_angle) + 0.1 * np.sin(np.pi * np.clip(radial, 0, 1))
    metal = np.array([196, 200, 206], np.float32) * shade[..., None]
    background = (92 + 10 * _smooth_noise(rng, size, 6))[..., None] * np.array([1.0, 1.0, 1.05], np.float32)
    image = alpha[..., None] * metal + (1 - alpha[..., None]) * background
    return image, alpha > 0.5


def _render_pill(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A two-coloured capsule, shaded like a cylinder, on a black background."""
    y, x = _coords(size)
    cy, cx = size / 2 + rng.uniform(-4, 4, 2)
    theta = np.deg2rad(rng.uniform(-3, 3))
    u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)  # along the capsule
    v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)  # across it
    half_length, half_width = 0.34 * size, 0.14 * size
    core = np.clip(np.abs(u) - (half_length - half_width), 0, None)
    distance = np.hypot(core, v)  # distance from the capsule's axis segment
    alpha = np.clip(half_width - distance + 0.5, 0, 1)
    across = np.clip(distance / half_width, 0, 1)
    shade = 0.55 + 0.45 * np.sqrt(1 - across**2)
    red = np.array([200, 48, 44], np.float32)
    white = np.array([236, 232, 220], np.float32)
    colour = np.where((u < 0)[..., None], red, white) * shade[..., None]
    background = (12 + 10 * _smooth_noise(rng, size, 4))[..., None] * np.ones(3, np.float32)
    image = alpha[..., None] * colour + (1 - alpha[..., None]) * background
    return image, alpha > 0.5


_RENDERERS = {
    "weave": _render_weave,
    "wood": _render_wood,
    "washer": _render_washer,
    "pill": _render_pill,
}


def _pick_centre(rng: np.random.Generator, region: np.ndarray, margin: int, inset: int = 0) -> tuple[int, int]:
    """A random (x, y) at least ``margin`` pixels from the image border and ``inset`` pixels inside ``region``."""
    cv2 = _cv2()
    inner = region.copy()
    if inset > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * inset + 1, 2 * inset + 1))
        eroded = cv2.erode(region.astype(np.uint8), kernel).astype(bool)
        if eroded[margin:-margin, margin:-margin].any():
            inner = eroded
    border = np.zeros_like(region)
    border[margin:-margin, margin:-margin] = True
    ys, xs = np.nonzero(inner & border)
    k = rng.integers(len(ys))
    return int(xs[k]), int(ys[k])


def _contrast_colour(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dark on bright surfaces, bright on dark ones, so every defect stands out."""
    mean = float(image[mask].mean()) if mask.any() else float(image.mean())
    if mean > 110:
        return rng.uniform(10, 40, 3).astype(np.float32)
    return rng.uniform(215, 250, 3).astype(np.float32)


def _add_scratch(rng, image, region):
    cv2 = _cv2()
    size = image.shape[0]
    x, y = _pick_centre(rng, region, size // 6, inset=4)
    length = rng.uniform(0.3, 0.45) * size
    direction = rng.uniform(0, np.pi)
    bend = rng.uniform(-0.4, 0.4)
    t = np.linspace(-0.5, 0.5, 12)
    angles = direction + bend * t
    steps = np.stack([np.cos(angles), np.sin(angles)], 1) * length / len(t)
    points = np.cumsum(steps, 0) - steps.sum(0) / 2 + np.array([x, y])
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 255, int(rng.integers(3, 6)), cv2.LINE_AA)
    mask = (mask > 0) & region
    colour = _contrast_colour(rng, image, region)
    image[mask] = 0.15 * image[mask] + 0.85 * colour
    return mask


def _add_hole(rng, image, region):
    cv2 = _cv2()
    size = image.shape[0]
    radius = rng.uniform(0.045, 0.07) * size
    x, y = _pick_centre(rng, region, int(radius) + 4, inset=int(1.15 * radius) + 2)
    yy, xx = _coords(size)
    angle = np.arctan2(yy - y, xx - x)
    wobble = 1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
    distance = np.hypot(xx - x, yy - y) / (radius * wobble)
    mask = distance <= 1.0
    rim = (distance > 1.0) & (distance <= 1.3)
    depth = np.clip(distance, 0, 1)[..., None]
    image[mask] = (8 + 30 * depth[mask]) * np.ones(3, np.float32)
    image[rim] = np.clip(image[rim] * 0.6, 0, 255)
    return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & (mask | rim)


def _add_stain(rng, image, region):
    cv2 = _cv2()
    size = image.shape[0]
    radius = rng.uniform(0.07, 0.11) * size
    x, y = _pick_centre(rng, region, int(radius) + 4, inset=int(0.5 * radius))
    yy, xx = _coords(size)
    blob = np.hypot((xx - x) / rng.uniform(0.8, 1.2), (yy - y) / rng.uniform(0.8, 1.2)) / radius
    blob = blob - 0.35 * _smooth_noise(rng, size, 16, octaves=2)
    alpha = np.clip((1.0 - blob) * 4, 0, 1) * rng.uniform(0.8, 0.95)
    alpha = cv2.GaussianBlur(alpha.astype(np.float32), (0, 0), 1.5) * region
    # Oil, rust, ink, grime: the one that differs most from the surface under the stain.
    palette = np.array([[90, 55, 15], [40, 120, 40], [160, 30, 120], [25, 25, 25], [225, 205, 60]], np.float32)
    surface = image[alpha > 0.3].mean(axis=0) if (alpha > 0.3).any() else image.reshape(-1, 3).mean(axis=0)
    colour = palette[np.argmax(np.linalg.norm(palette - surface, axis=1))]
    image[:] = (1 - alpha[..., None]) * image + alpha[..., None] * colour
    return alpha > 0.3


def _add_foreign_patch(rng, image, region):
    size = image.shape[0]
    half = int(rng.uniform(0.06, 0.1) * size)
    x, y = _pick_centre(rng, region, half + 2, inset=half // 2)
    patch_size = 2 * half
    noise = _smooth_noise(rng, patch_size, 4, octaves=2)
    stripes = 0.5 + 0.5 * np.sin(np.arange(patch_size, dtype=np.float32) / rng.uniform(1.5, 3.0))
    hue = rng.uniform(40, 255, 3).astype(np.float32)
    patch = (0.5 * noise + 0.5 * stripes[None, :])[..., None] * hue
    mask = np.zeros(image.shape[:2], bool)
    mask[y - half : y + half, x - half : x + half] = True
    mask &= region
    window = image[y - half : y + half, x - half : x + half]
    keep = mask[y - half : y + half, x - half : x + half]
    window[keep] = patch[keep]
    return mask


_DEFECTS = {
    "scratch": _add_scratch,
    "hole": _add_hole,
    "stain": _add_stain,
    "foreign_patch": _add_foreign_patch,
}


def render_sample(category: str, defect: str | None, rng: np.random.Generator, image_size: int = 256):
    """Render one image of ``category`` with an optional ``defect``.

    Returns:
        ``(image, mask)``: uint8 [H, W, 3] RGB and uint8 [H, W] in {0, 255} (all zero when ``defect`` is None).
    """
    image, region = _RENDERERS[category](rng, image_size)
    image = image.astype(np.float32)
    mask = np.zeros(region.shape, bool)
    if defect is not None:
        mask = _DEFECTS[defect](rng, image, region)
    image += rng.normal(0, 2.0, image.shape).astype(np.float32)  # sensor noise
    rgb = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return rgb, mask.astype(np.uint8) * 255


def _write_png(path: Path, array: np.ndarray) -> None:
    cv2 = _cv2()
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = array[..., ::-1] if array.ndim == 3 else array  # OpenCV writes BGR
    if not cv2.imwrite(str(path), np.ascontiguousarray(bgr)):
        raise ReconadError(f"Could not write {path}.")


def _write_category(root: Path, category: str, index: int, seed: int, config: SampleDataConfig) -> tuple[int, int]:
    size = config.image_size
    for k in range(config.num_train):
        rng = np.random.default_rng([seed, index, 0, k])
        image, _ = render_sample(category, None, rng, size)
        _write_png(root / category / "train" / "good" / f"{k:03d}.png", image)
    for k in range(config.num_test_good):
        rng = np.random.default_rng([seed, index, 1, k])
        image, _ = render_sample(category, None, rng, size)
        _write_png(root / category / "test" / "good" / f"{k:03d}.png", image)
    for d, defect in enumerate(DEFECT_TYPES):
        for k in range(config.num_test_per_defect):
            rng = np.random.default_rng([seed, index, 2 + d, k])
            image, mask = render_sample(category, defect, rng, size)
            _write_png(root / category / "test" / defect / f"{k:03d}.png", image)
            _write_png(root / category / "ground_truth" / defect / f"{k:03d}_mask.png", mask)
    return config.num_train, config.num_test_good + len(DEFECT_TYPES) * config.num_test_per_defect


def write_sample_data(
    out_dir: str | os.PathLike,
    seed: int = 0,
    config: SampleDataConfig = SampleDataConfig(),
    overwrite: bool = False,
) -> SampleDataSummary:
    """Write the synthetic data set to ``out_dir`` (MVTec-AD layout); the same seed gives the same files.

    The set is written to a temporary sibling folder and renamed into place, so an interrupted run
    leaves no half-written data set behind. An existing non-empty ``out_dir`` is replaced only with
    ``overwrite``.
    """
    unknown = sorted(set(config.categories) - set(_RENDERERS))
    if unknown:
        raise ReconadError(f"Unknown sample-data categories {unknown}; choose from {list(CATEGORIES)}.")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ReconadError(f"{root} exists and is not a folder.")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise ReconadError(f"{root} already exists and is not empty; pass --overwrite to replace it.")
    num_train = num_test = 0
    with atomic_folder(root) as staging:
        for category in config.categories:
            # Seeded by the category's fixed index, so a subset renders the same images.
            n_train, n_test = _write_category(staging, category, CATEGORIES.index(category), seed, config)
            num_train += n_train
            num_test += n_test
    return SampleDataSummary(root, num_train, num_test, tuple(config.categories))
