"""Checkpointing and resume through the CLI as a subprocess: kills, signals, locks, status."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_bucket
from tests.helpers import fake_jpeg, invoke, read_csv, read_jsonl, write_config
from tests.support.configs import job_config
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import put_objects
from tests.support.servers import StartFake

OPS = '[[operations]]\ntype = "detect_faces"\n\n[[operations]]\ntype = "detect_labels"\n'


@pytest.fixture
def slow_fake(start_fake: StartFake) -> FakeRekognition:
    """A fake with real latency and a quota, so runs last long enough to be interrupted."""
    return start_fake(
        latency_median_ms=20, latency_sigma=0.3, quotas={"DetectFaces": 100, "DetectLabels": 100}
    )


def _fill(s3: Any, bucket: str, images: int, extra: dict[str, bytes] | None = None) -> set[str]:
    """The bucket is filled in-process (an HTTP put costs ~15 ms); runs read it over HTTP."""
    make_bucket(s3, bucket)
    objects = {f"img/{i:05d}.jpg": fake_jpeg(i) for i in range(images)} | (extra or {})
    put_objects(bucket, objects.items())
    return set(objects)


def _config(
    tmp_path: Path,
    bucket: str,
    moto: str,
    rek: str,
    source: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
) -> Path:
    text = job_config(
        uris=[f"s3://{bucket}/"],
        output_dir=tmp_path / "out",
        s3_endpoint=moto,
        rek_endpoint=rek,
        operations=OPS,
        limits=limits or {"concurrency": 8, "max_tps": 100},
        source=source,
    )
    return write_config(tmp_path / "job.toml", text)


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rekbatch", *args, "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait_for_lines(path: Path, at_least: int, proc: subprocess.Popen[str], timeout: float) -> None:
    """Until the results file holds ``at_least`` lines (or the run ended); ``timeout`` only
    catches a run that makes no progress."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _lines(path) >= at_least or proc.poll() is not None:
            return
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=10)
    raise AssertionError(f"no progress in {timeout} s")


