"""The package's layers (pyproject's import-linter contract), no import cycle, and imports inside functions only for
heavy optional dependencies, each with its reason on the line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cifarlab"
# Optional extras ([app], [export]), albumentations (heavy, training only), torchvision (only its CIFAR-10 files need
# it) and the front ends and commands that cli starts:
# imported where they are used.
LAZY_ALLOWED = {"gradio", "matplotlib", "gradio_client", "pytorch_grad_cam", "cleanlab", "sklearn", "onnx",
                "onnxruntime", "onnxscript", "albumentations", "cv2", "torchvision", "cifarlab.app", "cifarlab.report",
                "cifarlab.commands"}


def test_the_import_contracts_in_pyproject_hold():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(PACKAGE.parents[1] / "pyproject.toml"), no_cache=True) == 0


def strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """Groups of modules that import each other, directly or not (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = set()
            while True:
                other = stack.pop()
                group.add(other)
                if other == module:
                    break
            groups.append(group)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return [g for g in groups if len(g) > 1]


def test_no_import_cycle_counting_imports_inside_functions():
    graph = grimp.build_graph("cifarlab")  # every import statement, at any depth of the file
    assert strongly_connected(graph) == []


def test_strongly_connected_finds_a_cycle(tmp_path, monkeypatch):
    """The cycle finder above is not vacuous: two modules that import each other inside functions are found."""
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from cyclic import b\n")
    (package / "b.py").write_text("def g():\n    from cyclic import a\n")
    (package / "c.py").write_text("from cyclic import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert strongly_connected(grimp.build_graph("cyclic", cache_dir=None)) == [{"cyclic.a", "cyclic.b"}]


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import inside a function or method of ``path``."""
    tree = ast.parse(path.read_text())
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                found += [(node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.append((node.lineno, node.module))
    return sorted(set(found))


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_inside_functions_are_heavy_optional_ones_with_a_reason(path):
    lines = path.read_text().splitlines()
    for line, module in function_level_imports(path):
        top = module.split(".")[0]
        allowed = top in LAZY_ALLOWED or any(module == m or module.startswith(m + ".") for m in LAZY_ALLOWED)
        assert allowed, f"{path.name}:{line} imports {module} inside a function: import it at the top"
        assert "#" in lines[line - 1], f"{path.name}:{line}: say in a comment why {module} is imported late"


def test_the_checkpoint_commands_never_import_lightning_or_other_slow_packages():
    """The app's page, predict, report and export start without Lightning, torchmetrics, torchvision, grad-cam or
    matplotlib: seconds of start-up each on a 2-core machine (docs/results.md, "App start-up")."""
    code = ("import sys, cifarlab.cli, cifarlab.app, cifarlab.report\n"
            "from cifarlab.commands import app, predict, report, export\n"
            "slow = ('lightning', 'torchmetrics', 'torchvision', 'pytorch_grad_cam', 'matplotlib')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in slow}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout
