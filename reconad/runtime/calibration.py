"""Thresholds from defect-free images, per category and global, written into the artifact's manifest.

Image threshold: just above the (1 - max_fpr) quantile of the good images' scores, plus a margin
(``threshold_at_fpr``); pixel threshold: the same rule on a sample of the good anomaly-map values;
distance limit (out of distribution, ``distance_limit_for``): between the category's good images and
the next category. Optional normalisation maps raw scores to 0..1 with the image threshold at 0.5.
Where the good images come from (``plan_calibration``): an MVTec-layout root (``<category>/test/good``
per category, held out from training; its defect folders give the operating point), ``--category NAME
DIR``, or plain folders of good images (the global thresholds). Backs ``recon-inspect calibrate``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from reconad.runtime.config import utc_now_iso
from reconad.runtime.errors import ReconadError
from reconad.runtime.progress import Progress
from reconad.runtime.frames import Roi, list_images, prepare_image
from reconad.runtime.inspector import Inspector
from reconad.runtime.manifest import Manifest, manifest_path_for
from reconad.runtime.thresholds import Calibration, OperatingPoint, OperatingPointCounts, ScoreNormalization, Threshold

NORMALIZE_CHOICES = ("quantile", "minmax", "none")
METHOD = "max_fpr"
DISTANCE_METHOD = "max_fpr_separation"
GOOD = "good"
HELD_OUT_GOODS = ("test", GOOD)  # <category>/test/good: defect-free images the model was not trained on
UNRELATED_DISTANCE = 1.0  # a one-category model's stand-in for the distance to the next product


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Settings of ``recon-inspect calibrate``; each field is the option of the same name."""

    max_fpr: float = 0.01  # false-positive rate allowed on defect-free images, for the image threshold
    pixel_max_fpr: float | None = None  # the same for anomaly-map pixels; None: max_fpr
    margin: float = 0.05  # fraction of the spread (quantile - median) added above the quantile
    normalize: str = "quantile"  # 0..1 score normalisation: quantile, minmax or none (removes it)
    roi: Roi | None = None  # the crop the line runs with; calibrate on what the model will see
    batch_size: int = 8
    pixel_samples_per_image: int = 16384  # anomaly-map values kept per image for the pixel quantile
    bit_depth: int | None = None  # real depth of 16-bit images without an sBIT chunk (e.g. 12); None: 16

    def __post_init__(self) -> None:
        for name in ("max_fpr", "pixel_max_fpr"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ReconadError(f"{name} must be in [0, 1), got {value}.")
        if self.margin < 0:
            raise ReconadError(f"margin must be >= 0, got {self.margin}.")
        if self.normalize not in NORMALIZE_CHOICES:
            raise ReconadError(f"normalize must be one of {list(NORMALIZE_CHOICES)}, got {self.normalize!r}.")
        if self.batch_size < 1 or self.pixel_samples_per_image < 1:
            raise ReconadError("batch_size and pixel_samples_per_image must be at least 1.")


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """Good images to calibrate one operating point on.

    Attributes:
        category: the category the thresholds are for; None for the global ones.
        good_dirs: folders of defect-free images (searched recursively).
        test_dir: a test split beside them (``<category>/test``) whose other folders hold defective
            images: the new operating point is reported on it; None without one.
    """

    category: str | None
    good_dirs: tuple[Path, ...]
    test_dir: Path | None = None


@dataclasses.dataclass(frozen=True)
class PointResult:
    """What one operating point was calibrated on and how it does.

    Attributes:
        category: as in ``CalibrationSet``.
        point: the new operating point.
        n_images: good images scored; ``n_unreadable`` were skipped.
        scores: the good images' raw scores, float64 [n_images].
        false_positive_rate: fraction of ``scores`` at or above the image threshold (in-sample: these
            images set the threshold).
        recognized: fraction of the good images the graph named as ``category`` (None: the model names
            no category, or the global set).
        counts: the operating point on the test split (good and defective images), None without one.
        recognition_accuracy: fraction of the test split's images named as ``category``, or None.
        replaced: the operating point this one replaced, if any was calibrated before.
    """

    category: str | None
    point: OperatingPoint
    n_images: int
    n_unreadable: int
    scores: np.ndarray
    false_positive_rate: float
    recognized: float | None = None
    counts: OperatingPointCounts | None = None
    recognition_accuracy: float | None = None
    replaced: OperatingPoint | None = None


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """What ``calibrate_artifact`` wrote.

    Attributes:
        manifest_path: the manifest that now holds the thresholds.
        manifest: its new content.
        points: one per calibrated set, the global one (category None) first when there is one.
    """

    manifest_path: Path
    manifest: Manifest
    points: tuple[PointResult, ...]

    def point(self, category: str | None) -> PointResult:
        return next(result for result in self.points if result.category == category)


def threshold_at_fpr(values: np.ndarray, max_fpr: float, margin: float) -> float:
    """The smallest sensible threshold that flags at most ``max_fpr`` of ``values`` (rule ``value >= t``).

    With n values and k = floor(max_fpr * n) allowed false positives, the anchor is the (k+1)-th largest
    value, so ``anchor`` itself must not be flagged: t = anchor + margin * (anchor - median), and at
    least the next float above the anchor. The margin, relative to the spread of the good values, leaves
    room for good images a little worse than any seen in calibration. With n < 1 / max_fpr, k = 0 and
    the anchor is the maximum.
    """
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())  # ascending
    if values.size == 0 or not np.isfinite(values).all():
        raise ReconadError("Calibration needs finite scores; the model produced NaN or infinite values.")
    anchor = _anchor(values, max_fpr)
    spread = anchor - float(np.median(values))
    threshold = anchor + margin * spread
    return threshold if threshold > anchor else float(np.nextafter(anchor, np.inf))


