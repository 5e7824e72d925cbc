"""Queue sources: S3 event notifications from SQS (moto's SQS over HTTP), through the engine.

Buckets and queues live on the session's moto server; Rekognition is the in-process
``FakeBackend`` where the test is about the queue, and the HTTP fake where the CLI runs as
a subprocess. Queues get short visibility timeouts and runs short idle times, so every
test takes seconds; every run is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest

from rekbatch.config import Config, load_config
from rekbatch.engine import Job, RunOptions, RunOutcome
from rekbatch.errors import BackendError
from rekbatch.store.ledger import LedgerDB
from tests.conftest import REGION, make_bucket
from tests.helpers import fake_jpeg, invoke, read_csv, read_jsonl, write_config
from tests.support.clients import aws_client
from tests.support.configs import operations, toml_tables
from tests.support.fake_backend import FakeBackend
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import lean_sqs_receives, put_objects, send_messages
from tests.support.servers import StartFake
from tests.test_engine import run as run_in_process

OPS = ("detect_faces", "detect_labels")
TWO_OPS = '[[operations]]\ntype = "detect_faces"\n\n[[operations]]\ntype = "detect_labels"\n'
BOUND = 60.0


@pytest.fixture(autouse=True, scope="module")
def _lean_receives() -> Iterator[None]:
    yield from lean_sqs_receives()


@pytest.fixture
def sqs(moto_endpoint: str) -> Any:
    return aws_client("sqs", moto_endpoint)


def make_queue(sqs: Any, name: str, *, visibility: int = 2, dlq_after: int | None = None) -> str:
    attributes = {"VisibilityTimeout": str(visibility)}
    if dlq_after is not None:
        dead = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])
        attributes["RedrivePolicy"] = json.dumps(
            {
                "deadLetterTargetArn": arn["Attributes"]["QueueArn"],
                "maxReceiveCount": str(dlq_after),
            }
        )
    url: str = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    return url


def created(bucket: str, key: str, body: bytes, sequencer: str) -> dict[str, Any]:
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventTime": "2026-12-01T10:00:00.000Z",
        "eventName": "ObjectCreated:Put",
        "s3": {
            "bucket": {"name": bucket},
            "object": {
                "key": quote_plus(key),
                "size": len(body),
                "eTag": hashlib.md5(body).hexdigest(),
                "sequencer": sequencer,
            },
        },
    }


def removed(bucket: str, key: str, sequencer: str) -> dict[str, Any]:
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventTime": "2026-12-01T10:00:01.000Z",
        "eventName": "ObjectRemoved:Delete",
        "s3": {
            "bucket": {"name": bucket},
            "object": {"key": quote_plus(key), "sequencer": sequencer},
        },
    }


def notify(s3: Any, sqs: Any, bucket: str, url: str) -> None:
    """``bucket`` sends its created and removed events to the queue at ``url``."""
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn["Attributes"]["QueueArn"],
                    "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                }
            ]
        },
    )


def send(sqs: Any, url: str, bodies: list[str]) -> None:
    for start in range(0, len(bodies), 10):
        entries = [
            {"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies[start : start + 10])
        ]
        answer = sqs.send_message_batch(QueueUrl=url, Entries=entries)
        assert not answer.get("Failed"), answer


def records(*events: dict[str, Any]) -> str:
    return json.dumps({"Records": list(events)})


def queue_counts(sqs: Any, url: str) -> tuple[int, int]:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


def make_config(
    tmp_path: Path, uris: list[str], moto: str, *, idle: float = 1.0, parquet: bool = False
) -> Config:
    path = tmp_path / "job.toml"
    text = toml_tables(
        job={"name": "follow", "output_dir": tmp_path / "out"},
        source={"uris": uris, "queue_idle_seconds": idle},
        aws={"region": REGION, "s3_endpoint_url": moto, "sqs_endpoint_url": moto},
        limits={"concurrency": 8, "max_tps": 10000},
        # Parquet only where it is the point: its export is a child process of a second or two.
        output={"parquet": parquet},
        operations=operations(*OPS),
    )
    path.write_text(text, encoding="utf-8")
    return load_config(path, environ={})


async def run(cfg: Config, backend: FakeBackend, **options: Any) -> RunOutcome:
    return await run_in_process(cfg, backend, bound=BOUND, **options)


def current_rows(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(key, operation) -> the ledger's current row."""
    db = LedgerDB(out / ".rekbatch" / "ledger.sqlite", readonly=True)
    try:
        rows = db.connection.execute("SELECT * FROM records").fetchall()
        return {(r["key"], r["operation"]): dict(r) for r in rows}
    finally:
        db.close()


