"""From file to score, one path: the image scores `recon-train evaluate` reports are the scores
`recon-inspect run` computes, image by image, for every kind of file; and the evaluation cases whose
labels or masks are incomplete (no masks, one class), file modes, and runs that fail before a frame."""

import csv
import json
import os
import shutil
import stat

import numpy as np
import pytest
from typer.testing import CliRunner

from reconad.runtime.verify import TOLERANCES
from tests.image_files import with_exif_orientation, write_16bit_png, write_palette_png, write_rgb

runner = CliRunner()


def texture(height, width, seed):
    """A smooth texture with noise, so resizing filters make a difference."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = (0.5 + 0.3 * np.sin(12 * xx + 5 * yy))[..., None] * rng.uniform(120, 250, 3)
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def write_odd_set(root):
    """An MVTec-layout category whose test images are of every kind a user's folder holds."""
    part = root / "part"
    write_rgb(part / "train" / "good" / "000.png", texture(64, 64, 0))
    good = part / "test" / "good"
    write_rgb(good / "wide.png", texture(100, 256, 1))  # non-square, larger along one axis only
    write_rgb(good / "tall.PNG", texture(300, 90, 2))  # upper-case suffix, both cases of mixed resize
    write_rgb(good / "large.png", texture(400, 480, 3))
    write_rgb(good / "small.png", texture(40, 48, 4))
    with_exif_orientation(good / "tablet.jpg", np.ascontiguousarray(np.rot90(texture(96, 160, 5))), 6)
    write_palette_png(good / "palette.png", np.repeat(np.repeat(texture(16, 16, 6), 4, 0), 4, 1))
    write_rgb(good / "gray.png", texture(70, 70, 7)[..., 0])
    write_rgb(good / "rgba.png", np.dstack([texture(64, 80, 8), np.full((64, 80), 200, np.uint8)]))
    write_16bit_png(good / "mono12.png", texture(64, 64, 9)[..., 0].astype(np.uint16) * 16, significant_bits=12)
    write_16bit_png(good / "full16.png", texture(64, 64, 10)[..., 1].astype(np.uint16) * 257)
    dent = texture(120, 200, 11)
    dent[40:70, 80:130] = 20
    write_rgb(part / "test" / "dent" / "000.png", dent)
    mask = np.zeros((120, 200), np.uint8)
    mask[40:70, 80:130] = 255
    write_rgb(part / "ground_truth" / "dent" / "000_mask.png", mask)
    return part


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    from reconad.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("export")
    (onnx_path,) = [path for path in export_onnx(tiny_checkpoint, out, precision="fp32") if path.suffix == ".onnx"]
    return onnx_path


def test_evaluate_and_run_give_the_same_score_for_every_kind_of_file(tiny_checkpoint, exported, tmp_path):
    from reconad.runtime.cli import app as inspect_app
    from reconad.train.cli import app as train_app

    part = write_odd_set(tmp_path / "data")
    evaluated = runner.invoke(train_app, ["evaluate", str(tiny_checkpoint), str(tmp_path / "data"),
                                          "--out", str(tmp_path / "report"), "--device", "cpu", "--num-heatmaps", "0"])
    assert evaluated.exit_code == 0, evaluated.output
    with open(tmp_path / "report" / "scores.csv") as handle:
        by_evaluate = {row["name"].removeprefix("part/test/"): float(row["image_score"]) for row in csv.DictReader(handle)}
    ran = runner.invoke(inspect_app, ["run", str(part / "test"), "--model", str(exported), "--out", str(tmp_path / "line"),
                                      "--stats-interval-s", "0", "--backend", "ort-cpu", "--no-threshold"])  # scores only
    assert ran.exit_code == 0, ran.output
    lines = [json.loads(line) for line in (tmp_path / "line" / "verdicts.jsonl").read_text().splitlines()]
    by_run = {line["file"]: line["image_score"] for line in lines}
    assert sorted(by_run) == sorted(by_evaluate) and len(by_run) == 11  # every file found, none unreadable
    reference = np.load(exported.with_name(exported.stem + ".reference.npz"))["anomaly_map"]
    limit = TOLERANCES["fp32"].score_max_abs * max(1.0, float(np.ptp(reference)))
    for name, score in by_evaluate.items():
        assert abs(by_run[name] - score) <= limit, (name, by_run[name], score)
    # the scores differ between files: the comparison is not between constants
    assert np.ptp(list(by_evaluate.values())) > 100 * limit


