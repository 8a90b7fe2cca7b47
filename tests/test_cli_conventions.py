"""The conventions of every recon-* app (reconad/runtime/cli_common.py): every option's default in --help as
written, --version, fixed choices as click choices (shell completion, one sentence on a wrong value) with the
spellings the library accepts."""

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

import reconad
from reconad.export import cli as export_cli
from reconad.runtime import cli as inspect_cli
from reconad.train import cli as train_cli

APPS = {"recon-train": train_cli.app, "recon-export": export_cli.app, "recon-inspect": inspect_cli.app}
runner = CliRunner()

# Options whose absence means "not used": no value stands in for them, so their help names no default.
NOT_USED_WHEN_ABSENT = {
    ("recon-train", "fit", "--config"),
    ("recon-train", "evaluate", "--manifest"),
    ("recon-inspect", "calibrate", "--category"),
    ("recon-inspect", "run", "--config"),
    ("recon-inspect", "run", "--model"),
    ("recon-inspect", "run", "--server"),
    ("recon-inspect", "run", "--out"),
    ("recon-inspect", "run", "--threshold"),
    ("recon-inspect", "run", "--category"),
    ("recon-inspect", "run", "--webhook"),
    ("recon-inspect", "run", "--webhook-header"),
    ("recon-inspect", "run", "--output"),
    ("recon-inspect", "run", "--mqtt"),
    ("recon-inspect", "run", "--mqtt-cert-file"),
    ("recon-inspect", "run", "--mqtt-key-file"),
    ("recon-inspect", "run", "--metrics-port"),
    ("recon-inspect", "doctor", "--for"),
    ("recon-inspect", "doctor", "--source"),
    ("recon-inspect", "doctor", "--environment"),
}


def commands():
    for app_name, app in APPS.items():
        group = typer.main.get_command(app)
        for name, command in group.commands.items():
            yield app_name, app, name, command


def option_help(command, name: str) -> str:
    context = typer.Context(command, info_name=name)
    return {param.opts[0]: param.get_help_record(context)[1] for param in command.params if param.param_type_name == "option"}


def rendered_help(app, command: str) -> str:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_every_option_shows_its_default_in_the_rendered_help():
    missing, not_rendered = [], []
    for app_name, app, name, command in commands():
        text = rendered_help(app, name)
        for param in command.params:
            if param.param_type_name != "option" or param.name == "help" or param.required:
                continue
            if param.is_flag and not param.secondary_opts:  # a plain flag is off unless given
                continue
            help_text = " ".join(param.get_help_record(typer.Context(command, info_name=name))[1].split())
            if help_text not in text:
                not_rendered.append((app_name, name, param.opts[0]))
            if "[default: " not in help_text and (app_name, name, param.opts[0]) not in NOT_USED_WHEN_ABSENT:
                missing.append((app_name, name, param.opts[0], help_text))
    assert missing == [] and not_rendered == []


def test_markup_like_text_survives_in_help():
    """Rich markup used to eat "[default: 0.01]" and "[user@]" (the issue's "...on good images .")."""
    calibrate = rendered_help(inspect_cli.app, "calibrate")
    assert "False-positive rate allowed on good images [default: 0.01]." in calibrate
    assert "--backend <auto|ort|ort-cpu|ort-cuda|ort-trt|trt>" in calibrate and "[default: auto]" in calibrate
    assert "mqtt://[user@]host[:port]/topic" in rendered_help(inspect_cli.app, "run")
    assert "AdamW peak rate [default: the recipe's]." in rendered_help(train_cli.app, "fit")
    evaluate = option_help(typer.main.get_command(train_cli.app).commands["evaluate"], "evaluate")
    assert "[default: 0.01]" in evaluate["--max-fpr"]


def field_defaults(*records) -> dict[str, object]:
    defaults = {}
    for record in records:
        for field in dataclasses.fields(record):
            if field.default is not dataclasses.MISSING and field.default is not None:
                defaults.setdefault(field.name, field.default)
    return defaults


def shown(value: object) -> str:
    return f"[default: {value:g}]" if isinstance(value, float) else f"[default: {value}]"


@pytest.mark.parametrize("command", ["run", "calibrate", "serve"])
def test_the_defaults_written_in_help_are_the_records_defaults(command):
    """The options default to None ("not given", so a file can set them); the help states the record's default."""
    from reconad.runtime.calibration import CalibrationConfig
    from reconad.runtime.line.blind import BlindConfig
    from reconad.runtime.line.config import InspectConfig
    from reconad.runtime.line.mqtt import MqttConfig
    from reconad.runtime.line.sources import SourceConfig
    from reconad.runtime.serve import ServeConfig

    records = {"run": (InspectConfig, SourceConfig, BlindConfig), "calibrate": (CalibrationConfig,), "serve": (ServeConfig,)}
    defaults = field_defaults(*records[command])
    if command == "run":
        defaults |= {f"mqtt_{name}": value for name, value in field_defaults(MqttConfig).items()}
    group = typer.main.get_command(inspect_cli.app)
    helps = option_help(group.commands[command], command)
    checked = []
    for param in group.commands[command].params:
        value = defaults.get(param.name)
        if param.param_type_name == "option" and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            assert shown(value) in helps[param.opts[0]], (param.name, value, helps[param.opts[0]])
            checked.append(param.name)
    assert len(checked) >= {"run": 15, "calibrate": 3, "serve": 3}[command], checked


