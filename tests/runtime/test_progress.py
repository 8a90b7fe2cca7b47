"""Progress of long steps: periodic plain lines off a terminal, nothing when quiet, on every long CLI step."""

import io
import time

import pytest
from typer.testing import CliRunner

from reconad.runtime import progress as progress_module
from reconad.runtime.progress import Progress, configure, format_seconds


@pytest.fixture(autouse=True)
def _reset_settings():
    saved = dict(progress_module._SETTINGS)
    yield
    progress_module._SETTINGS.update(saved)


def test_off_a_terminal_plain_lines_come_every_interval_with_done_total_and_eta():
    configure(quiet=False, interval=0.02, live=False)
    stream = io.StringIO()
    with Progress("caching features", 5, unit="images", rate_unit="img/s", stream=stream) as progress:
        for _ in range(5):
            time.sleep(0.03)
            progress.advance(1, loss=0.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 4  # periodic lines and the closing one
    assert lines[0].startswith("caching features: 1/5 images (20%)") and "img/s" in lines[0] and "ETA 0:00:00" in lines[0]
    assert "loss 0.5" in lines[0]
    assert lines[-1].startswith("caching features: 5/5 images in 0:00:00")


def test_a_long_interval_prints_only_the_closing_line():
    configure(quiet=False, interval=60, live=False)
    stream = io.StringIO()
    with Progress("evaluating", 3, unit="images", stream=stream) as progress:
        progress.advance(3)
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[0]]
    assert stream.getvalue().startswith("evaluating: 3/3 images in")


def test_quiet_prints_nothing():
    configure(quiet=True, interval=0.0, live=False)
    stream = io.StringIO()
    with Progress("epoch 1/3", 4, stream=stream) as progress, progress.heartbeat():
        for _ in range(4):
            progress.advance(1)
        time.sleep(0.05)
    progress_module.note("cached features", stream=stream)
    assert stream.getvalue() == ""


def test_heartbeat_keeps_lines_coming_during_one_blocking_call():
    configure(quiet=False, interval=0.02, live=False)
    stream = io.StringIO()
    with Progress("building the engine", None, stream=stream) as progress, progress.heartbeat():
        time.sleep(0.15)  # stands for build_serialized_network
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.startswith("building the engine:") for line in lines)
    assert "elapsed" in lines[0] and format_seconds(200) == "0:03:20"


def test_on_a_terminal_a_live_bar(monkeypatch):
    configure(quiet=False, interval=0.02, live=True)
    stream = io.StringIO()
    with Progress("epoch 2/5", 3, unit="batches", stream=stream) as progress:
        for _ in range(3):
            progress.advance(1, loss=0.25)
    assert progress._bar is not None and "epoch 2/5" in stream.getvalue() and "3/3" in stream.getvalue()


def test_fit_and_evaluate_show_progress_off_a_terminal_and_none_with_quiet(sample_data_root, tmp_path, monkeypatch):
    from reconad.train import cli

    monkeypatch.setenv("RECONAD_PROGRESS_SECONDS", "0")
    progress_module._SETTINGS.update(interval=None, live=False)
    runner = CliRunner()
    base = ["fit", str(sample_data_root), "--preset", "tiny", "--backbone-weights", "none", "--epochs", "2",
            "--batch-size", "4", "--device", "cpu"]
    loud = runner.invoke(cli.app, base + ["--out", str(tmp_path / "a")])
    assert loud.exit_code == 0, loud.output
    for expected in ("caching features: 4/12 images", "epoch 1/2: 1/3 batches (33%)", "ETA", "epoch 2/2: loss"):
        assert expected in loud.output
    quiet = runner.invoke(cli.app, base + ["--out", str(tmp_path / "b"), "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output.splitlines() == [line for line in quiet.output.splitlines() if line.startswith("wrote ")]
    evaluate = ["evaluate", str(tmp_path / "a" / "model.ckpt"), str(sample_data_root), "--out", str(tmp_path / "r"),
                "--num-heatmaps", "0", "--device", "cpu"]
    assert "evaluating: " in runner.invoke(cli.app, evaluate).output
    assert "evaluating: " not in runner.invoke(cli.app, evaluate + ["--quiet"]).output
