"""Manifest: construction helpers, JSON round trip, schema 2 (category head, per-category thresholds) and the
schema-1 migration, validation errors, hashes and atomic save."""

import json
import os

import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.manifest import CATEGORY_NAME, OUTPUT_NAMES, SCHEMA_VERSION, SCORE_OUTPUT_NAMES, CategoryHead, EngineInfo, ExporterInfo, Manifest, Precision, ScoreReducer, check_artifact_sha256, manifest_path_for, reference_path_for, sha256_file
from reconad.runtime.thresholds import Calibration, OperatingPoint, ScoreNormalization, Threshold

HEAD = CategoryHead(method="nearest_centroid", names=("bottle", "screw"), n_images=(10, 12), separation=(0.4, 0.4))


def make_manifest(**overrides) -> Manifest:
    arguments = dict(
        onnx_file="model.onnx",
        model_config={"preset": "tiny", "input_hw": (64, 64), "d_model": 32, "strides": [2, 4]},
        input_hw=(64, 64),
        max_batch=4,
        score_reducer=ScoreReducer(method="max_avgpool", kernel_size=16, stride=1),
        precision=Precision(mode="fp32"),
        exporter=ExporterInfo(reconad_version="0.1.0", torch_version="2.13.0", onnx_version="1.20", opset=17),
        preset="tiny",
        categories=("bottle", "screw"),
        category_head=HEAD,
        checkpoint_sha256="a" * 64,
    )
    arguments.update(overrides)
    return Manifest.for_onnx(**arguments)


def calibration() -> Calibration:
    return Calibration(method="max_fpr", n_images=40, max_fpr=0.01, date="2026-01-02T03:04:05+00:00", source="data/good")


def test_for_onnx_fills_the_io_contract():
    manifest = make_manifest()
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.input_tensor.shape == (-1, 64, 64, 3)
    assert manifest.input_tensor.min_batch == 1 and manifest.input_tensor.max_batch == 4
    assert tuple(output.name for output in manifest.output_tensors) == OUTPUT_NAMES
    assert manifest.output_tensors[0].shape == (-1, 1, 64, 64)
    assert manifest.output_tensors[1].shape == (-1,)
    assert [(o.shape, o.dtype) for o in manifest.output_tensors[2:]] == [((-1,), "int64"), ((-1,), "float32")]
    assert manifest.recognizes_categories and manifest.known_categories == ("bottle", "screw")
    assert manifest.input_hw == (64, 64)
    assert manifest.model_config["input_hw"] == [64, 64]  # JSON-normalised at construction
    fixed = make_manifest(max_batch=2, dynamic_batch=False)
    assert fixed.input_tensor.shape == (2, 64, 64, 3) and fixed.input_tensor.min_batch == 2


def test_round_trip_with_every_optional_field(tmp_path):
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"graph")
    manifest = make_manifest(
        image_threshold=Threshold(value=1.5, calibration=calibration()),
        pixel_threshold=Threshold(value=0.7, calibration=calibration()),
        score_normalization=ScoreNormalization(method="quantile", low=0.5, high=2.5, calibration=calibration()),
        precision=Precision(mode="fp16", fp32_islands=("LayerNormalization", "anomaly head"), description="ours"),
    ).stamp_artifact(artifact)
    manifest = manifest.with_operating_point(
        "screw",
        OperatingPoint(
            image_threshold=Threshold(value=1.25, calibration=calibration()),
            pixel_threshold=Threshold(value=0.5, calibration=calibration()),
            distance_limit=Threshold(value=0.1, calibration=calibration()),
        ),
    )
    assert manifest.onnx_sha256 == sha256_file(artifact)
    path = manifest_path_for(artifact)
    manifest.save(path)
    assert Manifest.load(path) == manifest
    assert Manifest.from_dict(json.loads(path.read_text())) == manifest
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]

    engine_file = tmp_path / "model.engine"
    engine_file.write_bytes(b"engine")
    engine_manifest = manifest.for_engine(
        engine_file=engine_file,
        engine=EngineInfo(tensorrt_version="10.3", gpu_name="Orin", compute_capability="8.7", build_details={"ws": 1}),
        max_batch=2,
    )
    assert engine_manifest.artifact_kind == "engine" and engine_manifest.artifact_file == "model.engine"
    assert engine_manifest.engine_sha256 == sha256_file(engine_file)
    assert engine_manifest.onnx_sha256 == manifest.onnx_sha256
    assert engine_manifest.input_tensor.max_batch == 2 and engine_manifest.input_tensor.shape[0] == -1
    assert Manifest.from_json(engine_manifest.to_json()) == engine_manifest
    assert engine_manifest.category_thresholds == manifest.category_thresholds
    assert engine_manifest.output_tensors[2].dtype == "int64"
    trt8 = manifest.for_engine(
        engine_file=engine_file,
        engine=EngineInfo(tensorrt_version="8.6.2", gpu_name="Orin", compute_capability="8.7"),
        output_dtypes={CATEGORY_NAME: "int32"},
    )
    assert trt8.output_tensors[2].dtype == "int32" and Manifest.from_json(trt8.to_json()) == trt8


