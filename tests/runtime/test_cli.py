"""recon-inspect run on an image folder: verdicts.jsonl, overlays for anomalies, the calibration the model
must carry (copied alone to another folder: refused), --category, --no-threshold, exit codes."""

import json
import shutil

import cv2
import numpy as np
from typer.testing import CliRunner

from reconad.runtime.cli import app
from reconad.runtime.manifest import Manifest, manifest_path_for
from reconad.runtime.thresholds import Calibration, OperatingPoint, Threshold
from tests.runtime.onnx_graphs import write_artifact

runner = CliRunner()


def image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "good").mkdir(parents=True)
    (folder / "bad").mkdir()
    cv2.imwrite(str(folder / "good" / "dark.png"), np.full((20, 30, 3), 20, np.uint8))
    cv2.imwrite(str(folder / "bad" / "bright.jpg"), np.full((40, 40, 3), 240, np.uint8))
    cv2.imwrite(str(folder / "bad" / "gray16.png"), np.full((24, 24), 60000, np.uint16))
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def artifact_with_threshold(tmp_path, value=0.5):
    calibration = Calibration(method="manual", n_images=0, date="2026-01-01", source="test")
    return write_artifact(tmp_path / "model", image_threshold=Threshold(value=value, calibration=calibration))


def read_verdicts(out):
    return {record["file"]: record for record in map(json.loads, (out / "verdicts.jsonl").read_text().splitlines())}


def test_run_writes_verdicts_and_overlays(tmp_path):
    folder, artifact, out = image_folder(tmp_path), artifact_with_threshold(tmp_path), tmp_path / "out"
    result = runner.invoke(app, ["run", str(folder), "--model", str(artifact), "--out", str(out), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "3 frames inspected on ort-cpu: 2 anomalous, 0 unknown, 1 unreadable, 0 camera-blind, 0 dropped, 2 overlays" in result.stdout
    verdicts = read_verdicts(out)
    assert set(verdicts) == {"good/dark.png", "bad/bright.jpg", "bad/gray16.png", "broken.png"}
    dark, bright = verdicts["good/dark.png"], verdicts["bad/bright.jpg"]
    assert dark["is_anomalous"] is False and dark["overlay"] is None and dark["threshold"] == 0.5
    assert abs(dark["image_score"] - 20 / 255) < 1e-6
    assert bright["is_anomalous"] is True and abs(bright["image_score"] - 240 / 255) < 0.02
    assert verdicts["bad/gray16.png"]["is_anomalous"] is True
    assert "Cannot read image" in verdicts["broken.png"]["error"]
    overlay = cv2.imread(str(out / bright["overlay"]))
    assert bright["overlay"] == "overlays/bad/bright.jpg.png"
    assert overlay.shape[0] > 360 and overlay.shape[1] > 360  # the annotated frame: scaled up, banner, colour bar
    assert (out / "overlays" / "bad" / "gray16.png").is_file()


def test_run_scores_only_and_roi(tmp_path):
    folder, out = image_folder(tmp_path), tmp_path / "out"
    artifact = write_artifact(tmp_path / "model")
    arguments = ["run", str(folder), "--model", str(artifact), "--out", str(out), "--roi", "0,0,20,20", "--overlays", "all"]
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 2 and "model.json has no image threshold" in refused.stderr
    assert not (out / "verdicts.jsonl").exists()
    result = runner.invoke(app, [*arguments, "--no-threshold"])
    assert result.exit_code == 0, result.output
    assert "Scores only (--no-threshold)" in result.stderr
    verdicts = read_verdicts(out)
    assert verdicts["good/dark.png"]["is_anomalous"] is None and verdicts["good/dark.png"]["decision"] is None
    assert verdicts["good/dark.png"]["overlay"] == "overlays/good/dark.png"
    assert (out / "overlays" / "good" / "dark.png").is_file()


def test_run_bad_input_exits_2_with_one_line(tmp_path):
    folder, artifact = image_folder(tmp_path), artifact_with_threshold(tmp_path)
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "nowhere"), "--model", str(artifact)], "does not exist or is not a folder"),
        ([str(empty), "--model", str(artifact)], "No image files under"),
        ([str(folder), "--model", str(tmp_path / "absent.onnx")], "does not exist"),
        (["csi://x", "--model", str(artifact)], "A CSI camera URI is csi://N"),
        ([str(folder), "--model", str(artifact), "--roi", "1,2,3"], "ROI must be four integers"),
        ([str(folder), "--model", str(artifact), "--threshold", "0.3", "--no-threshold"], "not both"),
        ([str(folder), "--model", str(artifact), "--category", "purple"], "knows no category 'purple'"),
    ]
    for arguments, message in cases:
        result = runner.invoke(app, ["run", *arguments, "--out", out])
        assert result.exit_code == 2, (arguments, result.output)
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    # a value outside a choice is refused while parsing (click's usage error: usage, then the one sentence)
    result = runner.invoke(app, ["run", str(folder), "--model", str(artifact), "--overlays", "some", "--out", out])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].endswith("'some' is not one of 'anomalies', 'all', 'none'.")


