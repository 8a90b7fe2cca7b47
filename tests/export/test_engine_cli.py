"""recon-export build-engine: flags and profile reach the build function as one BuildConfig; errors are one
line with the right exit code; the command runs without torch (what a Jetson has)."""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from reconad.export import engine
from reconad.export.cli import app
from reconad.export.build_config import BuildConfig
from reconad.runtime.errors import ReconadError
from tests.runtime.onnx_graphs import write_artifact

runner = CliRunner()


def fake_result(path="out.engine"):
    return mock.Mock(engine_path=Path(path))


def test_flags_and_profile_become_the_build_config(tmp_path):
    profile = tmp_path / "edge.toml"
    profile.write_text('description = "edge"\nworkspace_mib = 512\nopt_batch = 2\nmax_batch = 4\n')
    with mock.patch.object(engine, "build_engine", return_value=fake_result("x.engine")) as build:
        result = runner.invoke(
            app,
            [
                "build-engine", "model-fp16.onnx", "--out", "x.engine", "--profile", str(profile),
                "--workspace-mib", "2048", "--max-batch", "1", "--timing-cache", "t.cache", "--dla-core", "0",
                "--version-compatible", "--builder-optimization-level", "4",
            ],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "x.engine"
    build.assert_called_once_with(
        onnx_path=Path("model-fp16.onnx"),
        engine_path=Path("x.engine"),
        config=BuildConfig(
            workspace_mib=2048,
            min_batch=1,
            opt_batch=1,
            max_batch=1,
            timing_cache=Path("t.cache"),
            dla_core=0,
            version_compatible=True,
            builder_optimization_level=4,
        ),
        profile_name="edge",
    )


def test_no_flags_build_with_the_defaults():
    with mock.patch.object(engine, "build_engine", return_value=fake_result()) as build:
        result = runner.invoke(app, ["build-engine", "m.onnx"])
    assert result.exit_code == 0, result.output
    build.assert_called_once_with(onnx_path=Path("m.onnx"), engine_path=None, config=BuildConfig(), profile_name=None)


def test_precision_typing_and_hardware_flags(tmp_path):
    with mock.patch.object(engine, "build_engine", return_value=fake_result()) as build:
        result = runner.invoke(
            app,
            ["build-engine", "m.onnx", "--precision", "fp32", "--network-typing", "weak", "--hardware-compatible",
             "--no-version-compatible", "--min-batch", "1", "--opt-batch", "2", "--max-batch", "3", "--out", str(tmp_path)],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = build.call_args.kwargs["config"]
    assert config == BuildConfig(
        precision="fp32",
        network_typing="weak",
        hardware_compatible=True,
        version_compatible=False,
        min_batch=1,
        opt_batch=2,
        max_batch=3,
    )
    assert build.call_args.kwargs["engine_path"] == tmp_path


@pytest.mark.parametrize("code", [1, 2])
def test_build_errors_are_one_line_with_their_exit_code(code):
    error = engine.EnginePrecisionError("The engine came out FP32.") if code == 1 else ReconadError("Bad graph.")
    with mock.patch.object(engine, "build_engine", side_effect=error):
        result = runner.invoke(app, ["build-engine", "m.onnx"])
    assert result.exit_code == code
    assert result.stderr.strip() == str(error) and "Traceback" not in result.output


def test_bad_flags_and_profiles_exit_2_before_building(tmp_path):
    with mock.patch.object(engine, "build_engine") as build:
        result = runner.invoke(app, ["build-engine", "m.onnx", "--min-batch", "4", "--max-batch", "2"])
        assert result.exit_code == 2 and "min_batch <= opt_batch <= max_batch" in result.stderr
        missing = runner.invoke(app, ["build-engine", "m.onnx", "--profile", str(tmp_path / "none.toml")])
        assert missing.exit_code == 2 and "Cannot read build profile" in missing.stderr
    build.assert_not_called()


def test_without_tensorrt_the_command_says_so_and_exits_2(tmp_path, monkeypatch):
    onnx_path = write_artifact(tmp_path, name="m-16x16-fp16.onnx", precision="fp16")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = runner.invoke(app, ["build-engine", str(onnx_path), "--out", str(tmp_path / "m.engine")])
    assert result.exit_code == 2
    assert result.stderr.startswith("TensorRT is not installed") and result.stderr.count("\n") == 1


LOADED_HEAVY = (
    "import sys, json\n"
    "sys.modules['tensorrt'] = None\n"  # as on a machine without TensorRT, wherever this test runs
    "from reconad.export.cli import app\n"
    "try:\n"
    "    app(sys.argv[1:], prog_name='recon-export')\n"
    "except SystemExit as stop:\n"
    "    code = stop.code\n"
    "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'efficientnet_pytorch'})\n"
    "print(json.dumps({'code': code, 'heavy': heavy}))\n"
)


def run_cli(*arguments):
    completed = subprocess.run(
        [sys.executable, "-c", LOADED_HEAVY, *arguments], capture_output=True, text=True, timeout=120, check=False
    )
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def test_build_engine_without_tensorrt_loads_no_torch(tmp_path):
    # --help of every command is covered by tests/test_architecture.py
    onnx_path = write_artifact(tmp_path, name="m-16x16-fp16.onnx", precision="fp16")
    build_run, stderr = run_cli("build-engine", str(onnx_path))
    assert build_run == {"code": 2, "heavy": []}
    assert "TensorRT is not installed" in stderr