def test_operating_point_of_a_category_falls_back_to_the_global_one():
    global_threshold = Threshold(value=2.0, calibration=calibration())
    own = OperatingPoint(image_threshold=Threshold(value=1.0, calibration=calibration()))
    manifest = make_manifest(image_threshold=global_threshold).with_operating_point("screw", own)
    assert manifest.operating_point("screw") is own
    assert manifest.operating_point("bottle").image_threshold == global_threshold
    assert manifest.operating_point(None) == manifest.global_operating_point
    emptied = manifest.with_operating_point("bottle", OperatingPoint())  # no image threshold: global
    assert emptied.operating_point("bottle").image_threshold == global_threshold
    data = manifest.to_dict()
    assert data["category_thresholds"]["screw"]["image_threshold"]["value"] == 1.0


def test_schema_1_manifests_migrate_on_load_and_save_as_schema_2(tmp_path):
    legacy = make_manifest(category_head=None, image_threshold=Threshold(value=3.0, calibration=calibration())).to_dict()
    legacy["schema_version"] = 1
    legacy["output_tensors"] = legacy["output_tensors"][:2]
    for key in ("category_head", "category_thresholds", "distance_limit"):
        legacy.pop(key)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(legacy))
    manifest = Manifest.load(path)
    assert manifest.schema_version == SCHEMA_VERSION == 2
    assert tuple(output.name for output in manifest.output_tensors) == SCORE_OUTPUT_NAMES
    assert manifest.category_head is None and not manifest.recognizes_categories
    assert manifest.operating_point("bottle").image_threshold.value == 3.0  # the global threshold
    manifest.save(path)
    assert json.loads(path.read_text())["schema_version"] == 2


def test_a_head_without_centroids_names_one_category():
    head = CategoryHead(method="none", names=("all",))
    manifest = make_manifest(category_head=head)
    assert not manifest.recognizes_categories and manifest.known_categories == ("bottle", "screw")
    with pytest.raises(ReconadError, match="names only 'all'"):
        CategoryHead(method="none", names=("bottle",))


def test_paths_next_to_the_artifact(tmp_path):
    assert manifest_path_for(tmp_path / "m.fp16.onnx") == tmp_path / "m.fp16.json"
    assert manifest_path_for(tmp_path / "m.engine") == tmp_path / "m.json"
    assert reference_path_for(tmp_path / "m.fp16.onnx") == tmp_path / "m.fp16.reference.npz"


def test_score_normalization_and_threshold_rule():
    normalization = ScoreNormalization(method="minmax", low=1.0, high=3.0)
    assert normalization.apply([0.0, 2.0, 5.0]).tolist() == [0.0, 0.5, 1.0]
    threshold = Threshold(value=2.0, calibration=calibration())
    assert threshold.is_exceeded_by([1.9, 2.0, 2.1]).tolist() == [False, True, True]


