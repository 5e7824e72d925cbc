"""Runs through faults of the service, over real HTTP against the fake Rekognition.

Random throttles that are not the quota, 500s, dropped and reset connections, malformed and
unparseable answers, stalls, an endpoint that goes away for a while or for good: every
object ends ok (or with a recorded permanent error), exactly once, and nothing fails for a
transient cause. Every run is bounded.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_bucket
from tests.helpers import base_config, fake_jpeg, invoke, read_csv, read_jsonl, write_config
from tests.support.fake_rekognition import FakeConfig, FakeRekognition
from tests.support.moto import put_objects

OPS = '[[operations]]\ntype = "detect_labels"\n'
IMAGES = 240


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str) -> str:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="eu-west-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    name = make_bucket(s3, "faults-bucket")
    put_objects(name, ((f"img/{i:04d}.jpg", fake_jpeg(i)) for i in range(IMAGES)))
    return name


@pytest.fixture
def fake(moto_endpoint: str) -> Iterator[FakeRekognition]:
    with FakeRekognition(FakeConfig(s3_endpoint_url=moto_endpoint, seed=11)) as server:
        yield server


def _config(tmp_path: Path, bucket: str, moto: str, rek: str, limits: str = "") -> Path:
    text = base_config(
        uris=[f"s3://{bucket}/"],
        output_dir=tmp_path / "out",
        s3_endpoint=moto,
        rek_endpoint=rek,
        operations=OPS,
        extra=f"[limits]\nconcurrency = 16\nmax_tps = 200\nmax_attempts = 12\n{limits}\n",
    )
    return write_config(
        tmp_path / "job.toml", text.replace("[source]\n", "[source]\nsniff = false\n")
    )


def _exactly_once_ok(out: Path) -> list[dict[str, Any]]:
    rows = read_jsonl(out / "results.jsonl")
    keys = Counter(r["key"] for r in rows)
    assert len(keys) == IMAGES and max(keys.values()) == 1
    assert Counter(r["key"] for r in read_csv(out / "results.csv")) == keys
    failed = [r for r in rows if r["status"] != "ok"]
    assert not failed, failed[:3]
    return rows


@pytest.mark.parametrize(
    "faults",
    [
        {"throttle_rate": 0.10},
        {"error_rate": 0.20},
        {"drop_rate": 0.02},
        {"throttle_rate": 0.10, "error_rate": 0.20, "drop_rate": 0.02},
        {"reset_rate": 0.03, "malformed_rate": 0.02, "garbage_rate": 0.02},
    ],
    ids=["throttles", "500s", "drops", "all-three", "resets-and-bad-answers"],
)
def test_every_object_ends_ok_exactly_once_through_transient_faults(
    tmp_path: Path, bucket: str, moto_endpoint: str, fake: FakeRekognition, faults: dict[str, float]
) -> None:
    fake.configure(**faults)
    result = invoke("run", str(_config(tmp_path, bucket, moto_endpoint, fake.url)))
    assert result.exit_code == 0, result.stderr
    _exactly_once_ok(tmp_path / "out")
    stats = fake.stats()
    injected = sum(
        sum(stats.get(kind, {}).values())
        for kind in ("throttled", "errors", "dropped", "reset", "malformed", "garbage")
    )
    assert injected > 0  # the faults really happened
    # Every image was paid for at least once and, answers being delivered, at most once.
    assert max(stats["billed"].values()) == 1


def test_stalled_answers_cost_seconds_not_a_minute(
    tmp_path: Path, bucket: str, moto_endpoint: str, fake: FakeRekognition
) -> None:
    # Answers held until the client gives up: the deadline from the observed latency
    # (a few seconds here) ends each, and the request is tried again.
    fake.configure(fail_calls={40: "stall", 90: "stall", 150: "stall"}, stall_seconds=0)
    result = invoke("run", str(_config(tmp_path, bucket, moto_endpoint, fake.url)))
    assert result.exit_code == 0, result.stderr
    _exactly_once_ok(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["elapsed_seconds"] < 30  # three stalls of a minute would be three minutes
    assert sum(fake.stats()["stalled"].values()) == 3


class _DownAfterFirstCall(threading.Thread):
    """Takes the endpoint down for ``seconds`` once the fake has seen its first call (however
    long the run takes to start), polling for at most 60 s."""

    def __init__(self, fake: FakeRekognition, seconds: float) -> None:
        super().__init__(daemon=True)
        self.fake, self.seconds = fake, seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stopped.wait(0.005) and time.monotonic() < deadline:
            if sum(self.fake.stats()["calls"].values()):
                self.fake.configure(down_for_seconds=self.seconds)
                return

    def cancel(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


def _down_in(fake: FakeRekognition, seconds: float) -> _DownAfterFirstCall:
    """The endpoint refuses connections for ``seconds``, from the run's first call on."""
    timer = _DownAfterFirstCall(fake, seconds)
    timer.start()
    return timer


def test_an_endpoint_away_for_seconds_fails_nothing(
    tmp_path: Path, bucket: str, moto_endpoint: str, fake: FakeRekognition
) -> None:
    config = _config(tmp_path, bucket, moto_endpoint, fake.url, "unreachable_seconds = 30")
    timer = _down_in(fake, 2.0)
    try:
        result = invoke("run", str(config))
    finally:
        timer.cancel()
    assert result.exit_code == 0, result.stderr
    _exactly_once_ok(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["calls"]["retries"] > 0  # connections were refused meanwhile


def test_an_endpoint_gone_for_good_stops_the_run_and_it_resumes(
    tmp_path: Path, bucket: str, moto_endpoint: str, fake: FakeRekognition
) -> None:
    config = _config(tmp_path, bucket, moto_endpoint, fake.url, "unreachable_seconds = 2")
    timer = _down_in(fake, 60.0)
    try:
        result = invoke("run", str(config))
    finally:
        timer.cancel()
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("rekbatch:")]
    assert len(lines) == 1 and "unreachable for" in lines[0] and "resume" in lines[0]
    out = tmp_path / "out"
    done = read_jsonl(out / "results.jsonl")
    assert all(r["status"] == "ok" for r in done)  # nothing recorded as failed meanwhile
    assert len(done) < IMAGES

    fake.configure(down_for_seconds=0.0)
    result = invoke("resume", str(out))
    assert result.exit_code == 0, result.stderr
    _exactly_once_ok(out)
