"""The face index kept in step with the results: faces of a photo that changed or was removed
leave it, and a resume after IndexFaces whose row never committed indexes nothing twice.

AWS against the HTTP fake (whose IndexFaces, as Rekognition's, adds new faces each time an
image is indexed again), offline on two sample photos. The invariant every test ends with:
the faces in the index are exactly the faces the current rows name, and each (object,
operation) has one row in results.jsonl, results.csv and the ledger.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rekbatch.sinks.current import current_lines
from rekbatch.store.ledger import LedgerDB
from tests.conftest import SAMPLES, make_bucket
from tests.helpers import (
    fake_jpeg,
    invoke,
    read_csv,
    read_jsonl,
    sha256,
    write_config,
)
from tests.support.clients import aws_client
from tests.support.configs import job_config
from tests.support.fake_rekognition import FakeConfig, FakeRekognition
from tests.support.moto import lean_sqs_receives, put_objects

OP = "index_faces"
COLLECTION = "upkeep"
BOUND = 60.0


# -- helpers ----------------------------------------------------------------------------------


def _photos(count: int) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    """``count`` photos: ric in every 7th, two strangers in every photo."""
    bodies: dict[str, bytes] = {}
    people: dict[str, list[str]] = {}
    for i in range(count):
        body = fake_jpeg(i)
        bodies[f"photos/{i:04d}.jpg"] = body
        people[sha256(body)] = (["ric"] if i % 7 == 0 else []) + [f"a-{i}", f"b-{i}"]
    return bodies, people


def _reference(folder: Path) -> tuple[Path, dict[str, list[str]]]:
    folder.mkdir(parents=True, exist_ok=True)
    body = fake_jpeg(90_000)
    path = folder / "ric.jpg"
    path.write_bytes(body)
    return path, {sha256(body): ["ric"]}


def _config(
    tmp_path: Path,
    moto: str,
    fake: FakeRekognition,
    uris: list[str],
    *,
    limits: str = "",
    source: str = "",
    aws: str = "",
) -> Path:
    ops = f'[[operations]]\ntype = "{OP}"\ncollection_id = "{COLLECTION}"\n'
    text = job_config(
        uris=uris,
        output_dir=tmp_path / "out",
        s3_endpoint=moto,
        rek_endpoint=fake.url,
        operations=ops,
        extra=f"[limits]\nconcurrency = 4\n{limits}",
    )
    # No header reads: the fake reads the objects itself.
    text = text.replace("[source]\n", f"[source]\nsniff = false\n{source}")
    return write_config(tmp_path / "job.toml", text.replace("[aws]\n", f"[aws]\n{aws}"))


def _client(fake: FakeRekognition) -> Any:
    return aws_client("rekognition", fake.url)


def _indexed(fake: FakeRekognition, out: Path) -> Counter[str]:
    """Every FaceId in the job's collections (a Counter: a face listed twice shows)."""
    client = _client(fake)
    found: Counter[str] = Counter()
    for collection in _collections(out):
        pages = client.get_paginator("list_faces").paginate(CollectionId=collection)
        found.update(face["FaceId"] for page in pages for face in page["Faces"])
    return found


def _collections(out: Path) -> list[str]:
    db = LedgerDB(out / ".rekbatch" / "ledger.sqlite", readonly=True)
    try:
        return db.collections_of(OP) or [COLLECTION]
    finally:
        db.close()


def _current(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in current_lines(out)]


def _named_faces(out: Path) -> set[str]:
    """The FaceIds the current ok rows name (a copy names its original's)."""
    return {
        record["Face"]["FaceId"]
        for row in _current(out)
        if row["operation"] == OP and row["status"] == "ok"
        for record in row["result"]["FaceRecords"]
    }


def _assert_index_is_the_rows(indexed: Counter[str], out: Path) -> None:
    assert max(indexed.values(), default=1) == 1
    assert set(indexed) == _named_faces(out)


