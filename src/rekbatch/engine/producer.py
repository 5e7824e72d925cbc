"""The producer: lists every source after its watermarks and hands out the work.

A source is split into disjoint key ranges (kept in the ledger; a shard takes its part of
the job's split), listed by up to ``source.list_concurrency`` paginators at once, each range
after its own watermark.

Listed objects go through a bounded queue to the workers, so memory does not grow with the
bucket. Per chunk of listed keys the ledger says which (object, operation) pairs are done
(same ETag: nothing to do; another ETag: the object changed and is done again) and which
contents already have an original; objects the listing alone rules out (globs, sizes) are
recorded as skipped here, without a worker.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from rekbatch.config import Config
from rekbatch.engine.dedup import Content, Dedup, content_of
from rekbatch.engine.listing import ListingRules, RangeTodo, list_ranges, still_to_do
from rekbatch.engine.shards import JobSplit, Shard
from rekbatch.operations import Operation
from rekbatch.records import ObjectRef, Record, SkipReason, utc_now
from rekbatch.sinks.writer import Writer
from rekbatch.sources import Source
from rekbatch.sources.ranges import KeyRange
from rekbatch.sources.sqs import SqsSource
from rekbatch.store.ledger import Ledger, LedgerDB, Location

log = structlog.get_logger("rekbatch")

CHUNK = 500


@dataclass(slots=True)
class WorkItem:
    """One object for a worker: the operations it still needs, and, for a copy of content
    already processed or in flight, where the original's rows are (or will be)."""

    obj: ObjectRef
    lane: int  # the writer's lane of the object's key range
    seq: int
    ops: list[Operation]
    copy_of: list[Location] | asyncio.Future[list[Location] | None] | None = None
    content: Content | None = None  # set on an original whose copies wait for it


def ranged(row: Any) -> KeyRange:
    """A ledger row of ``source_ranges`` as the range it is."""
    return KeyRange(row["after"], row["upto"], row["part"])


