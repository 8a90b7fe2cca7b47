"""``recon-inspect doctor``: what this device can run, and what to install for the rest.

Two steps, so the advice can be tested on devices we do not have: ``probe_environment`` reads this
machine into an ``Environment`` record (Python, numpy, OpenCV's build, ONNX Runtime and its providers,
TensorRT, the CUDA binding, the driver and GPU, JetPack/L4T, GStreamer for the video outputs, the desktop);
``diagnose`` is a pure function from that record to one ``Finding`` per backend, source kind and output
kind (``doctor_outputs.py`` judges RTSP and display). Recorded environments (``Environment.from_dict``)
stand in for a Jetson and an x86 GPU server in the tests. Torch-free; nothing is installed or changed.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.metadata
import platform
import re
from typing import Any

from reconad.runtime import doctor_outputs
from reconad.runtime.config import decode, encode
from reconad.runtime.line.desktop import DesktopCheck
from reconad.runtime.line.outputs import FILE_FOURCCS

TARGETS = ("ort-cpu", "ort-cuda", "trt")
SOURCE_KINDS = ("images", "video", "csi", "v4l2", "rtsp")
OUTPUT_KINDS = ("out:file", "out:rtsp", "out:display")  # --output line.mp4, rtsp://@:8554/inspect, display://0
OLDEST_TENSORRT = (8, 5)
NEWEST_TENSORRT_MAJOR = 11
# JetPack release by L4T major.minor (the L4T version is what a Jetson itself reports).
JETPACK_BY_L4T = {"35.": "5.1", "36.3": "6.0", "36.4": "6.1/6.2", "38.": "7.x"}
JETSON_ORT_INDEX = "https://pypi.jetson-ai-lab.io (per JetPack and CUDA, e.g. /jp6/cu126), or the Jetson Zoo"
# The CUDA major each JetPack major ships (JetPack 5.1: CUDA 11.4, 6.x: 12.2/12.6, 7.x: 13.0).
CUDA_MAJOR_BY_JETPACK = {"5": 11, "6": 12, "7": 13}


@dataclasses.dataclass(frozen=True)
class Environment:
    """What ``probe_environment`` read; None where a component is absent (or could not be read).

    Attributes:
        python: ``"3.10.12"``.
        machine: ``platform.machine()``, e.g. ``"aarch64"``.
        numpy: numpy's version.
        opencv: OpenCV's version; ``opencv_error`` says why it failed to import, when it did.
        opencv_package: the pip distribution that provides ``cv2``, None for a system (apt) build.
        opencv_video: OpenCV's video I/O backends, e.g. ``{"GStreamer": True, "FFMPEG": True, "V4L2": True}``.
        onnxruntime: ONNX Runtime's version; ``onnxruntime_package``: its distribution name.
        onnxruntime_providers: its available execution providers.
        tensorrt: TensorRT's version; ``tensorrt_error`` says why it failed to import.
        cuda_python: the cuda-python version; ``pycuda``: pycuda's.
        gpu_name, compute_capability, driver_cuda_version, integrated_gpu: from the CUDA driver.
        gpu_error: why the driver could not be asked (no driver, no GPU).
        l4t, jetpack: the Jetson release (L4T from ``/etc/nv_tegra_release``).
        pillow: Pillow's version.
        v4l2_devices: the ``/dev/video*`` device nodes, e.g. ``("/dev/video0",)``; None where not read (a
            recording made before this field existed).
        gst: GStreamer's version as PyGObject imports it (``line/gst.py``'s ``import_gst``), e.g. ``"1.22.0"``;
            ``gst_error`` says why it did not import. Both None: not read (an older recording).
        gst_rtsp_server: whether the GstRtspServer typelib loads; None where not read.
        gst_elements: whether each of ``doctor_outputs.GST_ELEMENTS`` exists, e.g. ``{"x264enc": True, ...}``;
            None where not read.
        desktop: which of DISPLAY and WAYLAND_DISPLAY are set, e.g. ``("DISPLAY",)``; None where not read.
        desktop_checks: for each of them, its value and whether its X server or Wayland compositor
            answers (``line/desktop.py``'s ``DesktopCheck``: variable, value, answers, detail); None where
            not read (a recording made before this field existed).
    """

    python: str
    machine: str = ""
    numpy: str | None = None
    opencv: str | None = None
    opencv_error: str | None = None
    opencv_package: str | None = None
    opencv_video: dict[str, bool] = dataclasses.field(default_factory=dict)
    onnxruntime: str | None = None
    onnxruntime_package: str | None = None
    onnxruntime_providers: tuple[str, ...] = ()
    tensorrt: str | None = None
    tensorrt_error: str | None = None
    cuda_python: str | None = None
    pycuda: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    driver_cuda_version: str | None = None
    integrated_gpu: bool | None = None
    gpu_error: str | None = None
    l4t: str | None = None
    jetpack: str | None = None
    pillow: str | None = None
    v4l2_devices: tuple[str, ...] | None = None
    gst: str | None = None
    gst_error: str | None = None
    gst_rtsp_server: bool | None = None
    gst_elements: dict[str, bool] | None = None
    desktop: tuple[str, ...] | None = None
    desktop_checks: tuple[DesktopCheck, ...] | None = None

    @property
    def is_jetson(self) -> bool:
        return self.l4t is not None

    def to_dict(self) -> dict[str, Any]:
        return encode(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Environment:
        """A recorded environment (``recon-inspect doctor --json`` output), checked key by key."""
        return decode(cls, data, "environment")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One backend or source kind: whether it works here, why not, and what to install.

    Attributes:
        name: ``"ort-cpu"``, ``"ort-cuda"``, ``"trt"``, a source kind such as ``"rtsp"``, or an output kind
            such as ``"out:rtsp"``.
        works: True when everything it needs is present.
        detail: one line on what was found (versions, devices).
        fixes: one sentence per missing or wrong piece, each naming what to install or change.
    """

    name: str
    works: bool
    detail: str
    fixes: tuple[str, ...] = ()


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # absent, or broken by an ABI mismatch: both mean "not usable"
        return None


def _distribution_of(module: str) -> str | None:
    """The installed pip distribution providing top-level ``module``, or None (e.g. an apt package)."""
    return (importlib.metadata.packages_distributions().get(module) or [None])[0]


def _import_error(module: str) -> tuple[Any, str | None]:
    try:
        return importlib.import_module(module), None
    except Exception as error:  # ImportError, or numpy ABI errors raised as other types
        text = str(error).strip().splitlines()
        return None, (text[0] if text else type(error).__name__)[:200]


def parse_video_io(build_information: str) -> dict[str, bool]:
    """``cv2.getBuildInformation()`` -> ``{"GStreamer": bool, "FFMPEG": bool, "V4L2": bool}``."""
    found = {}
    for key, pattern in (("GStreamer", r"GStreamer:\s*(\S+)"), ("FFMPEG", r"FFMPEG:\s*(\S+)"), ("V4L2", r"v4l/v4l2:\s*(\S+)")):
        match = re.search(pattern, build_information)
        found[key] = bool(match and match.group(1).upper().startswith("YES"))
    return found


def probe_environment() -> Environment:
    """Read this machine (imports each component, GStreamer too; starts no session, opens no device)."""
    from reconad.runtime.backends.device import probe_gpu, read_jetson_release
    from reconad.runtime.errors import ReconadError

    values: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    values["numpy"] = _version("numpy")
    values["pillow"] = _version("PIL")
    cv2, values["opencv_error"] = _import_error("cv2")
    if cv2 is not None:
        values["opencv"] = str(cv2.__version__)
        values["opencv_video"] = parse_video_io(cv2.getBuildInformation())
        values["opencv_package"] = _distribution_of("cv2")
    ort, _ = _import_error("onnxruntime")
    if ort is not None:
        values["onnxruntime"] = str(ort.__version__)
        values["onnxruntime_providers"] = tuple(ort.get_available_providers())
        values["onnxruntime_package"] = _distribution_of("onnxruntime")
    trt, values["tensorrt_error"] = _import_error("tensorrt")
    values["tensorrt"] = str(trt.__version__) if trt is not None else None
    values["cuda_python"] = _package_version("cuda-python") or _package_version("cuda-bindings")
    values["pycuda"] = _version("pycuda")
    try:
        gpu = probe_gpu()
        values.update(
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            driver_cuda_version=gpu.driver_cuda_version,
            integrated_gpu=gpu.integrated,
        )
    except ReconadError as error:
        values["gpu_error"] = str(error)
    values["jetpack"], values["l4t"] = read_jetson_release()
    values["v4l2_devices"] = tuple(sorted(glob.glob("/dev/video*")))
    values.update(doctor_outputs.probe_gstreamer())
    return Environment(**values)


def _package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _numbers(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text or "")[:3])


