"""The house rules that code review would otherwise have to catch: the packages import each other
one way only (cli -> train/infer -> model/text/data/metrics/runtime -> the base modules), no import
cycles between modules (function-local imports included), files.py imports nothing of capcli,
nothing below the CLI prints, and `capcli --help` imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "capcli"
BASE = {"errors", "files", "progress", "choices", "version"}  # capcli/*.py: used by every room
FRONT = {"__init__", "__main__"}  # `from capcli import Captioner`, `python -m capcli`: may import any room

# What each room may import besides itself and the base modules. The issue of record for these:
# infer never imports train; model, text and data never import infer, train or cli.
MAY_IMPORT = {
    "base": set(),
    "front": {"model", "text", "data", "metrics", "runtime", "infer", "train", "cli"},
    "runtime": set(),
    "text": set(),
    "data": set(),
    "metrics": {"text"},
    "model": {"text"},
    "infer": {"model", "text", "data", "metrics", "runtime"},
    "train": {"model", "text", "data", "metrics", "runtime", "infer"},
    "cli": {"model", "text", "data", "metrics", "runtime", "infer", "train"},
}


def module_name(path: Path) -> str:
    """capcli/model/files.py -> "model.files"; capcli/errors.py -> "errors"."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def room(module: str) -> str:
    top = module.split(".")[0]
    return "base" if top in BASE else "front" if top in FRONT else top


def capcli_imports(path: Path) -> set[str]:
    """The capcli modules a file imports, anywhere in it, as module names ("model.files")."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name[len("capcli."):] for a in node.names if a.name.startswith("capcli.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "capcli":
            base = node.module[len("capcli."):] if node.module != "capcli" else ""
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in modules or f"{sub}.__init__" in modules else base or "__init__")
    return {m for m in found if m} - {module_name(path)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): capcli_imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_packages_import_one_way():
    wrong = []
    for module, deps in sorted(graph().items()):
        here = room(module)
        for dep in sorted(deps):
            there = room(dep)
            if there not in ("base", here) and there not in MAY_IMPORT[here]:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, wrong


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(edges.get(module, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [module, dep])
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_files_imports_nothing_of_capcli_and_nothing_imports_the_cli():
    edges = graph()
    assert edges["files"] == set()
    assert [m for m, deps in edges.items() if any(room(d) == "cli" for d in deps) and room(m) not in ("cli", "front")] == []


def test_nothing_below_the_cli_prints():
    for path in PACKAGE.rglob("*.py"):
        if room(module_name(path)) in ("cli", "front"):
            continue
        calls = [n for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not calls, f"{path.relative_to(PACKAGE)}:{calls[0].lineno} prints"


def test_the_command_line_and_the_config_modules_load_without_torch():
    """`capcli --help` stays fast: the CLI and the config modules import no torch."""
    code = ("import sys\nimport capcli.cli, capcli.choices, capcli.model.config, capcli.train.config\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