def _anchor(ascending: np.ndarray, max_fpr: float) -> float:
    allowed = math.floor(max_fpr * ascending.size + 1e-9)
    return float(ascending[ascending.size - 1 - min(allowed, ascending.size - 1)])


def distance_limit_for(distances: np.ndarray, separation: float, max_fpr: float, margin: float) -> float:
    """The out-of-distribution limit on ``category_distance`` for a category's good images' ``distances``.

    Midway between the good images (their ``max_fpr`` anchor, as for the image threshold) and half the
    cosine distance from the category's centroid to the nearest other one (``separation``): defective
    parts move the pooled features a little (on the sample data up to ~12 times the farthest good
    image's distance, 0.06 at most, where the nearest other centroid is 0.34 away), another product
    about as far as its own centroid (0.3 to 0.9 when left out of training). Never below ``threshold_at_fpr(distances, ...)``, so the calibration images themselves
    are not UNKNOWN where categories overlap.
    """
    values = np.sort(np.asarray(distances, dtype=np.float64).ravel())
    floor = threshold_at_fpr(values, max_fpr, margin)
    return max(floor, (_anchor(values, max_fpr) + separation / 2.0) / 2.0)


def normalization_for(
    scores: np.ndarray, threshold: float, method: str, max_fpr: float, calibration: Calibration
) -> ScoreNormalization:
    """0..1 normalisation with ``threshold`` at 0.5: low from the good scores (min, or their ``max_fpr``
    quantile for ``"quantile"``), ``high = 2 * threshold - low``; stronger anomalies saturate at 1."""
    low = float(np.min(scores)) if method == "minmax" else float(np.quantile(scores, max_fpr))
    low = min(low, float(np.nextafter(threshold, -np.inf)))  # keep low < threshold so high > low
    return ScoreNormalization(method=method, low=low, high=2.0 * threshold - low, calibration=calibration)


def _pixel_sample(anomaly_map: np.ndarray, count: int) -> np.ndarray:
    """About ``count`` values of a [H, W] map on a regular grid (deterministic)."""
    step = max(1, math.ceil(math.sqrt(anomaly_map.size / count)))
    return np.asarray(anomaly_map[::step, ::step], dtype=np.float32).ravel()


@dataclasses.dataclass(frozen=True)
class Scored:
    """Graph outputs for a list of images (the readable ones).

    Attributes:
        scores: raw image scores, float64 [n].
        pixels: a sample of their anomaly-map values, float32 [m].
        recognized: the category the graph named for each (None entries: the model names none).
        distances: ``category_distance`` [n] (NaN where the model names no category).
        read: bool [len(paths)], which of the given images could be read (the n above).
    """

    scores: np.ndarray
    pixels: np.ndarray
    recognized: list[str | None]
    distances: np.ndarray
    read: np.ndarray

    @property
    def unreadable(self) -> int:
        return int((~self.read).sum())


