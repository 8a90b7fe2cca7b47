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
    )
    assert f"wrote {tmp_path / 'a-64x64-fp32.onnx'}" in result.stdout


def test_to_onnx_all_options(tmp_path):
    arguments = [
        "to-onnx", "model.ckpt", "--out", "artifacts", "--precision", "both",
        "--max-batch", "4", "--opset", "18", "--reference-images", "data/weave/test",
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
    )


def test_cli_defaults_are_the_export_defaults():
    parameters = inspect.signature(export_module.export_onnx).parameters
    assert {name: parameters[name].default for name in ("precision", "max_batch", "opset", "reference_images")} == {
        "precision": "fp32",
        "max_batch": 8,
        "opset": 17,
        "reference_images": None,
    }
    assert export_module.PRECISION_CHOICES == ("fp32", "fp16", "both")


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
