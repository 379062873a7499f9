"""The package's layers, read from the source: the command line on top, nothing below it
importing it, no import cycle; and what `marlwatch summary` does not pay for."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "marlwatch"
SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """Every marlwatch module -> the marlwatch modules it imports, wherever in it (functions too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from marlwatch.flame import pyspy` imports a module; `from marlwatch.cli import main` a name.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_nothing_below_the_command_line_imports_it():
    graph = imports()
    above = {m for m in graph if m == "marlwatch.cli" or m.startswith("marlwatch.cli.")} | {"marlwatch.__main__"}
    offenders = {m: sorted(t for t in targets if t.startswith("marlwatch.cli"))
                 for m, targets in graph.items() if m not in above}
    assert {m: t for m, t in offenders.items() if t} == {}
    assert len(graph) > 40 and "marlwatch.cli.main" in graph["marlwatch.cli"]  # the walk saw the package


def test_no_import_cycle():
    graph = imports()
    # A package's __init__ is imported with each of its modules: an edge from a module to its own
    # package is not a cycle of the design.
    def edges(m: str) -> set[str]:
        return {t for t in graph[m] if not m.startswith(t + ".")}

    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges(m)):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def loaded_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    # marlwatch.app itself only holds the refresh rate the parser shows; its modules are the app.
    return sorted(m for m in modules if m.split(".")[0] in ("textual", "torch", "rich")
                  or m in ("marlwatch.runner", "marlwatch.monitor") or m.startswith("marlwatch.app."))


def test_summary_imports_neither_textual_nor_torch():
    modules = loaded_by(f"from marlwatch.cli import main\nimport contextlib, io\n"
                        f"with contextlib.redirect_stdout(io.StringIO()) as out:\n"
                        f"    assert main(['summary', {str(SHIPPED)!r}]) == 0\n"
                        f"assert 'process time' in out.getvalue()")
    assert "marlwatch.metrics" in modules  # it did read the file
    assert heavy(modules) == []


def test_building_the_parser_imports_no_command():
    modules = loaded_by("from marlwatch.cli.parser import build_parser\n"
                        "build_parser().parse_args(['run', '--flame', 'update:2'])")
    assert heavy(modules) == []
    assert not any(m.startswith(("marlwatch.cli.run", "marlwatch.cli.files", "marlwatch.flame.controller"))
                   for m in modules)
