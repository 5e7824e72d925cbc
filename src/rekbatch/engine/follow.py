"""Queue sources: S3 event notifications read from SQS, turned into the same work items and
records as listed objects.

Once the listing sources are done (their last rows committed), each queue is read with long
polls, 10 messages a call. A message's body holds events (``sources/s3_events.py``):

- ``ObjectCreated``: the object goes through the same filters, content dedup, operations and
  writer as a listed one;
- ``ObjectRemoved``: one row per operation with status ``removed``;
- a test event (or a restore, a tag): nothing; a body that is no event notification: one
  ``skipped`` row per operation, reason ``malformed_event``, its key ``message:<id>``.

SQS delivers each message at least once, in any order. The job keeps one current row per
(object, operation), in the ledger:

- The events of one key are taken one at a time: an event waits while another of its key is
  in flight, and until that one's rows are committed, then is compared with them
  (``plan_event``: by ``sequencer``, then ETag). A repeat or an older event writes nothing.
- A message is deleted only once every one of its events has been settled and the commit
  holding their rows is in the ledger (``Writer.settled_at``), and none of its objects failed.
  A message whose object failed is left alone: it comes back when its visibility timeout
  ends (the retry), and goes to the queue's dead-letter queue after its ``maxReceiveCount``.
- While its objects are in flight, a message is kept invisible (ChangeMessageVisibility,
  batched), so no other consumer (or this one) takes it again meanwhile.

Without ``--follow`` a queue is read until it has been idle (no message came) for
``source.queue_idle_seconds``; messages this run already saw fail do not count as activity,
so a message waiting for its redrive policy does not keep the run going. With ``--follow``
it is read until the run is stopped. Either way, the messages settled by the last commit are
deleted after the writer closes (``close``); the others come back to a later run, where the
ledger recognises what is already done.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from rekbatch.clock import MONOTONIC, Clock
from rekbatch.config import Config
from rekbatch.engine.dedup import Dedup, content_of
from rekbatch.engine.producer import WorkItem
from rekbatch.operations import Operation
from rekbatch.records import ObjectRef, Record, utc_now
from rekbatch.sinks.writer import Writer
from rekbatch.sources import S3Source, Source
from rekbatch.sources.filters import classify_listing
from rekbatch.sources.s3_events import EventPlan, ObjectEvent, Stored, parse_body, plan_event
from rekbatch.sources.sqs import BACKLOG_ATTRIBUTES, BATCH, MAX_WAIT_SECONDS, Message, SqsQueue
from rekbatch.store.ledger import Ledger, LedgerDB
from rekbatch.store.watermark import WatermarkTracker

log = structlog.get_logger("rekbatch")

TICK_SECONDS = 0.05  # how often settled messages are deleted and waiting events released
# Settled messages are deleted 10 a call; fewer once the oldest has waited this long.
DELETE_WAIT_SECONDS = 0.5
ATTRIBUTES_SECONDS = 5.0  # how often the queues' backlog is read for status
MAX_READERS = 4  # receives under way at once per queue (one per 8 workers)
_IN_FLIGHT = -1  # a key whose event is in flight (else: the commit its rows need)

Key = tuple[int, str]  # (ledger source, key)


@dataclass(eq=False)
class _Held:
    """A message this run holds: received, not deleted yet."""

    queue: SqsQueue
    message: Message  # its latest delivery: the receipt handle that deletes it
    visible_until: float  # on the feeder's clock
    events: int = 0  # events not settled yet
    need: int = 0  # the commit after which the rows of its events are in the ledger
    # (source, key, ETag, sequencer) of the objects whose rows say whether it failed
    check: list[tuple[int, str, str, str | None]] = field(default_factory=list)
    settled_at: float | None = None  # when it was first found ready to delete


@dataclass(eq=False)
class _Pending:
    """One event of a held message on its way through the run."""

    held: _Held
    source: int  # the ledger source its rows go under
    key: str
    event: ObjectEvent | None  # None: the message is not an event notification
    note: str | None = None  # why not


class _EventTracker(WatermarkTracker):
    """The writer's tracker of a queue's lane: tells the feeder when an object's records are
    all accepted. A queue has no watermark to move."""

    def __init__(self, done: Callable[[int], None]) -> None:
        super().__init__(None)
        self._on_complete = done

    def complete(self, seq: int) -> None:
        super().complete(seq)
        self.moved = False
        self._on_complete(seq)


@dataclass
class _QueueStats:
    received: int = 0
    redelivered: int = 0  # delivered again while held: its visibility ran out in flight
    extended: int = 0  # visibility extensions
    deleted: int = 0
    events: int = 0
    failed_messages: int = 0
    attributes: dict[str, int] = field(default_factory=dict)
    attributes_at: float | None = None  # epoch seconds
    last_lag_seconds: float | None = None


class QueueFeeder:
    def __init__(
        self,
        cfg: Config,
        queues: Sequence[SqsQueue],
        sources: Sequence[Source],
        operations: Sequence[Operation],
        ledger: Ledger,
        writer: Writer,
        dedup: Dedup,
        stopping: asyncio.Event,
        max_bytes: Sequence[int],
        *,
        follow: bool,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.cfg = cfg
        self.queues = list(queues)
        self.sources = sources
        self.operations = list(operations)
        self.ledger = ledger
        self.writer = writer
        self.dedup = dedup
        self.stopping = stopping
        self.max_bytes = max_bytes
        self.follow = follow
        self.clock = clock
        self._held: dict[str, _Held] = {}
        self._failed_ids: set[str] = set()  # messages left for their redrive policy
        self._busy: dict[Key, int] = {}
        self._parked: dict[Key, deque[_Pending]] = {}
        self._lanes: dict[int, int] = {}  # queue source -> the writer's lane
        self._by_seq: dict[tuple[int, int], _Pending] = {}
        self._stats = {q.index: _QueueStats() for q in self.queues}

    # -- reading ----------------------------------------------------------------------------

    async def run(self, work: asyncio.Queue[WorkItem | None]) -> None:
        """Read every queue until it is idle (or, following, until the run stops); events
        still waiting for their key are handed out before this returns."""
        await self._listing_settled()
        if self.stopping.is_set():
            return
        for queue in self.queues:
            lane = self.writer.start_range(queue.index, 0, None)
            self.writer.trackers[lane] = _EventTracker(self._completer(lane))
            self._lanes[queue.index] = lane
        log.info(
            "reading_queues",
            queues=[q.uri for q in self.queues],
            follow=self.follow,
            idle_seconds=None if self.follow else self.cfg.source.queue_idle_seconds,
        )
        # A receive takes a round trip; with several workers, several receives are under way
        # at once (SQS's own advice for throughput), each holding at most 10 messages.
        per_queue = max(1, min(MAX_READERS, self.cfg.limits.concurrency // 8))
        async with asyncio.TaskGroup() as group:
            readers = [
                group.create_task(self._read(q, work))
                for q in self.queues
                for _ in range(per_queue)
            ]
            group.create_task(self._release(work, readers))
        if not self.stopping.is_set():
            for queue in self.queues:
                self.writer.range_listed(self._lanes[queue.index])
                self.writer.listing_done(queue.index)
                log.info("queue_idle", queue=queue.uri, **self._counts(queue.index))

    async def _listing_settled(self) -> None:
        """Until every listed object is finished and its rows committed: an event about an
        object still in flight from the listing would otherwise be done twice."""
        writer = self.writer
        while not self.stopping.is_set():
            listing_busy = any(t.outstanding for t in writer.trackers.values())
            if not listing_busy and writer.committed >= writer.settled_at:
                return
            await asyncio.sleep(TICK_SECONDS)

    async def _read(self, queue: SqsQueue, work: asyncio.Queue[WorkItem | None]) -> None:
        idle = self.cfg.source.queue_idle_seconds
        idle_since = self.clock.now()
        while not self.stopping.is_set():
            wait: float = MAX_WAIT_SECONDS
            if not self.follow:
                left = idle - (self.clock.now() - idle_since)
                if left <= 0:
                    return
                wait = min(wait, left)
            asked = self.clock.now()
            messages = await self._receive(queue, wait)
            if messages is None:
                return
            if await self._take(queue, messages, work, asked):
                # Counted from when the batch is handed out: waiting for room in the work
                # queue is not idleness.
                idle_since = self.clock.now()

    async def _receive(self, queue: SqsQueue, wait: float) -> list[Message] | None:
        """A long poll that a stop cuts short (None then: the messages it may have taken
        become visible again after their timeout)."""
        poll = asyncio.ensure_future(queue.receive(wait))
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({poll, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not poll.done():
                return None
            return poll.result()
        finally:
            for task in (poll, stop):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _take(
        self,
        queue: SqsQueue,
        messages: list[Message],
        work: asyncio.Queue[WorkItem | None],
        asked: float,
    ) -> int:
        """Hold ``messages`` and hand out their events; returns how many count as activity
        (not a second delivery of a message held, nor one that already failed this run).
        Their visibility timeout is counted from ``asked``, when the receive was sent: SQS
        started it somewhere after that."""
        visible_until = asked + queue.visibility_seconds
        stats = self._stats[queue.index]
        pending: list[_Pending] = []
        fresh = 0
        wall = time.time()
        lags = [wall - m.sent_at for m in messages if m.sent_at is not None]
        if lags:
            stats.last_lag_seconds = round(max(lags), 3)
        for message in messages:
            held = self._held.get(message.id)
            if held is not None:
                # Delivered again while in hand (its visibility ran out, or SQS repeated
                # it): only its newest receipt handle deletes it.
                held.message = message
                held.visible_until = visible_until
                stats.redelivered += 1
                continue
            stats.received += 1
            if message.id not in self._failed_ids:
                fresh += 1
            held = _Held(queue, message, visible_until)
            self._held[message.id] = held
            parsed = parse_body(message.body)
            if parsed.malformed is not None:
                log.warning("malformed_event", queue=queue.uri, message_id=message.id)
                key = f"message:{message.id}"
                pending.append(_Pending(held, queue.index, key, None, parsed.malformed))
            for event in parsed.events:
                source = self._source_of(event, queue.index)
                pending.append(_Pending(held, source, event.key, event))
            stats.events += len(parsed.events)
        for item in pending:
            item.held.events += 1
        await self._dispatch(pending, work)
        return fresh

    def _source_of(self, event: ObjectEvent, queue_index: int) -> int:
        """The listing source whose prefix holds the object (its rows are that source's, so
        an object listed and then reported by an event is one object), else the queue."""
        for source in self.sources:
            if (
                isinstance(source, S3Source)
                and source.bucket == event.bucket
                and event.key.startswith(source.prefix)
            ):
                return source.index
        return queue_index

    async def _dispatch(
        self, pending: list[_Pending], work: asyncio.Queue[WorkItem | None]
    ) -> None:
        ready: list[_Pending] = []
        for item in pending:
            key = (item.source, item.key)
            if key in self._parked or not self._free(key):
                self._parked.setdefault(key, deque()).append(item)
            else:
                self._busy[key] = _IN_FLIGHT
                ready.append(item)
        if ready:
            await self._hand_out(ready, work)

    def _free(self, key: Key) -> bool:
        state = self._busy.get(key)
        if state is None:
            return True
        if state != _IN_FLIGHT and self.writer.committed >= state:
            del self._busy[key]
            return True
        return False

    async def _release(self, work: asyncio.Queue[WorkItem | None], readers: list[Any]) -> None:
        """Hand out waiting events whose key is free again; ends with the readers once none
        waits (or at once when the run stops: their messages come back later)."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            if self.stopping.is_set():
                return
            ready: list[_Pending] = []
            for key in [k for k in self._parked if self._free(k)]:
                waiting = self._parked[key]
                ready.append(waiting.popleft())
                if not waiting:
                    del self._parked[key]
                self._busy[key] = _IN_FLIGHT
            if ready:
                await self._hand_out(ready, work)
            if not self._parked and all(reader.done() for reader in readers):
                return

    # -- handing out ------------------------------------------------------------------------

    async def _hand_out(self, ready: list[_Pending], work: asyncio.Queue[WorkItem | None]) -> None:
        """Compare each event with its key's rows and write what it asks for: removed or
        skipped rows here, objects to analyse through the workers."""
        visible = self.writer.committed
        keys: dict[int, list[str]] = {}
        for item in ready:
            keys.setdefault(item.source, []).append(item.key)
        stored: dict[int, dict[str, dict[str, tuple[str, str, str | None]]]] = {}
        for source, names in keys.items():
            stored[source] = await self.ledger.read(LedgerDB.lookup_events, source, names)
        op_types = [op.type for op in self.operations]
        plans: list[EventPlan] = []
        remember: list[tuple[str, int, str, str]] = []
        for item in ready:
            rows = {op: Stored(*row) for op, row in stored[item.source].get(item.key, {}).items()}
            if item.event is None:
                plan = EventPlan(() if rows else tuple(op_types))
            else:
                plan = plan_event(item.event, rows, op_types)
                sequencer = item.event.sequencer
                if sequencer is not None:
                    remember += [(sequencer, item.source, item.key, op) for op in plan.remember]
            plans.append(plan)
        if remember:
            await self.ledger.write(LedgerDB.set_sequencers, remember)
        objects = [self._object(item) for item in ready]
        contents = sorted(
            {
                c
                for item, plan, obj in zip(ready, plans, objects, strict=True)
                if plan.write and item.event is not None and item.event.kind == "created"
                if (c := content_of(obj)) is not None
            }
        )
        originals = await self.ledger.read(LedgerDB.lookup_contents, contents) if contents else {}
        self.dedup.evict(visible)
        for item, plan, obj in zip(ready, plans, objects, strict=True):
            if self.stopping.is_set():
                return  # not settled: the message stays in the queue
            if not plan.write:
                self._settle(item, self.writer.settled_at, wrote=False)
                continue
            lane = self._lanes[item.held.queue.index]
            seq = self.writer.push(lane, item.key)
            self._by_seq[(lane, seq)] = item
            ops = [op for op in self.operations if op.type in plan.write]
            if item.event is None:
                self._write(obj, ops, "skipped", lane, seq)
            elif item.event.kind == "removed":
                self._write(obj, ops, "removed", lane, seq)
            else:
                reason = classify_listing(
                    obj,
                    self.cfg.source.include,
                    self.cfg.source.exclude,
                    self.max_bytes[item.source],
                    sniff=self.cfg.source.sniff,
                )
                if reason is not None:
                    self._write(replace(obj, skip=reason), ops, "skipped", lane, seq)
                    continue
                work_item = WorkItem(obj, lane, seq, ops)
                content = content_of(obj)
                if content is not None:
                    types = [op.type for op in ops]
                    claim = self.dedup.claim(content, types, originals.get(content))
                    if claim is None:
                        work_item.content = content
                    else:
                        work_item.copy_of = claim
                await work.put(work_item)

    def _object(self, item: _Pending) -> ObjectRef:
        event = item.event
        if event is None:
            return ObjectRef(
                None, item.key, 0, "", "", None, item.source, "malformed_event", item.note
            )
        return ObjectRef(
            event.bucket,
            event.key,
            event.size,
            event.etag,
            event.time,
            None,
            item.source,
            sequencer=event.sequencer,
        )

    def _write(
        self, obj: ObjectRef, ops: list[Operation], status: str, lane: int, seq: int
    ) -> None:
        """Rows written here, without a worker: removals and skips."""
        now = utc_now()
        for op in ops:
            if status == "removed":
                record = Record(obj, op.type, "removed", processed_at=now)
            else:
                record = Record(
                    obj, op.type, "skipped", obj.skip, error_message=obj.note, processed_at=now
                )
            self.writer.accept(record)
        self.writer.finish(lane, seq)

    def _completer(self, lane: int) -> Callable[[int], None]:
        return lambda seq: self._completed(lane, seq)

    def _completed(self, lane: int, seq: int) -> None:
        """The writer has every record of the object at ``seq`` of a queue's lane."""
        item = self._by_seq.pop((lane, seq), None)
        if item is not None:
            self._settle(item, self.writer.settled_at, wrote=True)

    def _settle(self, item: _Pending, need: int, *, wrote: bool) -> None:
        self._busy[(item.source, item.key)] = need
        held = item.held
        held.need = max(held.need, need)
        event = item.event
        if wrote and event is not None and event.kind == "created":
            held.check.append((item.source, item.key, event.etag, event.sequencer))
        held.events -= 1

    # -- keeping the messages: deletes, visibility, backlog ----------------------------------

    async def keep(self) -> None:
        """Runs beside the run's tasks until cancelled: deletes settled messages, keeps held
        ones invisible, reads each queue's backlog now and then."""
        polled = 0.0
        while True:
            await asyncio.sleep(TICK_SECONDS)
            await self._delete_settled()
            await self._extend_due()
            now = self.clock.now()
            if now - polled >= ATTRIBUTES_SECONDS:
                polled = now
                await self._poll_attributes()
                self._prune()

    async def close(self) -> None:
        """After the writer's last commit: delete what it settled. A failure here costs a
        redelivery, never a row, so it is logged, not raised."""
        try:
            await self._delete_settled(everything=True)
        except Exception as exc:
            log.warning("queue_delete_failed", error=f"{type(exc).__name__}: {exc}")

    async def _delete_settled(self, *, everything: bool = False) -> None:
        committed = self.writer.committed
        now = self.clock.now()
        settled: list[_Held] = []
        for queue in self.queues:
            mine = [
                h
                for h in self._held.values()
                if h.queue is queue and h.events == 0 and h.need <= committed
            ]
            for held in mine:
                if held.settled_at is None:
                    held.settled_at = now
            # Full calls of 10; the rest once its oldest has waited (or at the end).
            oldest = min((h.settled_at for h in mine if h.settled_at is not None), default=now)
            waited = now - oldest >= DELETE_WAIT_SECONDS
            settled += mine if everything or waited else mine[: len(mine) - len(mine) % BATCH]
        if not settled:
            return
        failed = await self._failed_objects(settled)
        deletes: dict[int, list[_Held]] = {}
        for held in settled:
            message_id = held.message.id
            if any((s, k) in failed for s, k, _, _ in held.check):
                # Not deleted: it comes back after its visibility timeout (the retry) and
                # moves to the dead-letter queue after the queue's maxReceiveCount.
                del self._held[message_id]
                self._failed_ids.add(message_id)
                self._stats[held.queue.index].failed_messages += 1
                log.warning(
                    "queue_message_failed",
                    queue=held.queue.uri,
                    message_id=message_id,
                    receive_count=held.message.receive_count,
                    hint="left in the queue for its redrive policy",
                )
                continue
            deletes.setdefault(held.queue.index, []).append(held)
        for queue in self.queues:
            batch = deletes.get(queue.index)
            if not batch:
                continue
            receipts = [(h.message.id, h.message.receipt) for h in batch]
            refused = set(await queue.delete(receipts))
            for held in batch:
                self._held.pop(held.message.id, None)
                self._failed_ids.discard(held.message.id)
            self._stats[queue.index].deleted += len(batch) - len(refused)

    async def _failed_objects(self, settled: list[_Held]) -> set[Key]:
        """The objects among ``settled`` messages' whose rows for that event failed."""
        wanted: dict[int, dict[str, list[tuple[str, str | None]]]] = {}
        for held in settled:
            for source, key, etag, sequencer in held.check:
                wanted.setdefault(source, {}).setdefault(key, []).append((etag, sequencer))
        failed: set[Key] = set()
        for source, keys in wanted.items():
            rows = await self.ledger.read(LedgerDB.lookup_events, source, list(keys))
            for key, ops in rows.items():
                for etag, status, sequencer in ops.values():
                    if status != "failed":
                        continue
                    if any(etag == e or (s is not None and sequencer == s) for e, s in keys[key]):
                        failed.add((source, key))
        return failed

    async def _extend_due(self) -> None:
        now = self.clock.now()
        for queue in self.queues:
            seconds = queue.visibility_seconds
            due = [
                h
                for h in self._held.values()
                if h.queue is queue and h.visible_until - now < seconds / 2
            ]
            if not due:
                continue
            await queue.extend([(h.message.id, h.message.receipt) for h in due], seconds)
            for held in due:
                held.visible_until = now + seconds
            self._stats[queue.index].extended += len(due)

    async def _poll_attributes(self) -> None:
        for queue in self.queues:
            try:
                values = await queue.attributes(*BACKLOG_ATTRIBUTES)
            except Exception as exc:  # status only: the run goes on without it
                log.warning("queue_attributes_failed", queue=queue.uri, error=str(exc))
                continue
            stats = self._stats[queue.index]
            stats.attributes = {k: int(v) for k, v in values.items() if v.isdigit()}
            stats.attributes_at = time.time()

    def _prune(self) -> None:
        """Forget keys whose rows are committed and which nothing waits for."""
        committed = self.writer.committed
        for key in [k for k, v in self._busy.items() if v != _IN_FLIGHT and v <= committed]:
            if key not in self._parked:
                del self._busy[key]

    # -- status -----------------------------------------------------------------------------

    def _counts(self, index: int) -> dict[str, Any]:
        stats = self._stats[index]
        return {
            "received": stats.received,
            "redelivered": stats.redelivered,
            "extended": stats.extended,
            "events": stats.events,
            "deleted": stats.deleted,
            "failed_messages": stats.failed_messages,
        }

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per queue: the backlog SQS reports, and what this run has seen of it. SQS gives
        no age of its oldest message (that is CloudWatch's ApproximateAgeOfOldestMessage):
        ``oldest_held_age_seconds`` is the oldest message this run holds, and
        ``lag_seconds`` how old the oldest message of the last receive was."""
        wall = time.time()
        out: dict[str, dict[str, Any]] = {}
        for queue in self.queues:
            stats = self._stats[queue.index]
            held = [
                h.message.sent_at
                for h in self._held.values()
                if h.queue is queue and h.message.sent_at is not None
            ]
            attributes = stats.attributes
            out[queue.uri] = {
                **self._counts(queue.index),
                "held": sum(1 for h in self._held.values() if h.queue is queue),
                "backlog": attributes.get("ApproximateNumberOfMessages"),
                "in_flight": attributes.get("ApproximateNumberOfMessagesNotVisible"),
                "delayed": attributes.get("ApproximateNumberOfMessagesDelayed"),
                "backlog_at": stats.attributes_at,
                "oldest_held_age_seconds": round(wall - min(held), 3) if held else None,
                "lag_seconds": stats.last_lag_seconds,
                "redrive_policy": queue.redrive_policy is not None,
            }
        return out
