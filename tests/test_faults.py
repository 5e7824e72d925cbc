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
from pathlib import Path
from typing import Any

import pytest

from rekbatch.store.ledger import LedgerDB
from tests.conftest import make_bucket
from tests.helpers import exactly_once, fake_jpeg, invoke, read_jsonl, write_config
from tests.support.clients import aws_client
from tests.support.configs import job_config
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import put_objects
from tests.support.servers import ServedJob, StartFake

OPS = '[[operations]]\ntype = "detect_labels"\n'
IMAGES = 240


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str) -> str:
    s3 = aws_client("s3", moto_endpoint)
    name = make_bucket(s3, "faults-bucket")
    put_objects(name, ((f"img/{i:04d}.jpg", fake_jpeg(i)) for i in range(IMAGES)))
    return name


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(seed=11)


def _config(
    tmp_path: Path, bucket: str, moto: str, rek: str, limits: dict[str, Any] | None = None
) -> Path:
    text = job_config(
        uris=[f"s3://{bucket}/"],
        output_dir=tmp_path / "out",
        s3_endpoint=moto,
        rek_endpoint=rek,
        operations=OPS,
        limits={"concurrency": 16, "max_tps": 200, "max_attempts": 12, **(limits or {})},
        source={"sniff": False},
    )
    return write_config(tmp_path / "job.toml", text)


def _exactly_once_ok(out: Path, images: int = IMAGES) -> list[dict[str, Any]]:
    """Each of ``images`` objects once in results.jsonl, results.csv and the ledger, ok."""
    return exactly_once(out, images, all_ok=True)


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
    assert sum(fake.stats()["stalled"].values()) == 3
    # each held answer was given up by the client (its deadline from the observed latency,
    # tests/test_calls.py) and the image asked again; the fake notices within a poll
    deadline = time.monotonic() + 30  # catches a hang only
    while sum(fake.stats()["abandoned"].values()) < 3:
        assert time.monotonic() < deadline, fake.stats()["abandoned"]
        time.sleep(0.02)
    assert sum(fake.stats()["abandoned"].values()) == 3


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
    config = _config(tmp_path, bucket, moto_endpoint, fake.url, {"unreachable_seconds": 30})
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
    config = _config(tmp_path, bucket, moto_endpoint, fake.url, {"unreachable_seconds": 2})
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


def test_a_request_always_slower_than_its_deadline_fails_after_max_attempts(
    tmp_path: Path, s3: Any, fake: FakeRekognition, monkeypatch: Any, served_job: ServedJob
) -> None:
    """One image sent as bytes is so large that the service never answers it in time; the
    others answer at once. It is sent ``max_attempts`` times, each send possibly billed, and
    recorded failed with a timeout; the others are done, and the run does not call the
    endpoint unreachable. Resumed with ``--retry-failed`` once the service keeps up, every
    record is there exactly once."""
    # Deadlines from a latency of milliseconds, so that the test takes seconds.
    monkeypatch.setattr("rekbatch.calls.caller.TIMEOUT_FLOOR", 0.3)
    monkeypatch.setattr("rekbatch.calls.caller.TIMEOUT_UNKNOWN", 0.3)
    name = make_bucket(s3, "slow-bucket")
    objects = [(f"img/{i:03d}.jpg", fake_jpeg(i)) for i in range(60)]
    objects.append(("img/zz-large.jpg", fake_jpeg(999, size=120_000)))
    put_objects(name, objects)
    fake.configure(slow_body_bytes=100_000, slow_seconds=0)
    config = served_job(
        fake,
        f"s3://{name}/",
        operations=OPS,
        limits={"concurrency": 4, "max_tps": 200, "max_attempts": 3},
        source={"sniff": False, "list_concurrency": 1},
        aws={"image_mode": "bytes"},
    )
    result = invoke("run", str(config))
    assert result.exit_code == 3, result.stderr  # done, one record failed
    assert fake.stats()["slow"] == {"DetectLabels": 3}  # sent max_attempts times, no more
    out = tmp_path / "out"
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    large = rows.pop("img/zz-large.jpg")
    assert (large["status"], large["error_code"], large["attempts"]) == ("failed", "Timeout", 3)
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows.values())

    fake.configure(slow_body_bytes=0)
    result = invoke("resume", str(out), "--retry-failed")
    assert result.exit_code == 0, result.stderr
    _exactly_once_ok(out, 61)
    assert fake.stats()["slow"] == {"DetectLabels": 3}


