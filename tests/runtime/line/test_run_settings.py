"""recon-inspect run --config FILE: every run option can come from a TOML file, flags win, unknown keys and
wrong types are refused in one sentence naming the key."""

import json
import os
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from reconad.runtime.cli import app
from reconad.runtime.errors import ReconadError
from reconad.runtime.line.run_settings import RunSettings, read_run_settings
from tests.runtime.test_cli import artifact_with_threshold, image_folder, read_verdicts

runner = CliRunner()


def test_every_run_option_is_a_settings_key():
    """--config FILE holds any run option: the record has a field for each, by the same name."""
    run = typer.main.get_command(app).commands["run"]
    options = {param.name for param in run.params} - {"config", "help"}
    assert options == {field for field in RunSettings.__dataclass_fields__}


def test_defaults_then_the_file_then_the_flags(tmp_path):
    config = tmp_path / "line1.toml"
    config.write_text(
        '[run]\nsource = "csi://0"\nmax_frames = 100\nbatch_size = 2\noutput = ["line.mp4"]\nblack_level = 12\n'
        'mqtt = "mqtt://broker/line1"\nmqtt_qos = 2\nflip = "rotate-180"\nloop = true\nbackend = "ort-cpu"\n'
    )
    settings = read_run_settings(config, {"max_frames": 5, "out": Path("/var/log/reconad"), "mqtt_qos": None})
    assert settings.source == "csi://0" and settings.backend == "ort-cpu" and settings.loop is True
    inspect = settings.inspect_config()
    assert inspect.max_frames == 5  # the flag wins
    assert inspect.batch_size == 2 and inspect.outputs == ("line.mp4",) and inspect.out == Path("/var/log/reconad")
    assert inspect.blind.black_level == 12 and inspect.blind.saturated_level == 225  # the rest keep their defaults
    assert inspect.mqtt.uri == "mqtt://broker/line1" and inspect.mqtt.qos == 2  # None: not given, the file's stays
    assert inspect.queue_size == 4 and settings.source_config().flip == "rotate-180"
    flat = tmp_path / "flat.toml"
    flat.write_text('source = "rtsp://cam/stream"\n')  # the top level works as well as a [run] table
    assert read_run_settings(flat, {}).source == "rtsp://cam/stream"


@pytest.mark.parametrize(
    "text, message",
    [
        ('colour = "red"\n', "run config {path} has unknown key(s) 'colour' (known: source, model,"),
        ("max_frames = '10'\n", "run config {path} key max_frames must be an integer, got '10'"),
        ("output = 'line.mp4'\n", "run config {path} key output must be a list, got 'line.mp4'"),
        ("no_threshold = 1\n", "run config {path} key no_threshold must be true or false, got 1"),
        ("max_frames = \n", "Run config {path} is not valid TOML"),
    ],
)
def test_bad_files_are_one_sentence_naming_the_key(tmp_path, text, message):
    config = tmp_path / "line.toml"
    config.write_text('source = "x"\n' + text)
    with pytest.raises(ReconadError) as caught:
        read_run_settings(config, {})
    assert str(caught.value).startswith(message.format(path=config))
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2 and result.stderr.startswith(message.format(path=config))
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_source_is_needed_from_the_command_line_or_the_file(tmp_path):
    result = runner.invoke(app, ["run", "--max-frames", "1"])
    assert result.exit_code == 2 and result.stderr.strip() == "Give the SOURCE to inspect on the command line."
    config = tmp_path / "line.toml"
    config.write_text("max_frames = 1\n")
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.stderr.strip() == f"Give the SOURCE to inspect on the command line or as source in {config}."


def test_run_from_a_config_file_with_flags_on_top(tmp_path):
    folder, artifact, out = image_folder(tmp_path), artifact_with_threshold(tmp_path), tmp_path / "out"
    config = tmp_path / "line.toml"
    config.write_text(f'[run]\nsource = "{folder}"\nmodel = "{artifact}"\nthreshold = 0.99\nbatch_size = 2\n'
                      f'out = "{tmp_path / "elsewhere"}"\noverlays = "none"\n')
    result = runner.invoke(app, ["run", "--config", str(config), "--out", str(out), "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    assert "3 frames inspected on ort-cpu: 2 anomalous" in result.stdout
    verdicts = read_verdicts(out)  # --out and --threshold from the flags, the rest from the file
    assert verdicts["good/dark.png"]["threshold"] == 0.5 and not (tmp_path / "elsewhere").exists()
    assert verdicts["bad/bright.jpg"]["is_anomalous"] is True and verdicts["bad/bright.jpg"]["overlay"] is None


@pytest.mark.parametrize("threads", [0, -1, 100000])
def test_num_threads_from_a_config_file_is_checked_like_the_flag(tmp_path, threads):
    """--num-threads 0 was refused, num_threads = 0 (or 1000) in a TOML file ran anyway (1000 threads on two
    cores: 2.1 fps)."""
    folder, artifact = image_folder(tmp_path), artifact_with_threshold(tmp_path)
    config = tmp_path / "line.toml"
    config.write_text(f'[run]\nsource = "{folder}"\nmodel = "{artifact}"\nnum_threads = {threads}\n')
    result = runner.invoke(app, ["run", "--config", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"num_threads must be between 1 and the {len(os.sched_getaffinity(0))} cores this process can use, got {threads}." in result.output
    assert "Traceback" not in result.output


def test_summary_records_the_threads_inference_ran_with(tmp_path):
    folder, artifact = image_folder(tmp_path), artifact_with_threshold(tmp_path)
    for flags, expected in ((["--num-threads", "1"], 1), ([], "all cores")):
        out = tmp_path / f"out{expected}"
        result = runner.invoke(app, ["run", str(folder), "--model", str(artifact), "--out", str(out), "--overlays", "none", *flags])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "summary.json").read_text())["num_threads"] == expected
