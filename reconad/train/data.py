"""Data sets for training and evaluation: MVTec-AD folder layout and the CIFAR-10 python pickles.

Every file is read and checked once, when the data set is built, so a bad file is reported up front
(naming the file) and never crashes an epoch. Items are uint8 RGB images at the preset's input size:
the detector normalises internally.

Bad files (unreadable or truncated image, missing ground-truth mask, mask of another size than its
image, 16-bit image, image with transparent pixels) stop the load with one sentence naming the file,
or with ``on_bad_file="skip"`` are left out and listed in ``ImageDataset.skipped``. Gray images are
converted to RGB (MVTec's grid, screw and zipper are gray) and fully opaque RGBA images lose the alpha.
"""

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from reconad.runtime.errors import ReconadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
OnBadFile = Literal["fail", "skip"]


class BadFileError(ReconadError):
    """An image or mask that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Sample:
    path: Path
    category: str
    defect: str  # "good" for defect-free images
    mask_path: Path | None = None  # None for defect-free images

    @property
    def label(self) -> int:
        return int(self.defect != GOOD)


def _cv2():
    try:
        import cv2
    except ImportError as error:
        raise ReconadError("OpenCV is needed to read images: pip install opencv-python-headless.") from error
    return cv2


def _decode(path: Path, flags: int) -> np.ndarray:
    cv2 = _cv2()
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as error:
        raise BadFileError(f"Cannot read {path}: {error.strerror or error}.") from error
    if path.suffix.lower() in (".jpg", ".jpeg") and b"\xff\xd9" not in data[-64:].tobytes():
        raise BadFileError(f"{path} is truncated (no JPEG end marker).")
    array = cv2.imdecode(data, flags) if data.size else None
    if array is None:
        raise BadFileError(f"{path} is not a readable image (unreadable or truncated).")
    return array


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit image file as uint8 [H, W, 3] RGB.

    Gray images are replicated to three channels and a fully opaque alpha channel is dropped.

    Raises:
        BadFileError: unreadable or truncated file, 16-bit or float image, transparent pixels.
    """
    cv2 = _cv2()
    path = Path(path)
    array = _decode(path, cv2.IMREAD_UNCHANGED)
    if array.dtype != np.uint8:
        raise BadFileError(f"{path} is a {array.dtype.itemsize * 8}-bit image; convert it to 8 bits per channel.")
    if array.ndim == 3 and array.shape[2] in (2, 4):
        if (array[..., -1] != 255).any():
            raise BadFileError(f"{path} has transparent pixels; save it without an alpha channel.")
        array = array[..., :-1]
    if array.ndim == 2 or array.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(array.reshape(array.shape[0], array.shape[1], 1), 3, axis=2))
    if array.shape[2] != 3:
        raise BadFileError(f"{path} has {array.shape[2]} channels; expected gray, RGB or RGBA.")
    return np.ascontiguousarray(array[..., ::-1])  # OpenCV decodes to BGR


