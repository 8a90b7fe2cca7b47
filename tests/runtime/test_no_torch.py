"""The runtime is torch-free: importing every reconad.runtime module loads no torch, onnx or efficientnet."""

import pkgutil
import subprocess
import sys

import reconad.runtime


def test_runtime_modules_import_without_torch():
    modules = sorted(f"reconad.runtime.{info.name}" for info in pkgutil.iter_modules(reconad.runtime.__path__))
    assert "reconad.runtime.verify" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as error:\n"
        "        if name != 'reconad.runtime.trt_backend':\n"  # needs TensorRT, absent on CPU machines
        "            raise\n"
        "import reconad.runtime.cli\n"
        "from typer.testing import CliRunner\n"
        "assert CliRunner().invoke(reconad.runtime.cli.app, ['run', '--help']).exit_code == 0\n"
        "banned = [name for name in ('torch', 'onnx', 'efficientnet_pytorch') if name in sys.modules]\n"
        "ours = sorted({name.split('.')[1] for name in sys.modules if name.startswith('reconad.') and name.count('.') >= 1})\n"
        "print(banned, ours)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[] ['runtime']"


def test_package_import_is_light():
    code = "import sys, reconad.runtime; print(sorted(n for n in ('onnxruntime', 'cv2', 'torch') if n in sys.modules))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
