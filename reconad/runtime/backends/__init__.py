"""Inference backends behind one protocol (``base.py``): ONNX Runtime (``ort.py``) and TensorRT (``trt.py``,
over the CUDA bindings of ``cuda.py``); ``device.py`` says what GPU and Jetson release this is."""