def test_copying_only_the_onnx_file_to_a_new_folder_is_refused_until_its_calibration_comes_along(tmp_path):
    """The issue's report: the .onnx alone on the device gave "0 anomalous" and exit 0."""
    folder, artifact = image_folder(tmp_path), write_artifact(tmp_path / "model")  # as to-onnx writes it
    calibrated = Manifest.load(manifest_path_for(artifact)).with_operating_point(None, OperatingPoint(
        image_threshold=Threshold.manual(0.5)))  # fmt: skip
    calibrated.save(manifest_path_for(artifact))  # as recon-inspect calibrate writes it: the sidecar only
    device = tmp_path / "device"
    device.mkdir()
    shutil.copy(artifact, device / artifact.name)
    arguments = ["run", str(folder), "--model", str(device / artifact.name), "--out", str(tmp_path / "out")]
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr.strip() == (
        "model.onnx carries no calibration: its thresholds are in model.json, which is not beside it (the manifest "
        "inside the model file is never calibrated); copy model.json along, or pass --threshold X (every image) or "
        "--no-threshold (scores only)."
    )
    shutil.copy(manifest_path_for(artifact), device / "model.json")
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "2 anomalous" in result.stdout and read_verdicts(tmp_path / "out")["bad/bright.jpg"]["is_anomalous"] is True
    scores_only = runner.invoke(app, [*arguments[:4], "--no-threshold"])
    assert scores_only.exit_code == 0 and "0 anomalous" in scores_only.stdout


def test_run_judges_each_image_by_its_category_or_the_forced_one(tmp_path):
    folder, artifact, out = image_folder(tmp_path), artifact_with_threshold(tmp_path, value=0.95), tmp_path / "out"
    manifest = Manifest.load(manifest_path_for(artifact))  # gray images: the graph names "red" (the first tie)
    manifest = manifest.with_operating_point("red", OperatingPoint(image_threshold=Threshold.manual(0.05)))
    manifest.save(manifest_path_for(artifact))
    result = runner.invoke(app, ["run", str(folder), "--model", str(artifact), "--out", str(out)])
    assert result.exit_code == 0, result.output
    dark = read_verdicts(out)["good/dark.png"]
    assert dark["category"] == "red" and dark["threshold"] == 0.05 and dark["is_anomalous"] is True
    forced = runner.invoke(app, ["run", str(folder), "--model", str(artifact), "--out", str(out), "--category", "blue"])
    assert forced.exit_code == 0, forced.output
    lines = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    dark = [line for line in lines if line.get("file") == "good/dark.png"][-1]
    assert dark["category"] == "blue" and dark["recognized_category"] == "red" and dark["threshold"] == 0.95


def test_run_warns_when_a_product_is_judged_at_the_global_threshold(tmp_path):
    """A global calibration only (say, on one product's goods): the other products are judged at it, which
    the newcomer trial found silent; now one warning names them. Per-category thresholds silence it."""
    folder, artifact, out = image_folder(tmp_path), artifact_with_threshold(tmp_path, value=0.95), tmp_path / "out"
    result = runner.invoke(app, ["run", str(folder), "--model", str(artifact), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: red, green, blue have no thresholds of their own and will be judged at the global one" in result.stderr
    manifest = Manifest.load(manifest_path_for(artifact))
    for name in ("red", "green"):
        manifest = manifest.with_operating_point(name, OperatingPoint(image_threshold=Threshold.manual(0.5)))
    manifest.save(manifest_path_for(artifact))
    result = runner.invoke(app, ["run", str(folder), "--model", str(artifact), "--out", str(tmp_path / "out2")])
    assert result.exit_code == 0 and "warning: blue has no threshold of its own" in result.stderr
    for name in ("blue",):
        manifest = manifest.with_operating_point(name, OperatingPoint(image_threshold=Threshold.manual(0.5)))
    manifest.save(manifest_path_for(artifact))
    result = runner.invoke(app, ["run", str(folder), "--model", str(artifact), "--out", str(tmp_path / "out3")])
    assert result.exit_code == 0 and "of its own" not in result.stderr and "of their own" not in result.stderr
