"""S3 event notifications as they arrive in an SQS message body, and how two events about
one key compare. Pure: plain values in, plain values out.

The shapes a body can have:

- S3's own notification: ``{"Records": [{"eventName": "ObjectCreated:Put", "eventTime": ...,
  "s3": {"bucket": {"name": ...}, "object": {"key", "size", "eTag", "sequencer"}}}]}``;
- EventBridge's event, sent to the queue by a rule: ``{"detail-type": "Object Created",
  "source": "aws.s3", "time": ..., "detail": {"bucket": {"name"}, "object": {"key", "size",
  "etag", "sequencer"}}}`` (``"Object Deleted"`` for deletions);
- either of these as the ``Message`` of an SNS notification (a topic between the bucket and
  the queue, without raw message delivery);
- the ``s3:TestEvent`` S3 sends when a notification configuration is saved.

Keys come URL-encoded the way HTML forms encode them (``application/x-www-form-urlencoded``):
a space is ``+`` and a plus sign ``%2B``, so they are decoded with ``unquote_plus``.

``sequencer`` orders the events of one key: the greater hexadecimal value is the later
event. Values can differ in length; S3 says to left-pad the shorter with zeros before
comparing, which ``sequencer_rank`` does without padding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote_plus

EventKind = Literal["created", "removed"]

# Event names (without the "s3:" some stand-ins put in front) that say an object is there
# or gone; other names (restores, tags, ACLs, transitions, replication) change nothing that
# an analysis looks at.
_REMOVED_PREFIXES = ("ObjectRemoved:", "LifecycleExpiration:Delete")
_EVENTBRIDGE_KINDS: dict[str, EventKind] = {
    "Object Created": "created",
    "Object Deleted": "removed",
}


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    """One object created or removed, as an event told it."""

    kind: EventKind
    bucket: str
    key: str  # decoded
    size: int  # 0 for a removal
    etag: str  # "" for a removal
    sequencer: str | None
    time: str  # ISO 8601 UTC, "" when the event had none
    name: str  # the event's own name, e.g. "ObjectCreated:Put" or "Object Deleted"


@dataclass(frozen=True, slots=True)
class ParsedBody:
    """What one message body holds: its object events, how many records it held that are
    not about objects being there or gone (test events, restores, tags), and, for a body
    that is not an event notification at all, why."""

    events: tuple[ObjectEvent, ...] = ()
    ignored: int = 0
    malformed: str | None = None


class _Malformed(ValueError):
    pass


def parse_body(body: str) -> ParsedBody:
    """The events of one SQS message body (see the module doc for the shapes)."""
    try:
        data = json.loads(body)
    except ValueError:
        return ParsedBody(malformed=f"not JSON: {_clip(body)}")
    try:
        return _parse(data, depth=0)
    except _Malformed as exc:
        return ParsedBody(malformed=str(exc))


def _parse(data: Any, depth: int) -> ParsedBody:
    if not isinstance(data, dict):
        raise _Malformed(f"not a JSON object: {_clip(json.dumps(data))}")
    if data.get("Event") == "s3:TestEvent":
        return ParsedBody(ignored=1)
    if data.get("Type") == "Notification" and isinstance(data.get("Message"), str) and depth == 0:
        try:
            inner = json.loads(data["Message"])
        except ValueError:
            raise _Malformed("an SNS notification whose Message is not JSON") from None
        return _parse(inner, depth + 1)
    if "Records" in data:
        records = data["Records"]
        if not isinstance(records, list):
            raise _Malformed("Records is not a list")
        events: list[ObjectEvent] = []
        ignored = 0
        for index, record in enumerate(records):
            event = _s3_record(record, index)
            if event is None:
                ignored += 1
            else:
                events.append(event)
        return ParsedBody(tuple(events), ignored)
    if data.get("source") == "aws.s3" and "detail-type" in data:
        event = _eventbridge(data)
        return ParsedBody((event,), 0) if event is not None else ParsedBody(ignored=1)
    raise _Malformed(f"not an S3 event notification: {_clip(json.dumps(data))}")


def _s3_record(record: Any, index: int) -> ObjectEvent | None:
    where = f"Records[{index}]"
    if not isinstance(record, dict):
        raise _Malformed(f"{where} is not an object")
    name = record.get("eventName")
    if not isinstance(name, str):
        raise _Malformed(f"{where} has no eventName")
    name = name.removeprefix("s3:")
    if name.startswith("ObjectCreated:"):
        kind: EventKind = "created"
    elif name.startswith(_REMOVED_PREFIXES):
        kind = "removed"
    else:
        return None
    s3 = record.get("s3")
    if not isinstance(s3, dict):
        raise _Malformed(f"{where} has no s3 member")
    return _event(kind, s3.get("bucket"), s3.get("object"), "eTag", record.get("eventTime"), name)


def _eventbridge(data: dict[str, Any]) -> ObjectEvent | None:
    name = data.get("detail-type")
    if not isinstance(name, str) or name not in _EVENTBRIDGE_KINDS:
        return None
    kind = _EVENTBRIDGE_KINDS[name]
    detail = data.get("detail")
    if not isinstance(detail, dict):
        raise _Malformed(f"an EventBridge {name!r} event without detail")
    return _event(kind, detail.get("bucket"), detail.get("object"), "etag", data.get("time"), name)


def _event(
    kind: EventKind, bucket: Any, obj: Any, etag_field: str, time: Any, name: str
) -> ObjectEvent:
    if not isinstance(bucket, dict) or not isinstance(bucket.get("name"), str):
        raise _Malformed(f"{name}: no bucket name")
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str) or not obj["key"]:
        raise _Malformed(f"{name}: no object key")
    key = unquote_plus(obj["key"])
    size = 0
    etag = ""
    if kind == "created":
        try:
            size = int(obj.get("size") or 0)
        except (TypeError, ValueError):
            raise _Malformed(f"{name}: size is not a number: {obj.get('size')!r}") from None
        etag = str(obj.get(etag_field) or obj.get("eTag") or obj.get("etag") or "").strip('"')
    sequencer = obj.get("sequencer")
    if sequencer is not None and not _is_hex(sequencer):
        raise _Malformed(f"{name}: sequencer is not hexadecimal: {sequencer!r}")
    return ObjectEvent(kind, bucket["name"], key, size, etag, sequencer, _iso_time(time), name)


def _is_hex(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        int(value, 16)
    except ValueError:
        return False
    return True


def _iso_time(value: Any) -> str:
    """An event time as ISO 8601 UTC with milliseconds (the form of ``last_modified``)."""
    if not isinstance(value, str) or not value:
        return ""
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return value
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- ordering ---------------------------------------------------------------------------------


def sequencer_rank(sequencer: str) -> tuple[int, str]:
    """A sort key equal to comparing the values left-padded with zeros to one length."""
    digits = sequencer.upper().lstrip("0")
    return len(digits), digits


def compare_sequencers(a: str | None, b: str | None) -> int | None:
    """-1, 0 or 1 as event ``a`` came before, with, or after event ``b`` of the same key;
    None when either has no sequencer."""
    if a is None or b is None:
        return None
    ra, rb = sequencer_rank(a), sequencer_rank(b)
    return (ra > rb) - (ra < rb)


@dataclass(frozen=True, slots=True)
class Stored:
    """What the job holds for one (object, operation): the row's ETag, status and the
    sequencer of the event it was written for (None for a listed object)."""

    etag: str
    status: str
    sequencer: str | None


@dataclass(frozen=True, slots=True)
class EventPlan:
    """What an event asks of the job: operations to write rows for, and operations whose
    row stays as it is but takes the event's sequencer (a newer event about the same
    content, remembered so that an older one arriving later is recognised)."""

    write: tuple[str, ...] = ()
    remember: tuple[str, ...] = ()


def plan_event(event: ObjectEvent, stored: dict[str, Stored], operations: list[str]) -> EventPlan:
    """Compare ``event`` with the job's rows of its key (``stored``, per operation).

    - An event older than the row's (by sequencer) writes nothing, and so does the same
      event again (equal sequencers), unless that row failed: a redelivered message is the
      retry of a failed object.
    - Otherwise (newer, or no sequencers to tell) the ETag decides: a creation with the
      row's content, or a removal of an object already removed, writes nothing new (and a
      newer sequencer is remembered); anything else writes a row.
    """
    write: list[str] = []
    remember: list[str] = []
    for op in operations:
        row = stored.get(op)
        if row is None:
            write.append(op)
            continue
        order = compare_sequencers(event.sequencer, row.sequencer)
        if order is not None and order < 0:
            continue  # older than what the row says
        if order == 0:
            if event.kind == "created" and row.status == "failed":
                write.append(op)
            continue
        if event.kind == "created":
            same = row.status not in ("removed", "failed") and row.etag == event.etag
        else:
            same = row.status == "removed"
        if not same:
            write.append(op)
        elif event.sequencer is not None:
            remember.append(op)
    return EventPlan(tuple(write), tuple(remember))
