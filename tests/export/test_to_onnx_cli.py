"""recon-export to-onnx: options reach export_onnx exactly; errors are one line with exit 2 (1 over tolerance)."""

import inspect
from pathlib import Path
from unittest.mock import patch

from typer.testing import CliRunner

from reconad.export import onnx as export_module
from reconad.export.cli import app
from reconad.runtime.errors import ReconadError

runner = CliRunner()


def test_to_onnx_defaults(tmp_path):
    with patch.object(export_module, "export_onnx", return_value=[tmp_path / "a-64x64-fp32.onnx"]) as mock:
        result = runner.invoke(app, ["to-onnx", "runs/weave/model.ckpt", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    mock.assert_called_once_with(
        checkpoint=Path("runs/weave/model.ckpt"),
        out_dir=tmp_path,
        precision="fp32",
        max_batch=8,
        opset=17,
        reference_images=None,
        overwrite=False,
        int8=None,
        target="tensorrt",
    )
    assert f"wrote {tmp_path / 'a-64x64-fp32.onnx'}" in result.stdout


def test_to_onnx_all_options(tmp_path):
    arguments = [
        "to-onnx", "model.ckpt", "--out", "artifacts", "--precision", "both",
        "--max-batch", "4", "--opset", "18", "--reference-images", "data/weave/test", "--overwrite",
        "--target", "ort-cpu",
    ]  # fmt: skip
    with patch.object(export_module, "export_onnx", return_value=[]) as mock:
        result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    mock.assert_called_once_with(
        checkpoint=Path("model.ckpt"),
        out_dir=Path("artifacts"),
        precision="both",
        max_batch=4,
        opset=18,
        reference_images=Path("data/weave/test"),
        overwrite=True,
        int8=None,
        target="ort-cpu",
    )


def test_cli_defaults_are_the_export_defaults():
    parameters = inspect.signature(export_module.export_onnx).parameters
    names = ("precision", "max_batch", "opset", "reference_images", "overwrite", "target")
    assert {name: parameters[name].default for name in names} == {
        "target": "tensorrt",
        "precision": "fp32",
        "max_batch": 8,
        "opset": 17,
        "reference_images": None,
        "overwrite": False,
    }
    assert export_module.PRECISION_CHOICES == ("fp32", "fp16", "both", "int8")


def test_bad_input_is_one_line_with_exit_2(tmp_path):
    with patch.object(export_module, "export_onnx", side_effect=ReconadError("checkpoint x.ckpt does not exist.")):
        result = runner.invoke(app, ["to-onnx", "x.ckpt", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == "checkpoint x.ckpt does not exist." and "Traceback" not in result.output
    for arguments in (["--precision", "fp8"], ["--max-batch", "0"], ["--opset", "16"]):
        with patch.object(export_module, "export_onnx") as mock:
            result = runner.invoke(app, ["to-onnx", "x.ckpt", "--out", str(tmp_path), *arguments])
        assert result.exit_code == 2, arguments
        mock.assert_not_called()


def test_over_tolerance_exits_1(tmp_path):
    error = export_module.ParityError("The fp32 ONNX graph does not match PyTorch (...), so nothing was written.")
    with patch.object(export_module, "export_onnx", side_effect=error):
        result = runner.invoke(app, ["to-onnx", "x.ckpt", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "does not match PyTorch" in result.stderr


def test_to_onnx_end_to_end_with_the_real_checkpoint(tiny_checkpoint, tiny_export, tmp_path, monkeypatch):
    """The real export_onnx behind the CLI (the torch.onnx trace replaced by the session's graph)."""
    monkeypatch.setattr(export_module, "trace_to_onnx", lambda detector, max_batch, opset: tiny_export.load("fp32"))
    result = runner.invoke(app, ["to-onnx", str(tiny_checkpoint), "--out", str(tmp_path), "--max-batch", "4"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tiny-run-64x64-fp32.json", "tiny-run-64x64-fp32.onnx", "tiny-run-64x64-fp32.reference.npz"
    ]
    assert "fp32 ONNX graph vs PyTorch" in result.stderr


def test_to_onnx_keeps_a_calibration_unless_told_to_overwrite(tiny_checkpoint, tiny_export, tmp_path, monkeypatch):
    """The issue's report: re-running to-onnx into the same folder silently set image_threshold back to null."""
    from reconad.runtime.manifest import Manifest, manifest_path_for
    from reconad.runtime.thresholds import OperatingPoint, Threshold

    monkeypatch.setattr(export_module, "trace_to_onnx", lambda detector, max_batch, opset: tiny_export.load("fp32"))
    arguments = ["to-onnx", str(tiny_checkpoint), "--out", str(tmp_path), "--max-batch", "4"]
    assert runner.invoke(app, arguments).exit_code == 0
    manifest_path = manifest_path_for(tmp_path / "tiny-run-64x64-fp32.onnx")
    calibrated = Manifest.load(manifest_path).with_operating_point(None, OperatingPoint(image_threshold=Threshold.manual(124.8)))
    calibrated.save(manifest_path)
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 2 and "holds a calibration (global; image threshold 124.8" in refused.stderr
    assert "pass --overwrite to replace it" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert Manifest.load(manifest_path).image_threshold.value == 124.8
    replaced = runner.invoke(app, [*arguments, "--overwrite"])
    assert replaced.exit_code == 0 and Manifest.load(manifest_path).image_threshold is None
