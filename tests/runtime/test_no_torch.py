"""Importing the runtime package is light: heavy libraries load only where a module needs them.

That no runtime module loads torch, onnx or efficientnet is tested in tests/test_architecture.py.
"""

import subprocess
import sys


def test_package_import_is_light():
    code = "import sys, reconad.runtime; print(sorted(n for n in ('onnxruntime', 'cv2', 'torch') if n in sys.modules))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
