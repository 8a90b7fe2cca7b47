import json

import numpy as np
import pytest

from reconad.train.data import load_mvtec
from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_quality")


def test_holdout_split_is_per_category_and_disjoint(bench, tiny_real_set):
    train = load_mvtec(tiny_real_set, "train", (64, 64))
    fit_idx, held_idx = bench.split_holdout(train, 0.3, seed=0)
    assert not set(fit_idx) & set(held_idx) and len(fit_idx) + len(held_idx) == len(train)
    for category in train.category_names:
        assert sum(train.categories[i] == category for i in held_idx) == 2  # round(0.3 * 6)
    again, _ = bench.split_holdout(train, 0.3, seed=0)
    assert np.array_equal(fit_idx, again)


def test_tiny_benchmark_writes_json_table_and_curve(bench, tiny_real_set, tmp_path):
    run_dir = tmp_path / "run"
    code = bench.main([str(tiny_real_set), "--preset", "tiny", "--backbone-weights", "none", "--epochs", "2",
                       "--batch-size", "4", "--holdout", "0.3", "--knn-subsample", "random", "--knn-bank-fraction", "0.5",
                       "--run-dir", str(run_dir), "--out-dir", str(tmp_path), "--tag", "tiny"])
    assert code == 0
    report = json.loads((tmp_path / "quality-tiny.json").read_text())
    assert (tmp_path / "quality-tiny-curve.png").stat().st_size > 1000
    table = (tmp_path / "quality-tiny.md").read_text()
    assert "| brick |" in table and "| gravel |" in table and "(selected)" in table

    meta, knn, uniad = report["meta"], report["knn"], report["uniad"]
    assert meta["num_fit_images"] == 8 and meta["num_heldout_images"] == 4 and meta["num_test_images"] == 16
    assert meta["real_set"]["image_size"] == 64
    # UniAD trained on the fit images only: the held-out goods never reached fit()
    assert json.loads((run_dir / "config.json").read_text())["num_train_images"] == 8
    assert knn["bank_patches"] == round(0.5 * knn["training_patches"]) and knn["training_patches"] == 8 * 64
    for result in (knn["metrics"], uniad["selected"], uniad["last"]):
        for key in ("image_auroc", "pixel_auroc", "au_pro"):
            assert 0.0 <= result["mean"][key] <= 1.0
        assert set(result["categories"]) == {"brick", "gravel"}
    curve = uniad["curve"]
    assert [p["epoch"] for p in curve] == [1, 2]
    assert 0 < curve[0]["minutes"] < curve[1]["minutes"] <= uniad["total_minutes"]
    best = min(curve, key=lambda p: p["heldout_error"])
    assert uniad["selected_epoch"] == best["epoch"] and uniad["selected"] == best["test"]


def test_bad_arguments_are_one_line(bench, tiny_real_set, tmp_path, capsys):
    assert bench.main([str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == 2
    assert bench.main([str(tiny_real_set), "--no-knn", "--no-uniad", "--out-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