def jetpack_of(env: Environment) -> str | None:
    """The JetPack release: the one recorded, else the one its L4T release belongs to."""
    if env.jetpack:
        return env.jetpack
    for prefix, release in JETPACK_BY_L4T.items():
        if env.l4t and env.l4t.startswith(prefix):
            return release
    return None


def _install_hint(env: Environment) -> str:
    if not env.is_jetson:
        return "pip install 'reconad[gpu]'"
    return "pip install 'reconad[jetson]'" if _numbers(env.driver_cuda_version)[:1] != (13,) else "pip install 'reconad[jetson7]'"


def _cuda_binding_fixes(env: Environment) -> list[str]:
    fixes = []
    driver_major = _numbers(env.driver_cuda_version)[:1]
    binding_major = _numbers(env.cuda_python)[:1]
    if env.cuda_python is None and env.pycuda is None:
        major = driver_major[0] if driver_major else CUDA_MAJOR_BY_JETPACK.get((jetpack_of(env) or "")[:1])
        if major is not None:
            source = f"the driver's CUDA {env.driver_cuda_version}" if driver_major else f"JetPack {jetpack_of(env)}'s CUDA"
            fixes.append(f"No CUDA binding for the TensorRT backend: pip install 'cuda-python>={major},<{major + 1}' "
                         f"(for {source}), or pycuda.")
        else:
            fixes.append("No CUDA binding for the TensorRT backend, and no driver told its CUDA version: once the NVIDIA "
                         "driver runs, pip install the cuda-python of the CUDA major that nvidia-smi shows as 'CUDA "
                         "Version' ('cuda-python>=12,<13' for 12.x, 'cuda-python>=13,<14' for 13.x), or pycuda.")
    elif env.cuda_python is not None and driver_major and binding_major and binding_major > driver_major:
        fixes.append(
            f"cuda-python {env.cuda_python} needs a CUDA {binding_major[0]} driver but this driver supports CUDA "
            f"{env.driver_cuda_version}: pip install 'cuda-python>={driver_major[0]},<{driver_major[0] + 1}'."
        )
    return fixes


