"""Build a real-image anomaly detection set in the MVTec-AD layout from freely licensed photographs that
ship inside PyPI and Debian packages, offline and reproducibly (same packages + same seed = same files).

Every category is one real photograph. Its area is split into disjoint train and test rectangles (a
checkerboard of cells, so both splits see every part of the photograph), so no test image shares a pixel
with a training image; each image is a random crop inside one of its split's rectangles
(window size jittered by +-8%, random flips, brightness gain 0.95-1.05), resized to ``--image-size``.
Defects are drawn on the crop at the photograph's resolution, before the same resize, so they are
resampled like the surface they sit on. Six kinds, each in three sizes (small, medium, large):
scratch, hole, stain, contamination (an irregular piece of ANOTHER category's photograph), cut and
discoloration. Masks are written as ``ground_truth/<defect>/<name>_mask.png``; ``real_set.json``
records the sources (with sha256), the settings and every image's defect, size class and mask area.

Sources and licences (read from the installed packages; nothing is downloaded):

| category | photograph | package | licence |
|---|---|---|---|
| brick | skimage/data/brick.png (Bricks25, cc0textures.com), gray | PyPI scikit-image (bundled in the wheel) | CC0 |
| gravel | skimage/data/gravel.png (Gravel04, cc0textures.com), gray | PyPI scikit-image (bundled) | CC0 |
| grass | skimage/data/grass.png (linolafett, DeviantArt), gray | PyPI scikit-image (bundled) | CC0 |
| cups | /usr/share/wallpapers/ColorfulCups (Dmitri Popov) | Debian plasma-workspace-wallpapers | GPL-2+ (Debian copyright), LGPL-3 (metadata.json) |
| facade | /usr/share/wallpapers/Grey (Sigi Sagi) | Debian plasma-workspace-wallpapers | GPL-2+ / LGPL-3 |
| moss | /usr/share/wallpapers/OneStandsOut (Risto Saukonpää); the one orange plant is left out | Debian plasma-workspace-wallpapers | GPL-2+ / LGPL-3 |
| leaf | /usr/share/backgrounds/mate/nature/Blinds.jpg (Lennart Poettering, Andrea Cimitan) | Debian mate-backgrounds | GPL-2+ |
| meadow | /usr/share/backgrounds/mate/nature/GreenMeadow.jpg (Timothy Schellhase, Lapo Calamandrei) | Debian mate-backgrounds | GPL-2+ |

The generated set is a derivative of these photographs: keep it local (it is git-ignored and never
committed). Install the sources with ``pip install scikit-image`` (extra ``bench``) and
``apt-get install plasma-workspace-wallpapers mate-backgrounds``, or pass ``--source-root DIR`` for a
tree made with ``dpkg -x PACKAGE.deb DIR`` (no root needed).

    .venv/bin/python benchmarks/make_real_set.py data/real                  # 8 categories, 256 px, ~30 s
    .venv/bin/python benchmarks/make_real_set.py /tmp/tiny --tiny --categories brick,gravel   # CI size
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from reconad.runtime.atomic import atomic_folder
from reconad.runtime.errors import ReconadError

DEFECTS = ("scratch", "hole", "stain", "contamination", "cut", "discoloration")
SIZES = ("small", "medium", "large")
Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the (scaled) photograph

# The 512 px scikit-image textures (stationary): the top two thirds train, the bottom third test.
_BAND_TRAIN: tuple[Rect, ...] = ((0, 0, 1, 0.65),)
_BAND_TEST: tuple[Rect, ...] = ((0, 0.66, 1, 1),)


@dataclass(frozen=True)
class Source:
    path: str  # "skimage:data/brick.png" (inside the installed package) or an absolute Debian path
    package: str  # "pypi:scikit-image" or "debian:plasma-workspace-wallpapers"
    licence: str
    author: str
    scale: float  # the photograph is resized by this factor first
    window: int  # crop side in scaled pixels, before the resize to --image-size
    # Either explicit train/test rectangles, or a rows x cols grid whose cells alternate between train
    # and test like a checkerboard, so both splits sample every part of a photograph that is not
    # stationary (the cups turn from blue to pink, the facade's strips thin out, the leaf's veins bend).
    train: tuple[Rect, ...] = ()
    test: tuple[Rect, ...] = ()
    grid: tuple[int, int] | None = None
    exclude: tuple[Rect, ...] = ()  # grid cells touching these are left out

    def split_rects(self) -> tuple[tuple[Rect, ...], tuple[Rect, ...]]:
        """(train, test) rectangles as fractions of the photograph; they never overlap."""
        if self.grid is None:
            return self.train, self.test
        rows, cols = self.grid
        cells: tuple[list[Rect], list[Rect]] = ([], [])
        for r in range(rows):
            for c in range(cols):
                cell = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
                if any(cell[0] < e[2] and e[0] < cell[2] and cell[1] < e[3] and e[1] < cell[3] for e in self.exclude):
                    continue
                cells[(r + c) % 2].append(cell)
        train, test = sorted(cells, key=len, reverse=True)  # the larger half trains
        return tuple(train), tuple(test)


SOURCES: dict[str, Source] = {
    "brick": Source("skimage:data/brick.png", "pypi:scikit-image", "CC0-1.0", "cc0textures.com Bricks25",
                    1.0, 160, _BAND_TRAIN, _BAND_TEST),
    "gravel": Source("skimage:data/gravel.png", "pypi:scikit-image", "CC0-1.0", "cc0textures.com Gravel04",
                     1.0, 160, _BAND_TRAIN, _BAND_TEST),
    "grass": Source("skimage:data/grass.png", "pypi:scikit-image", "CC0-1.0", "linolafett (DeviantArt Grass-01)",
                    1.0, 160, _BAND_TRAIN, _BAND_TEST),
    "cups": Source("/usr/share/wallpapers/ColorfulCups/contents/images/2560x1600.jpg",
                   "debian:plasma-workspace-wallpapers", "GPL-2+ / LGPL-3", "Dmitri Popov", 0.6, 256, grid=(3, 5)),
    "facade": Source("/usr/share/wallpapers/Grey/contents/images/2560x1600.jpg",
                     "debian:plasma-workspace-wallpapers", "GPL-2+ / LGPL-3", "Sigi Sagi", 0.6, 256, grid=(3, 5)),
    # The photograph's point is one orange plant (x 0.60-0.70, y 0.44-0.56); bare soil lies below y 0.67:
    # the cells touching either are left out.
    "moss": Source("/usr/share/wallpapers/OneStandsOut/contents/images/2560x1600.jpg",
                   "debian:plasma-workspace-wallpapers", "GPL-2+ / LGPL-3", "Risto Saukonpää", 0.6, 256,
                   grid=(3, 5), exclude=((0.6, 0.44, 0.7, 0.56), (0, 0.67, 1, 1))),
    "leaf": Source("/usr/share/backgrounds/mate/nature/Blinds.jpg", "debian:mate-backgrounds", "GPL-2+",
                   "Lennart Poettering, Andrea Cimitan", 0.8, 256, grid=(3, 5)),
    "meadow": Source("/usr/share/backgrounds/mate/nature/GreenMeadow.jpg", "debian:mate-backgrounds", "GPL-2+",
                     "Timothy Schellhase, Lapo Calamandrei", 0.8, 192, grid=(3, 4)),
}
CATEGORIES = tuple(SOURCES)


@dataclass(frozen=True)
class RealSetConfig:
    image_size: int = 256
    num_train: int = 60  # defect-free training images per category
    num_test_good: int = 20  # per category
    num_per_defect: int = 4  # per category and defect kind; sizes cycle small, medium, large
    categories: tuple[str, ...] = CATEGORIES
    seed: int = 0
    # A validation set for choosing a recipe: its test images (goods and defects) are new crops of the
    # TRAIN rectangles, so a search on it never sees the test rectangles; the training goods are the same.
    validation: bool = False

    @classmethod
    def tiny(cls, categories: tuple[str, ...] = ("brick", "gravel")) -> RealSetConfig:
        """The CI size: 64 px, 6 training images, 2 test goods and 1 image per defect kind per category."""
        return cls(image_size=64, num_train=6, num_test_good=2, num_per_defect=1, categories=categories)


@dataclass
class RealSetSummary:
    root: Path
    num_train: int
    num_test: int
    categories: tuple[str, ...]
    images: list[dict] = field(default_factory=list)


def _cv2():
    try:
        import cv2
    except ImportError as error:
        raise ReconadError("OpenCV is needed: pip install opencv-python-headless.") from error
    return cv2


def resolve_source(source: Source, source_roots: tuple[Path, ...] = ()) -> Path:
    """The photograph's file: inside the installed PyPI package, or under / or one of ``source_roots``.

    Raises:
        ReconadError: the package is not installed (naming the install command).
    """
    kind, package = source.package.split(":", 1)
    if source.path.startswith("skimage:"):
        try:
            import importlib.resources

            path = Path(str(importlib.resources.files("skimage") / source.path.removeprefix("skimage:")))
        except ImportError:
            path = None
        if path is None or not path.is_file():
            raise ReconadError(f"{source.path} needs the PyPI package {package}: pip install 'reconad[bench]'.")
        return path
    for root in (*source_roots, Path("/")):
        candidate = root / source.path.lstrip("/")
        if candidate.is_file():
            return candidate
    raise ReconadError(
        f"{source.path} is missing: apt-get install {package}, or pass --source-root DIR where "
        f"`dpkg -x {package}_*.deb DIR` unpacked it."
    )


def _package_version(package: str) -> str | None:
    kind, name = package.split(":", 1)
    if kind == "pypi":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(name)
        except PackageNotFoundError:
            return None
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def load_photograph(source: Source, path: Path) -> np.ndarray:
    """The photograph as float32 [H, W, 3] RGB in 0..255 at ``source.scale`` (gray ones replicated)."""
    cv2 = _cv2()
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # gray PNGs come back as 3 equal channels
    if image is None:
        raise ReconadError(f"{path} is not a readable image.")
    image = image[..., ::-1]
    if source.scale != 1.0:
        image = cv2.resize(image, None, fx=source.scale, fy=source.scale, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image, dtype=np.float32)


def _random_crop(rng: np.random.Generator, photo: np.ndarray, rects: tuple[Rect, ...], window: int) -> np.ndarray:
    """A square crop lying inside one of ``rects`` (fractions of ``photo``), flipped at random."""
    h, w = photo.shape[:2]
    x0, y0, x1, y1 = rects[rng.integers(len(rects))]
    left, top, right, bottom = int(x0 * w), int(y0 * h), int(x1 * w), int(y1 * h)
    side = int(round(window * rng.uniform(0.92, 1.08)))
    side = min(side, right - left, bottom - top)
    x = int(rng.integers(left, right - side + 1))
    y = int(rng.integers(top, bottom - side + 1))
    crop = photo[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    return np.ascontiguousarray(crop) * rng.uniform(0.95, 1.05)


def _blob(rng: np.random.Generator, side: int, radius: float, feather: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Soft irregular blob alpha float32 [side, side] in 0..1 at a random centre at least ``radius`` inside."""
    margin = int(radius) + 2
    cx, cy = (int(rng.integers(margin, max(margin + 1, side - margin))) for _ in range(2))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    angle = np.arctan2(yy - cy, xx - cx)
    boundary = np.ones_like(angle)
    for k in range(2, 6):  # a few low harmonics make the outline irregular but closed
        boundary += rng.uniform(0.03, 0.12) / (k - 1) * np.sin(k * angle + rng.uniform(0, 2 * np.pi))
    boundary *= radius * rng.uniform(0.8, 1.0, size=1).astype(np.float32)
    squash = rng.uniform(0.6, 1.0)  # ellipses at any angle
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / squash
    distance = np.hypot(u, v)
    alpha = np.clip((boundary - distance) / max(feather, 1e-3) + 0.5, 0, 1)
    return alpha.astype(np.float32), (cx, cy)