def _assert_once_each(out: Path, keys: set[str]) -> None:
    """Each (object, operation) once among the current rows, in results.csv and the ledger;
    results.jsonl holds nothing else but rows the current ones replaced."""
    current = Counter((r["key"], r["operation"]) for r in _current(out))
    assert current == {(key, OP): 1 for key in keys}
    everything = Counter((r["key"], r["operation"]) for r in read_jsonl(out / "results.jsonl"))
    assert set(everything) == set(current)
    csv_rows = Counter((r["key"], r["operation"]) for r in read_csv(out / "results.csv"))
    assert csv_rows == everything
    db = LedgerDB(out / ".rekbatch" / "ledger.sqlite", readonly=True)
    try:
        ledger = Counter(
            (r[0], r[1]) for r in db.connection.execute("SELECT key, operation FROM records")
        )
    finally:
        db.close()
    assert ledger == current


def _find(out: Path, reference: Path) -> set[str]:
    result = invoke("find", str(out), "--person", f"ric={reference}")
    assert result.exit_code == 0, result.stderr
    return {r["key"] for r in read_jsonl(out / "find" / "ric.jsonl")}


# -- a photo changed under its key --------------------------------------------------------------


def test_a_changed_photo_takes_its_old_faces_out_of_the_index(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    """Two of ric's photos change into photos without him; find answers neither. The old
    faces of one stay while a copy of its old content still names them."""
    bucket = make_bucket(s3, "upkeep-changed")
    bodies, people = _photos(21)
    bodies["copies/ric.jpg"] = bodies["photos/0007.jpg"]
    put_objects(bucket, bodies.items())
    reference, ref_people = _reference(tmp_path / "refs")
    changed = {"photos/0007.jpg": fake_jpeg(1007), "photos/0014.jpg": fake_jpeg(1014)}
    for body in changed.values():
        people[sha256(body)] = ["someone-else"]
    config = FakeConfig(s3_endpoint_url=moto_endpoint, people={**people, **ref_people})
    with FakeRekognition(config) as fake:
        job = _config(tmp_path, moto_endpoint, fake, [f"s3://{bucket}/"])
        assert invoke("run", str(job)).exit_code == 0
        out = tmp_path / "out"
        assert _find(out, reference) == {
            "photos/0000.jpg", "photos/0007.jpg", "photos/0014.jpg", "copies/ric.jpg"
        }  # fmt: skip

        put_objects(bucket, changed.items())
        fake.reset_stats()
        result = invoke("run", str(job))
        assert result.exit_code == 0, result.stderr
        calls = fake.stats()["calls"]
        assert calls["IndexFaces"] == 2
        # The replaced rows' faces, in one call; the copy's are kept.
        assert calls.get("DeleteFaces") == 1 and "ListFaces" not in calls
        assert _find(out, reference) == {"photos/0000.jpg", "copies/ric.jpg"}
        indexed = _indexed(fake, out)
    _assert_index_is_the_rows(indexed, out)
    _assert_once_each(out, set(bodies))
    summary = json.loads((out / "summary.json").read_text())[OP]
    assert summary["faces_indexed"] == sum(indexed.values())


def test_offline_a_changed_photo_is_found_no_more(tmp_path: Path) -> None:
    """ric.jpg becomes a photo of someone else: the scan no longer answers it, and the store
    keeps only the faces the current rows name."""
    from rekbatch.backends.local.collections import CollectionStore

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("ric.jpg", "sample-image0.jpeg"):
        shutil.copy(SAMPLES / name, photos / name)
    out = tmp_path / "out"

    def index() -> None:
        result = invoke("scan", str(photos), "--op", OP, "--offline", "--output", str(out))
        assert result.exit_code == 0, result.stderr

    index()
    reference = SAMPLES / "ric_harvey.jpeg"
    assert _find(out, reference) == {"ric.jpg"}
    (photos / "ric.jpg").write_bytes((SAMPLES / "sample-image0.jpeg").read_bytes())
    index()
    assert _find(out, reference) == set()
    store = CollectionStore(out / ".rekbatch" / "collections")
    try:
        stored = Counter(face.face_id for face in store.faces("rekbatch-index"))
    finally:
        store.close()
    _assert_index_is_the_rows(stored, out)
    _assert_once_each(out, {"ric.jpg", "sample-image0.jpeg"})


# -- an object removed (queue events) -----------------------------------------------------------


@pytest.fixture(scope="module")
def _lean_receives() -> Iterator[None]:
    yield from lean_sqs_receives()


def test_removed_objects_leave_the_index_and_the_report(
    s3: Any, moto_endpoint: str, tmp_path: Path, _lean_receives: None
) -> None:
    """a.jpg (ric) and its copy b.jpg come from S3 events. a.jpg removed: find and the report
    answer b.jpg alone, and a's faces stay (b names them). b.jpg removed: the faces go."""
    from tests.test_follow import created, make_queue, records, removed, send

    sqs = aws_client("sqs", moto_endpoint)
    bucket = make_bucket(s3, "upkeep-removed")
    bodies = {"a.jpg": fake_jpeg(1), "b.jpg": fake_jpeg(1), "c.jpg": fake_jpeg(2)}
    put_objects(bucket, bodies.items())
    url = make_queue(sqs, "upkeep-removed")
    reference, ref_people = _reference(tmp_path / "refs")
    people = {sha256(fake_jpeg(1)): ["ric", "x"], sha256(fake_jpeg(2)): ["y"], **ref_people}
    with FakeRekognition(FakeConfig(s3_endpoint_url=moto_endpoint, people=people)) as fake:
        job = _config(
            tmp_path,
            moto_endpoint,
            fake,
            ["sqs://upkeep-removed"],
            source="queue_idle_seconds = 1.0\n",
            aws=f'sqs_endpoint_url = "{moto_endpoint}"\n',
        )
        out = tmp_path / "out"
        events = [created(bucket, k, b, f"{i + 1:04X}") for i, (k, b) in enumerate(bodies.items())]
        send(sqs, url, [records(*events)])
        assert invoke("run", str(job)).exit_code == 0
        assert _find(out, reference) == {"a.jpg", "b.jpg"}
        a_row = next(r for r in _current(out) if r["key"] == "a.jpg")
        a_faces = {f["Face"]["FaceId"] for f in a_row["result"]["FaceRecords"]}
        assert len(a_faces) == 2

        s3.delete_object(Bucket=bucket, Key="a.jpg")
        send(sqs, url, [records(removed(bucket, "a.jpg", "0010"))])
        assert invoke("run", str(job)).exit_code == 0
        page = _report(out)
        assert "a.jpg" not in page and "b.jpg" in page  # before find is asked again
        assert _find(out, reference) == {"b.jpg"}
        assert a_faces <= set(_indexed(fake, out))  # b.jpg still names a's faces

        s3.delete_object(Bucket=bucket, Key="b.jpg")
        send(sqs, url, [records(removed(bucket, "b.jpg", "0011"))])
        fake.reset_stats()
        assert invoke("run", str(job)).exit_code == 0
        assert fake.stats()["calls"].get("DeleteFaces") == 1
        page = _report(out)
        assert "a.jpg" not in page and "b.jpg" not in page
        assert _find(out, reference) == set()
        indexed = _indexed(fake, out)
    _assert_index_is_the_rows(indexed, out)
    assert set(indexed) and not set(indexed) & a_faces  # c.jpg's faces alone
    rows = {r["key"]: r["status"] for r in _current(out)}
    assert rows == {"a.jpg": "removed", "b.jpg": "removed", "c.jpg": "ok"}


def _report(out: Path) -> str:
    result = invoke("report", str(out))
    assert result.exit_code == 0, result.stderr
    return (out / "report.html").read_text(encoding="utf-8")


# -- IndexFaces whose row never committed ---------------------------------------------------


def test_a_clean_run_costs_no_call_beyond_the_indexing(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    bucket = make_bucket(s3, "upkeep-clean")
    bodies, people = _photos(12)
    put_objects(bucket, bodies.items())
    with FakeRekognition(FakeConfig(s3_endpoint_url=moto_endpoint, people=people)) as fake:
        job = _config(tmp_path, moto_endpoint, fake, [f"s3://{bucket}/"])
        assert invoke("run", str(job)).exit_code == 0
        assert fake.stats()["calls"] == {"CreateCollection": 1, "IndexFaces": 12}
        fake.reset_stats()
        assert invoke("run", str(job)).exit_code == 0  # nothing changed: nothing to do
        assert fake.stats()["calls"] == {"CreateCollection": 1}
        indexed = _indexed(fake, tmp_path / "out")
    _assert_index_is_the_rows(indexed, tmp_path / "out")


def test_an_answer_lost_on_the_wire_and_retried_leaves_each_face_once(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    """Two IndexFaces indexed, then their connections dropped before the answer: the retries
    index the photos again. The run's end takes the first faces out, with one ListFaces and
    one DeleteFaces."""
    bucket = make_bucket(s3, "upkeep-dropped")
    bodies, people = _photos(12)
    put_objects(bucket, bodies.items())
    # Call 1 is CreateCollection.
    config = FakeConfig(
        s3_endpoint_url=moto_endpoint, people=people, fail_calls={3: "drop", 6: "drop"}
    )
    with FakeRekognition(config) as fake:
        job = _config(tmp_path, moto_endpoint, fake, [f"s3://{bucket}/"])
        result = invoke("run", str(job))
        assert result.exit_code == 0, result.stderr
        stats = fake.stats()
        assert stats["dropped"] == {"IndexFaces": 2}
        assert stats["calls"]["ListFaces"] == 1 and stats["calls"]["DeleteFaces"] == 1
        indexed = _indexed(fake, tmp_path / "out")
    _assert_index_is_the_rows(indexed, tmp_path / "out")
    _assert_once_each(tmp_path / "out", set(bodies))


def test_retry_failed_after_an_answer_lost_indexes_each_face_once(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    """With one attempt, a dropped answer is a failed record (exit 3) whose faces are in the
    collection all the same: the run's end takes them out; --retry-failed indexes once."""
    bucket = make_bucket(s3, "upkeep-retry")
    bodies, people = _photos(10)
    put_objects(bucket, bodies.items())
    config = FakeConfig(s3_endpoint_url=moto_endpoint, people=people, fail_calls={4: "drop"})
    with FakeRekognition(config) as fake:
        job = _config(
            tmp_path, moto_endpoint, fake, [f"s3://{bucket}/"], limits="max_attempts = 1\n"
        )
        assert invoke("run", str(job)).exit_code == 3
        out = tmp_path / "out"
        _assert_index_is_the_rows(_indexed(fake, out), out)
        fake.configure(fail_calls={})
        result = invoke("resume", str(out), "--retry-failed")
        assert result.exit_code == 0, result.stderr
        indexed = _indexed(fake, out)
    _assert_index_is_the_rows(indexed, out)
    _assert_once_each(out, set(bodies))
    assert all(r["status"] == "ok" for r in _current(out))


def _failing_accept(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """The writer seam: ``key``'s index_faces answer never reaches results.jsonl, and the run
    fails there (as a kill between the call and the row would leave it)."""
    from rekbatch.sinks.writer import Writer

    accept = Writer.accept

    def failing(self: Writer, record: Any) -> tuple[int, int]:
        if record.operation == OP and record.status == "ok" and record.obj.key == key:
            raise RuntimeError("injected: the row is lost")
        return accept(self, record)

    monkeypatch.setattr(Writer, "accept", failing)


def _resume_sweeping_the_strays(fake: FakeRekognition, out: Path) -> Counter[str]:
    """Resume a job that left faces without a row: one ListFaces finds them, one DeleteFaces
    takes them out. The faces indexed after."""
    fake.reset_stats()
    result = invoke("resume", str(out))
    assert result.exit_code == 0, result.stderr
    calls = fake.stats()["calls"]
    assert calls["ListFaces"] == 1 and calls["DeleteFaces"] == 1
    return _indexed(fake, out)


def test_a_row_lost_after_indexfaces_is_swept_on_resume(
    s3: Any, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = make_bucket(s3, "upkeep-seam")
    bodies, people = _photos(12)
    put_objects(bucket, bodies.items())
    with FakeRekognition(FakeConfig(s3_endpoint_url=moto_endpoint, people=people)) as fake:
        job = _config(tmp_path, moto_endpoint, fake, [f"s3://{bucket}/"])
        with monkeypatch.context() as patch:
            _failing_accept(patch, "photos/0004.jpg")
            assert invoke("run", str(job)).exit_code == 1
        out = tmp_path / "out"
        assert len(_indexed(fake, out)) > len(_named_faces(out))  # faces without a row
        indexed = _resume_sweeping_the_strays(fake, out)
    _assert_index_is_the_rows(indexed, out)
    _assert_once_each(out, set(bodies))


def test_offline_a_row_lost_after_indexing_is_replaced_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rekbatch.backends.local.collections import CollectionStore

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("ric.jpg", "sample-image0.jpeg"):
        shutil.copy(SAMPLES / name, photos / name)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _failing_accept(patch, "ric.jpg")  # one face
        result = invoke("scan", str(photos), "--op", OP, "--offline", "--output", str(out))
        assert result.exit_code == 1
    store = CollectionStore(out / ".rekbatch" / "collections")
    try:
        assert store.count("rekbatch-index") > len(_named_faces(out))
        result = invoke("resume", str(out))
        assert result.exit_code == 0, result.stderr
        assert _find(out, SAMPLES / "ric_harvey.jpeg") == {"ric.jpg"}
        stored = Counter(face.face_id for face in store.faces("rekbatch-index"))
    finally:
        store.close()
    _assert_index_is_the_rows(stored, out)
    _assert_once_each(out, {"ric.jpg", "sample-image0.jpeg"})


def test_sigkill_while_indexfaces_is_answered_then_a_resume(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    """The run is killed while the fake holds an answer whose faces it has indexed (and
    other calls may be in flight): the resume takes those faces out and indexes them once."""
    bucket = make_bucket(s3, "upkeep-kill")
    bodies, people = _photos(40)
    put_objects(bucket, bodies.items())
    config = FakeConfig(
        s3_endpoint_url=moto_endpoint,
        people=people,
        latency_median_ms=5,
        fail_calls={12: "stall"},
        stall_seconds=0,  # held until the client leaves
    )
    with FakeRekognition(config) as fake:
        job = _config(tmp_path, moto_endpoint, fake, [f"s3://{bucket}/"])
        out = tmp_path / "out"
        proc = subprocess.Popen(
            [sys.executable, "-m", "rekbatch", "run", str(job), "--log-format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + BOUND
            while not fake.stats()["stalled"].get("IndexFaces"):
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "no IndexFaces held"
                time.sleep(0.02)
            time.sleep(0.2)  # the other calls under way go on meanwhile
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
        assert len(_indexed(fake, out)) > len(_named_faces(out))
        fake.configure(fail_calls={})
        indexed = _resume_sweeping_the_strays(fake, out)
    _assert_index_is_the_rows(indexed, out)
    _assert_once_each(out, set(bodies))


# -- following the bucket: a replacement, a removal and a kill while re-indexing ----------------


def test_follow_replace_and_remove_then_a_kill_while_reindexing_and_a_resume(
    s3: Any, moto_endpoint: str, tmp_path: Path, _lean_receives: None
) -> None:
    """The README's setup: notifications into a queue, a first pass over the bucket, then
    ``run --follow``. One of ric's photos is replaced by a photo without him and another is
    removed; the process is killed while the fake holds the re-indexing IndexFaces (its
    faces already in the collection). ``resume`` takes the stray and the old faces out,
    indexes the new photo once, and ``find`` no longer answers the old photos."""
    from tests.test_follow import make_queue, notify, queue_counts, start, wait_for

    sqs = aws_client("sqs", moto_endpoint)
    bucket = make_bucket(s3, "upkeep-follow")
    url = make_queue(sqs, "upkeep-follow")
    notify(s3, sqs, bucket, url)
    bodies, people = _photos(15)  # ric in 0000, 0007 and 0014
    put_objects(bucket, bodies.items())
    reference, ref_people = _reference(tmp_path / "refs")
    replacement = fake_jpeg(1007)
    people[sha256(replacement)] = ["someone-else"]
    config = FakeConfig(
        s3_endpoint_url=moto_endpoint, people={**people, **ref_people}, stall_seconds=0
    )
    with FakeRekognition(config) as fake:
        job = _config(
            tmp_path,
            moto_endpoint,
            fake,
            [f"s3://{bucket}/", "sqs://upkeep-follow"],
            # Longer than the visibility timeout (2 s) twice over: see the resume below.
            source="queue_idle_seconds = 5.0\n",
            aws=f'sqs_endpoint_url = "{moto_endpoint}"\n',
        )
        out = tmp_path / "out"
        proc = start("run", str(job), "--follow")
        try:
            wait_for("the first pass", lambda: _keys_in(out) >= set(bodies), proc)
            wait_for("the queue to drain", lambda: queue_counts(sqs, url) == (0, 0), proc)
            assert _find(out, reference) == {
                "photos/0000.jpg", "photos/0007.jpg", "photos/0014.jpg"
            }  # fmt: skip
            fake.configure(fail_calls={1: "stall"})  # the next call: re-indexing 0007
            fake.reset_stats()
            s3.put_object(Bucket=bucket, Key="photos/0007.jpg", Body=replacement)
            s3.delete_object(Bucket=bucket, Key="photos/0014.jpg")
            wait_for("the held IndexFaces", lambda: fake.stats()["stalled"].get("IndexFaces"), proc)
            wait_for("the removal", lambda: _removed_in(out) == {"photos/0014.jpg"}, proc)
            # While the run follows: find answers from the committed rows alone.
            wait_for(
                "find to leave the removed photo out",
                lambda: "photos/0014.jpg" not in _find(out, reference),
                proc,
            )
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
        assert fake.stats()["calls"]["IndexFaces"] == 1
        assert len(_indexed(fake, out)) > len(_named_faces(out))  # the held call's faces
        # The messages the killed run held come back after their visibility timeout (a
        # receive it left on the wire may take them once more first).
        deadline = time.monotonic() + BOUND
        while queue_counts(sqs, url)[1]:
            assert time.monotonic() < deadline, "the held messages never came back"
            time.sleep(0.1)

        fake.configure(fail_calls={})
        fake.reset_stats()
        result = invoke("resume", str(out))
        assert result.exit_code == 0, result.stderr
        assert fake.stats()["calls"]["IndexFaces"] == 1  # the new photo, once
        assert _find(out, reference) == {"photos/0000.jpg"}
        indexed = _indexed(fake, out)
    assert queue_counts(sqs, url) == (0, 0)
    _assert_index_is_the_rows(indexed, out)
    _assert_once_each(out, set(bodies))
    rows = {r["key"]: r for r in _current(out)}
    assert rows["photos/0014.jpg"]["status"] == "removed"
    assert rows["photos/0007.jpg"]["etag"].strip('"') == hashlib.md5(replacement).hexdigest()


def _keys_in(out: Path) -> set[str]:
    path = out / "results.jsonl"
    return {r["key"] for r in read_jsonl(path)} if path.exists() else set()


def _removed_in(out: Path) -> set[str]:
    path = out / "results.jsonl"
    if not path.exists():
        return set()
    return {r["key"] for r in read_jsonl(path) if r["status"] == "removed"}


# -- the pieces ---------------------------------------------------------------------------------


def test_a_call_counts_the_attempts_the_service_may_have_carried_out() -> None:
    """Refused connections, throttles and error answers were not carried out; a connection
    lost after the request, a passed deadline and an unreadable answer may have been."""
    from rekbatch.calls.retry import RetryPolicy
    from rekbatch.errors import BackendError
    from tests.support.virtual_clock import VirtualClock
    from tests.test_calls import API, NetworkBackend, _caller, _image, _refused

    script: dict[int, Any] = {
        1: BackendError("ConnectionClosedError", "closed", "transient", connection="exchange"),
        2: _refused(),
        3: BackendError("ThrottlingException", "slow down", "throttle"),
        4: BackendError("InvalidResponse", "half a body", "transient"),
        5: BackendError("InternalServerError", "oops", "transient"),
        6: 3600.0,  # past the deadline
    }
    clock = VirtualClock()
    backend = NetworkBackend(lambda name, send: script.get(send, 0.01) if name == "a" else 0.01)
    caller = _caller(backend, clock, retry=RetryPolicy(max_attempts=8, cap=2.0))
    outcome = clock.run(caller.call(API, {}, _image("a")))
    assert outcome.error is None and outcome.attempts == 7
    assert outcome.unsure == 3
    clean = clock.run(caller.call(API, {}, _image("b")))
    assert clean.error is None and clean.unsure == 0


def test_notes_keep_what_is_unanswered_through_rewrites_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rekbatch.store import index_notes
    from rekbatch.store.index_notes import IndexNotes, read_notes

    monkeypatch.setattr(index_notes, "COMPACT_LINES", 5)
    path = tmp_path / "notes"
    notes = IndexNotes(path)
    assert notes.left() == set()
    notes.add(("c", "lost"))  # its answer never comes
    for i in range(12):
        notes.add(("c", f"x{i}"))
        notes.answered(("c", f"x{i}"))
    notes.add(("c-0001", "in-flight"))
    # Rewritten at the 5th and 10th note (each time with the note of the call then under
    # way, x3 and x8): what is needed, and the notes since.
    since = {("c", f"x{i}") for i in (8, 9, 10, 11)}
    assert read_notes(path) == {("c", "lost"), ("c-0001", "in-flight"), *since}
    assert notes.left() == {("c", "lost"), ("c-0001", "in-flight")}

    with path.open("ab") as fh:
        fh.write(b"c\ttorn-by-a-ki")  # a write cut short: no newline
    later = IndexNotes(path)  # the next run
    assert later.left() == {("c", "lost"), ("c-0001", "in-flight"), *since}
    later.add(("c", "new"))
    later.answered(("c", "new"))
    later.settled({("c", "lost"), *since})
    assert read_notes(path) == {("c-0001", "in-flight")}
    later.settled(later.left())
    assert path.read_bytes() == b""


def test_replaced_rows_retire_their_faces_in_the_commit(tmp_path: Path) -> None:
    """The ledger's row of an object, and a row of the same batch followed by another of the
    same object, retire the faces their results indexed; rows without faces retire none."""
    from rekbatch.sinks.retired import retired_faces
    from rekbatch.store.ledger import RECORD_COLUMNS

    lines: list[bytes] = []

    def row(key: str, status: str, faces: list[str], collection: str = "c") -> tuple[Any, ...]:
        records = [{"Face": {"FaceId": f, "ExternalImageId": key}} for f in faces]
        result = {"FaceRecords": records, "CollectionId": collection} if status == "ok" else None
        line = json.dumps({"result": result}).encode() + b"\n"
        offset = sum(map(len, lines))
        lines.append(line)
        values = dict.fromkeys(RECORD_COLUMNS)
        values.update(
            source=0, key=key, operation=OP, etag="e", size=1, status=status, attempts=1,
            billed=1, processed_at="now", jsonl_offset=offset, jsonl_length=len(line),
            detail=f"{collection}/{key}" if faces else None,
        )  # fmt: skip
        return tuple(values[c] for c in RECORD_COLUMNS)

    def read(offset: int, length: int) -> bytes:
        return b"".join(lines)[offset : offset + length]

    db = LedgerDB(tmp_path / "ledger.sqlite")
    try:
        first = [row("a", "ok", ["fa1", "fa2"]), row("b", "ok", ["fb"]), row("n", "ok", [])]
        assert retired_faces(db, first, read) == []
        db.commit(first, {}, {}, {}, [])
        batch = [
            row("a", "ok", ["fa3"], "c-0001"),  # changed: into another shard
            row("a", "removed", []),  # then removed, in the same batch
            row("b", "failed", []),
            row("n", "ok", ["fn"]),
            row("new", "ok", ["fx"]),
        ]
        retired = retired_faces(db, batch, read)
        assert sorted(retired) == [
            ("c", "fa1", "c/a"),
            ("c", "fa2", "c/a"),
            ("c", "fb", "c/b"),
            ("c-0001", "fa3", "c-0001/a"),
        ]
        db.commit(batch, {}, {}, {}, [], retired=retired)
        db.commit([], {}, {}, {}, [], retired=retired[:1])  # noted twice: kept once
        assert sorted(db.retired_faces(10)) == sorted(retired)
        db.forget_retired([("c", "fa1"), ("c", "fb")])
        assert sorted(db.retired_faces(10)) == [("c", "fa2", "c/a"), ("c-0001", "fa3", "c-0001/a")]
    finally:
        db.close()
