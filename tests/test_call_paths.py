"""The two call paths (``aws.call_path``) against the project's fake, through the CLI: every
operation gives the same records either way, and a direct path that breaks stops the run in
one line, after which the client path finishes the job exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rekbatch.backends.aws import AwsBackend
from tests.helpers import (
    exactly_once,
    invoke,
    read_jsonl,
    sample_people,
    upload_samples,
    write_config,
)
from tests.support.clients import aws_client
from tests.support.configs import job_config
from tests.support.fake_rekognition import FakeRekognition
from tests.support.servers import StartFake

BUCKET = "call-paths"
OPERATIONS = f"""
[[operations]]
type = "detect_faces"
attributes = ["ALL"]

[[operations]]
type = "detect_labels"

[[operations]]
type = "compare_faces"
reference = "s3://{BUCKET}/ric_harvey.jpeg"

[[operations]]
type = "detect_text"

[[operations]]
type = "detect_moderation_labels"

[[operations]]
type = "recognize_celebrities"

[[operations]]
type = "detect_protective_equipment"

[[operations]]
type = "search_faces"
strategy = "collection"
people = {{ ric = ["s3://{BUCKET}/ric_harvey.jpeg"] }}
"""
# What differs between two runs of the same job whatever the path.
PER_RUN = ("run_id", "processed_at", "latency_ms")


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str) -> str:
    s3 = aws_client("s3", moto_endpoint)
    return upload_samples(s3, BUCKET)


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(people=sample_people(), unmodelled_members=True)


def _config(tmp_path: Path, name: str, moto: str, fake: FakeRekognition, path: str) -> Path:
    text = job_config(
        uris=[f"s3://{BUCKET}/"],
        output_dir=tmp_path / name,
        s3_endpoint=moto,
        rek_endpoint=fake.url,
        operations=OPERATIONS,
        limits={"concurrency": 4, "max_tps": 200},
        aws={"call_path": path},
    )
    return write_config(tmp_path / f"{name}.toml", text)


def _records(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    rows = exactly_once(out)
    return {
        (r["key"], r["operation"]): {k: v for k, v in r.items() if k not in PER_RUN} for r in rows
    }


def test_every_operation_gives_the_same_records_on_both_paths(
    tmp_path: Path, bucket: str, moto_endpoint: str, fake: FakeRekognition
) -> None:
    records: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for path in ("direct", "client"):
        fake.reset_stats()
        config = _config(tmp_path, path, moto_endpoint, fake, path)
        result = invoke("run", str(config), "--log-format", "json")
        assert result.exit_code == 0, result.stderr
        logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
        chosen = [entry for entry in logged if entry.get("event") == "call_path"]
        paths = {entry["api"]: entry["path"] for entry in chosen}
        # logged once per API
        assert len(chosen) == len(paths) and paths["DetectFaces"] == path
        assert paths["SearchFacesByImage"] == path and paths["IndexFaces"] == path
        records[path] = _records(tmp_path / path)
        calls = fake.stats()["ok"]
        assert {"DetectProtectiveEquipment", "RecognizeCelebrities", "SearchFacesByImage"} <= set(
            calls
        )
    direct, client = records["direct"], records["client"]
    assert direct.keys() == client.keys()
    operations = {op for _, op in direct}
    assert len(operations) == 8
    for pair in direct:
        assert direct[pair] == client[pair], pair
    answered = [r for r in direct.values() if r["status"] == "ok" and r["result"]]
    assert answered
    text = json.dumps(answered)
    assert "Unmodelled" not in text  # what botocore's model does not know is not kept


def test_a_direct_path_that_breaks_stops_the_run_in_one_line(
    tmp_path: Path,
    bucket: str,
    moto_endpoint: str,
    fake: FakeRekognition,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A changed library under the direct path (here: signing raises a TypeError) fails the
    run, not each image; the client path then finishes the job, every record once."""
    real = AwsBackend.signed_request
    sent = 0

    def changed(self: AwsBackend, api: str, body: bytes, credentials: Any) -> Any:
        nonlocal sent
        sent += 1
        if api == "DetectLabels" and sent > 5:
            raise TypeError("add_auth() takes 2 positional arguments but 3 were given")
        return real(self, api, body, credentials)

    monkeypatch.setattr(AwsBackend, "signed_request", changed)
    config = _config(tmp_path, "out", moto_endpoint, fake, "direct")
    result = invoke("run", str(config))
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("rekbatch:")]
    assert len(lines) == 1, result.stderr
    assert "TypeError" in lines[0] and 'aws.call_path = "client"' in lines[0]
    out = tmp_path / "out"
    assert not [r for r in read_jsonl(out / "results.jsonl") if r["status"] == "failed"]

    monkeypatch.setenv("REKBATCH_AWS__CALL_PATH", "client")
    result = invoke("run", str(config))
    assert result.exit_code == 0, result.stderr
    records = _records(out)
    assert len(records) == 9 * 8  # nine files (two skipped without a call), eight operations