def _contrast(image: np.ndarray, alpha: np.ndarray) -> float:
    """Mean brightness under ``alpha`` (0..255)."""
    weight = alpha[..., None]
    return float((image * weight).sum() / (3 * weight.sum() + 1e-6))


def _radius(rng: np.random.Generator, side: int, size: str) -> float:
    low, high = {"small": (0.03, 0.05), "medium": (0.06, 0.09), "large": (0.10, 0.15)}[size]
    return rng.uniform(low, high) * side


def _curve(rng: np.random.Generator, side: int, length: float) -> np.ndarray:
    """Points [K, 2] (x, y) of a gently bent curve of about ``length`` pixels inside the crop."""
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    half = length / 2
    margin = half * np.abs(direction) + 3
    centre = np.array([rng.uniform(margin[0], max(margin[0] + 1, side - margin[0])),
                       rng.uniform(margin[1], max(margin[1] + 1, side - margin[1]))])
    t = np.linspace(-1, 1, 48)[:, None]
    bend = rng.uniform(-0.12, 0.12) * length
    return centre + t * half * direction + (1 - t**2) * bend * normal


def _scratch(rng, image, size, others):
    cv2 = _cv2()
    side = image.shape[0]
    length = {"small": rng.uniform(0.15, 0.25), "medium": rng.uniform(0.3, 0.45), "large": rng.uniform(0.5, 0.75)}[size] * side
    width = max(1, int(round({"small": 1.2, "medium": 2.2, "large": 3.5}[size] * side / 256 * rng.uniform(0.8, 1.3))))
    canvas = np.zeros((side * 4, side * 4), np.uint8)  # 4x supersampled for a clean anti-aliased line
    points = np.round(_curve(rng, side, length) * 4).astype(np.int32)
    cv2.polylines(canvas, [points], False, 255, width * 4, cv2.LINE_AA)
    alpha = cv2.resize(canvas, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    local = _contrast(image, cv2.dilate(alpha, np.ones((9, 9), np.uint8)))
    colour = rng.uniform(200, 245) if local < 140 else rng.uniform(15, 50)  # a bright groove or a dark one
    strength = rng.uniform(0.65, 0.9)
    image[:] = image * (1 - strength * alpha[..., None]) + strength * alpha[..., None] * colour
    return alpha > 0.25


def _hole(rng, image, size, others):
    cv2 = _cv2()
    side = image.shape[0]
    radius = _radius(rng, side, size) * 0.8
    alpha, (cx, cy) = _blob(rng, side, radius, feather=1.2)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    depth = np.clip(1 - np.hypot(xx - cx, yy - cy) / (radius + 1e-6), 0, 1)
    inside = (rng.uniform(8, 30) + 25 * (1 - depth))[..., None] * np.array([1.0, 0.95, 0.9], np.float32)
    rim = np.clip(cv2.dilate(alpha, np.ones((5, 5), np.uint8)) - alpha, 0, 1)  # a darker lip around it
    image[:] = image * (1 - 0.45 * rim[..., None])
    image[:] = image * (1 - alpha[..., None]) + alpha[..., None] * inside
    return (alpha > 0.5) | (rim > 0.5)


_STAIN_TINTS = np.array([[70, 45, 20], [150, 70, 25], [35, 45, 110], [40, 40, 40], [120, 110, 40]], np.float32)


def _stain(rng, image, size, others):
    side = image.shape[0]
    radius = _radius(rng, side, size) * 1.1
    alpha, _ = _blob(rng, side, radius, feather=0.35 * radius)
    alpha *= rng.uniform(0.6, 0.85)
    tint = _STAIN_TINTS[rng.integers(len(_STAIN_TINTS))]
    stained = 0.55 * image * tint / 255 + 0.45 * tint  # keeps part of the texture under the stain
    image[:] = image * (1 - alpha[..., None]) + alpha[..., None] * stained
    return alpha > 0.3


def _contamination(rng, image, size, others):
    cv2 = _cv2()
    side = image.shape[0]
    radius = _radius(rng, side, size)
    alpha, _ = _blob(rng, side, radius, feather=1.5)
    photo = others[rng.integers(len(others))]
    ph, pw = photo.shape[:2]
    y, x = int(rng.integers(0, ph - side + 1)), int(rng.integers(0, pw - side + 1))
    patch = photo[y : y + side, x : x + side]
    if patch.shape[:2] != (side, side):  # another photograph smaller than this crop
        patch = cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA)
    patch = np.rot90(patch, int(rng.integers(4)))
    image[:] = image * (1 - alpha[..., None]) + alpha[..., None] * patch
    return alpha > 0.5