@pytest.mark.parametrize("name", sorted(APPS))
def test_version_on_every_app(name):
    result = runner.invoke(APPS[name], ["--version"])
    assert result.exit_code == 0 and result.output == f"{name} {reconad.__version__}\n"


def test_the_package_version_is_the_distribution_version():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(reconad.__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["version"] == reconad.__version__


def values(enum_type) -> tuple[str, ...]:
    return tuple(member.value for member in enum_type)


def test_the_choices_are_the_spellings_the_library_accepts():
    from reconad.export.build_config import NETWORK_TYPINGS, PRECISIONS
    from reconad.export.onnx import PRECISION_CHOICES
    from reconad.export.triton import INSTANCE_KINDS
    from reconad.model import PRESETS
    from reconad.runtime.calibration import NORMALIZE_CHOICES
    from reconad.runtime.doctor import TARGETS
    from reconad.runtime.inspector import BACKEND_CHOICES
    from reconad.runtime.line.blind import BLIND_CHECKS
    from reconad.runtime.line.mqtt import EVENTS
    from reconad.runtime.line.sinks import OVERLAY_MODES
    from reconad.runtime.line.pipelines import FLIP_METHODS, V4L2_CODECS
    from reconad.runtime.manifest import GRAPH_TARGETS
    from reconad.train.config import VAL_METRICS

    assert values(inspect_cli.Backend) == BACKEND_CHOICES == values(export_cli.Backend)
    assert values(inspect_cli.Normalize) == NORMALIZE_CHOICES
    assert values(inspect_cli.Overlays) == OVERLAY_MODES
    assert values(inspect_cli.MqttEvents) == EVENTS
    assert values(inspect_cli.BlindChecks) == BLIND_CHECKS
    assert values(inspect_cli.Flip) == tuple(FLIP_METHODS)
    assert values(inspect_cli.Codec) == V4L2_CODECS
    assert values(inspect_cli.Target) == TARGETS
    assert values(export_cli.Precision) == PRECISION_CHOICES
    assert values(export_cli.Target) == GRAPH_TARGETS
    assert values(export_cli.EnginePrecision) == PRECISIONS
    assert values(export_cli.NetworkTyping) == NETWORK_TYPINGS
    assert set(values(export_cli.InstanceKind)) == set(INSTANCE_KINDS)
    assert set(values(train_cli.Preset)) == set(PRESETS) | {"tiny"}  # tiny: resolve_model_config's test size
    assert values(train_cli.ValMetric) == VAL_METRICS


def test_a_choice_completes_in_the_shell_and_a_wrong_one_is_one_sentence():
    env = {"_RECON_INSPECT_COMPLETE": "complete_bash", "COMP_WORDS": "recon-inspect run x --backend ort-c", "COMP_CWORD": "4"}
    completion = runner.invoke(inspect_cli.app, [], prog_name="recon-inspect", env=env)
    assert completion.output.split() == ["ort-cpu", "ort-cuda"], completion.output
    result = runner.invoke(export_cli.app, ["build-engine", "m.onnx", "--precision", "int4"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == \
        "Error: Invalid value for '--precision': 'int4' is not one of 'fp16', 'fp32', 'int8'."


# A wrong choice on each app: the same sentence (the option, the value, the choices), no pydantic "Value error, ".
WRONG_CHOICES = [
    ("recon-train", ["fit", "DATA", "--out", "RUN", "--preset", "lite0"], "fit",
     "Error: Invalid value for '--preset': 'lite0' is not one of 'mvtec-512', 'uniad-224', 'cifar-32', 'lite0-256', 'tiny'."),
    ("recon-export", ["verify", "m.onnx", "--backend", "cuda"], "verify",
     "Error: Invalid value for '--backend': 'cuda' is not one of 'auto', 'ort', 'ort-cpu', 'ort-cuda', 'ort-trt', 'trt'."),
    ("recon-inspect", ["doctor", "--for", "tensorrt"], "doctor",
     "Error: Invalid value for '--for': 'tensorrt' is not one of 'ort-cpu', 'ort-cuda', 'trt'."),
]


@pytest.mark.parametrize("app_name, arguments, command, sentence", WRONG_CHOICES)
def test_a_wrong_choice_reads_as_every_other_usage_error(app_name, arguments, command, sentence):
    """Typer 0.29 printed "Value error, 'lite0' is not one of ..." (pydantic's prefix) after the usage lines."""
    result = runner.invoke(APPS[app_name], arguments, prog_name=app_name)
    assert result.exit_code == 2 and "Traceback" not in result.output and "Value error" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == sentence
    unknown = runner.invoke(APPS[app_name], [command, "--no-such-option"], prog_name=app_name)
    assert unknown.exit_code == 2
    # the same usage lines before it as an unknown option gets, and nothing else
    assert lines[:-1] == unknown.output.strip().splitlines()[:-1], (result.output, unknown.output)


def test_usage_lines_and_value_types_read_as_click_writes_them():
    """Typer 0.29 wrote required arguments as {data} and types as <list[Path]> or <int range>."""
    for app_name, app, name, _ in commands():
        text = runner.invoke(app, [name, "--help"], prog_name=app_name, env={"COLUMNS": "200"}).output
        assert not re.search(r"\{[a-z_]+\}|<list\[|<[a-z]+ range>", text), (app_name, name, text)
    usage = {name: runner.invoke(app, [name, "--help"], prog_name=app_name).output.splitlines()[0]
             for app_name, app, name, _ in commands()}
    assert usage["fit"] == "Usage: recon-train fit [OPTIONS] DATA"
    assert usage["evaluate"] == "Usage: recon-train evaluate [OPTIONS] CHECKPOINT DATA"
    assert usage["calibrate"] == "Usage: recon-inspect calibrate [OPTIONS] ARTIFACT [FOLDERS]..."
    assert usage["triton-repo"] == "Usage: recon-export triton-repo [OPTIONS] ARTIFACTS..."
    assert usage["run"] == "Usage: recon-inspect run [OPTIONS] [SOURCE]"
    calibrate = rendered_help(inspect_cli.app, "calibrate")
    assert "ARTIFACT <path> The .onnx" in calibrate and "FOLDERS... <path> An MVTec-layout" in calibrate
    assert "--batch-size <int> Images per inference call [default: 8]. [x>=1]" in calibrate
    assert "--calibration-images <path> int8:" in rendered_help(export_cli.app, "to-onnx")
    missing = runner.invoke(train_cli.app, ["fit", "--out", "RUN"], prog_name="recon-train")
    assert missing.exit_code == 2 and missing.output.strip().splitlines()[-1] == "Error: Missing argument 'DATA'."


def test_help_stays_torch_free_and_fast_to_load():
    """The choices are spelled in the CLI modules, not imported from the library (the line's modules load
    OpenCV), so completion stays cheap."""
    import subprocess

    code = ("import sys; import reconad.runtime.cli, reconad.export.cli; "
            "print(sorted(m for m in ('torch', 'cv2', 'onnxruntime', 'onnx') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_int8_calibration_methods_are_the_manifests():
    from reconad.export import cli as export_cli
    from reconad.runtime.manifest import CALIBRATION_METHODS

    assert tuple(member.value for member in export_cli.CalibrationMethod) == tuple(CALIBRATION_METHODS)


# Bad input each app refuses after parsing (a ReconadError): the sentence alone, as recon-export and recon-inspect
# always printed it (recon-train used to put "error: " before it).
BAD_INPUT = [
    ("recon-train", ["fit", "DATA", "--out", "RUN", "--normal-classes", "a,b"],
     "--normal-classes must be comma-separated integers, got 'a,b'."),
    ("recon-export", ["verify", "{missing}"], "Model file {missing} does not exist."),
    ("recon-inspect", ["calibrate", "{missing}", "{folder}"],
     "Calibration needs at least 2 defect-free images; {folder} has fewer."),
]


@pytest.mark.parametrize("app_name, arguments, sentence", BAD_INPUT)
def test_bad_input_is_the_same_bare_sentence_on_every_app(app_name, arguments, sentence, tmp_path):
    names = {"missing": str(tmp_path / "none.onnx"), "folder": str(tmp_path)}
    result = runner.invoke(APPS[app_name], [argument.format(**names) for argument in arguments], prog_name=app_name)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == sentence.format(**names) + "\n"


def own_help(param) -> str:
    """A parameter's help without the default stated in it: what it says the option is for."""
    return re.sub(r"\[default: [^\]]*\]\.?", "", param.help or "").strip()


def test_every_option_and_argument_says_what_it_is_for():
    """--seed, --schedule, --vflip and --cache-features had only "[default: ...]"; evaluate's --skip-bad-files and
    --batch-size had nothing."""
    silent = []
    for app_name, app in APPS.items():
        group = typer.main.get_command(app)
        for name, command in [("", group), *group.commands.items()]:
            for param in command.params:
                if not own_help(param):
                    silent.append((app_name, name, param.opts[0] if param.opts else param.name))
    assert silent == []
