"""The package's layout as its import graph shows it: no import cycle (imports inside
functions count, type-checking-only ones do not), and the commands on top."""

from __future__ import annotations

from pathlib import Path

from tests.support.import_graph import cycles, import_graph


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


def test_only_the_command_line_imports_the_commands() -> None:
    graph = import_graph()
    below = {
        module: sorted(m for m in imported if m.startswith("rekbatch.commands"))
        for module, imported in graph.items()
        if not module.startswith(("rekbatch.commands", "rekbatch.cli", "rekbatch.__main__"))
    }
    assert {module: found for module, found in below.items() if found} == {}
