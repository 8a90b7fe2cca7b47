"""profile_onnx.py on the tiny exported graph and its ort-cpu rewrite: interleaved profiles, the before/after table."""

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
