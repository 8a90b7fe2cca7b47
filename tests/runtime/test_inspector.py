"""Inspector: manifest discovery (sidecar, embedded), refusal of mismatched files, verdicts vs numpy, the
category's thresholds, UNKNOWN parts, and the refusal to judge without a calibration."""

import json

import cv2
import numpy as np
import pytest

from reconad.runtime import Inspector, Manifest, Verdict
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import IMAGE_SCORE_NAME, manifest_path_for
from reconad.runtime.config import utc_now_iso
from reconad.runtime.thresholds import Calibration, OperatingPoint, ScoreNormalization, Threshold
from tests.runtime.onnx_graphs import colour_images, expected_outputs, random_images, write_artifact


def threshold(value: float) -> Threshold:
    return Threshold(value=value, calibration=Calibration(method="manual", n_images=0, date=utc_now_iso(), source="test"))


def test_verdicts_match_numpy(tmp_path):
    images = random_images(5)
    scores = expected_outputs(images)[IMAGE_SCORE_NAME]
    cut = float(np.sort(scores)[2])
    artifact = write_artifact(
        tmp_path,
        image_threshold=threshold(cut),
        score_normalization=ScoreNormalization(method="minmax", low=0.0, high=2.0),
    )
    with Inspector.open(artifact, backend="ort-cpu") as inspector:
        assert isinstance(inspector.manifest, Manifest) and inspector.input_hw == (16, 16)
        verdicts = inspector.inspect(list(images))
    assert all(isinstance(verdict, Verdict) for verdict in verdicts)
    np.testing.assert_allclose([verdict.image_score for verdict in verdicts], scores, atol=1e-6)
    assert [verdict.is_anomalous for verdict in verdicts] == [bool(score >= cut) for score in scores]
    assert sum(verdict.is_anomalous for verdict in verdicts) == 3
    assert verdicts[0].threshold == cut
    np.testing.assert_allclose(verdicts[0].normalized_score, scores[0] / 2.0, atol=1e-6)
    expected_map = expected_outputs(images[:1])["anomaly_map"][0, 0]
    np.testing.assert_allclose(verdicts[0].anomaly_map, expected_map, atol=1e-6)
    assert verdicts[0].anomaly_map.shape == (16, 16)


def test_frames_of_other_sizes_and_files_are_preprocessed(tmp_path):
    artifact = write_artifact(tmp_path / "model")
    frame = np.full((48, 64, 3), (30, 60, 90), np.uint8)  # BGR
    cv2.imwrite(str(tmp_path / "frame.png"), frame)
    with Inspector.open(artifact) as inspector:
        verdict_array, verdict_file = inspector.inspect([frame, tmp_path / "frame.png"], colour="BGR")
        (single,) = inspector.inspect(frame, colour="BGR", roi=(0, 0, 32, 32))
    assert verdict_array.image_score == pytest.approx(60 / 255, abs=1e-6)
    assert verdict_file.image_score == pytest.approx(60 / 255, abs=1e-6)
    assert single.image_score == pytest.approx(60 / 255, abs=1e-6)
    assert verdict_array.is_anomalous is None and verdict_array.threshold is None  # uncalibrated


def test_threshold_override(tmp_path):
    artifact = write_artifact(tmp_path, image_threshold=threshold(10.0))
    with Inspector.open(artifact, threshold=0.0) as inspector:
        assert inspector.inspect(random_images(1))[0].is_anomalous is True


def test_embedded_manifest_when_no_sidecar(tmp_path):
    artifact = write_artifact(tmp_path, sidecar=False, max_batch=2)
    with Inspector.open(artifact) as inspector:
        assert inspector.manifest.onnx_sha256 is None
        assert inspector.backend.max_batch == 2
        assert len(inspector.inspect(random_images(5))) == 5


def test_no_manifest_at_all(tmp_path):
    artifact = write_artifact(tmp_path, sidecar=False, embed=False)
    with pytest.raises(ReconadError, match="has no manifest: neither model.json beside it nor one inside it"):
        Inspector.open(artifact)


