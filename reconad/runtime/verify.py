"""Torch-free parity check of an artifact (any backend) against ``<stem>.reference.npz`` from ``to-onnx``.

Tolerances per precision, map and score relative to ``scale = max(1, range of the reference
anomaly_map)`` for fp32 and ``scale = range of the reference anomaly_map`` (1 when it is 0) for fp16;
``category_distance`` (a cosine distance, 0..2) in absolute units (see ``TOLERANCES``). ``category`` must
match exactly except on near ties: images whose two nearest centroids are, in the reference, within
twice the distance tolerance of each other (``category_margin``), where either answer is right.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Inspector
from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_NAME, IMAGE_SCORE_NAME, Manifest, reference_path_for, sha256_file
from reconad.runtime.thresholds import Threshold

REFERENCE_KEYS = ("images", ANOMALY_MAP_NAME, IMAGE_SCORE_NAME)
# The reference's gap between the second-nearest and the nearest centroid's distance, per image.
CATEGORY_MARGIN_KEY = "category_margin"
CATEGORY_REFERENCE_KEYS = (CATEGORY_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_MARGIN_KEY)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Limits for one precision, as fractions of the reference map scale (see the module docstring).

    Attributes:
        map_max_abs: limit on the largest absolute anomaly_map error, or None for no limit.
        map_p99_abs: limit on the 99th percentile of absolute anomaly_map errors, or None.
        score_max_abs: limit on the largest absolute image_score error.
        distance_max_abs: limit on the largest absolute category_distance error, in distance units.
        max_decision_flips: how many images may change side of the threshold.
    """

    map_max_abs: float | None
    map_p99_abs: float | None
    score_max_abs: float
    distance_max_abs: float
    max_decision_flips: int = 0

    @property
    def near_tie(self) -> float:
        """Reference margins up to this are near ties: each of the two distances may move by the tolerance."""
        return 2.0 * self.distance_max_abs


INT8_MAP_P99 = 5e-2
INT8_SCORE_MAX = 3e-2
INT8_DISTANCE_MAX = 2e-2

TOLERANCES = {
    # The fp32 graph must reproduce PyTorch up to float reassociation: 1e-4 on the map
    # (docs/architecture.md, "Precision plan").
    # The distance is a cosine distance computed in FP32 in both graphs (the category head is an FP32
    # island): float reassociation of the pooled mean and the dot products only.
    "fp32": Tolerance(map_max_abs=1e-4, map_p99_abs=None, score_max_abs=1e-4, distance_max_abs=1e-4),
    # FP16 storage rounds to ~1e-3 relative; the head is FP32, so 1% of the map's range at p99 is
    # generous for noise yet catches an overflowing or mis-typed island. Scores are pooled map
    # values, so the same 1% bounds them; no decision may flip.
    # The pooled features average FP16-stored backbone features (~5e-4 relative rounding each) over the
    # token grid: the demo model's fp16 graph moves the cosine distance by 2.2e-4 at most on ONNX Runtime
    # (to-onnx logs it); 2e-3 leaves room for TensorRT's own FP16 kernels.
    "fp16": Tolerance(map_max_abs=None, map_p99_abs=1e-2, score_max_abs=1e-2, distance_max_abs=2e-3),
    # INT8 (QDQ, activations calibrated on good images) rounds each MatMul/Conv input to 1/254 of its
    # calibrated range; the anomaly head is floating point. Measured on the tiny model (to-onnx logs it, three
    # data sets, minmax/percentile/entropy): map p99 1.5-2.0% of the map range, score max 0.5-0.8%, category
    # distance 8e-3..9e-3; the bounds leave ~2.5x room. On the trained lite0-256 demo model (pretrained Lite0
    # backbone, benchmarks/bench_int8_trained.py) the recipe gives 1.1%, 0.4-0.6%, 2-3e-3; the recipe before
    # its fix gave 23%, 11%, 0.13, rightly refused: the map reads the backbone features f directly, and they
    # came out at 3.6 dB signal-to-noise (19 dB now). Decision flips: none allowed, as for fp16.
    "int8": Tolerance(map_max_abs=None, map_p99_abs=INT8_MAP_P99, score_max_abs=INT8_SCORE_MAX, distance_max_abs=INT8_DISTANCE_MAX),
}


