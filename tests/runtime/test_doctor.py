"""recon-inspect doctor: this machine as it is, and recorded Jetson and x86 GPU-server environments."""

import dataclasses
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


# The video outputs (--output): files through OpenCV, RTSP and display through GStreamer for Python.

X86_GST = {"nvv4l2h264enc": False, "nvvidconv": False, "x264enc": True, "openh264enc": False, "rtph264pay": True,
           "autovideosink": True, "ximagesink": True, "videoconvert": True, "appsrc": True}


def x86_with_gstreamer(**changes):
    values = dict(gst="1.22.0", gst_error=None, gst_rtsp_server=True, gst_elements=X86_GST, desktop=("DISPLAY",))
    return dataclasses.replace(recorded("x86-gpu-server"), **{**values, **changes})


def test_a_jetson_streams_rtsp_on_its_hardware_encoder():
    findings = by_name(doctor.diagnose(recorded("jetson-orin-jp6")))
    for name in doctor.OUTPUT_KINDS:
        assert findings[name].works, (name, findings[name].fixes)
    assert "H.264 encoder nvv4l2h264enc (hardware)" in findings["out:rtsp"].detail
    assert "GStreamer" in findings["out:file"].detail  # JetPack's OpenCV has no FFmpeg
    assert "desktop: $DISPLAY" in findings["out:display"].detail
    software = dataclasses.replace(recorded("jetson-orin-jp6"), gst_elements={**X86_GST, "nvvidconv": True})
    rtsp = by_name(doctor.diagnose(software))["out:rtsp"]
    assert rtsp.works and "x264enc (software)" in rtsp.detail and "the CPU encodes" in rtsp.detail


def test_a_jetson_venv_without_jetpacks_python3_gi_is_told_how_to_see_it():
    findings = by_name(doctor.diagnose(recorded("jetson-orin-jp6-pip-shadowed")))
    (fix,) = findings["out:rtsp"].fixes
    assert not findings["out:rtsp"].works and "(No module named 'gi')" in fix
    assert "python3-gi" in fix and "--system-site-packages" in fix and "gir1.2-gst-rtsp-server-1.0" in fix
    assert "pip install 'reconad[gst]'" not in fix  # a PyPI PyGObject would shadow JetPack's
    display = findings["out:display"]
    assert not display.works and "rtsp://0.0.0.0:8554/inspect" in display.fixes[0] and "python3-gi" in display.fixes[1]
    assert findings["out:file"].works  # the pip OpenCV has FFmpeg


def test_x86_without_pygobject_gets_the_packages_outputs_names():
    from reconad.runtime.line.gst import GST_PACKAGES

    env = x86_with_gstreamer(gst=None, gst_error="No module named 'gi'", gst_rtsp_server=None, gst_elements=None)
    findings = by_name(doctor.diagnose(env))
    for name in ("out:rtsp", "out:display"):
        assert not findings[name].works and any(GST_PACKAGES in fix for fix in findings[name].fixes)
    assert "pip install 'reconad[gst]'" in GST_PACKAGES and "gstreamer1.0-plugins-ugly" in GST_PACKAGES
    assert "not importable" in findings["out:rtsp"].detail
    no_opencv = by_name(doctor.diagnose(dataclasses.replace(env, opencv=None, opencv_video={})))["out:file"]
    assert not no_opencv.works and no_opencv.detail == "OpenCV not installed" and "reconad[runtime]" in no_opencv.fixes[0]
    no_backend = by_name(doctor.diagnose(dataclasses.replace(env, opencv_video={"V4L2": True})))["out:file"]
    assert not no_backend.works and "FFmpeg or GStreamer" in no_backend.fixes[0]