def test_sha_mismatch_is_refused(tmp_path):
    artifact = write_artifact(tmp_path)
    write_artifact(tmp_path / "other", graph_offset=1.0)
    artifact.write_bytes((tmp_path / "other" / "model.onnx").read_bytes())  # a valid graph, wrong file
    with pytest.raises(ReconadError, match="does not match its manifest \\(sha256"):
        Inspector.open(artifact)


def test_corrupt_model_with_matching_hash_is_refused(tmp_path):
    artifact = write_artifact(tmp_path)
    artifact.write_bytes(b"\x00garbage")
    manifest = Manifest.load(manifest_path_for(artifact)).stamp_artifact(artifact)
    manifest.save(manifest_path_for(artifact))
    with pytest.raises(ReconadError, match="ONNX Runtime cannot load"):
        Inspector.open(artifact)


def test_corrupt_manifest_is_refused(tmp_path):
    artifact = write_artifact(tmp_path)
    manifest_path_for(artifact).write_text('{"schema_version": 1, "artifact_kind": "onnx"')
    with pytest.raises(ReconadError, match="Invalid manifest .*model.json: manifest is not valid JSON"):
        Inspector.open(artifact)


def test_io_mismatch_is_refused(tmp_path):
    artifact = write_artifact(tmp_path, input_hw=(16, 16))
    path = manifest_path_for(artifact)
    data = json.loads(path.read_text())
    data["input_tensor"]["shape"] = [-1, 32, 32, 3]
    data["output_tensors"][0]["shape"] = [-1, 1, 32, 32]
    path.write_text(json.dumps(data))
    with pytest.raises(ReconadError, match="tensor images has shape \\[-1, 16, 16, 3\\] but its manifest says \\[-1, 32, 32, 3\\]"):
        Inspector.open(artifact)


def test_engine_manifest_for_onnx_file_is_refused(tmp_path):
    artifact = write_artifact(tmp_path)
    path = manifest_path_for(artifact)
    data = json.loads(path.read_text())
    data.update(
        artifact_kind="engine",
        engine_sha256=data["onnx_sha256"],
        engine={"tensorrt_version": "10.3", "gpu_name": "Orin", "compute_capability": "8.7"},
    )
    path.write_text(json.dumps(data))
    with pytest.raises(ReconadError, match="is an onnx file but its manifest describes an engine artifact"):
        Inspector.open(artifact)


def test_missing_artifact(tmp_path):
    with pytest.raises(ReconadError, match="does not exist"):
        Inspector.open(tmp_path / "absent.onnx")


def point(value: float, limit: float | None = None) -> OperatingPoint:
    return OperatingPoint(image_threshold=threshold(value), distance_limit=None if limit is None else threshold(limit))


# Flat colours the contract graph names: red and blue parts, a gray part (unlike every centroid: distance
# 1 - 1/sqrt(3) = 0.42 to each), all scoring their mean over RGB / 255.
RED, BLUE, GRAY = (200, 40, 40), (30, 30, 150), (120, 120, 120)


def test_each_image_is_judged_with_the_thresholds_of_the_category_the_graph_names(tmp_path):
    artifact = write_artifact(tmp_path, image_threshold=threshold(0.6))
    manifest = Manifest.load(manifest_path_for(artifact))
    manifest = manifest.with_operating_point("red", point(0.5, limit=0.2)).with_operating_point("blue", point(0.2, limit=0.2))
    manifest.save(manifest_path_for(artifact))
    images = colour_images([RED, BLUE, GRAY, (40, 200, 40)])  # scores 0.37, 0.27, 0.47, 0.37
    with Inspector.open(artifact) as inspector:
        assert inspector.missing_calibration() is None and inspector.threshold is None  # it depends on the category
        red, blue, gray, green = inspector.inspect(images)
    assert (red.category, red.recognized_category, red.threshold, red.is_anomalous, red.decision) == ("red", "red", 0.5, False, "good")
    assert (blue.category, blue.threshold, blue.is_anomalous, blue.decision) == ("blue", 0.2, True, "anomalous")
    assert green.category == "green" and green.threshold == 0.6 and green.is_anomalous is False  # global fallback
    assert gray.recognized_category == "red" and gray.category_distance == pytest.approx(1 - 1 / np.sqrt(3), abs=1e-6)
    assert gray.is_unknown and gray.is_anomalous is None and gray.decision == "unknown"
    assert red.category_distance < 0.2 and not red.is_unknown
    assert gray.record() == {
        "decision": "unknown",
        "image_score": gray.image_score,
        "is_anomalous": None,
        "threshold": 0.5,
        "normalized_score": None,
        "category": "red",
        "recognized_category": "red",
        "category_distance": gray.category_distance,
        "is_unknown": True,
    }