class Producer:
    def __init__(
        self,
        cfg: Config,
        sources: Sequence[Source],
        operations: Sequence[Operation],
        ledger: Ledger,
        writer: Writer,
        dedup: Dedup,
        stopping: asyncio.Event,
        rules: ListingRules,
        *,
        shard: Shard | None = None,
        split: JobSplit | None = None,
        after_listing: Callable[[asyncio.Queue[WorkItem | None]], Awaitable[None]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sources = sources
        self.operations = list(operations)
        self.ledger = ledger
        self.writer = writer
        self.dedup = dedup
        self.stopping = stopping
        self.rules = rules
        self.shard = shard
        self.split = split  # a shard lists its part of the job's split
        # Queue sources, read once the listing is done (engine/follow.py).
        self.after_listing = after_listing
        self.ranges_total: dict[int, int] = {}
        self._dispatching = asyncio.Lock()
        self._started: dict[int, float] = {}
        self._ended: dict[int, float] = {}
        self._ranges_listed: Counter[int] = Counter()

    async def run(self, queue: asyncio.Queue[WorkItem | None], workers: int) -> None:
        rows = await self.ledger.read(LedgerDB.sources)
        queued = any(isinstance(source, SqsSource) for source in self.sources)
        if rows and all(row["listing_done"] for row in rows) and not queued:
            # A finished job run again: list everything once more to pick up new and
            # changed objects; unchanged ones are recognised in the ledger and cost nothing.
            # (With a queue source, the queue's events bring what changed.)
            await self.ledger.write(LedgerDB.reset_listing, range(len(rows)))
        for source in self.sources:
            if self.stopping.is_set():
                break
            if not isinstance(source, SqsSource):
                await self._list(source, queue)
        if self.after_listing is not None and not self.stopping.is_set():
            await self.after_listing(queue)
        # The end of the work: one for each worker. (Not on a failure: the supervisor
        # cancels the workers then.)
        for _ in range(workers):
            await queue.put(None)

    async def _ranges(self, source: Source) -> list[RangeTodo]:
        """The source's ranges not yet done, with their watermarks. A source is split once
        per listing and its ranges kept in the ledger, so a resume lists the same ranges,
        whatever ``list_concurrency`` it runs with."""
        index = source.index
        rows = await self.ledger.read(LedgerDB.ranges, index)
        if not rows:
            legacy = await self.ledger.read(LedgerDB.watermark, index)
            if legacy is not None:
                ranges = [KeyRange(None, None)]  # a job listed before ranges: its one mark
            elif self.split is not None and self.shard is not None:
                ranges = self.split.part(self.shard, index)
            else:
                ranges = await source.split(self.cfg.source.list_concurrency)
            bounds = [(r.after, r.upto, r.part) for r in ranges]
            await self.ledger.write(LedgerDB.save_ranges, index, bounds, legacy)
            rows = await self.ledger.read(LedgerDB.ranges, index)
        await self.ledger.write(LedgerDB.rebase_listed, index)
        self.ranges_total[index] = len(rows)
        return [
            RangeTodo(row["idx"], ranged(row), row["watermark"]) for row in rows if not row["done"]
        ]

    async def _list(self, source: Source, queue: asyncio.Queue[WorkItem | None]) -> None:
        index = source.index
        todo = await self._ranges(source)
        log.info(
            "listing", source=source.uri, ranges=self.ranges_total[index], ranges_left=len(todo)
        )
        self._started[index] = time.monotonic()

        def start(item: RangeTodo) -> int:
            return self.writer.start_range(index, item.index, item.mark)

        async def take(lane: int, objects: list[ObjectRef]) -> None:
            await self._dispatch(objects, lane, queue)

        def finish(lane: int) -> None:
            self.writer.range_listed(lane)
            self._ranges_listed[index] += 1

        await list_ranges(
            source,
            todo,
            listers=self.cfg.source.list_concurrency,
            chunk=CHUNK,
            start=start,
            take=take,
            finish=finish,
            stopping=self.stopping,
        )
        self._ended[index] = time.monotonic()
        if not self.stopping.is_set():
            self.writer.listing_done(index)
            log.info("listed", source=source.uri, objects=self.writer.listed[index])

    def listing_stats(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per source listed so far: keys, keys per second, ranges, and where the source
        knows its size (an inventory, a key list) the share done and the time left."""
        now = time.monotonic() if now is None else now
        stats: dict[str, dict[str, Any]] = {}
        for source in self.sources:
            index = source.index
            if index not in self._started:
                continue
            seconds = max(self._ended.get(index, now) - self._started[index], 1e-9)
            listed = self.writer.listed[index]
            entry: dict[str, Any] = {
                "listed": listed,
                "per_second": round(listed / seconds, 1),
                "ranges": self.ranges_total.get(index, 0),
                "ranges_listed": self._ranges_listed[index],
                "done": index in self._ended and not self.stopping.is_set(),
                "percent": None,
                "eta_seconds": None,
            }
            progress = getattr(source, "progress", None)
            known = progress() if callable(progress) else None
            if entry["done"]:
                entry["percent"], entry["eta_seconds"] = 100.0, 0.0
            elif known is not None:
                read, total = known
                entry["percent"] = round(100.0 * read / total, 1) if total else 100.0
                rate = read / seconds
                entry["eta_seconds"] = round((total - read) / rate, 1) if rate > 0 else None
            stats[source.uri] = entry
        return stats

    async def _dispatch(
        self, chunk: list[ObjectRef], lane: int, queue: asyncio.Queue[WorkItem | None]
    ) -> None:
        if not chunk:
            return
        # One chunk at a time: the ledger lookups, the content claims and the queue see the
        # chunks of all ranges one after the other, as with one paginator.
        async with self._dispatching:
            await self._dispatch_locked(chunk, lane, queue)

    async def _dispatch_locked(
        self, chunk: list[ObjectRef], lane: int, queue: asyncio.Queue[WorkItem | None]
    ) -> None:
        index = chunk[0].source_index
        writer, dedup = self.writer, self.dedup
        visible = writer.committed
        done = await self.ledger.read(LedgerDB.lookup, index, [o.key for o in chunk])
        contents = sorted({c for o in chunk if (c := content_of(o)) is not None})
        originals = await self.ledger.read(LedgerDB.lookup_contents, contents) if contents else {}
        dedup.evict(visible)
        rules = self.rules
        for obj in chunk:
            if self.stopping.is_set():
                return  # the rest stays above the watermark and is listed again
            seq = writer.push(lane, obj.key)
            todo = still_to_do(self.operations, obj, done.get(obj.key))
            if not todo:
                writer.finish(lane, seq)
                continue
            reason = rules.skip_reason(obj)
            if reason is not None:
                self._skip(obj, lane, seq, todo, reason)
                continue
            item = WorkItem(obj, lane, seq, todo)
            content = content_of(obj)
            if content is not None:
                claim = dedup.claim(content, [op.type for op in todo], originals.get(content))
                if claim is None:
                    item.content = content
                else:
                    item.copy_of = claim
            await queue.put(item)

    def _skip(
        self, obj: ObjectRef, lane: int, seq: int, ops: list[Operation], reason: SkipReason
    ) -> None:
        now = utc_now()
        for op in ops:
            self.writer.accept(
                Record(obj, op.type, "skipped", reason, error_message=obj.note, processed_at=now)
            )
        self.writer.finish(lane, seq)