def _gpu_fixes(env: Environment) -> list[str]:
    if env.gpu_name is None:
        return [env.gpu_error or "No NVIDIA GPU or driver here."]
    return []


def diagnose_backend(env: Environment, target: str) -> Finding:
    """Whether backend ``target`` (one of ``TARGETS``) can run here, and what to install if not."""
    if target == "ort-cpu":
        if env.onnxruntime is None:
            return Finding(target, False, "ONNX Runtime is not installed",
                           ("pip install 'reconad[runtime]' (on a Jetson, the onnxruntime-gpu wheel for its JetPack from "
                            f"{JETSON_ORT_INDEX})" if env.is_jetson else "pip install 'reconad[runtime]'",))
        return Finding(target, True, f"onnxruntime {env.onnxruntime} ({env.onnxruntime_package or 'system'})")
    if target == "ort-cuda":
        fixes = _gpu_fixes(env)
        if env.onnxruntime is None or "CUDAExecutionProvider" not in env.onnxruntime_providers:
            where = (f"install the onnxruntime-gpu wheel for JetPack {jetpack_of(env) or '?'} from {JETSON_ORT_INDEX} "
                     "(PyPI's onnxruntime has no CUDA on Jetson)" if env.is_jetson else
                     "pip uninstall onnxruntime && pip install onnxruntime-gpu (or 'reconad[gpu]')")
            have = f"onnxruntime {env.onnxruntime} has only {list(env.onnxruntime_providers)}" if env.onnxruntime else "no onnxruntime"
            fixes.append(f"No CUDA execution provider ({have}): {where}.")
        detail = (f"onnxruntime {env.onnxruntime}, providers {list(env.onnxruntime_providers)}" if env.onnxruntime
                  else "ONNX Runtime not installed")
        return Finding(target, not fixes, detail, tuple(fixes))
    if target == "trt":
        fixes = _gpu_fixes(env)
        version = _numbers(env.tensorrt)
        if env.tensorrt is None:
            how = ("JetPack provides TensorRT (apt install python3-libnvinfer; a pip 'tensorrt' stub must not shadow it)"
                   if env.is_jetson else "pip install 'reconad[gpu]' (tensorrt-cu12 from PyPI)")
            reason = f" ({env.tensorrt_error})" if env.tensorrt_error else ""
            fixes.append(f"TensorRT is not importable{reason}: {how}.")
        elif version[:2] < OLDEST_TENSORRT or version[0] > NEWEST_TENSORRT_MAJOR:
            fixes.append(f"TensorRT {env.tensorrt} is outside 8.5 to 11.x, the releases reconad builds and runs engines on.")
        fixes += _cuda_binding_fixes(env)
        detail = f"TensorRT {env.tensorrt or 'not installed'}, GPU {env.gpu_name or '-'} (compute capability {env.compute_capability or '-'}), " \
                 f"driver CUDA {env.driver_cuda_version or '-'}, cuda-python {env.cuda_python or '-'}, pycuda {env.pycuda or '-'}"
        return Finding(target, not fixes, detail, tuple(fixes))
    raise ValueError(f"unknown target {target!r}")