def _cut(rng, image, size, others):
    cv2 = _cv2()
    side = image.shape[0]
    length = {"small": rng.uniform(0.18, 0.28), "medium": rng.uniform(0.32, 0.45), "large": rng.uniform(0.5, 0.7)}[size] * side
    width = {"small": 2.0, "medium": 3.0, "large": 4.5}[size] * side / 256 * rng.uniform(0.8, 1.2)
    points = _curve(rng, side, length)
    canvas = np.zeros((side * 4, side * 4), np.float32)
    # A slit that is widest in the middle and closes at both ends.
    for (p, q), t in zip(zip(points[:-1], points[1:]), np.linspace(0, 1, len(points) - 1)):
        w = max(1, int(round(4 * width * np.sin(np.pi * (0.08 + 0.84 * t)) ** 0.6)))
        cv2.line(canvas, tuple(np.round(p * 4).astype(int)), tuple(np.round(q * 4).astype(int)), 1.0, w, cv2.LINE_AA)
    gap = cv2.resize(canvas, (side, side), interpolation=cv2.INTER_AREA)
    shift = np.float32([[1, 0, rng.choice([-1, 1])], [0, 1, rng.choice([-1, 1])]])
    lit_edge = np.clip(cv2.warpAffine(gap, shift, (side, side)) - gap, 0, 1)  # one lip catches the light
    image[:] = image * (1 - gap[..., None]) + gap[..., None] * rng.uniform(5, 30)
    image[:] = np.minimum(255, image * (1 + 0.5 * lit_edge[..., None]))
    return (gap > 0.25) | (lit_edge > 0.5)