def _broken(mutate) -> dict:
    data = make_manifest().to_dict()
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("input_tensor"), "'input_tensor' is missing"),
        (lambda d: d["input_tensor"].pop("max_batch"), "'input_tensor.max_batch' is missing"),
        (lambda d: d.pop("schema_version"), "no schema_version"),
        (lambda d: d.update(schema_version=99), "schema version is 99"),
        (lambda d: d.update(created_at=5), "created_at must be a string"),
        (lambda d: d.update(created_at="yesterday"), "ISO 8601"),
        (lambda d: d["input_tensor"].update(max_batch="4"), "input_tensor.max_batch must be an integer"),
        (lambda d: d["input_tensor"].update(max_batch=True), "input_tensor.max_batch must be an integer"),
        (lambda d: d["input_tensor"].update(dtype="float32"), "input_tensor.dtype must be 'uint8'"),
        (lambda d: d["input_tensor"].update(shape=[-1, 64, 64]), "must be [N, H, W, 3]"),
        (lambda d: d["output_tensors"].reverse(), "outputs must be"),
        (lambda d: d["output_tensors"][0].update(shape=[-1, 1, 32, 32]), "does not match the input"),
        (lambda d: d.update(artifact_kind="pt"), "artifact_kind must be one of"),
        (lambda d: d.update(artifact_file="../x.onnx"), "bare file name"),
        (lambda d: d.update(checkpoint_sha256="xyz"), "64 lowercase hex"),
        (lambda d: d.update(categories="bottle"), "categories must be a list"),
        (lambda d: d.update(colour="BGR"), "unknown key(s) 'colour'"),
        (lambda d: d.update(engine_sha256="b" * 64), "must not carry engine_sha256"),
        (lambda d: d.update(artifact_kind="engine"), "engine must be present"),
        (lambda d: d["precision"].update(mode="int4"), "precision.mode must be one of"),
        (lambda d: d.update(image_threshold={"value": 1.0}), "'image_threshold.calibration' is missing"),
        (lambda d: d.update(schema_version=3), "reads versions 1, 2"),
        (lambda d: d.pop("category_head"), "category_head must be present exactly when"),
        (lambda d: d.update(output_tensors=d["output_tensors"][:2]), "category_head must be present exactly when"),
        (lambda d: d["output_tensors"][2].update(dtype="float32"), "output category dtype must be one of"),
        (lambda d: d["output_tensors"][3].update(dtype="int64"), "category_distance dtype must be 'float32'"),
        (lambda d: d["category_head"].update(method="knn"), "category_head.method must be one of"),
        (lambda d: d["category_head"].update(names=["a", "a"]), "must be distinct"),
        (lambda d: d["category_head"].update(separation=[0.1]), "one distance per name"),
        (lambda d: d.update(category_thresholds={"nut": {}}), "name ['nut'], which are not categories"),
        (lambda d: d.update(category_thresholds=[]), "category_thresholds must be an object"),
        (lambda d: d.update(category_thresholds={"screw": {"image_threshold": {"value": "x"}}}),
         "category_thresholds.screw.image_threshold.value must be a number"),
    ],
)
def test_validation_errors_are_one_sentence(mutate, message):
    with pytest.raises(ReconadError) as caught:
        Manifest.from_dict(_broken(mutate))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ReconadError, match="Cannot read manifest .*missing.json"):
        Manifest.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ReconadError, match="Invalid manifest .*bad.json: manifest is not valid JSON"):
        Manifest.load(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ReconadError, match="must be a JSON object"):
        Manifest.load(listed)


def test_check_artifact_sha256(tmp_path):
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"graph")
    manifest = make_manifest().stamp_artifact(artifact)
    check_artifact_sha256(manifest, artifact)
    artifact.write_bytes(b"graph!")
    with pytest.raises(ReconadError, match="does not match its manifest"):
        check_artifact_sha256(manifest, artifact)
    with pytest.raises(ReconadError, match="records no sha256"):
        check_artifact_sha256(manifest.embedded_copy(), artifact)


def test_model_config_must_be_json():
    with pytest.raises(ReconadError, match="model_config is not JSON-serialisable"):
        make_manifest(model_config={"bad": object()})
