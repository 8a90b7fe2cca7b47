"""ONNX Runtime backend: I/O metadata, batch splitting, fixed batches, errors and backend choice."""

import numpy as np
import pytest

from reconad.runtime.backends.base import Backend, infer_in_chunks
from reconad.runtime.backends.ort import OrtBackend, available_ort_backends
from reconad.runtime.inspector import open_backend
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_NAME, IMAGE_SCORE_NAME, INPUT_NAME, OUTPUT_NAMES
from tests.runtime.onnx_graphs import expected_outputs, random_images, write_artifact


def test_ort_cpu_backend_matches_numpy_and_splits_batches(tmp_path):
    artifact = write_artifact(tmp_path)
    images = random_images(7)
    with open_backend(artifact, "ort-cpu", max_batch=3) as backend:
        assert isinstance(backend, Backend)
        assert backend.name == "ort-cpu"
        assert backend.inputs[0].name == INPUT_NAME and backend.inputs[0].shape == (-1, 16, 16, 3)
        assert backend.inputs[0].dtype == "uint8"
        assert [tensor.name for tensor in backend.outputs] == list(OUTPUT_NAMES)
        assert [tensor.dtype for tensor in backend.outputs] == ["float32", "float32", "int64", "float32"]
        calls = []
        original = backend._session.run
        backend._session.run = lambda names, feed: calls.append(len(feed[INPUT_NAME])) or original(names, feed)
        outputs = backend.infer(images)
    assert calls == [3, 3, 1]
    expected = expected_outputs(images)
    np.testing.assert_allclose(outputs[ANOMALY_MAP_NAME], expected[ANOMALY_MAP_NAME], atol=1e-6)
    np.testing.assert_allclose(outputs[IMAGE_SCORE_NAME], expected[IMAGE_SCORE_NAME], atol=1e-6)
    np.testing.assert_array_equal(outputs[CATEGORY_NAME], expected[CATEGORY_NAME])
    np.testing.assert_allclose(outputs[CATEGORY_DISTANCE_NAME], expected[CATEGORY_DISTANCE_NAME], atol=1e-6)
    assert outputs[ANOMALY_MAP_NAME].shape == (7, 1, 16, 16) and outputs[IMAGE_SCORE_NAME].shape == (7,)


def test_fixed_batch_graph_pads_short_chunks(tmp_path):
    artifact = write_artifact(tmp_path, max_batch=2, dynamic_batch=False)
    images = random_images(3)
    with OrtBackend(artifact, "ort-cpu") as backend:
        assert backend.min_batch == backend.max_batch == 2
        outputs = backend.infer(images)
    np.testing.assert_allclose(outputs[IMAGE_SCORE_NAME], expected_outputs(images)[IMAGE_SCORE_NAME], atol=1e-6)


def test_infer_in_chunks_pads_and_trims():
    seen = []

    def run_chunk(chunk):
        seen.append(chunk[:, 0, 0, 0].tolist())
        return {"value": chunk[:, 0, 0, 0].astype(np.float32)}

    images = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1)
    outputs = infer_in_chunks(images, min_batch=2, max_batch=2, run_chunk=run_chunk)
    assert seen == [[0, 1], [2, 3], [4, 4]]
    assert outputs["value"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ReconadError, match="non-empty"):
        infer_in_chunks(images[:0], 1, 2, run_chunk)


def test_closed_backend_refuses(tmp_path):
    backend = open_backend(write_artifact(tmp_path))
    backend.close()
    backend.close()
    with pytest.raises(ReconadError, match="closed"):
        backend.infer(random_images(1))


def test_auto_picks_an_available_ort_provider(tmp_path):
    with open_backend(write_artifact(tmp_path)) as backend:
        assert backend.name in available_ort_backends()


@pytest.mark.parametrize(
    ("name", "backend", "message"),
    [
        ("model.onnx", "trt", "build one from"),
        ("model.onnx", "tensorflow", "Unknown backend"),
        ("model.engine", "ort-cpu", "only the trt backend"),
        ("model.pt", "auto", "neither an .onnx graph nor a TensorRT .engine"),
    ],
)
def test_backend_choice_errors(tmp_path, name, backend, message):
    path = tmp_path / name
    path.write_bytes(b"x")
    with pytest.raises(ReconadError, match=message):
        open_backend(path, backend)


def test_missing_gpu_provider_is_one_sentence(tmp_path):
    if "ort-cuda" in available_ort_backends():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(ReconadError, match="no CUDAExecutionProvider for backend ort-cuda; install onnxruntime-gpu"):
        open_backend(write_artifact(tmp_path), "ort-cuda")


def test_engine_without_tensorrt_is_one_sentence(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(ReconadError, match="TensorRT is not installed"):
        open_backend(engine)


def test_corrupt_model_file_is_one_sentence(tmp_path):
    artifact = write_artifact(tmp_path)
    artifact.write_bytes(artifact.read_bytes()[:40])
    with pytest.raises(ReconadError, match="ONNX Runtime cannot load") as caught:
        OrtBackend(artifact, "ort-cpu")
    assert "\n" not in str(caught.value)
    with pytest.raises(ReconadError, match="does not exist"):
        OrtBackend(tmp_path / "absent.onnx", "ort-cpu")
