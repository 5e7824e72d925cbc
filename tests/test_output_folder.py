"""An output folder rekbatch cannot use is a setup problem (exit 2, one line naming it), and a
job folder that cannot be written can still be looked at (``status``)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from rekbatch.store import jobdir
from tests.conftest import SAMPLES
from tests.helpers import invoke, sample_people, write_config
from tests.support.configs import operations, toml_tables
from tests.support.fake_rekognition import FakeRekognition
from tests.support.readonly import run_read_only
from tests.support.servers import StartFake


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(people=sample_people())


def _config(tmp_path: Path, fake: FakeRekognition, out: Path) -> Path:
    return write_config(
        tmp_path / "job.toml",
        toml_tables(
            job={"output_dir": out},
            source={"uris": [SAMPLES]},
            aws={"rekognition_endpoint_url": fake.url},
            operations=operations("detect_labels"),
        ),
    )


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "unexpected error" not in lines[0] and "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_an_output_folder_that_is_a_file_is_exit_2_naming_it(
    tmp_path: Path, fake: FakeRekognition, where: str
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    out = taken if where == "file" else taken / "out"
    result = invoke("run", str(_config(tmp_path, fake, out)), "--log-format", "json")
    assert result.exit_code == 2
    assert str(out) in _one_line(result.stderr)
    assert taken.read_text() == "not a folder"
    assert fake.stats()["call_number"] == 0


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _closed_cleanly(out: Path) -> None:
    """As a job's ledger is once every connection closed: no write-ahead log beside it."""
    db = sqlite3.connect(jobdir.ledger_path(out))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    assert not jobdir.ledger_path(out).with_name("ledger.sqlite-wal").exists()


def test_status_reads_a_job_folder_it_cannot_write(tmp_path: Path, fake: FakeRekognition) -> None:
    out = tmp_path / "out"
    assert invoke("run", str(_config(tmp_path, fake, out)), "--log-format", "json").exit_code == 0
    _closed_cleanly(out)
    before = _snapshot(out)
    status, how = run_read_only(out, "status", str(out))
    assert status.returncode == 0, (how, status.stderr)
    assert "objects: 9 done of 9 listed (listing complete)" in status.stdout
    assert "detect_labels: ok 7, skipped 2" in status.stdout
    # Looking writes nothing: no log beside the ledger, no file changed.
    assert _snapshot(out) == before
    as_json, _ = run_read_only(out, "status", "--json", str(out))
    assert as_json.returncode == 0, as_json.stderr


def test_a_run_into_a_folder_it_cannot_write_is_exit_2_naming_it(
    tmp_path: Path, fake: FakeRekognition
) -> None:
    out = tmp_path / "out"
    config = _config(tmp_path, fake, out)
    assert invoke("run", str(config), "--log-format", "json", "--max-tps", "50").exit_code == 0
    _closed_cleanly(out)
    before = _snapshot(out)
    resumed, how = run_read_only(out, "resume", str(out), "--log-format", "json")
    if how is None:  # the folder could not be made read-only here: it ran, nothing new
        assert resumed.returncode == 0, resumed.stderr
        return
    assert resumed.returncode == 2, (how, resumed.stderr)
    assert str(out) in _one_line(resumed.stderr)
    assert _snapshot(out) == before
    fresh = tmp_path / "empty"
    fresh.mkdir()
    again, _ = run_read_only(fresh, "run", str(config), "--output", str(fresh / "job"))
    assert again.returncode == 2, again.stderr
    assert str(fresh / "job") in _one_line(again.stderr)
