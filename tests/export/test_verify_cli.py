"""recon-export verify: exit codes 0/1/2, one-line errors without traceback, JSON output, no torch."""

import json

import numpy as np
from typer.testing import CliRunner

from reconad.export.cli import app
from reconad.runtime.manifest import ANOMALY_MAP_NAME, reference_path_for
from tests.runtime.onnx_graphs import random_images, write_artifact

runner = CliRunner()


def test_verify_passes_with_table_and_json(tmp_path):
    artifact = write_artifact(tmp_path, reference_images=random_images(3))
    result = runner.invoke(app, ["verify", str(artifact), "--backend", "ort-cpu"])
    assert result.exit_code == 0, result.output
    assert "anomaly_map" in result.stdout and result.stdout.strip().endswith("PASS")
    result = runner.invoke(app, ["verify", str(artifact), "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["n_images"] == 3 and report["precision"] == "fp32"


def test_verify_over_tolerance_exits_1(tmp_path):
    artifact = write_artifact(tmp_path, reference_images=random_images(3))
    reference = reference_path_for(artifact)
    data = dict(np.load(reference))
    data[ANOMALY_MAP_NAME] = data[ANOMALY_MAP_NAME] + 1e-3
    moved = tmp_path / "moved.npz"
    np.savez(moved, **data)
    result = runner.invoke(app, ["verify", str(artifact), "--reference", str(moved)])
    assert result.exit_code == 1
    assert "FAIL: anomaly_map max abs error" in result.stdout


def test_verify_bad_input_exits_2_with_one_line(tmp_path):
    artifact = write_artifact(tmp_path)  # no reference written
    cases = [
        ([str(artifact)], "Cannot read reference"),
        ([str(tmp_path / "absent.onnx")], "does not exist"),
        ([str(artifact), "--backend", "trt"], "The trt backend runs .engine files"),
    ]
    for arguments, message in cases:
        result = runner.invoke(app, ["verify", *arguments])
        assert result.exit_code == 2, (arguments, result.output)
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    result = runner.invoke(app, ["verify", str(artifact), "--backend", "cuda"])  # refused while parsing
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].endswith("'cuda' is not one of 'auto', 'ort', 'ort-cpu', 'ort-cuda', 'ort-trt', 'trt'.")
    artifact.write_bytes(b"corrupt")
    result = runner.invoke(app, ["verify", str(artifact)])
    assert result.exit_code == 2 and "does not match its manifest" in result.stderr