def _wait_for_rows(path: Path, more_than: int, proc: subprocess.Popen[str], timeout: float) -> None:
    """Until the results file has grown past ``more_than`` bytes (or the run ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > more_than:
            return
        if proc.poll() is not None:
            return
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=10)
    raise AssertionError(f"no progress in {timeout} s")


def _assert_exactly_once(out: Path, keys: set[str]) -> list[dict[str, Any]]:
    rows = read_jsonl(out / "results.jsonl")  # every line parses: no torn line
    pairs = Counter((r["key"], r["operation"]) for r in rows)
    expected = {(k, op) for k in keys for op in ("detect_faces", "detect_labels")}
    assert set(pairs) == expected
    assert max(pairs.values()) == 1
    csv_pairs = Counter((r["key"], r["operation"]) for r in read_csv(out / "results.csv"))
    assert csv_pairs == pairs
    return rows


@pytest.fixture
def fast_fake(start_fake: StartFake) -> FakeRekognition:
    """Quick answers and a high quota: at this rate one 0.25 s batch window holds about
    200 answers, far more than the calls in flight."""
    return start_fake(
        latency_median_ms=15,
        latency_sigma=0.3,
        quotas={"DetectFaces": 400, "DetectLabels": 400},
        s3_cache=True,
    )


def test_sigkill_at_random_moments_loses_nothing_and_pays_only_for_calls_in_flight(
    s3: Any, moto_endpoint: str, fast_fake: FakeRekognition, tmp_path: Path
) -> None:
    # 800 objects, 1,600 calls in all; the fake's quota (800 calls/s) keeps every run busy
    # for well over a second past each kill's point.
    keys = _fill(s3, "crash-bucket", 800)
    config = _config(
        tmp_path,
        "crash-bucket",
        moto_endpoint,
        fast_fake.url,
        limits={"concurrency": 16, "max_tps": 400},
    )
    out = tmp_path / "out"
    rng = random.Random(20261124)
    kills = 4
    # Four kills, not ten (ten cost ~80 s), each at a random point of the work rather than
    # of the clock: after a seeded number of new result lines, up to 250 of the 1,600, so
    # that every run is killed while it is busy however fast or loaded the machine is.
    for _ in range(kills):
        proc = _start("run", str(config))
        target = _lines(out / "results.jsonl") + rng.randint(1, 250)
        _wait_for_lines(out / "results.jsonl", target, proc, timeout=60)
        assert proc.poll() is None, "the run ended before its kill"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    code, _, err = _finish(_start("run", str(config)))
    assert code == 0, err
    _assert_exactly_once(out, keys)

    # Every answer is written down when it arrives: a kill loses only the calls on the
    # wire, at most one per worker (a batch window of ~200 answers used to be lost too).
    billed = fast_fake.stats()["billed"]
    assert {ident for _, ident in billed} == {f"s3://crash-bucket/{k}" for k in keys}
    extra = sum(n - 1 for n in billed.values())
    assert extra <= kills * 16, (extra, kills)


def test_sigint_stops_cleanly_with_130_and_resumes(
    s3: Any, moto_endpoint: str, slow_fake: FakeRekognition, tmp_path: Path
) -> None:
    keys = _fill(s3, "sigint-bucket", 200)  # 400 calls at 200/s: seconds after the signal
    config = _config(tmp_path, "sigint-bucket", moto_endpoint, slow_fake.url)
    out = tmp_path / "out"
    proc = _start("run", str(config))
    _wait_for_rows(out / "results.jsonl", 0, proc, timeout=60)
    proc.send_signal(signal.SIGINT)
    code, _, err = _finish(proc, timeout=30)
    assert code == 130, err
    assert f"rekbatch resume {out}" in err
    partial = read_jsonl(out / "results.jsonl")
    assert 0 < len(partial) < 400
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"].startswith("interrupted")

    resumed = invoke("resume", str(out))  # in-process: the interrupted directory is the test
    assert resumed.exit_code == 0, resumed.stderr
    _assert_exactly_once(out, keys)


def test_lock_refuses_a_second_runner_and_is_taken_over_after_a_crash(
    s3: Any, moto_endpoint: str, slow_fake: FakeRekognition, tmp_path: Path
) -> None:
    keys = _fill(s3, "lock-bucket", 300)
    config = _config(tmp_path, "lock-bucket", moto_endpoint, slow_fake.url)
    out = tmp_path / "out"
    first = _start("run", str(config))
    _wait_for_rows(out / "results.jsonl", 0, first, timeout=60)

    # Rows reach results.jsonl the moment they are answered; the ledger commits them in
    # batches a fraction of a second later.
    deadline = time.monotonic() + 10
    while True:
        status = invoke("status", str(out), "--json")
        assert status.exit_code == 0, status.stderr
        report = json.loads(status.stdout)
        if sum(report["by_status"].values()) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert report["active"] is True
    assert sum(report["by_status"].values()) > 0

    second = invoke("run", str(config))
    assert second.exit_code == 2
    assert "already active" in second.stderr

    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)
    assert json.loads(invoke("status", str(out), "--json").stdout)["active"] is False
    taken_over = invoke("run", str(config))  # in-process, on the lock the killed run left
    assert taken_over.exit_code == 0, taken_over.stderr
    _assert_exactly_once(out, keys)
    report = json.loads(invoke("status", str(out), "--json").stdout)
    assert report["active"] is False
    assert report["objects_done"] == len(keys)
    assert report["eta_seconds"] == 0


def test_changed_and_new_objects_are_processed_on_a_rerun(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    fake = start_fake()
    keys = _fill(s3, "etag-bucket", 20)
    config = _config(tmp_path, "etag-bucket", moto_endpoint, fake.url)
    out = tmp_path / "out"
    assert invoke("run", str(config)).exit_code == 0
    s3.put_object(Bucket="etag-bucket", Key="img/00003.jpg", Body=fake_jpeg(999))
    s3.put_object(Bucket="etag-bucket", Key="img/zz-new.jpg", Body=fake_jpeg(1000))
    assert invoke("run", str(config)).exit_code == 0
    rows = read_jsonl(out / "results.jsonl")
    per_key = Counter(r["key"] for r in rows if r["operation"] == "detect_faces")
    assert per_key["img/00003.jpg"] == 2  # once per version of the object
    assert per_key["img/zz-new.jpg"] == 1
    assert all(per_key[k] == 1 for k in keys if k != "img/00003.jpg")
    etags = {r["etag"] for r in rows if r["key"] == "img/00003.jpg"}
    assert len(etags) == 2
    billed = fake.stats()["billed"]
    assert billed[("DetectFaces", "s3://etag-bucket/img/00003.jpg")] == 2
    assert billed[("DetectFaces", "s3://etag-bucket/img/00004.jpg")] == 1


def test_retry_failed_replaces_the_failed_rows(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    fake = start_fake()
    liar = b"words and no picture at all, although the name says jpg. " * 3
    keys = _fill(s3, "retry-bucket", 10, {"img/liar.jpg": liar})
    config = _config(tmp_path, "retry-bucket", moto_endpoint, fake.url, source={"sniff": False})
    out = tmp_path / "out"
    result = invoke("run", str(config))
    assert result.exit_code == 3
    failed = [r for r in read_jsonl(out / "results.jsonl") if r["status"] == "failed"]
    assert {r["error_code"] for r in failed} == {"InvalidImageFormatException"}

    s3.put_object(Bucket="retry-bucket", Key="img/liar.jpg", Body=fake_jpeg(77))
    result = invoke("resume", str(out), "--retry-failed", "--codes", "InvalidImageFormatException")
    assert result.exit_code == 0, result.stderr
    rows = _assert_exactly_once(out, keys)
    assert all(r["status"] == "ok" for r in rows)


def test_a_different_job_in_the_directory_is_refused_unless_fresh(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    fake = start_fake()
    keys = _fill(s3, "fresh-bucket", 5)
    config = _config(tmp_path, "fresh-bucket", moto_endpoint, fake.url)
    assert invoke("run", str(config)).exit_code == 0
    other = tmp_path / "other.toml"
    other.write_text(config.read_text().replace('type = "detect_labels"', 'type = "detect_text"'))
    refused = invoke("run", str(other))
    assert refused.exit_code == 2
    assert "different job" in refused.stderr
    assert invoke("run", str(other), "--fresh").exit_code == 0
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert {r["operation"] for r in rows} == {"detect_faces", "detect_text"}
    assert len(rows) == 2 * len(keys)
