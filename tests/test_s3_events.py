"""S3 event notifications in SQS bodies, and how events of one key compare: plain values."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rekbatch.sources.s3_events import (
    EventPlan,
    ObjectEvent,
    Stored,
    compare_sequencers,
    parse_body,
    plan_event,
    sequencer_rank,
)

OPS = ["detect_faces", "detect_labels"]


def s3_record(
    name: str = "ObjectCreated:Put",
    key: str = "photos/a.jpg",
    *,
    bucket: str = "pics",
    size: Any = 1234,
    etag: str = "0123abcd",
    sequencer: str | None = "0055AED6DCD90281E5",
) -> dict[str, Any]:
    obj: dict[str, Any] = {"key": key, "size": size, "eTag": etag}
    if sequencer is not None:
        obj["sequencer"] = sequencer
    if name.startswith("ObjectRemoved"):
        obj = {k: v for k, v in obj.items() if k not in ("size", "eTag")}
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "eu-west-1",
        "eventTime": "2026-12-01T10:00:00.123Z",
        "eventName": name,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": obj},
    }


def eventbridge(detail_type: str, key: str = "photos/a.jpg", **obj: Any) -> dict[str, Any]:
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": detail_type,
        "source": "aws.s3",
        "account": "111122223333",
        "time": "2026-12-01T10:00:00Z",
        "region": "eu-west-1",
        "resources": ["arn:aws:s3:::pics"],
        "detail": {
            "version": "0",
            "bucket": {"name": "pics"},
            "object": {"key": key, **obj},
            "reason": "PutObject",
        },
    }


def test_s3s_own_shape_gives_created_and_removed_events() -> None:
    gone = s3_record("ObjectRemoved:Delete", sequencer="0055AED6DCD9028200")
    body = json.dumps({"Records": [s3_record(), gone]})
    parsed = parse_body(body)
    assert parsed.malformed is None and parsed.ignored == 0
    created, removed = parsed.events
    assert created == ObjectEvent(
        "created",
        "pics",
        "photos/a.jpg",
        1234,
        "0123abcd",
        "0055AED6DCD90281E5",
        "2026-12-01T10:00:00.123Z",
        "ObjectCreated:Put",
    )
    assert (removed.kind, removed.size, removed.etag) == ("removed", 0, "")


def test_eventbridges_shape_gives_the_same_events() -> None:
    created = parse_body(
        json.dumps(eventbridge("Object Created", size=5, etag="b1946ac9", sequencer="617F0829"))
    )
    (event,) = created.events
    assert (event.kind, event.bucket, event.key, event.size, event.etag) == (
        "created",
        "pics",
        "photos/a.jpg",
        5,
        "b1946ac9",
    )
    assert event.time == "2026-12-01T10:00:00.000Z"
    deleted = parse_body(
        json.dumps(eventbridge("Object Deleted", sequencer="617F0830", **{"deletion-type": "x"}))
    )
    assert [e.kind for e in deleted.events] == ["removed"]
    other = parse_body(json.dumps(eventbridge("Object Restore Completed")))
    assert other.events == () and other.ignored == 1 and other.malformed is None


@pytest.mark.parametrize(
    ("encoded", "key"),
    [
        ("red+flower.jpg", "red flower.jpg"),  # a space is a plus sign
        ("c%2B%2B/logo.png", "c++/logo.png"),  # a plus sign is %2B
        ("a%3Ab%3Dc%26d.jpg", "a:b=c&d.jpg"),
        ("caf%C3%A9/%E5%86%99%E7%9C%9F.jpg", "café/写真.jpg"),  # UTF-8, percent-encoded
        ("100%25.jpg", "100%.jpg"),
        ("plain/key.jpg", "plain/key.jpg"),
    ],
)
def test_keys_are_decoded_the_way_s3_encodes_them(encoded: str, key: str) -> None:
    for body in (
        {"Records": [s3_record(key=encoded)]},
        eventbridge("Object Created", key=encoded, size=1, etag="e"),
    ):
        (event,) = parse_body(json.dumps(body)).events
        assert event.key == key


def test_test_events_and_other_event_types_are_ignored() -> None:
    test_event = {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2026-12-01T10:00:00.000Z",
        "Bucket": "pics",
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
    }
    assert parse_body(json.dumps(test_event)).ignored == 1
    tagged = parse_body(json.dumps({"Records": [s3_record("ObjectTagging:Put")]}))
    assert tagged.events == () and tagged.ignored == 1 and tagged.malformed is None
    # MinIO and moto put "s3:" in front of the name.
    (event,) = parse_body(json.dumps({"Records": [s3_record("s3:ObjectCreated:Copy")]})).events
    assert event.kind == "created"
    (gone,) = parse_body(json.dumps({"Records": [s3_record("LifecycleExpiration:Delete")]})).events
    assert gone.kind == "removed"


def test_an_event_inside_an_sns_notification_is_read() -> None:
    inner = json.dumps({"Records": [s3_record()]})
    body = json.dumps({"Type": "Notification", "MessageId": "m", "Message": inner})
    (event,) = parse_body(body).events
    assert event.key == "photos/a.jpg"


@pytest.mark.parametrize(
    "body",
    [
        "hello",
        "[1, 2]",
        "{}",
        json.dumps({"Records": "no"}),
        json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]}),
        json.dumps({"Records": [s3_record(key="")]}),
        json.dumps({"Records": [s3_record(size="big")]}),
        json.dumps({"Records": [s3_record(sequencer="not-hex")]}),
        json.dumps({"Type": "Notification", "Message": "not json"}),
        json.dumps(eventbridge("Object Created") | {"detail": None}),
    ],
)
def test_a_body_that_is_not_an_event_says_why(body: str) -> None:
    parsed = parse_body(body)
    assert parsed.events == ()
    assert parsed.malformed


def test_sequencers_compare_as_hex_left_padded_with_zeros() -> None:
    assert compare_sequencers("0055AED6DCD90281E5", "0055AED6DCD90281E6") == -1
    assert compare_sequencers("FF", "0100") == -1  # 0x0FF < 0x100 once padded
    assert compare_sequencers("100", "FF") == 1  # longer (unpadded) is greater
    assert compare_sequencers("00ab", "AB") == 0
    assert compare_sequencers(None, "AB") is None
    assert sequencer_rank("000") == (0, "")


def _event(kind: str = "created", etag: str = "e1", sequencer: str | None = "20") -> ObjectEvent:
    return ObjectEvent(kind, "b", "k", 10 if kind == "created" else 0, etag, sequencer, "", "x")  # type: ignore[arg-type]


def _rows(etag: str, status: str, sequencer: str | None) -> dict[str, Stored]:
    return {op: Stored(etag, status, sequencer) for op in OPS}


def test_a_new_object_writes_every_operation() -> None:
    assert plan_event(_event(), {}, OPS) == EventPlan(tuple(OPS))
    # and only the operations it has no row for (a run killed between two operations)
    partial = {"detect_faces": Stored("e1", "ok", "20")}
    assert plan_event(_event(), partial, OPS) == EventPlan(("detect_labels",))


def test_repeats_and_older_events_write_nothing() -> None:
    done = _rows("e1", "ok", "20")
    assert plan_event(_event(), done, OPS) == EventPlan()  # the same event again
    assert plan_event(_event(etag="e0", sequencer="1F"), done, OPS) == EventPlan()  # older
    assert plan_event(_event("removed", "", "10"), done, OPS) == EventPlan()  # older delete
    removed = _rows("", "removed", "30")
    assert plan_event(_event(), removed, OPS) == EventPlan()  # created before the delete


def test_newer_events_replace_the_rows() -> None:
    done = _rows("e1", "ok", "20")
    assert plan_event(_event(etag="e2", sequencer="21"), done, OPS).write == tuple(OPS)
    assert plan_event(_event("removed", "", "21"), done, OPS).write == tuple(OPS)
    removed = _rows("", "removed", "21")
    assert plan_event(_event(etag="e1", sequencer="22"), removed, OPS).write == tuple(OPS)


def test_a_newer_event_about_the_same_content_is_only_remembered() -> None:
    done = _rows("e1", "ok", "20")
    assert plan_event(_event(sequencer="25"), done, OPS) == EventPlan((), tuple(OPS))
    removed = _rows("", "removed", "21")
    assert plan_event(_event("removed", "", "22"), removed, OPS) == EventPlan((), tuple(OPS))


def test_a_failed_row_is_tried_again_by_the_same_event() -> None:
    failed = _rows("e1", "failed", "20")
    assert plan_event(_event(), failed, OPS).write == tuple(OPS)
    assert plan_event(_event(sequencer="1F"), failed, OPS) == EventPlan()  # but not an older


def test_without_sequencers_the_etag_decides() -> None:
    listed = _rows("e1", "ok", None)  # a row written by a listing
    assert plan_event(_event(sequencer=None), listed, OPS) == EventPlan()
    # the same content, with a sequencer: nothing to do, and the sequencer is kept
    assert plan_event(_event(), listed, OPS) == EventPlan((), tuple(OPS))
    assert plan_event(_event(etag="e2", sequencer=None), listed, OPS).write == tuple(OPS)
    assert plan_event(_event("removed", "", None), listed, OPS).write == tuple(OPS)
