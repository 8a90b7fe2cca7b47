"""Inspector: manifest discovery (sidecar, embedded), refusal of mismatched files, verdicts vs numpy."""

import json

import cv2
import numpy as np
import pytest

from reconad.runtime import Inspector, Manifest, Verdict
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import IMAGE_SCORE_NAME, manifest_path_for
from reconad.runtime.config import utc_now_iso
from reconad.runtime.thresholds import Calibration, ScoreNormalization, Threshold
from tests.runtime.onnx_graphs import expected_outputs, random_images, write_artifact


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
