"""recon-train sample-data / fit / evaluate: flags reach the functions; errors are one line, no traceback."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconad.runtime.errors import ReconadError
from reconad.train import cli
from reconad.train.config import TrainConfig

runner = CliRunner()


def test_sample_data_passes_seed_and_overwrite(monkeypatch, tmp_path):
    calls = []

    def fake_write(out, seed, overwrite):
        calls.append(dict(out=out, seed=seed, overwrite=overwrite))
        from reconad.train.sample_data import SampleDataSummary

        return SampleDataSummary(Path(out), 10, 4, ("weave",))

    monkeypatch.setattr("reconad.train.sample_data.write_sample_data", fake_write)
    result = runner.invoke(cli.app, ["sample-data", str(tmp_path / "d"), "--seed", "5", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert calls == [dict(out=tmp_path / "d", seed=5, overwrite=True)]
    assert "10 train and 4 test images" in result.output


def test_fit_flags_override_the_toml_file(monkeypatch, tmp_path):
    received = {}

    def fake_fit(data, out, config, resume):
        received.update(data=data, out=out, config=config, resume=resume)
        raise ReconadError("stop here")

    monkeypatch.setattr("reconad.train.fit.fit", fake_fit)
    toml = tmp_path / "t.toml"
    toml.write_text("epochs = 50\nbatch_size = 2\n")
    args = ["fit", "DATA", "--out", "RUN", "--preset", "lite0-256", "--config", str(toml), "--epochs", "5", "--lr",
            "0.001", "--categories", "pill, wood", "--normal-classes", "1,2", "--val-every-epochs", "0", "--hflip",
            "--resume"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2 and result.stderr == "stop here\n"
    assert received["resume"] is True and received["data"] == Path("DATA") and received["out"] == Path("RUN")
    assert received["config"] == TrainConfig(
        preset="lite0-256", epochs=5, batch_size=2, learning_rate=0.001, categories=("pill", "wood"),
        normal_classes=(1, 2), val_every_epochs=0, hflip=True,
    )


def test_fit_bad_value_is_one_line(tmp_path):
    result = runner.invoke(cli.app, ["fit", str(tmp_path), "--out", str(tmp_path / "r"), "--val-metric", "f1"])
    assert result.exit_code == 2  # refused while parsing: click's usage error, then one sentence
    assert result.output.strip().splitlines()[-1].endswith("'f1' is not one of 'image_auroc', 'pixel_auroc'.")
    assert "Traceback" not in result.output


def test_evaluate_end_to_end_and_missing_checkpoint(tiny_run, sample_data_root, tmp_path):
    result = runner.invoke(
        cli.app, ["evaluate", str(tiny_run.checkpoint), str(sample_data_root), "--out", str(tmp_path / "r"),
                  "--num-heatmaps", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "| **mean** |" in result.output and (tmp_path / "r" / "metrics.json").is_file()
    assert "| category | threshold | recall | false-alarm rate |" in result.output
    result = runner.invoke(cli.app, ["evaluate", str(tmp_path / "nope.ckpt"), str(sample_data_root), "--out", "x"])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["sample-data", "fit", "evaluate"])
def test_help(command):
    assert runner.invoke(cli.app, [command, "--help"]).exit_code == 0


def test_fit_recipe_budget_and_selection_flags_reach_the_config(monkeypatch):
    received = {}

    def fake_fit(data, out, config, resume):
        received.update(config=config)
        raise ReconadError("stop here")

    monkeypatch.setattr("reconad.train.fit.fit", fake_fit)
    args = ["fit", "DATA", "--out", "RUN", "--preset", "lite0-256", "--recipe", "official", "--minutes", "20",
            "--schedule", "cosine", "--warmup-epochs", "2", "--ema-decay", "0.9", "--select-on", "held-out",
            "--holdout-fraction", "0.2", "--keep-resume", "--quiet"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2 and result.stderr == "stop here\n"
    assert received["config"] == TrainConfig(
        preset="lite0-256", recipe="official", minutes=20.0, schedule="cosine", warmup_epochs=2.0, ema_decay=0.9,
        select_on="held-out", holdout_fraction=0.2, keep_resume=True,
    )
    assert received["config"].learning_rate == 1e-4  # the official recipe's where no flag sets it
    result = runner.invoke(cli.app, ["fit", "DATA", "--out", "RUN", "--select-on", "held-out"])
    assert result.exit_code == 2 and "holdout_fraction above 0" in result.output and "Traceback" not in result.output
