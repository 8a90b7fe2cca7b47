"""reconad: UniAD visual anomaly detection from PyTorch training to FP16 TensorRT engines.

Subpackages: ``model`` (the nn.Modules), ``train``, ``export`` and the torch-free ``runtime``.
Nothing is imported here so that ``import reconad.runtime`` stays light on a Jetson.
"""

__version__ = "0.1.0"
