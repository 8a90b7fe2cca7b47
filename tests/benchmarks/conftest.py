"""The benchmark scripts are plain files in benchmarks/, not a package: load them by path."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def make_real_set():
    pytest.importorskip("skimage", reason="the real-image set needs scikit-image: pip install 'reconad[bench]'")
    return load_script("make_real_set")


@pytest.fixture(scope="session")
def tiny_real_set(make_real_set, tmp_path_factory):
    """brick and gravel (the scikit-image photographs) at 64 px: 6 train, 2 test goods, 6 defective each."""
    root = tmp_path_factory.mktemp("real") / "set"
    make_real_set.write_real_set(root, make_real_set.RealSetConfig.tiny())
    return root