def test_a_category_without_masks_is_evaluated_from_its_folder_labels(tiny_run, sample_data_root, tmp_path):
    from reconad.train.evaluate import evaluate_checkpoint

    data = tmp_path / "data"
    shutil.copytree(sample_data_root, data)
    shutil.rmtree(data / "weave" / "ground_truth")
    report = evaluate_checkpoint(tiny_run.checkpoint, data, tmp_path / "report", device="cpu", num_heatmaps=1)
    weave, pill = report.result["categories"]["weave"], report.result["categories"]["pill"]
    assert np.isfinite(weave["image_auroc"]) and "pixel_auroc" not in weave and "au_pro" not in weave
    assert np.isfinite(pill["pixel_auroc"]) and report.result["mean"]["pixel_auroc"] == pill["pixel_auroc"]
    assert any(note.startswith("weave: no ground-truth masks") for note in report.notes)
    payload = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert payload["categories"]["weave"]["num_anomalous"] == 4


def test_a_category_where_only_some_masks_are_missing_still_stops(tiny_run, sample_data_root, tmp_path):
    from reconad.runtime.errors import ReconadError
    from reconad.train.evaluate import evaluate_checkpoint

    data = tmp_path / "data"
    shutil.copytree(sample_data_root, data)
    sorted((data / "weave" / "ground_truth").rglob("*.png"))[0].unlink()
    with pytest.raises(ReconadError, match="has no ground-truth mask"):
        evaluate_checkpoint(tiny_run.checkpoint, data, tmp_path / "report", device="cpu")


def test_a_one_class_test_split_reports_na_and_stays_out_of_the_mean(tiny_run, sample_data_root, tmp_path):
    from reconad.train.evaluate import evaluate_checkpoint

    data = tmp_path / "data"
    shutil.copytree(sample_data_root, data)
    shutil.rmtree(data / "pill" / "test" / "good")  # defect images only
    report = evaluate_checkpoint(tiny_run.checkpoint, data, tmp_path / "report", device="cpu", num_heatmaps=1)
    pill, weave = report.result["categories"]["pill"], report.result["categories"]["weave"]
    for key in ("image_auroc", "image_ap", "image_f1_max"):
        assert np.isnan(pill[key]), key  # once: AP = F1-max = 1.0, averaged into the mean
        assert report.result["mean"][key] == pytest.approx(weave[key]), key
    assert any(note.startswith("pill: image AUROC, image AP, image F1-max n/a") for note in report.notes)
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["categories"]["pill"]["image_ap"] is None


def test_files_written_atomically_follow_the_umask(tiny_checkpoint, tmp_path):
    from reconad.export.onnx import write_files_atomically
    from reconad.model import load_detector, save_checkpoint
    from reconad.runtime.atomic import write_text_atomic
    from reconad.train.sample_data import SampleDataConfig, write_sample_data

    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "summary.json", "{}")
        write_files_atomically({tmp_path / "m.onnx": b"x", tmp_path / "m.json": b"{}"})
        save_checkpoint(load_detector(tiny_checkpoint), tmp_path / "model.ckpt")
        write_sample_data(tmp_path / "data", config=SampleDataConfig(image_size=32, num_train=1, num_test_good=1,
                                                                      num_test_per_defect=1, categories=("weave",)))
        for name in ("summary.json", "m.onnx", "m.json", "model.ckpt"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
        assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o755
        os.umask(0o077)
        write_text_atomic(tmp_path / "private.json", "{}")
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


@pytest.mark.parametrize("kind", ["unopenable video", "missing model"])
def test_a_run_that_fails_before_its_first_frame_leaves_a_summary_that_says_so(exported, tmp_path, kind):
    from reconad.runtime.cli import app as inspect_app

    source, model = tmp_path / "broken.mp4", exported
    source.write_bytes(b"not a video at all")
    if kind == "missing model":
        source, model = tmp_path / "frames", tmp_path / "absent.onnx"
        write_rgb(source / "000.png", texture(64, 64, 0))
    out = tmp_path / "out"
    result = runner.invoke(inspect_app, ["run", str(source), "--model", str(model), "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert sorted(path.name for path in out.iterdir()) == ["summary.json"]  # no empty verdicts.jsonl, no overlays/
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "failure" and summary["failure"] and summary["source"] == str(source)