def test_created_events_are_analysed_once_and_their_messages_deleted(
    s3: Any, sqs: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    bucket = make_bucket(s3, "follow-basic")
    bodies = {f"in/pic {i}+.jpg": fake_jpeg(i) for i in range(12)}
    put_objects(bucket, bodies.items())
    url = make_queue(sqs, "follow-basic")
    send(
        sqs,
        url,
        [
            records(created(bucket, key, body, f"{i + 1:016X}"))
            for i, (key, body) in enumerate(bodies.items())
        ],
    )
    cfg = make_config(tmp_path, ["sqs://follow-basic"], moto_endpoint)
    outcome = asyncio.run(run(cfg, FakeBackend()))
    assert outcome.exit_code == 0, outcome
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert Counter((r["key"], r["operation"]) for r in rows) == {
        (key, op): 1 for key in bodies for op in OPS
    }
    assert all(r["status"] == "ok" and r["sequencer"] for r in rows)
    assert queue_counts(sqs, url) == (0, 0)


def test_deletes_after_creates_and_older_events_arriving_late(
    s3: Any, sqs: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    bucket = make_bucket(s3, "follow-order")
    v1 = {f"k{i}.jpg": fake_jpeg(i) for i in range(4)}
    v2 = fake_jpeg(100)  # k2.jpg's newer content
    put_objects(bucket, [*v1.items(), ("k2.jpg", v2)])
    url = make_queue(sqs, "follow-order")
    cfg = make_config(tmp_path, ["sqs://follow-order"], moto_endpoint)
    out = tmp_path / "out"
    backend = FakeBackend()

    # 1: four objects created; k0 and k1 deleted afterwards; k2 put again with new content.
    send(sqs, url, [records(created(bucket, k, b, "10")) for k, b in v1.items()])
    send(sqs, url, [records(removed(bucket, "k0.jpg", "20"), removed(bucket, "k1.jpg", "20"))])
    send(sqs, url, [records(created(bucket, "k2.jpg", v2, "30"))])
    first = asyncio.run(run(cfg, backend))
    assert first.exit_code == 0, first
    rows = current_rows(out)
    assert {k for (k, _), r in rows.items() if r["status"] == "removed"} == {"k0.jpg", "k1.jpg"}
    assert rows[("k2.jpg", "detect_faces")]["sequencer"] == "30"
    assert rows[("k3.jpg", "detect_labels")]["status"] == "ok"
    assert queue_counts(sqs, url) == (0, 0)
    lines_before = read_jsonl(out / "results.jsonl")

    # 2: late arrivals: k2's older create, k0's create from before its delete, and repeats
    # of events already applied. None of them writes a row, and their messages are deleted.
    send(
        sqs,
        url,
        [
            records(created(bucket, "k2.jpg", v1["k2.jpg"], "10")),
            records(created(bucket, "k0.jpg", v1["k0.jpg"], "10")),
            records(removed(bucket, "k1.jpg", "20")),
            records(created(bucket, "k3.jpg", v1["k3.jpg"], "10")),
        ],
    )
    calls = sum(backend.calls.values())
    second = asyncio.run(run(cfg, backend))
    assert second.exit_code == 0, second
    assert read_jsonl(out / "results.jsonl") == lines_before
    assert sum(backend.calls.values()) == calls
    assert queue_counts(sqs, url) == (0, 0)

    # 3: k0 created again after its delete: analysed again, its removed rows replaced.
    send(sqs, url, [records(created(bucket, "k0.jpg", v1["k0.jpg"], "40"))])
    third = asyncio.run(run(cfg, backend))
    assert third.exit_code == 0, third
    rows = current_rows(out)
    assert rows[("k0.jpg", "detect_faces")]["status"] == "ok"
    assert rows[("k1.jpg", "detect_faces")]["status"] == "removed"

    # The files are append-only: the last row of a key and operation is its current one,
    # and it is the one the ledger points at.
    lines = read_jsonl(out / "results.jsonl")
    last = {(r["key"], r["operation"]): r for r in lines}
    assert {k: (r["status"], r["etag"]) for k, r in last.items()} == {
        k: (r["status"], r["etag"]) for k, r in rows.items()
    }
    assert Counter(r["status"] for r in read_csv(out / "results.csv")) == Counter(
        r["status"] for r in lines
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["by_status"] == {"ok": 6, "removed": 2}


def test_a_message_whose_object_keeps_failing_is_left_for_the_redrive_policy(
    s3: Any, sqs: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    bucket = make_bucket(s3, "follow-fail")
    bodies = {f"ok{i}.jpg": fake_jpeg(i) for i in range(3)} | {"bad.jpg": fake_jpeg(99)}
    put_objects(bucket, bodies.items())
    url = make_queue(sqs, "follow-fail", visibility=3, dlq_after=2)
    dlq = sqs.get_queue_url(QueueName="follow-fail-dlq")["QueueUrl"]
    send(sqs, url, [records(created(bucket, k, b, "10")) for k, b in bodies.items()])

    def hook(number: int, api: str, ident: str) -> BaseException | None:
        if ident.endswith("/bad.jpg"):
            return BackendError("InvalidImageFormatException", "refused", "permanent")
        return None

    backend = FakeBackend(hook=hook)
    cfg = make_config(tmp_path, ["sqs://follow-fail"], moto_endpoint)

    def back_in_the_queue() -> None:
        """Until the message's visibility timeout has run out (bounded)."""
        deadline = time.monotonic() + 20
        while queue_counts(sqs, url) != (1, 0):
            assert time.monotonic() < deadline, queue_counts(sqs, url)
            time.sleep(0.1)

    first = asyncio.run(run(cfg, backend))
    assert first.exit_code == 3, first  # some records failed
    assert current_rows(tmp_path / "out")[("bad.jpg", "detect_faces")]["status"] == "failed"
    # The others' messages are deleted; the failed one is not: it comes back.
    back_in_the_queue()
    tries = backend.calls["DetectFaces"]
    assert tries == 4

    # Delivered again: tried again (its failed rows replaced by the retry's).
    second = asyncio.run(run(cfg, backend))
    assert second.exit_code == 3, second
    assert backend.calls["DetectFaces"] == tries + 1
    back_in_the_queue()

    # Its next receive is past maxReceiveCount (2): SQS moves it to the dead-letter queue.
    assert not sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages")
    assert queue_counts(sqs, url) == (0, 0)
    moved = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10)["Messages"]
    assert len(moved) == 1 and "bad.jpg" in moved[0]["Body"]
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert Counter(r["key"] for r in rows if r["status"] == "failed") == {"bad.jpg": 4}


def test_messages_stay_invisible_while_their_objects_are_in_flight(
    s3: Any, sqs: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    bucket = make_bucket(s3, "follow-visible")
    bodies = {f"slow{i}.jpg": fake_jpeg(i) for i in range(4)}
    put_objects(bucket, bodies.items())
    url = make_queue(sqs, "follow-visible", visibility=1)
    send(sqs, url, [records(created(bucket, k, b, "10")) for k, b in bodies.items()])
    # Each object takes 2 s (one call per operation, 1 s each), twice the visibility
    # timeout; the queue is read for 3 s after the last message came, long enough to be
    # handed the messages again had their visibility run out.
    cfg = make_config(tmp_path, ["sqs://follow-visible"], moto_endpoint, idle=3.0)
    job = Job(cfg, RunOptions(output_dir=tmp_path / "out"), backend=FakeBackend(latency=1.0))

    async def run_it() -> RunOutcome:
        async with asyncio.timeout(BOUND):
            return await job.run()

    assert asyncio.run(run_it()).exit_code == 0
    assert job.feeder is not None
    stats = job.feeder.stats()["sqs://follow-visible"]
    assert stats["extended"] > 0
    assert stats["redelivered"] == 0  # without the extensions SQS would have sent them again
    assert (stats["received"], stats["deleted"]) == (4, 4)
    assert queue_counts(sqs, url) == (0, 0)


def test_a_finished_job_with_a_queue_does_not_list_its_bucket_again(
    s3: Any, sqs: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    bucket = make_bucket(s3, "follow-nolist")
    put_objects(bucket, [(f"a{i}.jpg", fake_jpeg(i)) for i in range(3)])
    url = make_queue(sqs, "follow-nolist")
    cfg = make_config(tmp_path, [f"s3://{bucket}/", "sqs://follow-nolist"], moto_endpoint)
    assert asyncio.run(run(cfg, FakeBackend())).exit_code == 0
    # New objects: one with an event, one without (its event lost, say). The queue says
    # what changed; the bucket is not listed again.
    put_objects(bucket, [("b.jpg", fake_jpeg(10)), ("c.jpg", fake_jpeg(11))])
    send(sqs, url, [records(created(bucket, "b.jpg", fake_jpeg(10), "10"))])
    assert asyncio.run(run(cfg, FakeBackend())).exit_code == 0
    keys = {r["key"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")}
    assert keys == {"a0.jpg", "a1.jpg", "a2.jpg", "b.jpg"}
    # and the event's object is the listing source's object (one source, one row each)
    assert {r["source"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")} == {
        f"s3://{bucket}/"
    }


# -- through the CLI, as a subprocess, with the HTTP fake Rekognition -------------------------


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    """Real latency and a quota: a few hundred objects take seconds, long enough to kill."""
    return start_fake(
        latency_median_ms=20,
        latency_sigma=0.3,
        quotas={"DetectFaces": 150, "DetectLabels": 150},
        s3_cache=True,
    )


def cli_config(tmp_path: Path, uris: list[str], moto: str, rek: str, idle: float) -> Path:
    uri_list = ", ".join(json.dumps(u) for u in uris)
    return write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "follow"\noutput_dir = "{tmp_path / "out"}"\n\n'
        # No sniffing: each object would be read from moto first, and the queue is the point.
        f"[source]\nuris = [{uri_list}]\nqueue_idle_seconds = {idle}\nsniff = false\n\n"
        f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{moto}"\n'
        f'sqs_endpoint_url = "{moto}"\nrekognition_endpoint_url = "{rek}"\n\n'
        # 16 workers: two receives under way at once
        f"[limits]\nconcurrency = 16\nmax_tps = 150\n\n[output]\nparquet = false\n\n{TWO_OPS}",
    )


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rekbatch", *args, "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(what: str, ready: Any, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the run ended before {what}: {proc.returncode} {err[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=10)
    raise AssertionError(f"no {what} in {timeout} s")


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def assert_one_current_row_each(out: Path, expected: set[tuple[str, str]]) -> None:
    """Every (key, operation) exactly once in results.jsonl, results.csv and the ledger."""
    rows = Counter((r["key"], r["operation"]) for r in read_jsonl(out / "results.jsonl"))
    assert set(rows) == expected
    assert max(rows.values()) == 1
    assert Counter((r["key"], r["operation"]) for r in read_csv(out / "results.csv")) == rows
    assert set(current_rows(out)) == expected


def test_300_messages_a_sigkill_and_a_rerun_leave_one_row_each_and_an_empty_queue(
    s3: Any, sqs: Any, moto_endpoint: str, fake: FakeRekognition, tmp_path: Path
) -> None:
    bucket = make_bucket(s3, "follow-kill")
    bodies = {f"new/{i:03d} photo.jpg": fake_jpeg(i) for i in range(270)}
    put_objects(bucket, bodies.items())
    url = make_queue(sqs, "follow-kill")
    rng = random.Random(28)
    creates = [
        records(created(bucket, key, body, f"{i + 1:018X}"))
        for i, (key, body) in enumerate(bodies.items())
    ]
    test_event = json.dumps(
        {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": bucket, "RequestId": "r"}
    )
    messages = (
        creates
        + rng.sample(creates, 10)  # the same events again
        + [test_event] * 10
        + [f"not an event {i}" for i in range(5)]
        + [json.dumps({"hello": i}) for i in range(5)]
    )
    rng.shuffle(messages)
    assert len(messages) == 300
    send_messages("follow-kill", messages)  # in-process: sending is not what is tested

    # Idle for longer than the visibility timeout (2 s): the rerun waits out the messages
    # the killed run held.
    config = cli_config(tmp_path, ["sqs://follow-kill"], moto_endpoint, fake.url, idle=3.0)
    out = tmp_path / "out"
    proc = start("run", str(config))
    wait_for("100 rows", lambda: lines_in(out / "results.jsonl") > 100, proc)
    time.sleep(rng.uniform(0.05, 0.3))
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    killed_at = lines_in(out / "results.jsonl")
    assert killed_at < 560

    rerun = start("run", str(config))
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err[-3000:]
    malformed = {
        (r["key"], r["operation"])
        for r in read_jsonl(out / "results.jsonl")
        if r["reason"] == "malformed_event"
    }
    assert len(malformed) == 10 * len(OPS)
    assert all(key.startswith("message:") for key, _ in malformed)
    assert_one_current_row_each(out, {(k, op) for k in bodies for op in OPS} | malformed)
    assert queue_counts(sqs, url) == (0, 0)
    # Each image paid for once, but for the calls on the wire at the kill.
    billed = fake.stats()["billed"]
    assert {ident for _, ident in billed} == {f"s3://{bucket}/{k}" for k in bodies}
    assert sum(n - 1 for n in billed.values()) <= 16 * len(OPS)


def test_follow_after_a_listing_takes_new_objects_once_and_stops_on_sigterm(
    s3: Any, sqs: Any, moto_endpoint: str, fake: FakeRekognition, tmp_path: Path
) -> None:
    # The README's order: the queue and the notifications first, then the first pass over
    # the bucket; the events of objects the listing also finds cost nothing.
    bucket = make_bucket(s3, "follow-live")
    url = make_queue(sqs, "follow-live")
    notify(s3, sqs, bucket, url)
    first = {f"old/{i:02d}.jpg": fake_jpeg(i) for i in range(30)}
    put_objects(bucket, first.items())
    config = cli_config(
        tmp_path, [f"s3://{bucket}/", "sqs://follow-live"], moto_endpoint, fake.url, idle=1.0
    )
    out = tmp_path / "out"
    proc = start("run", str(config), "--follow")
    listed = {(k, op) for k in first for op in OPS}

    def have(expected: set[tuple[str, str]]) -> Any:
        def check() -> bool:
            if not (out / "results.jsonl").exists():
                return False
            rows = {(r["key"], r["operation"]) for r in read_jsonl(out / "results.jsonl")}
            return expected <= rows

        return check

    wait_for("the listed objects' rows", have(listed), proc)
    added = {f"new/{i:02d} x+y.jpg": fake_jpeg(100 + i) for i in range(20)}
    for key, body in added.items():  # over HTTP, while the run follows the queue
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    s3.delete_object(Bucket=bucket, Key="old/00.jpg")
    everything = listed | {(k, op) for k in added for op in OPS}
    wait_for("the new objects' rows", have(everything), proc)
    wait_for("the queue to drain", lambda: queue_counts(sqs, url) == (0, 0), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert f"rekbatch resume {out}" in err

    rows = read_jsonl(out / "results.jsonl")
    counted = Counter((r["key"], r["operation"], r["status"]) for r in rows)
    assert max(counted.values()) == 1
    assert {(k, op) for k, op, status in counted if status == "ok"} == everything
    assert {k for k, _, status in counted if status == "removed"} == {"old/00.jpg"}
    billed = fake.stats()["billed"]
    assert max(billed.values()) == 1  # the listing and the events overlapped for free

    # Resumable: the job goes on where it stopped (without --follow: until the queue idles).
    resumed = invoke("resume", str(out))
    assert resumed.exit_code == 0, resumed.stderr
    assert read_jsonl(out / "results.jsonl") == rows
    assert queue_counts(sqs, url) == (0, 0)
    status = invoke("status", str(out), "--json")
    assert status.exit_code == 0, status.stderr
    queues = json.loads(status.stdout)["queues"]
    assert queues["sqs://follow-live"]["backlog"] == 0


def test_a_follow_run_writes_parquet_while_it_runs_with_one_row_per_object(
    s3: Any, sqs: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    pytest.importorskip("pyarrow")  # the test extra installs it
    import pyarrow.parquet as pq

    bucket = make_bucket(s3, "follow-parquet")
    old, new = fake_jpeg(1), fake_jpeg(2)
    put_objects(bucket, [("a.jpg", new), ("b.jpg", fake_jpeg(3))])
    make_queue(sqs, "follow-parquet")
    send_messages(
        "follow-parquet",
        [
            records(created(bucket, "a.jpg", old, "10")),
            records(created(bucket, "b.jpg", fake_jpeg(3), "10")),
        ],
    )
    cfg = make_config(tmp_path, ["sqs://follow-parquet"], moto_endpoint, parquet=True)
    out = tmp_path / "out"

    async def follow() -> tuple[RunOutcome, list[dict[str, Any]]]:
        job = Job(
            cfg,
            RunOptions(output_dir=out, follow=True, export_every_seconds=0.3),
            backend=FakeBackend(),
        )
        task = asyncio.create_task(job.run())

        async def rows_when(done: Any) -> list[dict[str, Any]]:
            while True:
                await asyncio.sleep(0.05)
                assert not task.done(), task.result()
                path = out / "results.parquet"
                if path.exists():
                    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
                    if done(rows):
                        return rows

        async with asyncio.timeout(BOUND):
            await rows_when(lambda rows: len(rows) == 4)
            # a.jpg again with new content, then b.jpg removed, while the run follows
            send_messages(
                "follow-parquet",
                [
                    records(created(bucket, "a.jpg", new, "20")),
                    records(removed(bucket, "b.jpg", "20")),
                ],
            )
            new_etag = hashlib.md5(new).hexdigest()
            rows = await rows_when(
                lambda rows: (
                    {(r["key"], r["status"], r["etag"]) for r in rows}
                    == {("a.jpg", "ok", new_etag), ("b.jpg", "removed", "")}
                )
            )
            job.request_stop("interrupted by SIGTERM")
            return await task, rows

    outcome, rows = asyncio.run(follow())
    assert outcome.exit_code == 130
    assert Counter((r["key"], r["operation"]) for r in rows) == {
        (k, op): 1 for k in ("a.jpg", "b.jpg") for op in OPS
    }
    assert len(read_jsonl(out / "results.jsonl")) == 8  # every version's rows, in order


# -- config, CLI, readers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "sqs://photos-events",
        "sqs://photos_events.fifo",
        "sqs://https://sqs.eu-west-1.amazonaws.com/111122223333/photos-events",
        "sqs://http://127.0.0.1:5000/000000000000/q",
    ],
)
def test_queue_sources_are_accepted(tmp_path: Path, uri: str) -> None:
    cfg = make_config(tmp_path, [uri], "http://127.0.0.1:1")
    assert cfg.source.uris == [uri]
    assert cfg.aws.sqs_endpoint_url == "http://127.0.0.1:1"
    assert cfg.source.queue_idle_seconds == 1.0


@pytest.mark.parametrize("uri", ["sqs://", "sqs://has space", "sqs://a/b", "sqs://" + "q" * 81])
def test_a_bad_queue_source_is_one_config_error(tmp_path: Path, uri: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        f'[source]\nuris = ["{uri}"]\n\n[[operations]]\ntype = "detect_labels"\n',
        encoding="utf-8",
    )
    result = invoke("validate", str(path))
    assert result.exit_code == 2
    assert "source.uris" in result.stderr and "sqs://QUEUE_NAME" in result.stderr


def test_the_idle_time_does_not_change_which_job_it_is(tmp_path: Path) -> None:
    a = make_config(tmp_path, ["sqs://q"], "http://127.0.0.1:1", idle=1.0)
    b = make_config(tmp_path, ["sqs://q"], "http://127.0.0.1:1", idle=60.0)
    assert a.fingerprint() == b.fingerprint()


def test_follow_needs_a_queue_source(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    path = tmp_path / "job.toml"
    path.write_text(
        f'[job]\noutput_dir = "{tmp_path / "out"}"\n[source]\nuris = ["{photos}"]\n\n'
        '[backend]\nkind = "aws"\n\n[[operations]]\ntype = "detect_labels"\n',
        encoding="utf-8",
    )
    result = invoke("run", str(path), "--follow")
    assert result.exit_code == 2
    assert "--follow: needs a queue source (sqs://QUEUE)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_queue_is_one_line_before_any_work(moto_endpoint: str, tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    make_config(tmp_path, ["sqs://no-such-queue"], moto_endpoint)  # writes job.toml
    result = invoke("run", str(path))
    assert result.exit_code == 2
    assert "sqs://no-such-queue" in result.stderr
    assert "Traceback" not in result.stderr


def test_current_lines_are_the_rows_the_ledger_points_at(tmp_path: Path) -> None:
    from rekbatch.sinks.current import LEDGER, current_lines
    from rekbatch.store import jobdir

    assert Path(jobdir.STATE_DIR) / "ledger.sqlite" == LEDGER
    out = tmp_path / "out"
    out.mkdir()
    lines = [b'{"k": "a", "v": 1}\n', b'{"k": "b", "v": 1}\n', b'{"k": "a", "v": 2}\n']
    (out / "results.jsonl").write_bytes(b"".join(lines))
    assert list(current_lines(out)) == lines  # no ledger: every line
    db = LedgerDB(out / LEDGER)
    rows = [(0, "b", 19), (0, "a", 38)]  # a's second row replaced its first
    db.connection.executemany(
        "INSERT INTO records (source, key, operation, etag, size, status, attempts, billed, "
        "processed_at, jsonl_offset, jsonl_length) "
        "VALUES (?, ?, 'op', '', 0, 'ok', 1, 0, '', ?, 19)",
        rows,
    )
    db.connection.commit()
    db.close()
    assert list(current_lines(out)) == [lines[1], lines[2]]


def test_status_shows_the_backlog_and_ages_from_what_the_run_saw() -> None:
    from rekbatch.commands.status import queue_status
    from rekbatch.display.lines import queue_line

    beat = {"heartbeat_at": 1000.0}
    seen = {
        "sqs://q": {
            "received": 40,
            "events": 38,
            "deleted": 35,
            "failed_messages": 1,
            "held": 4,
            "backlog": 120,
            "in_flight": 4,
            "delayed": 0,
            "backlog_at": 998.0,
            "oldest_held_age_seconds": 7.0,
            "lag_seconds": 65.0,
            "redrive_policy": True,
        }
    }
    status = queue_status(seen, beat, now=1010.0)["sqs://q"]
    assert status["backlog_age_seconds"] == 12.0
    assert status["oldest_held_age_seconds"] == 17.0  # 7 s at the heartbeat, 10 s ago
    line = queue_line("sqs://q", status)
    assert line == (
        "queue sqs://q: backlog 120 (4 in flight) as of 12 s ago, oldest message in hand "
        "17 s old, last received 65 s after it was sent; received 40, deleted 35, "
        "left for redrive 1"
    )


def test_plan_says_a_queue_is_not_planned(tmp_path: Path) -> None:
    make_config(tmp_path, ["sqs://photos-events"], "http://127.0.0.1:1")
    result = invoke("plan", str(tmp_path / "job.toml"))
    assert result.exit_code == 0, result.stderr
    assert "note: sqs://photos-events: a queue; its events are read by run" in result.stdout


def test_the_progress_view_shows_removed_rows_and_the_queue() -> None:
    import io

    from rich.console import Console

    from rekbatch.display.progress import ProgressView

    stats: dict[str, Any] = {
        "calls": {"DetectLabels": 10},
        "listed": 12,
        "listing_complete": False,
        "objects_done": 12,
        "records": {"ok": 10, "removed": 2},
        "queues": {
            "sqs://photos-events": {"backlog": 40, "in_flight": 10, "received": 22, "deleted": 12}
        },
    }
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(ProgressView(warmup=3.0).render(stats, now=1.0))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "removed 2" in text
    assert "queue" in text and "backlog 40 (10 in flight)" in text and "received 22" in text