@dataclasses.dataclass(frozen=True)
class OutputError:
    """Absolute error statistics of one output over finite (artifact, reference) pairs."""

    name: str
    max_abs: float
    mean_abs: float
    p99_abs: float
    nan_count: int
    inf_count: int


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The result of ``verify_artifact``; ``passed`` is False when any tolerance is exceeded."""

    artifact: str
    reference: str
    backend: str
    precision: str
    n_images: int
    map_scale: float
    tolerance: Tolerance
    anomaly_map: OutputError
    image_score: OutputError
    category_distance: OutputError | None  # None: the artifact has no category outputs
    category_mismatches: int  # images whose category differs from the reference, near ties included
    category_near_ties: int  # of those, the ones forgiven as near ties
    threshold: float | None  # None: each image at its own category's threshold
    threshold_source: str  # "manifest" or "reference median (proxy: the manifest has no threshold)"
    decision_flips: int
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


def proxy_threshold(reference_scores: np.ndarray) -> float:
    """A stand-in threshold when the manifest has none: the reference scores' median, moved to the
    midpoint between the two middle scores so that no reference score sits exactly on it."""
    ordered = np.sort(np.asarray(reference_scores, dtype=np.float64))
    if len(ordered) == 1:
        return float(ordered[0])
    middle = len(ordered) // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2.0)


def output_error(name: str, actual: np.ndarray, expected: np.ndarray) -> OutputError:
    """Error statistics of ``actual`` vs ``expected`` (same shape); NaN/Inf are counted in ``actual``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    finite = np.isfinite(actual)
    errors = np.abs(actual[finite] - expected[finite])
    if errors.size == 0:
        errors = np.array([np.inf])
    return OutputError(
        name=name,
        max_abs=float(errors.max()),
        mean_abs=float(errors.mean()),
        p99_abs=float(np.percentile(errors, 99)),
        nan_count=int(np.isnan(actual).sum()),
        inf_count=int(np.isinf(actual).sum()),
    )


