"""What ``scan`` writes into a config is TOML-encoded, whatever a name holds: a folder whose
name carries a newline and ``[[operations]]`` adds nothing to the job."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from rekbatch.commands.scan import to_toml
from rekbatch.config import load_config
from rekbatch.errors import ConfigError
from tests.conftest import SAMPLES
from tests.helpers import invoke, read_jsonl
from tests.support.fake_rekognition import FakeConfig, FakeRekognition

# Ends the comment that names the command, and the string that holds the folder.
INJECTED = 'photos\n[[operations]]\ntype = "detect_labels"\n# "\\\n'


@pytest.fixture
def fake() -> Iterator[FakeRekognition]:
    with FakeRekognition(FakeConfig(region="eu-west-1")) as server:
        yield server


def test_a_folder_name_with_a_newline_adds_no_operation(
    tmp_path: Path, fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REKBATCH_AWS__REKOGNITION_ENDPOINT_URL", fake.url)
    folder = tmp_path / INJECTED.replace("/", "_")
    folder.mkdir()
    (folder / "ric.jpg").write_bytes((SAMPLES / "ric.jpg").read_bytes())
    out = tmp_path / "out"
    result = invoke("scan", str(folder), "--op", "detect_faces", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    written = out / "rekbatch.toml"
    text = written.read_text(encoding="utf-8")
    assert "\n[[operations]]\ntype = \"detect_labels\"" not in text
    for line in text.splitlines():
        assert not line.startswith("#") or "[[operations]]" not in line or "\\n" in line
    cfg = load_config(written, environ={})
    assert [op.type for op in cfg.operations] == ["detect_faces"]
    assert cfg.source.uris == [str(folder)]
    assert [r["operation"] for r in read_jsonl(out / "results.jsonl")] == ["detect_faces"]
    # Run again on the written file: the same job, nothing new, still one operation.
    again = invoke("run", str(written))
    assert again.exit_code == 0, again.stderr
    assert "nothing new" in again.stdout


HOSTILE = [
    "",
    "plain",
    'quote " and backslash \\',
    "\n\r\t\b\f",
    "".join(chr(c) for c in range(32)) + "\x7f",
    "'''\"\"\"",
    "ünïcødé カメラ \u2028 \u2029 \U0001f600",
    "key = \"value\"\n[table]",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_every_string_round_trips_through_a_toml_parser(value: str) -> None:
    data = {
        "job": {"name": value, "output_dir": value},
        "source": {"uris": [value, "b"]},
        "operations": [{"type": "search_faces", "people": {value or "x": [value]}}],
    }
    text = to_toml(data, command=f"rekbatch scan {value}")
    parsed = tomllib.loads(text)
    assert parsed["job"] == data["job"]
    assert parsed["source"] == data["source"]
    assert parsed["operations"] == data["operations"]
    # Each comment is one line, by TOML's rule (\n) and by Python's wider one.
    for lines in (text.split("\n"), text.splitlines()):
        comments = [line for line in lines if line.startswith("#")]
        assert len(comments) == 2 and comments[0].startswith("# Written by: rekbatch scan")


def test_a_name_toml_cannot_hold_is_refused_in_one_line() -> None:
    undecodable = "photos-\udcff"  # a file name that was not UTF-8, as Python decodes it
    with pytest.raises(ConfigError, match="cannot be written as TOML"):
        to_toml({"source": {"uris": [undecodable]}}, command="rekbatch scan x")