def test_x86_rtsp_without_x264_falls_back_to_openh264_or_names_x264():
    openh264 = by_name(doctor.diagnose(x86_with_gstreamer(gst_elements={**X86_GST, "x264enc": False, "openh264enc": True})))
    assert openh264["out:rtsp"].works and "openh264enc (software)" in openh264["out:rtsp"].detail
    none = by_name(doctor.diagnose(x86_with_gstreamer(gst_elements={**X86_GST, "x264enc": False})))["out:rtsp"]
    assert not none.works and "encoder none" in none.detail
    assert none.fixes == ("No H.264 encoder in GStreamer: apt install gstreamer1.0-plugins-ugly (x264enc).",)
    no_server = by_name(doctor.diagnose(x86_with_gstreamer(gst_rtsp_server=False, gst_elements={**X86_GST, "rtph264pay": False})))
    assert [fix.split(":")[0] for fix in no_server["out:rtsp"].fixes] == [
        "The GstRtspServer typelib does not load", "GStreamer lacks rtph264pay"]
    assert "apt install gstreamer1.0-plugins-good" in no_server["out:rtsp"].fixes[1]


def test_a_display_needs_a_desktop_and_a_window_sink():
    headless = by_name(doctor.diagnose(x86_with_gstreamer(desktop=())))["out:display"]
    assert not headless.works and "neither DISPLAY nor WAYLAND_DISPLAY" in headless.fixes[0]
    assert "--output rtsp://0.0.0.0:8554/inspect" in headless.fixes[0] and "desktop: none" in headless.detail
    x11_plain = x86_with_gstreamer(gst_elements={**X86_GST, "autovideosink": False})
    assert by_name(doctor.diagnose(x11_plain))["out:display"].works  # DisplayOutput falls back to ximagesink
    wayland_only = dataclasses.replace(x11_plain, desktop=("WAYLAND_DISPLAY",))
    wayland = by_name(doctor.diagnose(wayland_only))["out:display"]
    assert not wayland.works and wayland.fixes == (
        "GStreamer lacks waylandsink, autovideosink: apt install gstreamer1.0-plugins-bad gstreamer1.0-plugins-good.",)
    with_waylandsink = dataclasses.replace(wayland_only, gst_elements={**wayland_only.gst_elements, "waylandsink": True})
    assert by_name(doctor.diagnose(with_waylandsink))["out:display"].works  # DisplayOutput uses waylandsink itself


def test_a_desktop_that_does_not_answer_is_missing_with_the_sentence_the_output_refuses_with():
    from reconad.runtime.line.desktop import DesktopCheck

    dead = x86_with_gstreamer(desktop_checks=(DesktopCheck("DISPLAY", ":42", False, "no X server answers"),))
    finding = by_name(doctor.diagnose(dead))["out:display"]
    assert not finding.works and finding.detail == "GStreamer 1.22.0, desktop: DISPLAY=:42 (no X server answers)"
    assert finding.fixes == ("display://0 needs a desktop, but no X server answers on DISPLAY=:42: start the X server "
                             "or log in to the desktop, or watch from another machine with --output "
                             "rtsp://0.0.0.0:8554/inspect.",)
    alive = x86_with_gstreamer(desktop_checks=(DesktopCheck("DISPLAY", ":99", True, "answers"),))
    finding = by_name(doctor.diagnose(alive))["out:display"]
    assert finding.works and finding.detail.endswith("desktop: DISPLAY=:99 (answers)")
    unknown = x86_with_gstreamer(desktop_checks=(DesktopCheck("DISPLAY", "host:10.0", None, "not checked: libX11 not found"),))
    assert by_name(doctor.diagnose(unknown))["out:display"].works  # not refused where it could not be checked
    assert doctor.Environment.from_dict(json.loads(json.dumps(dead.to_dict()))) == dead
    older = by_name(doctor.diagnose(x86_with_gstreamer()))["out:display"]  # recorded before desktop_checks
    assert older.works and older.detail.endswith("desktop: $DISPLAY (whether it answers: not recorded)")


def test_the_file_output_lists_every_suffix_it_writes():
    from reconad.runtime.line.outputs import FILE_FOURCCS

    detail = by_name(doctor.diagnose(x86_with_gstreamer()))["out:file"].detail
    assert detail.endswith("(.mp4 .m4v .mov .mkv .avi)") and set(FILE_FOURCCS) == {".mp4", ".m4v", ".mov", ".mkv", ".avi"}


