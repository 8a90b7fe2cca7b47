"""Real TensorRT builds and runs (``gpu``): skipped with a reason wherever ``tensorrt`` cannot be imported.

A tiny engine from the contract graph (fp32), and the tiny checkpoint's exported model built in fp16
and fp32, each run through ``TrtBackend`` with and without CUDA graphs and checked against ONNX
Runtime and the PyTorch reference npz (``verify``). CI has no GPU: none of this runs there.
"""

import dataclasses
import json

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here; the gpu tests need TensorRT and a GPU")

from reconad.export.build_config import BuildConfig  # noqa: E402
from reconad.export.engine import build_engine  # noqa: E402
from reconad.runtime.backends.ort import OrtBackend  # noqa: E402
from reconad.runtime.backends.cuda import open_cuda  # noqa: E402
from reconad.runtime.errors import ReconadError  # noqa: E402
from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_NAME, IMAGE_SCORE_NAME, Manifest, manifest_path_for  # noqa: E402
from reconad.runtime.backends.trt import TrtBackend, parse_version  # noqa: E402
from reconad.runtime.verify import verify_artifact  # noqa: E402
from tests.runtime.onnx_graphs import expected_outputs, random_images, write_artifact  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def cuda_binding():
    try:
        driver = open_cuda()
    except ReconadError as error:
        pytest.skip(f"no usable CUDA binding or GPU: {error}")
    driver.close()


@pytest.fixture(scope="module")
def contract_engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("contract")
    onnx_path = write_artifact(folder, name="contract-16x16-fp32.onnx", max_batch=4, reference_images=random_images(3))
    return build_engine(onnx_path, folder, BuildConfig(precision="fp32", max_batch=4), log=print)


def test_a_tiny_engine_builds_and_infers(contract_engine):
    manifest = Manifest.load(contract_engine.manifest_path)
    assert manifest.engine.tensorrt_version == trt.__version__ and manifest.precision.mode == "fp32"
    # TensorRT 8.x has no INT64 tensors (its parser maps the int64 output to INT32); 10.x keeps int64.
    category_dtype = "int32" if parse_version(trt.__version__) < (10,) else "int64"
    assert manifest.output_tensors[2].dtype == category_dtype
    images = random_images(7, seed=4)  # more than max_batch: split into 4 + 3
    wanted = expected_outputs(images)
    for cuda_graph in (False, True):
        with TrtBackend(contract_engine.engine_path, cuda_graph=cuda_graph) as backend:
            assert backend.max_batch == 4 and backend.outputs[2].dtype == category_dtype
            outputs = backend.infer(images)
            for name in (ANOMALY_MAP_NAME, IMAGE_SCORE_NAME, CATEGORY_DISTANCE_NAME):
                np.testing.assert_allclose(outputs[name], wanted[name], atol=1e-5)
            assert outputs[CATEGORY_NAME].dtype == category_dtype
            np.testing.assert_array_equal(outputs[CATEGORY_NAME], wanted[CATEGORY_NAME])
            single = backend.infer(images[:2], copy=False)
            np.testing.assert_allclose(single[IMAGE_SCORE_NAME], wanted[IMAGE_SCORE_NAME][:2], atol=1e-5)
    assert verify_artifact(contract_engine.engine_path, "trt").passed


def test_an_engine_whose_manifest_names_another_gpu_is_refused(contract_engine, tmp_path):
    manifest = Manifest.load(contract_engine.manifest_path)
    other = dataclasses.replace(manifest, engine=dataclasses.replace(manifest.engine, gpu_name="Another GPU"))
    with pytest.raises(ReconadError, match="rebuild it here"):
        TrtBackend(contract_engine.engine_path, manifest=other)


@pytest.fixture(scope="module")
def model_engines(tiny_export):
    engines = {}
    for precision in ("fp16", "fp32"):
        result = build_engine(tiny_export.fp16, tiny_export.out_dir, BuildConfig(precision=precision, max_batch=4))
        engines[precision] = result
    return engines


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_the_real_model_engine_matches_its_reference(model_engines, precision):
    result = model_engines[precision]
    report = verify_artifact(result.engine_path, "trt")
    assert report.passed, json.dumps(report.to_dict(), indent=2)
    assert result.report.problems(precision) == []
    if precision == "fp16":
        assert result.report.has_fp16 and not result.report.island_violations


def test_fp16_engine_agrees_with_onnx_runtime_with_and_without_cuda_graphs(model_engines, tiny_export):
    manifest = Manifest.load(manifest_path_for(tiny_export.fp16))
    images = random_images(6, manifest.input_hw, seed=11)
    with OrtBackend(tiny_export.fp16, "ort-cpu", max_batch=4) as ort:
        wanted = ort.infer(images)
    runs = []
    for cuda_graph in (False, True):
        with TrtBackend(model_engines["fp16"].engine_path, cuda_graph=cuda_graph) as backend:
            runs.append(backend.infer(images))
    np.testing.assert_allclose(runs[0][ANOMALY_MAP_NAME], runs[1][ANOMALY_MAP_NAME], rtol=0, atol=0)
    scale = float(np.abs(wanted[ANOMALY_MAP_NAME]).max())
    error = np.abs(runs[0][ANOMALY_MAP_NAME] - wanted[ANOMALY_MAP_NAME]).max()
    assert error <= 0.02 * scale, (
        f"fp16 engine vs ONNX Runtime: max abs error {error:.4g} on a map of scale {scale:.4g}"
    )
    assert (np.argsort(runs[0][IMAGE_SCORE_NAME]) == np.argsort(wanted[IMAGE_SCORE_NAME])).all()
    # Categories are checked against the reference, near ties forgiven, by verify above.
    assert np.abs(runs[0][CATEGORY_DISTANCE_NAME] - wanted[CATEGORY_DISTANCE_NAME]).max() <= 2e-3