def compare_outputs(
    outputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    *,
    precision: str,
    threshold: Threshold | float | Sequence[Threshold] | None,
    artifact: str = "",
    reference_name: str = "",
    backend: str = "",
) -> VerifyReport:
    """Compare artifact outputs with reference outputs under the tolerances of ``precision``.

    Decision flips are counted with the manifest's rule (``Threshold.is_exceeded_by``) at ``threshold``,
    or at ``proxy_threshold`` of the reference scores when there is none; a sequence gives each image
    its own (its category's). When ``outputs`` has the
    category outputs, ``reference`` must have ``CATEGORY_REFERENCE_KEYS``.
    """
    if precision not in TOLERANCES:
        raise ReconadError(f"No tolerances for precision {precision!r}; expected one of {list(TOLERANCES)}.")
    for name in (ANOMALY_MAP_NAME, IMAGE_SCORE_NAME):
        if np.shape(outputs[name]) != np.shape(reference[name]):
            raise ReconadError(
                f"The artifact's {name} has shape {list(np.shape(outputs[name]))} "
                f"but the reference has {list(np.shape(reference[name]))}."
            )
    tolerance = TOLERANCES[precision]
    reference_map = np.asarray(reference[ANOMALY_MAP_NAME], dtype=np.float64)
    map_range = float(reference_map.max() - reference_map.min())
    map_scale = max(1.0, map_range) if precision == "fp32" else (map_range or 1.0)
    map_error = output_error(ANOMALY_MAP_NAME, outputs[ANOMALY_MAP_NAME], reference_map)
    score_error = output_error(IMAGE_SCORE_NAME, outputs[IMAGE_SCORE_NAME], reference[IMAGE_SCORE_NAME])
    distance_error, mismatches, ties = None, 0, 0
    if CATEGORY_NAME in outputs:
        missing = [key for key in CATEGORY_REFERENCE_KEYS if key not in reference]
        if missing:
            raise ReconadError(
                f"The reference lacks {', '.join(missing)}, which the artifact's category outputs are checked "
                "against; re-run recon-export to-onnx."
            )
        for name in (CATEGORY_NAME, CATEGORY_DISTANCE_NAME):
            if np.shape(outputs[name]) != np.shape(reference[name]):
                raise ReconadError(
                    f"The artifact's {name} has shape {list(np.shape(outputs[name]))} "
                    f"but the reference has {list(np.shape(reference[name]))}."
                )
        distance_error = output_error(CATEGORY_DISTANCE_NAME, outputs[CATEGORY_DISTANCE_NAME], reference[CATEGORY_DISTANCE_NAME])
        # int32 from TensorRT 8.x engines, int64 elsewhere: compared as integers.
        differs = np.asarray(outputs[CATEGORY_NAME]).astype(np.int64) != np.asarray(reference[CATEGORY_NAME]).astype(np.int64)
        near_tie = np.asarray(reference[CATEGORY_MARGIN_KEY], dtype=np.float64) <= tolerance.near_tie
        mismatches, ties = int(differs.sum()), int((differs & near_tie).sum())

    count = len(reference[IMAGE_SCORE_NAME])
    if threshold is None:
        source = "reference median (no manifest threshold)"
        rules = [Threshold.manual(proxy_threshold(reference[IMAGE_SCORE_NAME]), source=source)] * count
    elif isinstance(threshold, (list, tuple)):
        source = "manifest, per category"
        rules = list(threshold)
    else:
        source = "manifest"
        rules = [threshold if isinstance(threshold, Threshold) else Threshold.manual(threshold, source=source)] * count
    expected_decisions = [bool(rule.is_exceeded_by(value)) for rule, value in zip(rules, reference[IMAGE_SCORE_NAME])]
    # NaN is never anomalous
    actual_decisions = [bool(rule.is_exceeded_by(value)) for rule, value in zip(rules, outputs[IMAGE_SCORE_NAME])]
    flips = sum(expected != actual for expected, actual in zip(expected_decisions, actual_decisions))
    threshold = rules[0].value if len({rule.value for rule in rules}) == 1 else None

    failures = []
    for error in (map_error, score_error, distance_error):
        if error is not None and (error.nan_count or error.inf_count):
            failures.append(f"{error.name} has {error.nan_count} NaN and {error.inf_count} Inf values")
    checks = (
        ("anomaly_map max abs error", map_error.max_abs, tolerance.map_max_abs),
        ("anomaly_map p99 abs error", map_error.p99_abs, tolerance.map_p99_abs),
        ("image_score max abs error", score_error.max_abs, tolerance.score_max_abs),
    )
    for label, value, limit in checks:
        if limit is not None and not value <= limit * map_scale:
            failures.append(f"{label} {value:.3g} exceeds {limit * map_scale:.3g}")
    if distance_error is not None and not distance_error.max_abs <= tolerance.distance_max_abs:
        failures.append(
            f"category_distance max abs error {distance_error.max_abs:.3g} exceeds {tolerance.distance_max_abs:.3g}"
        )
    if mismatches > ties:
        failures.append(
            f"{mismatches - ties} image(s) named another category than the reference "
            f"(not near ties: their two nearest centroids are more than {tolerance.near_tie:.3g} apart)"
        )
    if flips > tolerance.max_decision_flips:
        where = f"threshold {threshold:.6g}" if threshold is not None else "the per-category thresholds"
        failures.append(f"{flips} decision flip(s) at {where}")
    return VerifyReport(
        artifact=artifact,
        reference=reference_name,
        backend=backend,
        precision=precision,
        n_images=int(len(reference[IMAGE_SCORE_NAME])),
        map_scale=map_scale,
        tolerance=tolerance,
        anomaly_map=map_error,
        image_score=score_error,
        category_distance=distance_error,
        category_mismatches=mismatches,
        category_near_ties=ties,
        threshold=None if threshold is None else float(threshold),
        threshold_source=source,
        decision_flips=flips,
        failures=tuple(failures),
    )