def read_mask(path: str | os.PathLike, image_hw: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as bool [H, W]; any non-zero pixel is defective.

    Raises:
        BadFileError: unreadable mask, or its size differs from its image's ``image_hw``.
    """
    cv2 = _cv2()
    path = Path(path)
    array = _decode(path, cv2.IMREAD_UNCHANGED)
    if array.ndim == 3:
        array = array.max(axis=2)
    if array.shape != tuple(image_hw):
        raise BadFileError(
            f"{path} is {array.shape[1]}x{array.shape[0]} but its image is {image_hw[1]}x{image_hw[0]}."
        )
    return array > 0


def resize_image(image: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """Resize uint8 [H, W, 3] to ``input_hw``: area filter when shrinking, bilinear when growing."""
    cv2 = _cv2()
    if image.shape[:2] == tuple(input_hw):
        return image
    shrinking = image.shape[0] * image.shape[1] > input_hw[0] * input_hw[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (input_hw[1], input_hw[0]), interpolation=interpolation)


def resize_mask(mask: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """Resize bool [H, W] to ``input_hw`` with nearest-neighbour sampling (masks stay binary)."""
    cv2 = _cv2()
    if mask.shape == tuple(input_hw):
        return mask
    resized = cv2.resize(mask.astype(np.uint8), (input_hw[1], input_hw[0]), interpolation=cv2.INTER_NEAREST)
    return resized > 0


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def list_categories(root: str | os.PathLike) -> tuple[str, ...]:
    """The categories under an MVTec-layout ``root``: sub-folders that hold ``train/good``."""
    root = Path(root)
    if not root.is_dir():
        raise ReconadError(f"Data folder {root} does not exist.")
    categories = tuple(sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir()))
    if not categories:
        raise ReconadError(f"{root} has no <category>/train/good folders (expected the MVTec-AD layout).")
    return categories


def _find_mask(root: Path, category: str, defect: str, image_path: Path) -> Path | None:
    folder = root / category / "ground_truth" / defect
    for stem in (f"{image_path.stem}_mask", image_path.stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def scan_mvtec(
    root: str | os.PathLike, split: Literal["train", "test"], categories: tuple[str, ...] | None = None
) -> list[Sample]:
    """List the samples of one split; reads no pixels. Train holds only ``good`` images.

    A defective test image whose mask is missing gets ``mask_path=None``; ``load_mvtec`` reports it.
    """
    root = Path(root)
    available = list_categories(root)
    chosen = tuple(categories) if categories else available
    missing = [c for c in chosen if c not in available]
    if missing:
        raise ReconadError(f"Categories {missing} are not in {root}; it has {list(available)}.")
    samples = []
    for category in chosen:
        split_dir = root / category / split
        if not split_dir.is_dir():
            raise ReconadError(f"{split_dir} does not exist (expected the MVTec-AD layout).")
        defects = [GOOD] if split == "train" else sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        for defect in defects:
            for path in _image_files(split_dir / defect):
                mask_path = None if defect == GOOD else _find_mask(root, category, defect, path)
                samples.append(Sample(path, category, defect, mask_path))
    return samples


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """Decoded, resized images (uint8 [N, H, W, 3] RGB) with labels, masks and their categories.

    Items are dicts: ``image`` uint8 [H, W, 3], ``mask`` uint8 [H, W] in {0, 1}, ``label`` (1 = anomalous),
    ``index``. ``has_masks`` is False where the data set has no pixel ground truth (CIFAR-10).
    """

    images: np.ndarray  # uint8 [N, H, W, 3]
    masks: np.ndarray  # bool [N, H, W]
    labels: np.ndarray  # int64 [N]
    categories: list[str]
    names: list[str]  # e.g. "pill/test/hole/003.png", for reports
    has_masks: bool = True
    skipped: list[str] = field(default_factory=list)  # one sentence per left-out file

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": torch.from_numpy(self.images[index]),
            "mask": torch.from_numpy(self.masks[index].astype(np.uint8)),
            "label": int(self.labels[index]),
            "index": index,
        }

    def subset(self, category: str) -> "ImageDataset":
        """The items of one category, as a data set of its own."""
        keep = np.array([c == category for c in self.categories])
        idx = np.nonzero(keep)[0]
        return ImageDataset(
            self.images[idx],
            self.masks[idx],
            self.labels[idx],
            [self.categories[i] for i in idx],
            [self.names[i] for i in idx],
            self.has_masks,
        )

    @property
    def category_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.categories))


def _load_sample(sample: Sample, root: Path, input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    image = read_image_rgb(sample.path)
    if sample.defect == GOOD:
        mask = np.zeros(image.shape[:2], bool)
    elif sample.mask_path is None:
        expected = root / sample.category / "ground_truth" / sample.defect / f"{sample.path.stem}_mask.png"
        raise BadFileError(f"{sample.path} has no ground-truth mask (expected {expected}).")
    else:
        mask = read_mask(sample.mask_path, image.shape[:2])
    return resize_image(image, input_hw), resize_mask(mask, input_hw)


def load_mvtec(
    root: str | os.PathLike,
    split: Literal["train", "test"],
    input_hw: tuple[int, int],
    categories: tuple[str, ...] | None = None,
    on_bad_file: OnBadFile = "fail",
    num_threads: int | None = None,
) -> ImageDataset:
    """Read, check and resize one split of an MVTec-layout folder.

    Args:
        root: the folder holding ``<category>/train/good``, ``<category>/test/<defect>``, ...
        split: ``"train"`` (defect-free images only) or ``"test"``.
        input_hw: the preset's input size; images and masks are resized to it.
        categories: a subset of the categories; all by default.
        on_bad_file: ``"fail"`` raises ``BadFileError`` naming the first bad file; ``"skip"`` leaves bad
            files out and lists them in ``skipped``.
        num_threads: decoding threads (OpenCV releases the GIL); default: the CPU count, at most 8.

    Raises:
        ReconadError: layout errors, a bad file under ``"fail"``, or nothing left to load.
    """
    if on_bad_file not in ("fail", "skip"):
        raise ReconadError(f"on_bad_file must be 'fail' or 'skip', not {on_bad_file!r}.")
    root = Path(root)
    samples = scan_mvtec(root, split, categories)
    threads = num_threads or min(8, os.cpu_count() or 1)

    def load(sample: Sample):
        try:
            return _load_sample(sample, root, input_hw)
        except BadFileError as error:
            return error

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(load, samples))
    kept, skipped = [], []
    for sample, result in zip(samples, results):
        if isinstance(result, BadFileError):
            if on_bad_file == "fail":
                raise BadFileError(f"{result} Pass --skip-bad-files to leave such files out.")
            skipped.append(str(result))
        else:
            kept.append((sample, result))
    if not kept:
        raise ReconadError(f"No usable {split} images under {root}.")
    h, w = input_hw
    images = np.empty((len(kept), h, w, 3), np.uint8)
    masks = np.empty((len(kept), h, w), bool)
    for i, (_, (image, mask)) in enumerate(kept):
        images[i], masks[i] = image, mask
    return ImageDataset(
        images=images,
        masks=masks,
        labels=np.array([s.label for s, _ in kept], np.int64),
        categories=[s.category for s, _ in kept],
        names=[s.path.relative_to(root).as_posix() for s, _ in kept],
        has_masks=True,
        skipped=skipped,
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 batches hold (dicts, lists, bytes, numpy arrays)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[b"labels"], np.int64)
    except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as error:
        raise BadFileError(f"{path} is not a readable CIFAR-10 batch ({error}).") from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise BadFileError(f"{path} is not a CIFAR-10 batch: data has shape {data.shape}, {len(labels)} labels.")
    # [N, 3072] as channel planes → [N, 32, 32, 3]
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def find_cifar10(root: str | os.PathLike) -> Path | None:
    """The ``cifar-10-batches-py`` folder at or directly under ``root``, or None."""
    root = Path(root)
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "test_batch").is_file() and (folder / "data_batch_1").is_file():
            return folder
    return None


def load_cifar10(
    root: str | os.PathLike,
    split: Literal["train", "test"],
    normal_classes: tuple[int, ...] = (0, 1, 2, 3, 4),
    input_hw: tuple[int, int] = (32, 32),
) -> ImageDataset:
    """CIFAR-10 in the seed's one-versus-rest setting: ``normal_classes`` are normal, the rest anomalous.

    Train holds the training images of the normal classes only; test holds all 10000 test images.
    There are no masks (``has_masks`` is False) and the category is ``cifar10``.
    """
    folder = find_cifar10(root)
    if folder is None:
        raise ReconadError(f"{root} holds no cifar-10-batches-py (data_batch_1..5, test_batch).")
    bad = [c for c in normal_classes if not 0 <= c <= 9]
    if bad or not normal_classes or len(set(normal_classes)) == 10:
        raise ReconadError(f"normal_classes must be a proper subset of 0..9, got {list(normal_classes)}.")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_read_cifar_batch(folder / name) for name in names if (folder / name).is_file()]
    if not parts:
        raise ReconadError(f"{folder} has none of {names}.")
    images = np.concatenate([p[0] for p in parts])
    classes = np.concatenate([p[1] for p in parts])
    anomalous = ~np.isin(classes, normal_classes)
    if split == "train":
        images, classes, anomalous = images[~anomalous], classes[~anomalous], anomalous[~anomalous]
    if tuple(input_hw) != (32, 32):
        images = np.stack([resize_image(image, input_hw) for image in images])
    n = len(images)
    return ImageDataset(
        images=np.ascontiguousarray(images),
        masks=np.zeros((n, *input_hw), bool),
        labels=anomalous.astype(np.int64),
        categories=["cifar10"] * n,
        names=[f"cifar10/{split}/{i:05d}-class{c}" for i, c in enumerate(classes)],
        has_masks=False,
    )


def load_dataset(
    root: str | os.PathLike,
    split: Literal["train", "test"],
    input_hw: tuple[int, int],
    categories: tuple[str, ...] | None = None,
    on_bad_file: OnBadFile = "fail",
    normal_classes: tuple[int, ...] = (0, 1, 2, 3, 4),
) -> ImageDataset:
    """CIFAR-10 when ``root`` holds its python batches, otherwise the MVTec layout."""
    if find_cifar10(root) is not None:
        return load_cifar10(root, split, normal_classes, input_hw)
    return load_mvtec(root, split, input_hw, categories, on_bad_file)