def ledger_records(out: Path) -> int:
    db = LedgerDB(out / ".rekbatch" / "ledger.sqlite", readonly=True)
    try:
        return sum(row["n"] for row in db.counts())
    finally:
        db.close()


def test_every_answer_malformed_stops_the_run_early_and_it_resumes(
    tmp_path: Path, s3: Any, fake: FakeRekognition, served_job: ServedJob
) -> None:
    """A systemic failure: every answer is malformed. 300 objects at concurrency 4 with 3
    attempts each would cost 900 calls; the breaker stops the run after 20 records in a
    row failed with the same code, in one line naming it, having paid for those and the
    ones in flight only, and ``resume --retry-failed`` takes the job up once the service is
    healthy. (``benchmarks/stops.py`` measures it with the default 8 attempts over 500
    objects: 176 calls.)"""
    name = make_bucket(s3, "all-malformed")
    put_objects(name, ((f"img/{i:04d}.jpg", fake_jpeg(i)) for i in range(300)))
    fake.configure(malformed_rate=1.0)
    config = served_job(
        fake,
        f"s3://{name}/",
        operations=OPS,
        limits={"concurrency": 4, "max_tps": 500, "max_attempts": 3},
        source={"sniff": False},
    )
    result = invoke("run", str(config))
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("rekbatch:")]
    assert len(lines) == 1, result.stderr
    assert "20 records in a row failed with InvalidResponse" in lines[0]
    assert "--retry-failed" in lines[0]
    calls = sum(fake.stats()["calls"].values())
    assert calls <= (20 + 4) * 3, calls  # the streak and the objects in flight
    out = tmp_path / "out"
    failed = [r for r in read_jsonl(out / "results.jsonl") if r["status"] == "failed"]
    assert 20 <= len(failed) < 30 and {r["error_code"] for r in failed} == {"InvalidResponse"}

    fake.configure(malformed_rate=0.0)
    result = invoke("resume", str(out), "--retry-failed")
    assert result.exit_code == 0, result.stderr
    _exactly_once_ok(out, 300)


class _RefuseKeyAfter(threading.Thread):
    """Once the fake has answered ``calls`` calls, refuse the access key ``old`` (it has
    expired) and, when ``renew`` is given, write it to the credentials file (what a
    credential helper does), polling for at most 60 s."""

    def __init__(self, fake: FakeRekognition, calls: int, renew: Path | None) -> None:
        super().__init__(daemon=True)
        self.fake, self.calls, self.renew = fake, calls, renew

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(self.fake.stats()["ok"].values()) >= self.calls:
                if self.renew is not None:
                    _credentials_file(self.renew, "new")
                self.fake.configure(refused_keys={"old": "ExpiredTokenException"})
                return
            time.sleep(0.002)


def _credentials_file(path: Path, key: str) -> None:
    path.write_text(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = s\n")


@pytest.mark.parametrize("renewed", [True, False], ids=["renewed", "still-expired"])
def test_credentials_that_expire_mid_run_are_reloaded_once(
    tmp_path: Path,
    bucket: str,
    moto_endpoint: str,
    fake: FakeRekognition,
    monkeypatch: pytest.MonkeyPatch,
    renewed: bool,
) -> None:
    """The credentials expire after 60 answers. Renewed in the credentials file, the run
    reloads them and finishes; still expired, the run stops at the second refusal without
    failing a record, and resumes once they are renewed."""
    credentials = tmp_path / "credentials"
    _credentials_file(credentials, "old")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    config = _config(tmp_path, bucket, moto_endpoint, fake.url)
    watcher = _RefuseKeyAfter(fake, 60, credentials if renewed else None)
    watcher.start()
    result = invoke("run", str(config))
    watcher.join(timeout=5)
    out = tmp_path / "out"
    if renewed:
        assert result.exit_code == 0, result.stderr
        _exactly_once_ok(out)
        return
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("rekbatch:")]
    assert len(lines) == 1, result.stderr
    assert "ExpiredTokenException" in lines[0] and "refused the credentials" in lines[0]
    done = read_jsonl(out / "results.jsonl")
    assert all(r["status"] == "ok" for r in done) and len(done) < IMAGES

    _credentials_file(credentials, "new")
    result = invoke("resume", str(out))
    assert result.exit_code == 0, result.stderr
    _exactly_once_ok(out)
