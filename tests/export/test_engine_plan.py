"""The precision policy per TensorRT version, build-option gates and parser messages (no TensorRT needed)."""

import pytest

from reconad.export.build_config import BuildConfig
from reconad.export.builder import describe_parser_errors
from reconad.export.precision_plan import check_build_options, plan_precision
from reconad.runtime.errors import ReconadError


@pytest.mark.parametrize("version", [(8, 5, 2, 2), (8, 6, 2, 3), (9, 3, 0)])
def test_fp16_before_10_is_the_fp32_graph_with_fp16_flag_and_obeyed_island_constraints(version):
    plan = plan_precision(version, "fp16")
    assert plan.onnx_precision == "fp32"
    assert plan.explicit_batch_flag and not plan.strongly_typed
    assert plan.fp16_flag and plan.constrain_islands
    assert plan.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert not plan.disable_tf32


@pytest.mark.parametrize("version", [(10, 0, 1), (10, 3, 0, 26), (10, 12, 0), (10, 13, 3)])
def test_fp16_on_10_is_strongly_typed_from_the_fp16_graph(version):
    plan = plan_precision(version, "fp16")
    assert plan.onnx_precision == "fp16" and plan.strongly_typed
    assert plan.builder_flags == () and not plan.explicit_batch_flag and not plan.constrain_islands
    assert "strongly typed" in plan.description


def test_weak_typing_on_10_is_available_before_10_12_only():
    weak = plan_precision((10, 11, 0), "fp16", "weak")
    assert weak.onnx_precision == "fp32" and not weak.strongly_typed
    assert weak.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert not weak.explicit_batch_flag  # EXPLICIT_BATCH is deprecated and ignored from 10 on
    with pytest.raises(ReconadError, match="deprecated"):
        plan_precision((10, 12, 0), "fp16", "weak")


@pytest.mark.parametrize("version", [(11, 0, 0), (11, 4, 0, 106)])
def test_11_is_strongly_typed_only(version):
    plan = plan_precision(version, "fp16")
    assert plan.strongly_typed and plan.onnx_precision == "fp16"
    assert "FP16" not in plan.builder_flags
    with pytest.raises(ReconadError, match="removed"):
        plan_precision(version, "fp16", "weak")


def test_strong_typing_is_refused_before_10():
    with pytest.raises(ReconadError, match="TensorRT 10 or later; this is TensorRT 8.6.2"):
        plan_precision((8, 6, 2), "fp16", "strong")


def test_fp32_engines_use_the_fp32_graph_without_tf32():
    old, new = plan_precision((8, 5, 2), "fp32"), plan_precision((11, 0, 0), "fp32")
    assert old.onnx_precision == new.onnx_precision == "fp32"
    assert old.builder_flags == () and not old.constrain_islands and old.explicit_batch_flag
    assert new.strongly_typed
    assert old.disable_tf32 and new.disable_tf32


def test_versions_older_than_8_5_and_unknown_choices_are_refused():
    with pytest.raises(ReconadError, match="older than 8.5"):
        plan_precision((8, 4, 3), "fp16")
    with pytest.raises(ReconadError, match="Precision must be one of"):
        plan_precision((10, 3), "int4")
    with pytest.raises(ReconadError, match="Network typing"):
        plan_precision((10, 3), "fp16", "loose")


def test_build_options_new_in_8_6_are_refused_on_8_5():
    check_build_options((8, 5, 2), BuildConfig())
    check_build_options((8, 6, 2), BuildConfig(version_compatible=True, builder_optimization_level=5))
    for option in ({"version_compatible": True}, {"hardware_compatible": True}, {"builder_optimization_level": 2}):
        with pytest.raises(ReconadError, match="needs TensorRT 8.6"):
            check_build_options((8, 5, 2), BuildConfig(**option))


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_8_5_decomposes_layer_normalization_its_parser_lacks_and_later_versions_do_not(precision):
    old = plan_precision((8, 5, 2, 2), precision)
    assert old.decompose_layer_norm and "LayerNormalization decomposed" in old.description
    assert old.constrain_islands == (precision == "fp16")  # the decomposed LayerNorms are islands like the op
    for version in ((8, 6, 1), (9, 3, 0), (10, 3, 0), (11, 0, 0)):
        plan = plan_precision(version, precision)
        assert not plan.decompose_layer_norm and "decomposed" not in plan.description


def test_parser_errors_read_as_one_sentence():
    errors = [
        {"desc": "No importer registered for op: Foo.\n", "node": 3, "node_name": "/head/Foo", "operator": "Foo"},
        {"desc": "second"},
    ]
    message = describe_parser_errors("model.onnx", "10.3.0", errors)
    assert message == (
        "TensorRT 10.3.0 could not parse model.onnx at node /head/Foo (Foo): No importer registered for op: Foo; "
        "1 more error(s) above."
    )
    assert "at node #7" in describe_parser_errors("m.onnx", "8.5.2", [{"desc": "bad", "node": 7}])
    assert "gave no reason" in describe_parser_errors("m.onnx", "8.5.2", [])
