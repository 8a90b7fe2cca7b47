"""recon-inspect doctor: this machine as it is, and recorded Jetson and x86 GPU-server environments."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconad.runtime import doctor
from reconad.runtime.cli import app
from reconad.runtime.errors import ReconadError

ENVIRONMENTS = Path(__file__).parent / "environments"
runner = CliRunner()


def recorded(name):
    return doctor.Environment.from_dict(json.loads((ENVIRONMENTS / f"{name}.json").read_text()))


def by_name(findings):
    return {finding.name: finding for finding in findings}


def test_this_machine_as_it_is():
    """The CI machine: CPU ONNX Runtime and files work; no GPU, so neither CUDA nor TensorRT."""
    env = doctor.probe_environment()
    import cv2
    import onnxruntime

    assert env.onnxruntime == onnxruntime.__version__ and env.opencv == cv2.__version__
    assert set(env.opencv_video) == {"GStreamer", "FFMPEG", "V4L2"}
    findings = by_name(doctor.diagnose(env))
    assert findings["ort-cpu"].works and findings["images"].works and findings["platform"].works
    if env.gpu_name is None:
        assert not findings["trt"].works and not findings["ort-cuda"].works
        assert any("No NVIDIA driver" in fix for fix in findings["trt"].fixes)


def test_a_well_installed_jetson_runs_every_backend_and_source_kind():
    findings = by_name(doctor.diagnose(recorded("jetson-orin-jp6")))
    for name in ("platform", "ort-cpu", "ort-cuda", "trt", "csi", "v4l2", "rtsp", "images"):
        assert findings[name].works, (name, findings[name].fixes)
    assert "JetPack 6.2" in findings["platform"].detail and "Orin" in findings["trt"].detail


def test_a_jetson_with_pypi_wheels_gets_each_fix_named():
    """What `pip install './reconad[runtime,trt]'` used to leave on a Jetson."""
    findings = by_name(doctor.diagnose(recorded("jetson-orin-jp6-pip-shadowed")))
    assert not findings["trt"].works
    assert any("cuda-python 13.0.1 needs a CUDA 13 driver" in fix and "'cuda-python>=12,<13'" in fix
               for fix in findings["trt"].fixes)
    assert not findings["ort-cuda"].works and "jetson-ai-lab" in findings["ort-cuda"].fixes[0]
    assert not findings["csi"].works and "pip uninstall opencv-python-headless" in findings["csi"].fixes[0]
    assert not findings["rtsp"].works
    assert not findings["platform"].works and "numpy<2" in findings["platform"].fixes[0]
    assert "JetPack 6.1/6.2" in findings["platform"].detail  # from L4T 36.4 when nvidia-jetpack is absent


def test_an_x86_gpu_server():
    findings = by_name(doctor.diagnose(recorded("x86-gpu-server")))
    assert findings["trt"].works and findings["ort-cuda"].works and findings["rtsp"].works
    assert not findings["csi"].works and "only on a Jetson" in findings["csi"].fixes[0]


def test_the_command_exits_1_when_the_asked_target_cannot_work(tmp_path):
    environment = ENVIRONMENTS / "jetson-orin-jp6-pip-shadowed.json"
    result = runner.invoke(app, ["doctor", "--environment", str(environment), "--for", "trt"])
    assert result.exit_code == 1 and "missing  trt" in result.stdout and "cuda-python>=12,<13" in result.stdout
    good = runner.invoke(app, ["doctor", "--environment", str(ENVIRONMENTS / "jetson-orin-jp6.json"), "--for", "trt"])
    assert good.exit_code == 0, good.output
    report = runner.invoke(app, ["doctor", "--json"])
    assert report.exit_code == 0
    payload = json.loads(report.stdout)
    assert doctor.Environment.from_dict(payload["environment"]) == doctor.probe_environment()
    bad = runner.invoke(app, ["doctor", "--for", "tensorrt"])
    assert bad.exit_code == 2 and "'tensorrt' is not one of 'ort-cpu', 'ort-cuda', 'trt'" in bad.output


def test_a_source_is_really_opened(tmp_path):
    import numpy as np

    from tests.image_files import write_rgb

    write_rgb(tmp_path / "frames" / "000.png", np.zeros((20, 30, 3), np.uint8))
    ok = runner.invoke(app, ["doctor", "--for", "ort-cpu", "--source", str(tmp_path / "frames")])
    assert ok.exit_code == 0 and "read a 30x20 frame" in ok.stdout
    missing = runner.invoke(app, ["doctor", "--source", str(tmp_path / "broken.mp4")])
    assert missing.exit_code == 1 and "does not exist" in missing.stdout


def test_a_recorded_environment_is_checked_key_by_key(tmp_path):
    with pytest.raises(ReconadError, match="environment has unknown key"):
        doctor.Environment.from_dict({"python": "3.10.0", "gpu": "x"})
    path = tmp_path / "env.json"
    path.write_text("{not json")
    result = runner.invoke(app, ["doctor", "--environment", str(path)])
    assert result.exit_code == 2 and "not valid JSON" in result.output


def test_without_a_driver_the_cuda_binding_advice_says_how_to_find_the_major():
    """It printed pip install 'cuda-python>=N,<N+1' when no driver told its CUDA version."""
    import dataclasses

    server = recorded("x86-gpu-server")
    no_binding = dataclasses.replace(server, cuda_python=None, pycuda=None)
    (fix,) = [f for f in by_name(doctor.diagnose(no_binding))["trt"].fixes if "CUDA binding" in f]
    assert f"'cuda-python>=12,<13' (for the driver's CUDA {server.driver_cuda_version})" in fix
    no_driver = dataclasses.replace(no_binding, gpu_name=None, driver_cuda_version=None, gpu_error="No NVIDIA driver here.")
    (fix,) = [f for f in by_name(doctor.diagnose(no_driver))["trt"].fixes if "CUDA binding" in f]
    assert "N+1" not in fix and "nvidia-smi" in fix and "'cuda-python>=13,<14' for 13.x" in fix
    jetson = dataclasses.replace(recorded("jetson-orin-jp6"), cuda_python=None, driver_cuda_version=None)
    (fix,) = [f for f in by_name(doctor.diagnose(jetson))["trt"].fixes if "CUDA binding" in f]
    assert "'cuda-python>=12,<13' (for JetPack 6.2's CUDA)" in fix


def test_v4l2_is_missing_where_no_device_node_exists():
    """It said "ok v4l2" on a machine without /dev/video*."""
    import dataclasses

    server = recorded("x86-gpu-server")
    none = by_name(doctor.diagnose(dataclasses.replace(server, v4l2_devices=())))["v4l2"]
    assert not none.works and none.fixes[0].startswith("No V4L2 devices found") and "devices: none" in none.detail
    one = by_name(doctor.diagnose(dataclasses.replace(server, v4l2_devices=("/dev/video0",))))["v4l2"]
    assert one.works and "devices: /dev/video0" in one.detail
    assert by_name(doctor.diagnose(server))["v4l2"].works  # a recording without the field: not judged on it
    this_machine = doctor.probe_environment()
    assert this_machine.v4l2_devices == tuple(sorted(str(p) for p in Path("/dev").glob("video*")))


def test_what_is_absent_is_named_not_installed():
    """It printed "TensorRT None"."""
    import dataclasses

    bare = dataclasses.replace(recorded("x86-gpu-server"), tensorrt=None, onnxruntime=None, onnxruntime_providers=())
    findings = by_name(doctor.diagnose(bare))
    assert findings["trt"].detail.startswith("TensorRT not installed, ")
    assert findings["ort-cuda"].detail == "ONNX Runtime not installed"
    assert not any("None" in finding.detail for finding in findings.values())
