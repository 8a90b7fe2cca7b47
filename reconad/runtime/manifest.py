"""Graph tensor names and the artifact manifest: the contract between export and runtime.

The names below are the only definition of the fused graph's I/O; every other module imports them.
"""

INPUT_NAME = "images"  # uint8 [N, H, W, 3] RGB
ANOMALY_MAP_NAME = "anomaly_map"  # float32 [N, 1, H, W]
IMAGE_SCORE_NAME = "image_score"  # float32 [N]
OUTPUT_NAMES = (ANOMALY_MAP_NAME, IMAGE_SCORE_NAME)