def _opencv_fixes(env: Environment) -> list[str]:
    if env.opencv is not None:
        return []
    if env.opencv_error and "numpy" in env.opencv_error.lower():
        return [f"OpenCV does not import with numpy {env.numpy} ({env.opencv_error}): pip install 'numpy<2' "
                "(JetPack's OpenCV is built against numpy 1.x)."]
    return ["OpenCV is not installed: " + ("apt install python3-opencv (JetPack's build, with GStreamer)" if env.is_jetson
                                          else "pip install 'reconad[runtime]'") + "."]


def diagnose_source(env: Environment, kind: str) -> Finding:
    """Whether frame sources of ``kind`` (one of ``SOURCE_KINDS``) can be read here."""
    fixes = _opencv_fixes(env)
    video = env.opencv_video
    gstreamer = video.get("GStreamer", False)
    if env.opencv is None:
        pass
    elif kind == "csi" and not env.is_jetson:
        fixes.append("CSI cameras (nvarguscamerasrc) exist only on a Jetson.")
    elif kind in ("csi", "rtsp", "v4l2") and env.is_jetson and not gstreamer:
        shadow = f" the pip wheel {env.opencv_package} shadows JetPack's OpenCV:" if env.opencv_package else ""
        fixes.append(f"This OpenCV has no GStreamer;{shadow} pip uninstall {env.opencv_package or 'opencv-python'} "
                     "and use JetPack's python3-opencv.")
    elif kind == "rtsp" and not (gstreamer or video.get("FFMPEG", False)):
        fixes.append("RTSP needs OpenCV with GStreamer or FFmpeg: pip install opencv-python-headless.")
    elif kind == "v4l2" and not (gstreamer or video.get("V4L2", False)):
        fixes.append("V4L2 cameras need OpenCV with V4L2 or GStreamer.")
    elif kind == "v4l2" and env.v4l2_devices == ():
        fixes.append("No V4L2 devices found (no /dev/video*): connect the camera, then check that ls /dev/video* lists it.")
    elif kind == "video" and not (gstreamer or video.get("FFMPEG", False)):
        fixes.append("Video files need OpenCV with FFmpeg or GStreamer.")
    if kind == "images" and env.pillow is None:
        fixes.append("Image files need Pillow for their EXIF orientation: pip install pillow.")
    backends = ", ".join(name for name, present in video.items() if present) or "none"
    detail = f"OpenCV {env.opencv or '-'} ({env.opencv_package or 'system build'}; video I/O: {backends})"
    if kind == "v4l2" and env.v4l2_devices is not None:
        detail += f"; devices: {', '.join(env.v4l2_devices) or 'none'}"
    return Finding(kind, not fixes, detail, tuple(fixes))