def load_reference(path: str | os.PathLike, input_hw: tuple[int, int], with_category: bool = False) -> dict[str, np.ndarray]:
    """Read and validate a ``.reference.npz``: images uint8 [K, H, W, 3], anomaly_map [K, 1, H, W], image_score [K];
    with ``with_category`` also category [K], category_distance [K] and category_margin [K]."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise ReconadError(f"Cannot read reference {path}: {type(error).__name__}: {error}.") from None
    missing = [key for key in REFERENCE_KEYS + (CATEGORY_REFERENCE_KEYS if with_category else ()) if key not in data]
    if missing:
        raise ReconadError(f"Reference {path} lacks {', '.join(missing)}; re-run recon-export to-onnx.")
    images, anomaly_map, scores = (data[key] for key in REFERENCE_KEYS)
    count = len(images)
    height, width = input_hw
    expected = {
        "images": (count, height, width, 3),
        ANOMALY_MAP_NAME: (count, 1, height, width),
        IMAGE_SCORE_NAME: (count,),
    }
    if with_category:
        expected |= {key: (count,) for key in CATEGORY_REFERENCE_KEYS}
    for key, shape in expected.items():
        if data[key].shape != shape or count == 0:
            raise ReconadError(
                f"Reference {path} {key} has shape {list(data[key].shape)}; "
                f"the artifact needs {list(shape)} with K >= 1."
            )
    if images.dtype != np.uint8:
        raise ReconadError(f"Reference {path} images are {images.dtype}, not uint8.")
    if not (np.isfinite(anomaly_map).all() and np.isfinite(scores).all()):
        raise ReconadError(f"Reference {path} contains NaN or Inf outputs, so it cannot serve as a reference.")
    return data


def verify_artifact(
    artifact: str | os.PathLike,
    backend: str = "auto",
    reference: str | os.PathLike | None = None,
    *,
    num_threads: int | None = None,
) -> VerifyReport:
    """Run ``artifact`` on ``backend`` over the reference images and compare with the reference outputs.

    Args:
        artifact: ``.onnx`` or ``.engine`` with its manifest.
        backend: see ``reconad.runtime.inspector.BACKEND_CHOICES``.
        reference: the ``.reference.npz``; None for ``find_reference``'s: ``<artifact stem>.reference.npz``,
            and for an engine without one the reference its manifest records.
    """
    artifact = Path(artifact)
    with Inspector.open(artifact, backend, num_threads=num_threads) as inspector:
        manifest = inspector.manifest
        reference_path = Path(reference) if reference is not None else find_reference(artifact, manifest)
        data = load_reference(reference_path, manifest.input_hw, with_category=manifest.category_head is not None)
        outputs = inspector.infer(data["images"])
        return compare_outputs(
            outputs,
            data,
            precision=manifest.precision.mode,
            threshold=reference_thresholds(manifest, data),
            artifact=str(artifact),
            reference_name=str(reference_path),
            backend=inspector.backend.name,
        )


def reference_thresholds(manifest: Manifest, reference: dict[str, np.ndarray]) -> Threshold | list[Threshold] | None:
    """The threshold each reference image is judged with: its (reference) category's, else the global one."""
    if not manifest.category_thresholds or not manifest.recognizes_categories:
        return manifest.image_threshold
    names = manifest.category_head.names
    points = [manifest.operating_point(names[int(index)]) for index in reference[CATEGORY_NAME]]
    if any(point.image_threshold is None for point in points):
        return manifest.image_threshold
    return [point.image_threshold for point in points]


