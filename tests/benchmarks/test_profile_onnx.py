"""profile_onnx.py on the tiny exported graph and its ort-cpu rewrite (interleaved profiles, the before/after table); bench_ort_cpu.py's ratios."""

import numpy as np
import onnx

from reconad.export.onnx import export_onnx
from reconad.export.ort_attention import fuse_attention
from reconad.runtime.manifest import reference_path_for
from tests.benchmarks.conftest import load_script


def test_both_graphs_are_profiled_interleaved_and_compared_by_op_type(tiny_checkpoint, tmp_path):
    profile = load_script("profile_onnx")
    (explicit,) = [p for p in export_onnx(tiny_checkpoint, tmp_path / "export", max_batch=1) if p.suffix == ".onnx"]
    fused = tmp_path / "fused.onnx"
    onnx.save(fuse_attention(onnx.load(explicit)), fused)
    images = np.load(reference_path_for(explicit))["images"][:1]
    profiles = profile.profile_sessions({"tensorrt": explicit, "ort-cpu": fused}, images, 2, 1, tmp_path)
    before, after = ({row["op_type"]: row for row in profiles[t]["ops"]} for t in ("tensorrt", "ort-cpu"))
    assert "Softmax" in before and "MultiHeadAttention" not in before
    assert "MultiHeadAttention" in after and "Softmax" not in after
    assert after["MultiHeadAttention"]["gflop_per_run"] > 0  # from the recorded query and key shapes
    assert all(len(p["wall_ms_per_run_all"]) == 2 for p in profiles.values())
    meta = {"preset": "tiny", "targets": ["tensorrt", "ort-cpu"], "batch": 1, "onnxruntime": "x", "ort_threads": 1,
            "cpu_count": 2, "runs": 2, "load_average_before": (1.0,), "load_average_after": (1.0,)}
    table = profile.render_tables({"meta": meta, "profiles": profiles, "wall_ratio_median": 1.1})
    assert "| op type (as run) | tensorrt ms | share | ort-cpu ms | share |" in table
    assert "median of the per-run ratios: 1.10x" in table and "### ort-cpu" in table
    assert not list(tmp_path.glob("ort_profile*"))  # the profiler's traces are removed once read


def test_bench_ort_cpu_ratios_are_per_round_against_fp32():
    bench = load_script("bench_ort_cpu")
    times = {"fp32": [200.0, 400.0, 210.0], "fp32-arena": [180.0, 380.0, 190.0], "ort-cpu": [160.0, 320.0, 175.0]}
    rows = bench.summarize(times)
    assert rows["fp32"]["vs_fp32_median"] == 1.0
    assert rows["ort-cpu"]["vs_fp32_median"] == 1.25  # 200/160, 400/320, 210/175 = 1.25, 1.25, 1.2
    assert rows["ort-cpu"]["ms_per_image_median"] == 175.0
    meta = {"preset": "tiny", "rounds": 3, "onnxruntime": "x", "cpu_count": 2}
    table = bench.render({"meta": meta, "batches": {"1": {"load_average_before": (0.5,), "load_average_after": (0.7,),
                                                          "variants": rows}}})
    assert "| 1 | ort-cpu | 175 | 1.25x | 1.23-1.25 | 0.5 / 0.7 |" in table