def score_images(
    inspector: Inspector,
    paths: list[Path],
    config: CalibrationConfig,
    report: Callable[[str], None] = print,
    description: str = "scoring",
) -> Scored:
    """Run the graph on the readable images of ``paths``; unreadable ones are reported and counted.
    Progress (``reconad.runtime.progress``) is shown as ``description``."""
    scores: list[float] = []
    pixels: list[np.ndarray] = []
    recognized: list[str | None] = []
    distances: list[float] = []
    read = np.zeros(len(paths), bool)
    progress = Progress(description, len(paths), unit="images", rate_unit="img/s")
    for start in range(0, len(paths), config.batch_size):
        if start:
            progress.advance(config.batch_size)
        images = []
        for offset, path in enumerate(paths[start : start + config.batch_size]):
            try:
                images.append(prepare_image(path, inspector.input_hw, roi=config.roi, bit_depth=config.bit_depth))
                read[start + offset] = True
            except ReconadError as error:
                report(f"warning: skipped {path}: {error}")
        if not images:
            continue
        for verdict in inspector.inspect(np.stack(images)):  # [B, H, W, 3] in
            scores.append(verdict.image_score)
            pixels.append(_pixel_sample(verdict.anomaly_map, config.pixel_samples_per_image))
            recognized.append(verdict.recognized_category)
            distances.append(math.nan if verdict.category_distance is None else verdict.category_distance)
    progress.advance(len(paths) - progress.done)
    progress.close()
    return Scored(
        scores=np.asarray(scores, dtype=np.float64),
        pixels=np.concatenate(pixels) if pixels else np.empty(0, np.float32),
        recognized=recognized,
        distances=np.asarray(distances, dtype=np.float64),
        read=read,
    )


def _image_subfolders(folder: Path) -> list[Path]:
    return sorted(child for child in folder.iterdir() if child.is_dir() and any(list_images(child)))


def plan_calibration(
    folders: Sequence[str | os.PathLike] = (),
    category_dirs: Sequence[tuple[str, str | os.PathLike]] = (),
) -> list[CalibrationSet]:
    """What to calibrate on, from ``recon-inspect calibrate``'s folders and ``--category NAME DIR`` pairs.

    Each folder is one of: an MVTec-layout root (sub-folders ``<category>/test/good``): one set per
    category on its ``test/good`` (held-out goods), with ``test/`` as its test split, plus the global
    set on all of them (with two categories or more); a category folder (``<folder>/test/good``): the
    same for that one category;
    else a folder of good images, for the global thresholds. A test split itself (``good/`` beside
    defect folders, e.g. ``weave/test``) is refused: its defects are not good images.

    Raises:
        ReconadError: a missing folder, a test split, roots mixed with plain folders, a category twice.
    """
    by_category: dict[str, CalibrationSet] = {}
    plain: list[Path] = []

    def add(category: str, good_dirs: tuple[Path, ...], test_dir: Path | None) -> None:
        if category in by_category:
            raise ReconadError(f"Category {category!r} is given twice; calibrate each category on one set of images.")
        by_category[category] = CalibrationSet(category, good_dirs, test_dir)

    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ReconadError(f"Image folder {folder} does not exist or is not a folder.")
        held_out = folder.joinpath(*HELD_OUT_GOODS)
        roots = [child for child in sorted(folder.iterdir()) if child.joinpath(*HELD_OUT_GOODS).is_dir()]
        subfolders = _image_subfolders(folder)
        if held_out.is_dir():
            add(folder.resolve().name, (held_out,), held_out.parent)
        elif roots:
            for child in roots:
                add(child.name, (child.joinpath(*HELD_OUT_GOODS),), child / HELD_OUT_GOODS[0])
        elif (folder / GOOD).is_dir() and any(child.name != GOOD for child in subfolders):
            defects = ", ".join(child.name for child in subfolders if child.name != GOOD)
            category = folder.resolve().parent.name
            raise ReconadError(
                f"{folder} is a test split: beside good/ it holds defect folders ({defects}), whose images are not "
                f"good; calibrate on {folder / GOOD}, give --category {category} {folder / GOOD}, or give the data "
                "root (MVTec layout) to calibrate every category on its test/good."
            )
        else:
            plain.append(folder)
    for name, folder in category_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise ReconadError(f"Image folder {folder} (for --category {name}) does not exist or is not a folder.")
        subfolders = _image_subfolders(folder)
        if (folder / GOOD).is_dir() and any(child.name != GOOD for child in subfolders):
            raise ReconadError(
                f"{folder} (for --category {name}) holds defect folders beside good/; give {folder / GOOD} instead."
            )
        add(name, (folder,), None)
    if plain and by_category:
        raise ReconadError(
            f"{plain[0]} is a folder of good images but the other folders are categories; calibrate the global "
            "thresholds and the categories in two runs."
        )
    if plain:
        return [CalibrationSet(None, tuple(plain))]
    if not by_category:
        raise ReconadError("Nothing to calibrate on: give folders of good images, a data root, or --category NAME DIR.")
    sets = list(by_category.values())
    from_roots = [s for s in sets if s.test_dir is not None]
    if len(from_roots) > 1:  # from a data root: the global thresholds on every category's goods as well
        sets.insert(0, CalibrationSet(None, tuple(d for s in from_roots for d in s.good_dirs)))
    return sets


