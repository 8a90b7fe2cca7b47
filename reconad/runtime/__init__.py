"""Torch-free runtime: the frame path, the manifest, backends, the Inspector, calibration, verify, the line.

Never imports torch, onnx (the package), efficientnet or anything else of reconad. onnxruntime, OpenCV,
TensorRT and the CUDA bindings are imported only when a backend is opened or an image is decoded.
The layout and the data flow are in docs/architecture.md.
"""

from reconad.runtime.inspector import Inspector, Verdict
from reconad.runtime.manifest import Manifest

__all__ = ["Inspector", "Manifest", "Verdict"]