def _discoloration(rng, image, size, others):
    cv2 = _cv2()
    side = image.shape[0]
    radius = _radius(rng, side, size) * 1.2
    alpha, _ = _blob(rng, side, radius, feather=0.3 * radius)
    gray = np.allclose(image[..., 0], image[..., 1]) and np.allclose(image[..., 1], image[..., 2])
    if gray or rng.random() < 0.5:  # darker or paler patch
        gain = rng.uniform(0.5, 0.7) if rng.random() < 0.6 else rng.uniform(1.35, 1.6)
        changed = np.clip(image * gain, 0, 255)
    else:  # a hue shift of 25-50 degrees
        hsv = cv2.cvtColor(np.clip(image, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.choice([-1, 1]) * rng.uniform(12, 25)) % 180
        changed = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    image[:] = image * (1 - alpha[..., None]) + alpha[..., None] * changed
    return alpha > 0.5


_DEFECT_PAINTERS = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "contamination": _contamination,
    "cut": _cut,
    "discoloration": _discoloration,
}


def render_image(
    rng: np.random.Generator,
    photo: np.ndarray,
    source: Source,
    split: str,
    image_size: int,
    defect: str | None = None,
    size: str = "medium",
    others: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image of a category: uint8 [S, S, 3] RGB and its mask uint8 [S, S] in {0, 255}.

    ``others``: the other categories' photographs, for ``contamination``.
    """
    cv2 = _cv2()
    train_rects, test_rects = source.split_rects()
    crop = _random_crop(rng, photo, train_rects if split == "train" else test_rects, source.window)
    mask = np.zeros(crop.shape[:2], np.float32)
    if defect is not None:
        mask = _DEFECT_PAINTERS[defect](rng, crop, size, others or [photo]).astype(np.float32)
    side = crop.shape[0]
    interpolation = cv2.INTER_AREA if side > image_size else cv2.INTER_LINEAR
    image = cv2.resize(np.clip(crop, 0, 255), (image_size, image_size), interpolation=interpolation)
    mask = cv2.resize(mask, (image_size, image_size), interpolation=cv2.INTER_LINEAR) >= 0.5
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def _write_png(path: Path, array: np.ndarray) -> None:
    cv2 = _cv2()
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = array[..., ::-1] if array.ndim == 3 else array
    if not cv2.imwrite(str(path), np.ascontiguousarray(bgr)):
        raise ReconadError(f"Could not write {path}.")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_real_set(
    out_dir: str | os.PathLike,
    config: RealSetConfig = RealSetConfig(),
    source_roots: tuple[Path, ...] = (),
    overwrite: bool = False,
) -> RealSetSummary:
    """Write the set to ``out_dir`` (MVTec-AD layout plus ``real_set.json``); same sources + seed = same files.

    Written to a temporary sibling and renamed into place: an interrupted run leaves nothing half-written.

    Raises:
        ReconadError: unknown category, a missing source package, a non-empty ``out_dir`` without
            ``overwrite``, or a size too small for the defects.
    """
    unknown = sorted(set(config.categories) - set(SOURCES))
    if unknown:
        raise ReconadError(f"Unknown categories {unknown}; choose from {list(CATEGORIES)}.")
    if not config.categories:
        raise ReconadError("Choose at least one category.")
    if config.image_size < 32 or min(config.num_train, config.num_test_good, config.num_per_defect) < 1:
        raise ReconadError("image_size must be at least 32 and every count at least 1.")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ReconadError(f"{root} exists and is not a folder.")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise ReconadError(f"{root} already exists and is not empty; pass --overwrite to replace it.")
    paths = {name: resolve_source(SOURCES[name], source_roots) for name in config.categories}
    photos = {name: load_photograph(SOURCES[name], path) for name, path in paths.items()}

    summary = RealSetSummary(root, 0, 0, tuple(config.categories))
    with atomic_folder(root) as staging:  # a half-written set is never left behind
        for name in config.categories:
            index = CATEGORIES.index(name)  # seeded by the fixed index: a subset renders the same images
            source, photo = SOURCES[name], photos[name]
            others = [p for other, p in photos.items() if other != name] or [photo[::-1, ::-1]]
            jobs = [("train", "good", k, None) for k in range(config.num_train)]
            jobs += [("test", "good", k, None) for k in range(config.num_test_good)]
            jobs += [("test", d, k, SIZES[k % len(SIZES)]) for d in DEFECTS for k in range(config.num_per_defect)]
            for split, defect, k, size in jobs:
                code = 0 if split == "train" else 1 if defect == "good" else 2 + DEFECTS.index(defect)
                salt = [1] if config.validation and split == "test" else []
                rng = np.random.default_rng([config.seed, index, code, k, *salt])
                region = "train" if config.validation else split
                image, mask = render_image(rng, photo, source, region, config.image_size,
                                           None if defect == "good" else defect, size or "medium", others)
                relative = f"{name}/{split}/{defect}/{k:03d}.png"
                _write_png(staging / relative, image)
                record = {"image": relative, "category": name, "split": split, "defect": defect}
                if defect != "good":
                    _write_png(staging / name / "ground_truth" / defect / f"{k:03d}_mask.png", mask)
                    record.update(size=size, mask_fraction=round(float((mask > 0).mean()), 5))
                summary.images.append(record)
            summary.num_train += config.num_train
            summary.num_test += config.num_test_good + len(DEFECTS) * config.num_per_defect
        info = {
            "format": "reconad real set 1",
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
            "defects": list(DEFECTS),
            "sizes": list(SIZES),
            "sources": {
                name: {**{k: v for k, v in asdict(SOURCES[name]).items() if k not in ("train", "test")},
                       "train_rects": SOURCES[name].split_rects()[0], "test_rects": SOURCES[name].split_rects()[1],
                       "file": str(paths[name]), "sha256": _sha256(paths[name]),
                       "package_version": _package_version(SOURCES[name].package)}
                for name in config.categories
            },
            "images": summary.images,
        }
        (staging / "real_set.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (MVTec-AD layout)")
    parser.add_argument("--categories", help=f"comma-separated, default all: {','.join(CATEGORIES)}")
    parser.add_argument("--tiny", action="store_true", help="the CI size: 64 px, 6 train, 2 test goods, 1 per defect")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--num-train", type=int)
    parser.add_argument("--num-test-good", type=int)
    parser.add_argument("--num-per-defect", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--source-root", type=Path, action="append", default=[],
                        help="also look for Debian files under DIR (a `dpkg -x` tree); repeatable")
    parser.add_argument("--validation", action="store_true",
                        help="test images cut from the TRAIN rectangles: a set to choose a recipe on (never the test split)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    categories = tuple(c.strip() for c in args.categories.split(",") if c.strip()) if args.categories else None
    config = RealSetConfig.tiny() if args.tiny else RealSetConfig()
    changes = {k: v for k, v in dict(image_size=args.image_size, num_train=args.num_train,
                                      num_test_good=args.num_test_good, num_per_defect=args.num_per_defect,
                                      seed=args.seed, categories=categories).items() if v is not None}
    changes["validation"] = args.validation
    config = RealSetConfig(**{**asdict(config), **changes})
    try:
        summary = write_real_set(args.out, config, tuple(args.source_root), args.overwrite)
    except ReconadError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"wrote {summary.root}: {len(summary.categories)} categories ({', '.join(summary.categories)}), "
          f"{summary.num_train} train and {summary.num_test} test images at {config.image_size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