def _test_images(test_dir: Path) -> tuple[list[Path], np.ndarray]:
    """The images of a test split and their labels (1 = in a defect folder, 0 = in good/)."""
    paths, labels = [], []
    for folder in _image_subfolders(test_dir):
        for path in list_images(folder):
            paths.append(path)
            labels.append(int(folder.name != GOOD))
    return paths, np.asarray(labels, dtype=np.int64)


def calibrate_artifact(
    artifact: str | os.PathLike,
    good_dirs: str | os.PathLike | Sequence[str | os.PathLike] = (),
    config: CalibrationConfig = CalibrationConfig(),
    *,
    categories: Sequence[tuple[str, str | os.PathLike]] = (),
    backend: str = "auto",
    report: Callable[[str], None] = print,
) -> CalibrationResult:
    """Score good images and write the operating points they give into ``artifact``'s manifest.

    The sidecar ``<stem>.json`` is replaced atomically (created from the ONNX file's embedded copy when
    absent); the model file is not touched, so its hash still matches. Operating points not calibrated
    in this run are kept; those calibrated replace the old ones (``PointResult.replaced``).

    Args:
        artifact: ``.onnx`` or ``.engine`` with its manifest.
        good_dirs: folders as ``plan_calibration`` reads them: a data root, category folders, or
            folders of good images for the global thresholds.
        categories: ``(name, folder of its good images)`` pairs, as ``--category NAME DIR``.
        backend: see ``reconad.runtime.inspector.BACKEND_CHOICES``.
        report: receives warnings and notes.

    Raises:
        ReconadError: see ``plan_calibration``; a category the model does not know; fewer than 2
            readable good images in a set.
    """
    folders = [good_dirs] if isinstance(good_dirs, (str, os.PathLike)) else list(good_dirs)
    sets = plan_calibration(folders, categories)
    for calibration_set in sets:
        if sum(len(list_images(folder)) for folder in calibration_set.good_dirs) < 2:
            where = ", ".join(map(str, calibration_set.good_dirs))
            raise ReconadError(f"Calibration needs at least 2 defect-free images; {where} has fewer.")
    with Inspector.open(artifact, backend, no_threshold=True) as inspector:
        manifest = inspector.manifest
        known = manifest.known_categories
        unknown = [s.category for s in sets if s.category is not None and known and s.category not in known]
        if unknown:
            raise ReconadError(
                f"{Path(artifact).name} was not trained on {', '.join(unknown)}; its categories are {', '.join(known)}."
            )
        results = [_calibrate_set(inspector, calibration_set, config, report) for calibration_set in sets]
    few = sorted({result.n_images for result in results if result.n_images * config.max_fpr < 1})
    if few:
        counts = f"{few[0]}" if len(few) == 1 else f"{few[0]} to {few[-1]}"
        report(
            f"note: {counts} good images cannot resolve max_fpr={config.max_fpr:g}: each threshold is set above the "
            f"highest good score of its images (use at least {math.ceil(1 / config.max_fpr)} for a real quantile)."
        )
    updated = manifest
    final = []
    for result in results:
        previous = manifest.global_operating_point if result.category is None else manifest.category_thresholds.get(result.category)
        updated = updated.with_operating_point(result.category, result.point)
        final.append(dataclasses.replace(result, replaced=None if previous is None or previous.is_empty else previous))
    if not manifest.recognizes_categories and any(result.category is not None for result in results):
        report(
            f"note: {Path(artifact).name} does not name the category of an image, so recon-inspect run uses a "
            "category's thresholds only with --category NAME."
        )
    manifest_path = manifest_path_for(artifact)
    if updated.artifact_sha256 is None:  # the embedded ONNX copy carries no hash of its own file
        updated = updated.stamp_artifact(artifact)
    updated.save(manifest_path)
    return CalibrationResult(manifest_path=manifest_path, manifest=updated, points=tuple(final))


