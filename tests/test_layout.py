"""The package's layout as its import graph shows it: no import cycle (imports inside
functions count, type-checking-only ones do not), and the commands on top."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.import_graph import PACKAGE, cycles, import_graph


def test_the_cycle_finder_finds_every_cycle_and_only_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"a"}}
    assert cycles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reads_imports_inside_functions_and_leaves_out_type_checking(
    tmp_path: Path,
) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "top.py").write_text("from pkg.sub import inner\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "inner.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg import typed\n"
        "def late():\n    from .. import top\n"
    )
    (package / "typed.py").write_text("")
    graph = import_graph(package)
    assert graph["pkg.sub.inner"] == {"pkg", "pkg.top"}
    assert graph["pkg.top"] == {"pkg.sub", "pkg.sub.inner"}
    assert cycles(graph) == [["pkg.sub.inner", "pkg.top"]]
    # and on the package itself: an import inside a method is read
    assert "rekbatch.backends.aws" in import_graph()["rekbatch.engine.run"]


def test_the_package_has_no_import_cycle() -> None:
    """Imports inside functions count: a cycle through one is still two modules that
    cannot be read, tested or moved apart."""
    assert cycles(import_graph()) == []


def test_only_the_command_line_imports_the_commands() -> None:
    graph = import_graph()
    below = {
        module: sorted(m for m in imported if m.startswith("rekbatch.commands"))
        for module, imported in graph.items()
        if not module.startswith(("rekbatch.commands", "rekbatch.cli", "rekbatch.__main__"))
    }
    assert {module: found for module, found in below.items() if found} == {}


_EXIT_CODES = {0, 1, 2, 3, 4, 130}


def _exit_code_literals(node: ast.AST) -> bool:
    """An exit code written as a number: ``0``, ``(0, 3)``, ``3 if failed else 0``."""
    if isinstance(node, ast.IfExp):
        return _exit_code_literals(node.body) or _exit_code_literals(node.orelse)
    if isinstance(node, ast.Tuple | ast.Set | ast.List):
        return any(_exit_code_literals(e) for e in node.elts)
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "frozenset":
        return any(_exit_code_literals(a) for a in node.args)
    return (
        isinstance(node, ast.Constant) and type(node.value) is int and node.value in _EXIT_CODES
    )


def test_exit_codes_are_written_in_errors_py_alone() -> None:
    """Each exit code is one name in ``rekbatch.errors``; elsewhere neither a number given
    to an exit or an outcome, nor one compared with an exit code, nor an ``EXIT_`` name."""
    found: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [ast.unparse(t) for t in targets if not isinstance(t, ast.Tuple)]
                coded = any("CODE" in n.upper() for n in names)
                written = any(n.startswith("EXIT_") for n in names) or (
                    coded and node.value is not None and _exit_code_literals(node.value)
                )
            elif isinstance(node, ast.Call):
                callee = ast.unparse(node.func).rsplit(".", 1)[-1]
                exits = callee in {"Exit", "_exit", "exit", "SystemExit"}
                written = (exits or callee.endswith("Outcome")) and bool(node.args)
                written = written and _exit_code_literals(node.args[0])
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                written = any("exit_code" in ast.unparse(s) for s in sides) and any(
                    _exit_code_literals(s) for s in sides
                )
            else:
                written = False
            if written:
                where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', 0)}"
                found.append(f"{where} {ast.unparse(node)}")
    assert not found, "exit codes written as numbers:\n" + "\n".join(found)
