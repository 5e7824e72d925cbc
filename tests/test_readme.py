"""The README's "Two commands" must keep working: each piece of them is checked here, and the
main job's rekbatch command is run (in-process, output in a temporary folder) so that what
the README says it prints and writes is what it prints and writes."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import invoke

README = (REPO / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _commands() -> list[str]:
    """The command lines of the first shell block of "Two commands", comments left out."""
    block = re.search(r"```sh\n(.*?)```", _section("Two commands"), re.S)
    assert block, "no ```sh block under 'Two commands'"
    lines = [line.strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readme_has_exactly_two_commands() -> None:
    assert len(_commands()) == 2, _commands()


def test_the_first_command_installs_and_runs_the_offline_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = [step.strip() for step in _commands()[0].split("&&")]
    assert steps[0] == "python3 -m venv .venv"
    assert steps[1] == ". .venv/bin/activate"
    install = shlex.split(steps[2])
    assert install[:3] == ["pip", "install", "-e"]
    spec = re.fullmatch(r"\.\[([a-z,]+)\]", install[3])
    assert spec, install[3]
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    for extra in spec.group(1).split(","):
        assert extra in extras, f"README installs the extra {extra!r}, pyproject has none"
    assert project["scripts"]["rekbatch"] == "rekbatch.cli:main"

    run = shlex.split(steps[3])
    assert run[:2] == ["rekbatch", "run"] and len(run) == 3
    config = REPO / run[2]
    assert config.is_file(), f"README runs {run[2]}, which is missing"
    cfg = tomllib.loads(config.read_text(encoding="utf-8"))
    assert cfg["backend"]["kind"] == "local", "the README's first command must need no AWS"

    # What the README says the first command prints and writes.
    prose = _section("Two commands")
    answer = re.search(r"prints the answer, `([^`]+)`", prose)
    assert answer, "README no longer quotes the answer"
    written = re.search(r"writes `([^`{]+)results\.\{jsonl,csv\}` and `summary\.json`", prose)
    # The config's relative paths are read from its own folder.
    assert written and (REPO / written.group(1)).resolve() == (
        config.parent / cfg["job"]["output_dir"]
    ).resolve()

    monkeypatch.chdir(tmp_path)  # and it runs from any folder
    out = tmp_path / "out"
    result = invoke(run[1], str(config), "--output", str(out), "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    assert answer.group(1) in result.stdout.splitlines()
    for name in ("results.jsonl", "results.csv", "summary.json"):
        assert (out / name).is_file(), name


def test_the_second_command_is_the_test_script_that_sets_everything_up() -> None:
    assert _commands()[1] == "./scripts/test"
    script = REPO / "scripts" / "test"
    assert script.is_file() and os.access(script, os.X_OK), "scripts/test must be executable"
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    syntax = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert syntax.returncode == 0, syntax.stderr
    # It makes its own environment, installs the browser the report test needs, runs pytest.
    assert "python3 -m venv" in text and "pip install -q -e '.[test,local]'" in text
    assert "apt-get install" in text and "chromium" in text
    assert re.search(r"^exec python -m pytest -q( --durations=\d+)? \"\$@\"$", text, re.M)
    # CI runs the same command.
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^\./scripts/test\b", ci, re.M), ".ci/run must call ./scripts/test"


def test_every_rekbatch_command_the_readme_shows_exists() -> None:
    shown = set(re.findall(r"^\s*rekbatch ([a-z]+)\b", README, re.M))
    shown |= set(re.findall(r"`rekbatch ([a-z]+)\b", README))
    assert {"run", "validate", "plan", "status", "resume", "report"} <= shown
    for command in sorted(shown):
        result = invoke(command, "--help")
        assert result.exit_code == 0, f"README shows `rekbatch {command}`: {result.stderr}"
