"""Data sets for training and evaluation: MVTec-AD folder layout and the CIFAR-10 python pickles.

Every file is read and checked once, when the data set is built, so a bad file is reported up front
(naming the file) and never crashes an epoch. Images and masks go through the runtime's one image
path (``reconad.runtime.frames``: decode, EXIF orientation, bit depth, colour, resize), so training and
evaluation see exactly the pixels the line does. Items are uint8 RGB images at the preset's input size:
the detector normalises internally.

Bad files (unreadable or truncated image, a missing ground-truth mask in a category that has masks, a
mask of another size than its image) stop the load with one sentence naming the file, or with
``on_bad_file="skip"`` are left out and listed in ``ImageDataset.skipped``. A category whose defect
images have no masks at all is evaluated from its folder labels only (``unmasked_categories``).
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
from reconad.runtime.frames import list_images, read_image, resize_image, resize_mask
from reconad.runtime.frames import read_mask as decode_mask

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


def read_image_rgb(path: str | os.PathLike, bit_depth: int | None = None) -> np.ndarray:
    """``reconad.runtime.frames.read_image`` with its failures as ``BadFileError`` (uint8 [H, W, 3] RGB)."""
    try:
        return read_image(path, bit_depth)
    except ReconadError as error:
        raise BadFileError(str(error)) from None


def read_mask(path: str | os.PathLike, image_hw: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as bool [H, W] (``reconad.runtime.frames.read_mask``), checked against its image.

    Raises:
        BadFileError: unreadable mask, or its (upright) size differs from its image's ``image_hw``.
    """
    path = Path(path)
    try:
        mask = decode_mask(path)
    except ReconadError as error:
        raise BadFileError(str(error)) from None
    if mask.shape != tuple(image_hw):
        raise BadFileError(f"{path} is {mask.shape[1]}x{mask.shape[0]} but its image is {image_hw[1]}x{image_hw[0]}.")
    return mask


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
    """``ground_truth/<defect>/<stem>_mask.<ext>`` (or ``<stem>.<ext>``), any image suffix in any letter case."""
    folder = root / category / "ground_truth" / defect
    if not folder.is_dir():
        return None
    by_stem = {}
    for path in list_images(folder, recursive=False):
        by_stem.setdefault(path.stem.lower(), path)
    stem = image_path.stem.lower()
    return by_stem.get(f"{stem}_mask") or by_stem.get(stem)


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
            for path in list_images(split_dir / defect, recursive=False):
                mask_path = None if defect == GOOD else _find_mask(root, category, defect, path)
                samples.append(Sample(path, category, defect, mask_path))
    return samples


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """Decoded, resized images (uint8 [N, H, W, 3] RGB) with labels, masks and their categories.

    Items are dicts: ``image`` uint8 [H, W, 3], ``mask`` uint8 [H, W] in {0, 1}, ``label`` (1 = anomalous),
    ``index``. ``has_masks`` is False where the data set has no pixel ground truth at all (CIFAR-10);
    ``unmasked_categories`` are the categories without it (their defect images have no masks), whose
    all-zero ``masks`` mean "unknown", not "defect-free".
    """

    images: np.ndarray  # uint8 [N, H, W, 3]
    masks: np.ndarray  # bool [N, H, W]
    labels: np.ndarray  # int64 [N]
    categories: list[str]
    names: list[str]  # e.g. "pill/test/hole/003.png", for reports
    has_masks: bool = True
    skipped: list[str] = field(default_factory=list)  # one sentence per left-out file
    unmasked_categories: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)  # one sentence per suspicious file kept (e.g. a full mask)

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
            self.has_masks and category not in self.unmasked_categories,
            unmasked_categories=tuple(c for c in self.unmasked_categories if c == category),
        )

    def category_has_masks(self, category: str) -> bool:
        """Whether the pixel ground truth of ``category`` is known (pixel metrics can be computed)."""
        return self.has_masks and category not in self.unmasked_categories

    @property
    def category_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.categories))


def _load_sample(
    sample: Sample, root: Path, input_hw: tuple[int, int], masked: bool, bit_depth: int | None
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The resized image and mask of one sample, and a note when its mask marks every pixel."""
    image = read_image_rgb(sample.path, bit_depth)
    note = None
    if sample.defect == GOOD or not masked:
        mask = np.zeros(image.shape[:2], bool)
    elif sample.mask_path is None:
        expected = root / sample.category / "ground_truth" / sample.defect / f"{sample.path.stem}_mask.png"
        raise BadFileError(f"{sample.path} has no ground-truth mask (expected {expected}).")
    else:
        mask = read_mask(sample.mask_path, image.shape[:2])
        if mask.all():
            note = f"{sample.mask_path} marks every pixel of its image as defective; check how it was saved."
    return resize_image(image, input_hw), resize_mask(mask, input_hw), note


def load_mvtec(
    root: str | os.PathLike,
    split: Literal["train", "test"],
    input_hw: tuple[int, int],
    categories: tuple[str, ...] | None = None,
    on_bad_file: OnBadFile = "fail",
    num_threads: int | None = None,
    bit_depth: int | None = None,
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
        bit_depth: the real depth of 16-bit images that do not record it (see ``frames.to_rgb_uint8``).

    Raises:
        ReconadError: layout errors, a bad file under ``"fail"``, or nothing left to load.
    """
    if on_bad_file not in ("fail", "skip"):
        raise ReconadError(f"on_bad_file must be 'fail' or 'skip', not {on_bad_file!r}.")
    root = Path(root)
    samples = scan_mvtec(root, split, categories)
    threads = num_threads or min(8, os.cpu_count() or 1)
    defective = [sample for sample in samples if sample.defect != GOOD]
    unmasked = tuple(
        category
        for category in dict.fromkeys(sample.category for sample in defective)
        if all(sample.mask_path is None for sample in defective if sample.category == category)
    )

    def load(sample: Sample):
        try:
            return _load_sample(sample, root, input_hw, sample.category not in unmasked, bit_depth)
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
    notes = [f"{category}: no ground-truth masks, so only image-level metrics (from the folder labels)."
             for category in unmasked]
    for i, (_, (image, mask, note)) in enumerate(kept):
        images[i], masks[i] = image, mask
        notes += [note] if note else []
    return ImageDataset(
        images=images,
        masks=masks,
        labels=np.array([s.label for s, _ in kept], np.int64),
        categories=[s.category for s, _ in kept],
        names=[s.path.relative_to(root).as_posix() for s, _ in kept],
        has_masks=len(unmasked) < len({s.category for s, _ in kept}),
        skipped=skipped,
        unmasked_categories=unmasked,
        notes=notes,
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
    bit_depth: int | None = None,
) -> ImageDataset:
    """CIFAR-10 when ``root`` holds its python batches, otherwise the MVTec layout."""
    if find_cifar10(root) is not None:
        return load_cifar10(root, split, normal_classes, input_hw)
    return load_mvtec(root, split, input_hw, categories, on_bad_file, bit_depth=bit_depth)