def test_a_recording_from_before_the_output_checks_still_loads():
    env = recorded("x86-gpu-server")  # no gst_* or desktop keys
    assert env.gst is None and env.gst_elements is None and env.desktop is None and env.desktop_checks is None
    findings = by_name(doctor.diagnose(env))
    assert findings["out:file"].works
    for name in ("out:rtsp", "out:display"):
        assert not findings[name].works and "record it again" in findings[name].fixes[0]
    assert doctor.Environment.from_dict(env.to_dict()) == env
    jetson = recorded("jetson-orin-jp6")
    assert doctor.Environment.from_dict(json.loads(json.dumps(jetson.to_dict()))) == jetson


def test_the_report_keeps_its_columns():
    lines = doctor.render(doctor.diagnose(recorded("jetson-orin-jp6-pip-shadowed"))).splitlines()
    heads = [line for line in lines if not line.startswith(" ")]
    assert {len(line[:21]) for line in heads} == {21} and all(line[20] == " " and line[21] != " " for line in heads)
    assert [line.split()[1] for line in heads][-3:] == ["out:file", "out:rtsp", "out:display"]
    assert all(line.startswith("           - ") for line in lines if line.startswith(" "))


def test_the_probe_agrees_with_what_the_outputs_open(tmp_path, monkeypatch):
    """This machine has GStreamer for Python: each output finding works iff outputs.py opens that output."""
    import numpy as np

    from reconad.runtime.line.outputs import open_output
    from tests.runtime.line.services import free_port, require_display, unused_display

    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    findings = by_name(doctor.diagnose(doctor.probe_environment()))
    frame = np.zeros((48, 64, 3), np.uint8)

    def opens(uri, frames=1):
        try:
            output = open_output(uri, fps=10)
            try:
                for _ in range(frames):
                    output.write(frame)
            finally:
                output.close()
        except ReconadError:
            return False
        return True

    assert findings["out:file"].works == opens(str(tmp_path / "line.mp4"), 3) == opens(str(tmp_path / "line.avi"), 3)
    assert findings["out:rtsp"].works == opens(f"rtsp://@:{free_port()}/inspect")
    assert not findings["out:display"].works and not opens("display://0")  # no desktop
    monkeypatch.setenv("DISPLAY", unused_display())  # set, but no X server behind it
    dead = by_name(doctor.diagnose(doctor.probe_environment()))["out:display"]
    assert not dead.works and "(no X server answers)" in dead.detail and not opens("display://0")
    screen = require_display(tmp_path / "x")
    try:
        monkeypatch.setenv("DISPLAY", screen.display)
        env = doctor.probe_environment()
        assert env.desktop == ("DISPLAY",) and env.desktop_checks[0].answers is True
        display = by_name(doctor.diagnose(env))["out:display"]
        assert f"desktop: DISPLAY={screen.display} (answers)" in display.detail
        assert display.works == opens("display://0", 3)
    finally:
        screen.stop()


def test_without_pygobject_the_probe_reports_it_and_does_not_crash(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gi", None)  # as a Python without PyGObject: import gi raises ImportError
    env = doctor.probe_environment()
    assert env.gst is None and "gi" in env.gst_error and env.gst_elements is None and env.gst_rtsp_server is None
    rtsp = by_name(doctor.diagnose(env))["out:rtsp"]
    assert not rtsp.works and "GStreamer for Python does not import" in rtsp.fixes[0]


def test_the_report_and_its_json_carry_the_outputs():
    from reconad.runtime.line.gst import import_gst
    from tests.runtime.line.services import require_gst_outputs

    require_gst_outputs()
    Gst, _, _ = import_gst("this test")

    report = runner.invoke(app, ["doctor"])
    assert report.exit_code == 0 and "out:rtsp" in report.stdout and "out:display" in report.stdout
    payload = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)
    environment = payload["environment"]
    assert environment["gst"] == ".".join(str(n) for n in tuple(Gst.version())[:3])
    assert environment["gst_rtsp_server"] is True and environment["gst_elements"]["appsrc"] is True
    assert set(environment["gst_elements"]) == set(doctor.doctor_outputs.GST_ELEMENTS)
    assert [f["name"] for f in payload["findings"]][-3:] == list(doctor.OUTPUT_KINDS)
    old = runner.invoke(app, ["doctor", "--environment", str(ENVIRONMENTS / "x86-gpu-server.json"), "--for", "trt"])
    assert old.exit_code == 0 and "missing  out:rtsp" in old.stdout  # outputs do not decide --for
