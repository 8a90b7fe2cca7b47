"""Fitting: run folder contents, resume equals an uninterrupted run, best-checkpoint selection, config."""

import json

import numpy as np
import pytest
import torch

from reconad.model import load_detector
from reconad.runtime.errors import ReconadError
from reconad.train.config import RECIPES, read_train_config
from reconad.train.fit import fit
from reconad.train.data import load_mvtec
from reconad.train.evaluate import evaluate_checkpoint
from tests.train.conftest import tiny_train_config, write_cifar_batches


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_fit_writes_the_run(tiny_run, sample_data_root):
    run_dir = tiny_run.run_dir
    # A finished run keeps no resume.pt unless asked (--keep-resume).
    assert {p.name for p in run_dir.iterdir()} == {"model.ckpt", "config.json", "train_log.jsonl"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train_config"]["preset"] == "tiny" and config["model_config"]["preset"] == "tiny"
    assert config["categories"] == ["pill", "weave"] and config["num_train_images"] == 12
    assert config["feature_cache"] is True
    (record,) = _log(run_dir)
    assert record["epoch"] == 1 and record["loss"] > 0 and record["images_per_s"] > 0
    assert record["backbone_seconds"] == 0  # cached features: the backbone ran once, before the epochs
    detector = load_detector(run_dir / "model.ckpt")
    assert detector.provenance["categories"] == ["pill", "weave"]
    for saved, trained in zip(detector.reconstructor.parameters(), tiny_run.detector.reconstructor.parameters()):
        torch.testing.assert_close(saved, trained.cpu(), rtol=0, atol=0)
    # The category centroids, fitted on the (cached) training features: one per category, in name order.
    head = detector.provenance["category_head"]
    assert head["names"] == ["pill", "weave"] and head["n_images"] == [6, 6] and "12 training images" in head["source"]
    train_set = load_mvtec(sample_data_root, "train", (64, 64))
    with torch.no_grad():
        pooled = detector.pooled_features(detector.extract_features(torch.from_numpy(train_set.images)))
        for row, name in enumerate(head["names"]):
            keep = torch.tensor([c == name for c in train_set.categories])
            expected = torch.nn.functional.normalize(pooled[keep].mean(0), dim=0)
            torch.testing.assert_close(detector.category_centroids[row], expected, rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly_where_it_stopped(sample_data_root, tmp_path):
    straight = fit(sample_data_root, tmp_path / "straight", tiny_train_config(epochs=2))
    fit(sample_data_root, tmp_path / "split", tiny_train_config(epochs=1, lr_step_epochs=1, keep_resume=True))
    assert (tmp_path / "split" / "resume.pt").is_file()
    with pytest.raises(ReconadError, match="--resume"):
        fit(sample_data_root, tmp_path / "split", tiny_train_config(epochs=2))
    resumed = fit(sample_data_root, tmp_path / "split", tiny_train_config(epochs=2, lr_step_epochs=1), resume=True)
    # lr_step_epochs=1 is 80% of 2 epochs, so both runs share one schedule.
    for a, b in zip(straight.detector.reconstructor.parameters(), resumed.detector.reconstructor.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert [r["epoch"] for r in _log(tmp_path / "split")] == [1, 2]
    assert not (tmp_path / "split" / "resume.pt").exists()  # the resumed run finished without --keep-resume
    with pytest.raises(ReconadError, match="Nothing to resume.*--keep-resume"):
        fit(sample_data_root, tmp_path / "split", tiny_train_config(epochs=3, lr_step_epochs=1), resume=True)
    with pytest.raises(ReconadError, match="Nothing to resume"):
        fit(sample_data_root, tmp_path / "empty", tiny_train_config(), resume=True)


def test_selection_on_test_data_only_when_asked(sample_data_root, tmp_path):
    result = fit(sample_data_root, tmp_path / "run", tiny_train_config(epochs=3, val_every_epochs=2, select_on="test"))
    log = _log(tmp_path / "run")
    validated = [r for r in log if "val" in r]
    assert [r["epoch"] for r in validated] == [2, 3]  # every 2 epochs and at the end
    best = max(validated, key=lambda r: r["val"]["image_auroc"])
    assert result.best_epoch == best["epoch"]
    assert set(validated[0]["val"]["categories"]) == {"pill", "weave"}
    provenance = load_detector(tmp_path / "run" / "model.ckpt").provenance
    assert provenance["epoch"] == best["epoch"] and provenance["val_value"] == pytest.approx(best["val"]["image_auroc"])
    assert "test split" in provenance["selected_by"] and "test split" in result.selected_by


def test_by_default_no_selection_and_no_test_data(sample_data_root, tmp_path):
    result = fit(sample_data_root, tmp_path / "run", tiny_train_config(epochs=2, val_every_epochs=1))
    assert all("val" not in r and "heldout_error" not in r for r in _log(tmp_path / "run"))
    provenance = load_detector(result.checkpoint).provenance
    assert provenance["epoch"] == 2 and provenance["selected_by"] == "last epoch, no selection"
    assert result.best_epoch is None


def test_selection_on_held_out_good_training_images(sample_data_root, tmp_path):
    config = tiny_train_config(epochs=3, holdout_fraction=0.25, select_on="held-out", val_every_epochs=1)
    result = fit(sample_data_root, tmp_path / "run", config)
    log = _log(tmp_path / "run")
    assert all("val" not in r for r in log)  # the test split is never read
    errors = [r["heldout_error"] for r in log]
    assert len(errors) == 3 and result.best_epoch == 1 + int(np.argmin(errors))
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config["num_train_images"] == 8 and run_config["num_heldout_images"] == 4  # 2 of 6 per category
    provenance = load_detector(result.checkpoint).provenance
    assert provenance["epoch"] == result.best_epoch and "4 held-out good training images" in provenance["selected_by"]
    assert provenance["val_metric"] == "heldout_error" and provenance["val_value"] == pytest.approx(min(errors), abs=1e-6)
    with pytest.raises(ReconadError, match="holdout_fraction"):
        tiny_train_config(select_on="held-out")


def test_augmentation_runs_the_backbone_every_step(sample_data_root, tmp_path):
    fit(sample_data_root, tmp_path / "run", tiny_train_config(hflip=True, categories=("weave",)))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["feature_cache"] is False and config["categories"] == ["weave"]
    assert _log(tmp_path / "run")[0]["backbone_seconds"] > 0


def test_bad_preset_and_bad_data_are_reported(sample_data_root, tmp_path):
    with pytest.raises(ReconadError, match="Unknown preset"):
        fit(sample_data_root, tmp_path / "a", tiny_train_config(preset="resnet"))
    with pytest.raises(ReconadError, match="MVTec"):
        fit(tmp_path, tmp_path / "b", tiny_train_config())


def test_train_config_precedence(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text('[train]\nepochs = 7\nlearning_rate = 1\ncategories = ["pill"]\npreset = "lite0-256"\n')
    config = read_train_config(toml, epochs=3, seed=None)
    assert config.epochs == 3  # the flag wins over the file
    assert config.learning_rate == 1.0 and config.categories == ("pill",) and config.preset == "lite0-256"
    assert config.batch_size == RECIPES["budget"]["batch_size"]  # lite0-256's recipe where neither sets it
    toml.write_text("epochs = 'ten'\n")
    with pytest.raises(ReconadError, match="epochs"):
        read_train_config(toml)
    toml.write_text("epoch = 10\n")
    with pytest.raises(ReconadError, match=r"train config .*train.toml has unknown key\(s\) 'epoch'"):
        read_train_config(toml)


def test_cifar10_fit_and_evaluate(tmp_path):
    write_cifar_batches(tmp_path / "cifar" / "cifar-10-batches-py", np.random.default_rng(0), n_per_batch=8)
    result = fit(tmp_path / "cifar", tmp_path / "run", tiny_train_config(normal_classes=(0, 1, 2), val_every_epochs=1))
    provenance = load_detector(result.checkpoint).provenance
    assert provenance["categories"] == ["cifar10"] and provenance["normal_classes"] == [0, 1, 2]
    report = evaluate_checkpoint(result.checkpoint, tmp_path / "cifar", tmp_path / "report", device="cpu")
    metrics = report.result["categories"]["cifar10"]
    assert metrics["num_images"] == 8 and "pixel_auroc" not in metrics  # no masks: image metrics only
    assert "pixel AUROC" not in report.table
