"""Torch-free runtime: manifest, backends, pre/post-processing, Inspector, inspection loop.

Never imports torch, onnx (the package), efficientnet or anything else of reconad.
"""