def _calibrate_set(
    inspector: Inspector, calibration_set: CalibrationSet, config: CalibrationConfig, report: Callable[[str], None]
) -> PointResult:
    manifest = inspector.manifest
    category = calibration_set.category
    paths = [path for folder in calibration_set.good_dirs for path in list_images(folder)]
    where = ", ".join(str(folder) for folder in calibration_set.good_dirs)
    name = calibration_set.category or "all categories"
    scored = score_images(inspector, paths, config, report, f"calibrating {name}: good images")
    if scored.scores.size < 2:
        raise ReconadError(f"Only {scored.scores.size} of the {len(paths)} images in {where} could be read.")
    pixel_max_fpr = config.max_fpr if config.pixel_max_fpr is None else config.pixel_max_fpr

    def provenance(max_fpr: float, method: str = METHOD) -> Calibration:
        return Calibration(
            method=method,
            n_images=int(scored.scores.size),
            max_fpr=max_fpr,
            date=utc_now_iso(),
            source=", ".join(str(folder.resolve()) for folder in calibration_set.good_dirs),
            margin=config.margin,
        )

    image_threshold = Threshold(
        value=threshold_at_fpr(scored.scores, config.max_fpr, config.margin), calibration=provenance(config.max_fpr)
    )
    pixel_threshold = Threshold(
        value=threshold_at_fpr(scored.pixels, pixel_max_fpr, config.margin), calibration=provenance(pixel_max_fpr)
    )
    normalization = None
    if config.normalize != "none":
        normalization = normalization_for(
            scored.scores, image_threshold.value, config.normalize, config.max_fpr, provenance(config.max_fpr)
        )
    distance_limit, recognized = None, None
    if manifest.recognizes_categories:
        head = manifest.category_head
        if category is None:
            separation = min(head.separation) if head.separation else UNRELATED_DISTANCE
        else:
            separation = head.separation[head.names.index(category)] if head.separation else UNRELATED_DISTANCE
            recognized = float(np.mean([name == category for name in scored.recognized]))
            if recognized < 1.0:
                report(
                    f"warning: the model named {sum(name != category for name in scored.recognized)} of the "
                    f"{scored.scores.size} good images of {category} another category; recon-inspect run judges "
                    "an image by the category the model names."
                )
        value = distance_limit_for(scored.distances, separation, config.max_fpr, config.margin)
        distance_limit = Threshold(value=value, calibration=provenance(config.max_fpr, DISTANCE_METHOD))
    point = OperatingPoint(
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        score_normalization=normalization,
        distance_limit=distance_limit,
    )
    counts, accuracy = None, None
    if calibration_set.test_dir is not None:
        test_paths, labels = _test_images(calibration_set.test_dir)
        if labels.any():
            test = score_images(inspector, test_paths, config, report, f"calibrating {name}: test images")
            unknown = distance_limit.is_exceeded_by(test.distances) if distance_limit is not None else None
            counts = OperatingPointCounts.count(image_threshold, labels[test.read], test.scores, unknown)
            if manifest.recognizes_categories:
                accuracy = float(np.mean([name == category for name in test.recognized]))
    return PointResult(
        category=category,
        point=point,
        n_images=int(scored.scores.size),
        n_unreadable=scored.unreadable,
        scores=scored.scores,
        false_positive_rate=float(np.mean(image_threshold.is_exceeded_by(scored.scores))),
        recognized=recognized,
        counts=counts,
        recognition_accuracy=accuracy,
    )

