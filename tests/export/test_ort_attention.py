"""The ort-cpu export target: attention as com.microsoft.MultiHeadAttention, its own parity with PyTorch, its
manifest, the runtime running it unchanged, build-engine refusing it, and the TensorRT graph left as it was."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from reconad.export import onnx as export_module
from reconad.export import ort_attention
from reconad.export.cli import app
from reconad.export.onnx import ParityError, export_onnx
from reconad.export.ort_attention import CONTRIB_DOMAIN, FUSED_OP, fuse_attention
from reconad.model import ModelConfig, build_detector, save_checkpoint
from reconad.runtime.backends.ort import OrtBackend
from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Inspector
from reconad.runtime.manifest import IMAGE_SCORE_NAME, INPUT_NAME, Manifest, manifest_path_for, reference_path_for
from reconad.runtime.verify import compare_outputs, verify_artifact

runner = CliRunner()


@pytest.fixture(scope="module")
def biased_checkpoint(tmp_path_factory):
    """The tiny detector with every transformer bias, LayerNorm and embedding random (the official init zeroes
    the biases, which would hide a bias folded into the wrong head or projection)."""
    torch.manual_seed(1)
    detector = build_detector(ModelConfig.tiny()).eval()
    with torch.no_grad():
        for name, parameter in detector.reconstructor.named_parameters():
            if name.endswith("bias") or "norm" in name or "embed" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.5)
    return save_checkpoint(detector, tmp_path_factory.mktemp("biased") / "biased-run" / "model.ckpt")


@pytest.fixture(scope="module")
def ort_cpu_export(biased_checkpoint, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ort-cpu")
    return out_dir, export_onnx(biased_checkpoint, out_dir, precision="fp32", max_batch=4, target="ort-cpu")


def ops(model: onnx.ModelProto) -> Counter:
    return Counter((node.domain or "", node.op_type) for node in model.graph.node)


def test_the_ort_cpu_graph_has_one_fused_attention_per_softmax_and_its_own_manifest(ort_cpu_export):
    out_dir, paths = ort_cpu_export
    onnx_path = out_dir / "biased-run-64x64-fp32-ort-cpu.onnx"
    assert sorted(p.name for p in paths) == sorted(
        [onnx_path.name, "biased-run-64x64-fp32-ort-cpu.json", "biased-run-64x64-fp32-ort-cpu.reference.npz"]
    )
    model = onnx.load(onnx_path)
    config = ModelConfig.tiny()
    attentions = config.num_encoder_layers + 2 * config.num_decoder_layers
    counts = ops(model)
    assert counts[(CONTRIB_DOMAIN, FUSED_OP)] == attentions and counts[("", "Softmax")] == 0
    assert {entry.domain: entry.version for entry in model.opset_import}[CONTRIB_DOMAIN] == 1
    fused = [node for node in model.graph.node if node.op_type == FUSED_OP]
    assert all(node.input[3] for node in fused), "every projection bias folds into the op's bias input"
    masks = {node.input[5] for node in fused}
    assert len(masks) == 1 and "" not in masks  # one shared neighbour mask, [1, 1, L, L]
    manifest = Manifest.load(manifest_path_for(onnx_path))
    assert manifest.target == "ort-cpu" and manifest.precision.mode == "fp32"
    assert "MultiHeadAttention" in manifest.precision.description


def test_the_runtime_runs_it_unchanged_within_the_fp32_tolerances(ort_cpu_export):
    out_dir, _ = ort_cpu_export
    onnx_path = out_dir / "biased-run-64x64-fp32-ort-cpu.onnx"
    report = verify_artifact(onnx_path, "ort-cpu")  # recon-export verify's path: OrtBackend, fp32 tolerances
    assert report.passed, report.failures
    reference = dict(np.load(reference_path_for(onnx_path)))
    with OrtBackend(str(onnx_path), "ort-cpu", max_batch=4) as backend:
        single = backend.infer(reference["images"][:1])
    assert compare_outputs(single, {k: v[:1] for k, v in reference.items()}, precision="fp32", threshold=None).passed
    with Inspector.open(onnx_path, "ort-cpu", no_threshold=True) as inspector:  # recon-inspect run's opening path
        verdicts = inspector.inspect(reference["images"])
    scores = np.array([verdict.image_score for verdict in verdicts])
    np.testing.assert_allclose(scores, reference[IMAGE_SCORE_NAME], rtol=0, atol=1e-4)


def test_the_runtime_opens_it_with_the_memory_arena_and_the_tensorrt_graph_without(ort_cpu_export, tiny_export):
    out_dir, _ = ort_cpu_export
    onnx_path = out_dir / "biased-run-64x64-fp32-ort-cpu.onnx"

    def arena(path, **kwargs):
        with OrtBackend(str(path), "ort-cpu", **kwargs) as backend:
            return backend._session.get_session_options().enable_cpu_mem_arena

    assert arena(onnx_path) is True and arena(tiny_export.fp32) is False  # None: decided by the graph's target
    assert arena(onnx_path, memory_arena=False) is False and arena(tiny_export.fp32, memory_arena=True) is True


def test_the_rewrite_matches_the_explicit_graph_and_leaves_it_untouched(tiny_export):
    explicit = tiny_export.load("fp32")
    before = explicit.SerializeToString()
    fused = fuse_attention(explicit)
    assert explicit.SerializeToString() == before
    assert all(entry.domain != CONTRIB_DOMAIN for entry in explicit.opset_import)
    images = np.load(reference_path_for(tiny_export.fp32))["images"]
    with OrtBackend(explicit.SerializeToString(), "ort-cpu", max_batch=4) as a, OrtBackend(
        fused.SerializeToString(), "ort-cpu", max_batch=4
    ) as b:
        want, got = a.infer(images), b.infer(images)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5, err_msg=name)


def test_a_wrong_fusion_is_caught_by_the_parity_check_and_nothing_is_written(biased_checkpoint, tmp_path, monkeypatch):
    real = ort_attention.fuse_attention

    def biases_dropped(model):  # what folding the projection biases wrongly would do
        fused = real(model)
        for node in fused.graph.node:
            if node.op_type == FUSED_OP:
                node.input[3] = ""
        return fused

    monkeypatch.setattr(export_module, "fuse_attention", biases_dropped)
    with pytest.raises(ParityError, match="fp32 ort-cpu graph .* does not match PyTorch"):
        export_onnx(biased_checkpoint, tmp_path / "out", precision="fp32", max_batch=2, target="ort-cpu")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_graph_not_in_the_explicit_form_is_refused_in_one_sentence(tiny_export):
    model = tiny_export.load("fp32")
    transpose = next(n for n in model.graph.node if n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 2, 3, 1])
    transpose.attribute[0].ints[:] = [0, 2, 1, 3]  # the keys no longer transposed for Q.K^T
    with pytest.raises(ReconadError, match=r"^The attention at .* is not in the exported explicit form .*\.$"):
        fuse_attention(model)
    no_attention = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    ))
    with pytest.raises(ReconadError, match="has no Softmax"):
        fuse_attention(no_attention)


def test_bad_target_arguments_fail_before_any_work(tiny_checkpoint, tmp_path):
    with pytest.raises(ReconadError, match=r"^The ort-cpu target is an fp32 graph only .* not fp16: export it with --precision fp32\.$"):
        export_onnx(tiny_checkpoint, tmp_path, precision="fp16", target="ort-cpu")
    with pytest.raises(ReconadError, match="Target must be one of"):
        export_onnx(tiny_checkpoint, tmp_path, target="tensorrt-8")
    result = runner.invoke(app, ["to-onnx", str(tiny_checkpoint), "--out", str(tmp_path), "--target", "trt"])
    assert result.exit_code == 2 and "'trt' is not one of 'tensorrt', 'ort-cpu'." in result.output
    assert list(tmp_path.iterdir()) == []


def test_build_engine_refuses_the_ort_cpu_graph_in_one_sentence(ort_cpu_export):
    out_dir, _ = ort_cpu_export
    result = runner.invoke(app, ["build-engine", str(out_dir / "biased-run-64x64-fp32-ort-cpu.onnx")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1
    assert "is the ort-cpu graph" in result.stderr and "exported without --target" in result.stderr


def test_the_tensorrt_graph_stays_plain_onnx(tiny_export):
    for precision in ("fp32", "fp16"):
        model = tiny_export.load(precision)
        assert all(entry.domain in ("", "ai.onnx") for entry in model.opset_import)
        assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
        assert Manifest.load(manifest_path_for(tiny_export.fp32)).target == "tensorrt"
    session_inputs = [i.name for i in tiny_export.load("fp32").graph.input]
    assert session_inputs == [INPUT_NAME]
