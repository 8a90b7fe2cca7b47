"""Checkpoint → ONNX (needs torch, imported lazily in ``export.onnx``), ONNX → TensorRT engine, verify."""
