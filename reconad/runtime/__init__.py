"""Torch-free runtime: manifest, backends, pre/post-processing, Inspector, inspection loop.

Never imports torch, onnx (the package), efficientnet or anything else of reconad. onnxruntime and
OpenCV are imported only when a backend is opened or an image is decoded.
"""

from reconad.runtime.inspector import Inspector, Verdict
from reconad.runtime.manifest import Manifest

__all__ = ["Inspector", "Manifest", "Verdict"]
