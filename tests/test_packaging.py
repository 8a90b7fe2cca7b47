"""What each install extra may pull: the Jetson sets nothing that shadows JetPack (TensorRT, OpenCV, CUDA,
ONNX Runtime from PyPI), the CUDA binding matches each target's CUDA major, GPU and CPU ONNX Runtime
never side by side."""

import importlib.metadata
import re
from pathlib import Path

import pytest

from reconad.runtime.config import load_toml

PYPROJECT = load_toml(Path(__file__).resolve().parents[1] / "pyproject.toml", "pyproject")
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
SHADOWS_JETPACK = re.compile(r"^(opencv|onnxruntime|tensorrt|nvidia-|torch|pycuda|cupy)", re.IGNORECASE)


def names(requirements):
    return {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def spec_of(requirements, name):
    (match,) = [requirement for requirement in requirements if requirement.lower().startswith(name)]
    return match


@pytest.mark.parametrize("extra", ["jetson", "jetson7"])
def test_the_jetson_extras_pull_nothing_that_shadows_jetpack(extra):
    assert not {name for name in names(EXTRAS[extra]) if SHADOWS_JETPACK.match(name)}, EXTRAS[extra]
    for name in names(EXTRAS[extra]):  # nor do their own dependencies, where installed here
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        pulled = {dependency for dependency in names(r for r in requires if "extra ==" not in r)}
        assert not {dependency for dependency in pulled if SHADOWS_JETPACK.match(dependency)}, (name, pulled)
    assert "<2" in spec_of(EXTRAS[extra], "numpy")  # JetPack's compiled modules are built against numpy 1.x


def test_each_cuda_binding_matches_its_targets_cuda_major():
    assert spec_of(EXTRAS["jetson"], "cuda-python").replace(" ", "") == "cuda-python>=12,<13"  # JetPack 6: CUDA 12.6
    assert spec_of(EXTRAS["jetson7"], "cuda-python").replace(" ", "") == "cuda-python>=13,<14"  # JetPack 7: CUDA 13
    assert spec_of(EXTRAS["gpu"], "cuda-python").replace(" ", "") == "cuda-python>=12,<13"
    assert "tensorrt-cu12" in names(EXTRAS["gpu"])  # not the "tensorrt" meta-package


def test_gpu_and_cpu_onnxruntime_are_never_in_one_extra():
    for extra, requirements in EXTRAS.items():
        assert not {"onnxruntime", "onnxruntime-gpu"} <= names(requirements), extra
    assert "onnxruntime-gpu" in names(EXTRAS["gpu"]) and "onnxruntime" in names(EXTRAS["runtime"])
    assert "opencv-python-headless" in names(EXTRAS["runtime"])


def test_the_base_install_is_torch_free():
    assert not {name for name in names(PYPROJECT["project"]["dependencies"]) if SHADOWS_JETPACK.match(name)}


def test_the_license_is_an_spdx_expression_with_its_text_shipped():
    """A `license = { text = ... }` table made setuptools warn "project.license as a TOML table is deprecated" on
    every install; the SPDX string and license-files need setuptools 77 (PEP 639), so the build asks for it."""
    root = Path(__file__).resolve().parents[1]
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    files = [path for pattern in project["license-files"] for path in root.glob(pattern)]
    assert files and "Apache License\n                           Version 2.0, January 2004" in files[0].read_text()
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]