def diagnose_output(env: Environment, kind: str) -> Finding:
    """Whether ``--output`` of ``kind`` (one of ``OUTPUT_KINDS``) can work here."""
    if kind == "out:rtsp":
        return Finding(*doctor_outputs.diagnose_rtsp(env))
    if kind == "out:display":
        return Finding(*doctor_outputs.diagnose_display(env))
    if kind != "out:file":
        raise ValueError(f"unknown output kind {kind!r}")
    # OpenCV's VideoWriter: mp4v in .mp4/.m4v/.mov/.mkv, MJPG in .avi (line/outputs.py FILE_FOURCCS).
    fixes = _opencv_fixes(env)
    writer = "FFmpeg" if env.opencv_video.get("FFMPEG") else "GStreamer" if env.opencv_video.get("GStreamer") else None
    if env.opencv is not None and writer is None:
        fixes.append("Video files need OpenCV with FFmpeg or GStreamer video I/O: " + (
            "use JetPack's python3-opencv." if env.is_jetson else "pip install opencv-python-headless."))
    detail = (f"OpenCV {env.opencv} VideoWriter through {writer or 'neither FFmpeg nor GStreamer'} "
              f"({' '.join(FILE_FOURCCS)})" if env.opencv else "OpenCV not installed")
    return Finding(kind, not fixes, detail, tuple(fixes))


def diagnose(env: Environment) -> list[Finding]:
    """One finding per backend (``TARGETS``), source kind (``SOURCE_KINDS``) and output kind
    (``OUTPUT_KINDS``), after the platform's."""
    findings = [diagnose_platform(env)]
    findings += [diagnose_backend(env, target) for target in TARGETS]
    findings += [diagnose_source(env, kind) for kind in SOURCE_KINDS]
    findings += [diagnose_output(env, kind) for kind in OUTPUT_KINDS]
    return findings


def diagnose_platform(env: Environment) -> Finding:
    """Python and numpy: what every part needs (and what JetPack's compiled modules need of numpy)."""
    fixes = []
    if _numbers(env.python)[:2] < (3, 10):
        fixes.append(f"Python {env.python} is too old: reconad needs 3.10 or later "
                     + ("(JetPack 5 ships 3.8: use JetPack 6 or 7)" if env.is_jetson else "") + ".")
    if env.numpy is None:
        fixes.append("numpy is not installed: pip install numpy.")
    elif env.is_jetson and _numbers(env.numpy)[:1] >= (2,):
        fixes.append(f"numpy {env.numpy} on a Jetson: JetPack's OpenCV and TensorRT bindings are built against numpy 1.x; "
                     "pip install 'numpy<2'.")
    where = f"Jetson, L4T {env.l4t}, JetPack {jetpack_of(env) or '?'}" if env.is_jetson else env.machine or "?"
    return Finding("platform", not fixes, f"Python {env.python}, numpy {env.numpy or '-'}, {where}", tuple(fixes))


def check_source(uri: str, timeout_s: float = 10.0) -> Finding:
    """Open ``uri`` as ``recon-inspect run`` would and read one frame (a real check of that camera or stream)."""
    import threading

    from reconad.runtime.errors import ReconadError
    from reconad.runtime.line.sources import open_source

    outcome: dict[str, Any] = {}

    def attempt() -> None:
        try:
            source = open_source(uri)
            source.open()
            try:
                frame = source.read()
            finally:
                source.close()
            outcome["frame"] = frame
        except ReconadError as error:
            outcome["error"] = str(error)

    worker = threading.Thread(target=attempt, daemon=True)  # a camera read can block for good
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return Finding(uri, False, f"no frame within {timeout_s:g} s", (f"{uri} opened but delivered no frame in time.",))
    if "error" in outcome:
        return Finding(uri, False, "cannot open", (outcome["error"],))
    frame = outcome.get("frame")
    if frame is None:
        return Finding(uri, False, "opened, but it holds no frame", (f"{uri} ended before its first frame.",))
    height, width = frame.image.shape[:2]
    return Finding(uri, True, f"read a {width}x{height} frame")


def render(findings: list[Finding]) -> str:
    """The report: one line per finding (``ok`` / ``missing``), then its fixes indented."""
    lines = []
    for finding in findings:
        lines.append(f"{'ok     ' if finding.works else 'missing'}  {finding.name:<11} {finding.detail}")
        lines += [f"           - {fix}" for fix in finding.fixes]
    return "\n".join(lines)