def find_reference(artifact: str | os.PathLike, manifest: Manifest) -> Path:
    """The ``.reference.npz`` an artifact is verified against when ``--reference`` is not given.

    ``<stem>.reference.npz`` beside the artifact (what ``to-onnx`` writes beside an ONNX graph). For an
    engine without one: the reference its manifest records (``EngineInfo.reference_path``, relative to
    the engine's folder, then a file of that name beside the engine), checked against the recorded
    sha256; for an engine built before references were recorded, that of the ONNX manifest beside it
    whose ``onnx_sha256`` the engine names.

    Raises:
        ReconadError: one sentence when the recorded reference is missing or has changed since the
            build, or the engine's ONNX had none, naming the path and ``--reference``.
    """
    artifact = Path(artifact)
    own = reference_path_for(artifact)
    if own.is_file() or manifest.artifact_kind != "engine":
        return own
    engine = manifest.engine
    if engine is not None and engine.onnx_path is not None:  # built by a reconad that records its sources
        if engine.reference_path is None:
            raise ReconadError(
                f"{artifact.name} was built from {engine.onnx_path}, which had no .reference.npz beside it; "
                "pass --reference with that graph's reference (recon-export to-onnx writes it)."
            )
        recorded = Path(engine.reference_path)
        candidates = [artifact.parent / recorded, artifact.parent / recorded.name]
        changed = None
        for candidate in dict.fromkeys(candidates):
            if candidate.is_file():
                if sha256_file(candidate) == engine.reference_sha256:
                    return candidate
                changed = changed or candidate
        if changed is not None:
            raise ReconadError(
                f"Reference {changed} has changed since {artifact.name} was built from it (its sha256 differs from "
                "the engine's manifest); pass --reference with the reference of the ONNX the engine was built from."
            )
        raise ReconadError(
            f"Reference {engine.reference_path} (relative to {artifact.parent}), which the manifest of {artifact.name} "
            f"records, is missing; copy it there, or beside the engine, or pass --reference."
        )
    for candidate in sorted(artifact.parent.glob("*.json")):  # an older engine: its source ONNX's manifest beside it
        try:
            source = Manifest.load(candidate)
        except ReconadError:
            continue
        if source.artifact_kind == "onnx" and source.onnx_sha256 == manifest.onnx_sha256:
            source_reference = reference_path_for(artifact.parent / source.artifact_file)
            if source_reference.is_file():
                return source_reference
    raise ReconadError(f"No reference for {artifact}: pass --reference with the .reference.npz of its ONNX graph.")


def render_report(report: VerifyReport) -> str:
    """A plain-text table of the report, one line per output, then decisions and the verdict."""
    scale = report.map_scale
    tolerance = report.tolerance

    def limit(value: float | None) -> str:
        return "-" if value is None else f"{value * scale:.3g}"

    header = (
        f"{'output':<17} {'max abs':>10} {'mean abs':>10} {'p99 abs':>10} "
        f"{'max tol':>9} {'p99 tol':>9} {'NaN':>5} {'Inf':>5}"
    )
    rows = [
        f"{report.artifact} ({report.precision}, backend {report.backend}, {report.n_images} reference images)",
        f"reference {report.reference}; tolerances x map scale {scale:.4g}",
        header,
        "-" * len(header),
    ]
    limits = {
        ANOMALY_MAP_NAME: (limit(tolerance.map_max_abs), limit(tolerance.map_p99_abs)),
        IMAGE_SCORE_NAME: (limit(tolerance.score_max_abs), "-"),
        CATEGORY_DISTANCE_NAME: (f"{tolerance.distance_max_abs:.3g}", "-"),  # absolute, not x map scale
    }
    errors = [report.anomaly_map, report.image_score] + ([report.category_distance] if report.category_distance else [])
    for error in errors:
        max_limit, p99_limit = limits[error.name]
        rows.append(
            f"{error.name:<17} {error.max_abs:>10.3g} {error.mean_abs:>10.3g} {error.p99_abs:>10.3g} "
            f"{max_limit:>9} {p99_limit:>9} {error.nan_count:>5} {error.inf_count:>5}"
        )
    if report.category_distance is not None:
        rows.append(
            f"category: {report.category_mismatches} image(s) differ from the reference, "
            f"{report.category_near_ties} of them near ties (margin <= {tolerance.near_tie:.3g}, allowed)"
        )
    rows.append(
        f"decision flips: {report.decision_flips} (allowed {tolerance.max_decision_flips}) "
        + (f"at threshold {report.threshold:.6g}" if report.threshold is not None else "at each image's category threshold")
        + f" from {report.threshold_source}"
    )
    rows.append("PASS" if report.passed else "FAIL: " + "; ".join(report.failures))
    return "\n".join(rows)
