"""The house rules that code review would otherwise have to catch: no import cycles between capcli
modules (function-local imports included), files.py imports nothing of capcli, nothing below
cli.py prints, and nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "capcli"


def capcli_imports(path: Path) -> set[str]:
    """Names of the capcli modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("capcli.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "capcli":
                found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            elif node.module.startswith("capcli."):
                found.add(node.module.split(".")[1])
    return found - {path.stem}


def graph() -> dict[str, set[str]]:
    return {p.stem: capcli_imports(p) for p in PACKAGE.glob("*.py")}


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
    assert [m for m, deps in edges.items() if "cli" in deps and m != "__main__"] == []


def test_nothing_below_the_cli_prints():
    for path in PACKAGE.glob("*.py"):
        if path.stem in ("cli", "__main__"):
            continue
        calls = [n for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not calls, f"{path.name}:{calls[0].lineno} prints"
