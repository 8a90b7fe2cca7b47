"""to-onnx's export: the graph contract, a batch axis that really works, parity, manifests, atomic writes."""

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from reconad.export import onnx as export_module
from reconad.export.naming import artifact_stem
from reconad.export.ort_attention import fuse_attention
from reconad.export.onnx import (
    ParityError,
    export_onnx,
    load_reference_images,
    synthetic_reference_images,
    write_files_atomically,
)
from reconad.model import PRESETS, build_detector, load_detector, save_checkpoint
from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import ANOMALY_MAP_NAME, CATEGORY_DISTANCE_NAME, CATEGORY_NAME, IMAGE_SCORE_NAME, INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, Manifest, check_artifact_sha256, manifest_path_for, reference_path_for
from reconad.runtime.thresholds import OperatingPoint, Threshold
from reconad.runtime.verify import CATEGORY_MARGIN_KEY


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_export_writes_self_describing_artifacts(tiny_export, tiny_checkpoint):
    names = sorted(path.name for path in tiny_export.paths)
    assert names == sorted(
        f"tiny-run-64x64-{p}{suffix}" for p in ("fp32", "fp16") for suffix in (".onnx", ".json", ".reference.npz")
    )
    assert sorted(p.name for p in tiny_export.out_dir.iterdir()) == names  # no temp files left behind
    for precision, path in (("fp32", tiny_export.fp32), ("fp16", tiny_export.fp16)):
        manifest = Manifest.load(manifest_path_for(path))
        check_artifact_sha256(manifest, path)
        assert manifest.artifact_file == path.name and manifest.precision.mode == precision
        assert manifest.input_tensor.shape == (-1, 64, 64, 3) and manifest.input_tensor.max_batch == 4
        assert manifest.categories == ("weave", "pill") and manifest.exporter.opset == 17
        assert manifest.category_head.method == "nearest_centroid" and manifest.category_head.names == ("weave", "pill")
        assert manifest.category_head.n_images == (6, 6) and len(manifest.category_head.separation) == 2
        assert [o.dtype for o in manifest.output_tensors] == ["float32", "float32", "int64", "float32"]
        assert manifest.model_config == load_detector(tiny_checkpoint).config.to_dict()
        model = onnx.load(path)
        embedded = Manifest.from_json({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
        assert embedded == manifest.embedded_copy()
        assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert Manifest.load(manifest_path_for(tiny_export.fp16)).precision.fp32_islands == (
        "input normalisation", "LayerNormalization", "softmax logits", "anomaly head", "category head"
    )


def test_reference_holds_pytorch_outputs_of_synthetic_images(tiny_export, tiny_checkpoint):
    data = np.load(reference_path_for(tiny_export.fp32))
    assert sorted(data.files) == sorted(["images", *OUTPUT_NAMES, CATEGORY_MARGIN_KEY])
    images = data["images"]
    assert images.dtype == np.uint8 and images.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(images, synthetic_reference_images((64, 64)))
    detector = load_detector(tiny_checkpoint)
    with torch.inference_mode():
        anomaly_map, image_score, category, distance = detector(torch.from_numpy(images))
        pooled = detector.pooled_features(detector.extract_features(torch.from_numpy(images)))
    np.testing.assert_allclose(data[ANOMALY_MAP_NAME], anomaly_map.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(data[IMAGE_SCORE_NAME], image_score.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(data[CATEGORY_NAME], category.numpy())
    assert data[CATEGORY_NAME].dtype == np.int64 and data[CATEGORY_DISTANCE_NAME].dtype == np.float32
    distances = np.sort(1 - (pooled @ detector.category_centroids.T).numpy(), axis=1)  # [K, 2]
    np.testing.assert_allclose(data[CATEGORY_DISTANCE_NAME], distances[:, 0], atol=1e-6)
    np.testing.assert_allclose(data[CATEGORY_MARGIN_KEY], distances[:, 1] - distances[:, 0], atol=1e-6)
    fp16_data = np.load(reference_path_for(tiny_export.fp16))
    for key in data.files:
        np.testing.assert_array_equal(fp16_data[key], data[key])


def test_graph_contract(tiny_export):
    model = tiny_export.load("fp32")
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 17)]
    (graph_input,) = model.graph.input
    assert graph_input.name == INPUT_NAME
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [64, 64, 3]
    assert tuple(o.name for o in model.graph.output) == OUTPUT_NAMES
    types = [o.type.tensor_type.elem_type for o in model.graph.output]
    assert types == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT]
    ops = Counter(node.op_type for node in model.graph.node)
    # LayerNormalization is one op (opset 17), not ReduceMean/Sub/Pow/Sqrt: 2 in the encoder layer,
    # 3 in the decoder layer, the decoder norm. The one ReduceMean pools the features for the category head.
    assert ops["LayerNormalization"] == 6 and ops["ReduceMean"] == 1
    assert ops["ArgMin"] == 1 and ops["ReduceMin"] == 1
    assert ops["Softmax"] == 3
    # Folded: no Split / Transpose of weights left, no Constant nodes, no as_strided Gathers.
    initializers = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        assert node.op_type != "Constant"
        assert not (node.input and all(name in initializers for name in node.input if name)), node.name
    assert ops["Gather"] == 0 and ops["GlobalAveragePool"] > 0
    assert len({node.name for node in model.graph.node}) == len(model.graph.node)


def test_one_shared_neighbour_mask_initializer(tiny_export):
    for precision in ("fp32", "fp16"):
        model = tiny_export.load(precision)
        tokens = 8 * 8
        masks = [init for init in model.graph.initializer if list(init.dims) == [tokens, tokens]]
        assert len(masks) == 1, [m.name for m in masks]
        (mask,) = masks
        assert mask.data_type == onnx.TensorProto.FLOAT
        values = onnx.numpy_helper.to_array(mask)
        assert np.isfinite(values).all() and values.min() == -30000.0  # finite fill, never -inf
        readers = [node for node in model.graph.node if mask.name in node.input]
        assert len(readers) == 3 and {node.op_type for node in readers} == {"Add"}


def test_attention_is_exported_in_its_explicit_form(tiny_export):
    """Q.K^T MatMul with the scale on Q alone, mask Add, Softmax, MatMul: the form the FP32 islands, the
    TensorRT 8.x constraints and the LayerNorm rewrite are found on. Tracing the SDPA that training and
    evaluation run would scale Q and K both and add Shape / Slice arithmetic. The decoder's first attention
    has a query that is the same for every image (learned queries + position): its scaled projection is a
    folded constant [1, nhead, L, head_dim], not per-image work."""
    model = tiny_export.load("fp32")
    producer = {name: node for node in model.graph.node for name in node.output}
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    softmaxes = [node for node in model.graph.node if node.op_type == "Softmax"]
    assert len(softmaxes) == 3
    head_dim = 32 // 2  # ModelConfig.tiny(): d_model 32, nhead 2
    folded_queries = []
    for softmax in softmaxes:
        add = producer[softmax.input[0]]
        (logits,) = [name for name in add.input if name not in constants]
        assert add.op_type == "Add" and any(constants[name].shape == (64, 64) for name in add.input if name in constants)
        matmul = producer[logits]
        assert matmul.op_type == "MatMul"
        q_name, k_name = matmul.input
        assert producer[k_name].op_type == "Transpose"
        if q_name in constants:
            folded_queries.append(constants[q_name].shape)
        else:
            scaled_q = producer[q_name]
            assert scaled_q.op_type == "Mul"
            (scale,) = [constants[name] for name in scaled_q.input if name in constants]
            assert np.allclose(scale, head_dim**-0.5)
        (reader,) = [node for node in model.graph.node if softmax.output[0] in node.input]
        assert reader.op_type == "MatMul"
    assert folded_queries == [(1, 2, 64, head_dim)]  # tiny: one decoder layer, 2 heads, 8x8 tokens
    assert not any(node.op_type == "Slice" for node in model.graph.node)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_batch_axis_really_is_dynamic(tiny_export, tiny_checkpoint, batch):
    detector = load_detector(tiny_checkpoint)
    images = np.random.default_rng(batch).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    anomaly_map, image_score, category, distance = session(tiny_export.fp32).run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    with torch.inference_mode():
        expected_map, expected_score, expected_category, expected_distance = detector(torch.from_numpy(images))
    assert anomaly_map.shape == (batch, 1, 64, 64) and image_score.shape == (batch,) and category.shape == (batch,)
    assert np.abs(anomaly_map - expected_map.numpy()).max() <= 1e-4
    assert np.abs(image_score - expected_score.numpy()).max() <= 1e-4
    np.testing.assert_array_equal(category, expected_category.numpy())
    assert np.abs(distance - expected_distance.numpy()).max() <= 1e-5


@pytest.fixture
def fast_export(tiny_export, monkeypatch):
    """export_onnx with the (slow) torch.onnx trace replaced by the session's exported graph."""
    monkeypatch.setattr(export_module, "trace_to_onnx", lambda detector, max_batch, opset: tiny_export.load("fp32"))


def test_parity_failure_writes_nothing(fast_export, tiny_checkpoint, tmp_path, monkeypatch):
    real_run_torch = export_module.run_torch

    def drifting_run_torch(*args, **kwargs):
        outputs = real_run_torch(*args, **kwargs)
        return {**outputs, ANOMALY_MAP_NAME: outputs[ANOMALY_MAP_NAME] + 1e-2}

    monkeypatch.setattr(export_module, "run_torch", drifting_run_torch)
    with pytest.raises(ParityError, match="fp32 ONNX graph does not match PyTorch") as caught:
        export_onnx(tiny_checkpoint, tmp_path / "out", precision="both", max_batch=4)
    assert caught.value.exit_code == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_interrupted_export_leaves_no_partial_file(fast_export, tiny_checkpoint, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    real_fsync, calls = os.fsync, []

    def interrupted_fsync(descriptor):
        calls.append(descriptor)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_fsync(descriptor)

    monkeypatch.setattr(export_module.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_checkpoint, out_dir, precision="fp32", max_batch=4)
    assert list(out_dir.iterdir()) == []


def test_a_calibration_in_the_output_folder_is_never_discarded_without_overwrite(fast_export, tiny_checkpoint, tmp_path):
    out_dir = tmp_path / "out"
    (fp32,) = [p for p in export_onnx(tiny_checkpoint, out_dir, precision="fp32", max_batch=4) if p.suffix == ".onnx"]
    export_onnx(tiny_checkpoint, out_dir, precision="fp32", max_batch=4)  # uncalibrated: replaced freely
    manifest = Manifest.load(manifest_path_for(fp32))
    point = OperatingPoint(image_threshold=Threshold.manual(1.5, source="line 3"))
    calibrated = manifest.with_operating_point("pill", point)
    calibrated.save(manifest_path_for(fp32))
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    with pytest.raises(ReconadError, match=r"holds a calibration \(pill; .*pass --overwrite to replace it"):
        export_onnx(tiny_checkpoint, out_dir, precision="both", max_batch=4)
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before  # nothing written, not even fp16
    export_onnx(tiny_checkpoint, out_dir, precision="fp32", max_batch=4, overwrite=True)
    assert Manifest.load(manifest_path_for(fp32)).category_thresholds == {}
    manifest_path_for(fp32).write_text("{broken")
    with pytest.raises(ReconadError, match="is not a manifest this reconad reads; pass --overwrite"):
        export_onnx(tiny_checkpoint, out_dir, precision="fp32", max_batch=4)


def test_a_checkpoint_without_centroids_exports_one_category_all(legacy_checkpoint, tmp_path):
    paths = export_onnx(legacy_checkpoint, tmp_path, precision="both", max_batch=2)
    for precision in ("fp32", "fp16"):
        (onnx_path,) = [p for p in paths if p.name.endswith(f"{precision}.onnx")]
        manifest = Manifest.load(manifest_path_for(onnx_path))
        assert manifest.category_head.method == "none" and manifest.category_head.names == ("all",)
        assert not manifest.recognizes_categories and manifest.known_categories == ("weave",)
        images = synthetic_reference_images((64, 64))
        _, _, category, distance = session(onnx_path).run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        assert category.dtype == np.int64 and category.tolist() == [0, 0, 0, 0] and distance.tolist() == [0.0] * 4
    reference = np.load(reference_path_for(onnx_path))
    assert np.isinf(reference[CATEGORY_MARGIN_KEY]).all()  # one "centroid": never a near tie


def test_write_files_atomically_keeps_old_files_on_failure(tmp_path, monkeypatch):
    old = tmp_path / "a.onnx"
    old.write_bytes(b"old")
    real_replace = os.replace

    def failing_replace(source, target):
        if str(target).endswith("b.json"):
            raise OSError(28, "No space left on device", str(target))
        real_replace(source, target)

    monkeypatch.setattr(export_module.os, "replace", failing_replace)
    with pytest.raises(ReconadError, match="No space left on device"):
        write_files_atomically({tmp_path / "b.json": b"{}", old: b"new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"] and old.read_bytes() == b"old"


def test_reference_images_from_a_folder(tmp_path):
    cv2 = pytest.importorskip("cv2")
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(20):
        image = np.full((40 + index, 50, 3), index * 10, dtype=np.uint8)
        cv2.imwrite(str(folder / f"{index:02d}.png"), image)
    images = load_reference_images(folder, (32, 32))
    assert images.dtype == np.uint8 and images.shape == (16, 32, 32, 3)
    assert images[0].max() == 0 and images[-1].min() == 190  # first and last file, evenly spaced between
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReconadError, match="holds no image files"):
        load_reference_images(tmp_path / "empty", (32, 32))


def test_synthetic_reference_images_are_deterministic_and_distinct():
    first, second = synthetic_reference_images((48, 40)), synthetic_reference_images((48, 40))
    assert first.shape == (4, 48, 40, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert len({image.tobytes() for image in first}) == 4


def test_artifact_stem(tmp_path):
    assert artifact_stem(tmp_path / "weave" / "model.ckpt", {}) == "weave"
    assert artifact_stem(tmp_path / "runs" / "bottle-v2.ckpt", {}) == "bottle-v2"
    assert artifact_stem(tmp_path / "x" / "best.ckpt", {"run_name": "line 3/cam 1"}) == "line_3_cam_1"


def test_bad_arguments_fail_before_any_work(tiny_checkpoint, tmp_path):
    cases = [
        ({"precision": "int4"}, "Precision must be one of"),
        ({"precision": "int8"}, "An int8 export needs --calibration-images"),
        ({"max_batch": 0}, "max_batch must be at least 1"),
        ({"opset": 16}, "Opset 16 is too old"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ReconadError, match=message):
            export_onnx(tiny_checkpoint, tmp_path, **kwargs)
    with pytest.raises(ReconadError, match="does not exist"):
        export_onnx(tmp_path / "absent.ckpt", tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ReconadError, match="is a file"):
        export_onnx(tiny_checkpoint, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_exports_with_parity(preset, tmp_path):
    """Random weights; export_onnx itself fails unless fp32 matches PyTorch and fp16 passes verify's tolerances;
    the fp32 graph's ort-cpu rewrite matches too."""
    torch.manual_seed(0)
    detector = build_detector(PRESETS[preset]).eval()
    pooled = torch.nn.functional.normalize(torch.rand(6, PRESETS[preset].channels), dim=1)
    detector.fit_category_centroids(pooled, ["a", "a", "a", "b", "b", "b"], ["a", "b"])
    head = {"names": ["a", "b"], "n_images": [3, 3], "source": "random"}
    checkpoint = save_checkpoint(detector, tmp_path / preset / "model.ckpt", category_head=head)
    paths = export_onnx(checkpoint, tmp_path / "out", precision="both", max_batch=2)
    height, width = PRESETS[preset].input_hw
    fp32 = tmp_path / "out" / f"{preset}-{height}x{width}-fp32.onnx"
    assert fp32 in paths and (tmp_path / "out" / f"{preset}-{height}x{width}-fp16.onnx") in paths
    reference = np.load(reference_path_for(fp32))
    anomaly_map, *_ = session(fp32).run(list(OUTPUT_NAMES), {INPUT_NAME: reference["images"][:2]})
    assert np.abs(anomaly_map - reference[ANOMALY_MAP_NAME][:2]).max() <= 1e-4
    fused = tmp_path / "fused.onnx"  # the ort-cpu target's rewrite finds every attention of every preset
    onnx.save(fuse_attention(onnx.load(fp32)), fused)
    anomaly_map, *_ = session(fused).run(list(OUTPUT_NAMES), {INPUT_NAME: reference["images"][:2]})
    assert np.abs(anomaly_map - reference[ANOMALY_MAP_NAME][:2]).max() <= 1e-4


@pytest.mark.slow
def test_opset_18_and_a_static_batch_of_one(tiny_checkpoint, tmp_path):
    paths = export_onnx(tiny_checkpoint, tmp_path, precision="fp16", max_batch=1, opset=18)
    (onnx_path,) = [path for path in paths if path.suffix == ".onnx"]
    assert onnx_path.name == "tiny-run-64x64-fp16.onnx"
    model = onnx.load(onnx_path)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 64, 64, 3]
    manifest = Manifest.load(manifest_path_for(onnx_path))
    assert manifest.input_tensor.shape == (1, 64, 64, 3) and not manifest.input_tensor.dynamic_batch
    assert manifest.exporter.opset == 18 and manifest.precision.mode == "fp16"