def test_a_forced_category_gives_its_thresholds_to_every_image(tmp_path):
    artifact = write_artifact(tmp_path, image_threshold=threshold(0.6))
    manifest = Manifest.load(manifest_path_for(artifact)).with_operating_point("blue", point(0.2))
    manifest.save(manifest_path_for(artifact))
    with Inspector.open(artifact, category="blue") as inspector:
        assert inspector.threshold == 0.2
        (red,) = inspector.inspect(colour_images([RED]))
    assert red.category == "blue" and red.recognized_category == "red" and red.is_anomalous is True
    with pytest.raises(ReconadError, match="knows no category 'purple'; its categories are red, green, blue"):
        Inspector.open(artifact, category="purple")


def test_scores_only_judges_nothing(tmp_path):
    artifact = write_artifact(tmp_path)
    with Inspector.open(artifact, no_threshold=True) as inspector:
        assert inspector.missing_calibration() is None
        (verdict,) = inspector.inspect(colour_images([GRAY]))
    assert verdict.decision is None and verdict.is_anomalous is None and not verdict.is_unknown
    with pytest.raises(ReconadError, match="either a threshold or no_threshold"):
        Inspector.open(artifact, threshold=0.3, no_threshold=True)


def test_a_graph_without_category_outputs_judges_with_the_global_threshold(tmp_path):
    artifact = write_artifact(tmp_path, with_category=False, image_threshold=threshold(0.3))
    with Inspector.open(artifact) as inspector:
        assert inspector.threshold == 0.3
        red, blue = inspector.inspect(colour_images([RED, BLUE]))
    assert (red.category, red.category_distance, red.is_anomalous) == (None, None, True)
    assert blue.is_anomalous is False


@pytest.mark.parametrize(
    "setup, message",
    [
        ("copied", "model.onnx carries no calibration: its thresholds are in model.json, which is not beside it "
         "(the manifest inside the model file is never calibrated); copy model.json along, or pass --threshold X "
         "(every image) or --no-threshold (scores only)."),
        ("uncalibrated", "model.json has no image threshold: calibrate it with recon-inspect calibrate model.onnx "
         "GOOD_IMAGES, or pass --threshold X"),
        ("some categories", "model.json has no image threshold for green, blue (nor a global one): calibrate it"),
        ("legacy per category", "model.json has thresholds for blue, red only and model.onnx does not name the "
         "category of an image: pass --category NAME, calibrate a global threshold"),
    ],
)
def test_without_the_calibration_it_needs_the_inspector_refuses_to_judge(tmp_path, setup, message):
    legacy = setup == "legacy per category"
    artifact = write_artifact(tmp_path, sidecar=setup != "copied", with_category=not legacy)
    if setup in ("some categories", "legacy per category"):
        manifest = Manifest.load(manifest_path_for(artifact)).with_operating_point("red", point(0.5))
        if legacy:
            manifest = manifest.with_operating_point("blue", point(0.4))
        manifest.save(manifest_path_for(artifact))
    with Inspector.open(artifact) as inspector:
        with pytest.raises(ReconadError) as caught:
            inspector.require_calibration()
    message = message.replace("calibrate model.onnx", f"calibrate {artifact}")  # the command names the path as given
    assert message in str(caught.value) and caught.value.exit_code == 2
    with Inspector.open(artifact, threshold=0.5) as inspector:
        assert inspector.missing_calibration() is None
    if setup == "some categories":
        with Inspector.open(artifact, category="red") as inspector:
            assert inspector.missing_calibration() is None
