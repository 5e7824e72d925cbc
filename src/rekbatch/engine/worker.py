"""A worker: takes one object at a time from the queue to its records.

Per object: take it from the budget, sniff its first bytes (names lie), read it when the
image goes as bytes, run each operation through the caller, and hand each record to the
writer as soon as it exists (durable from then on). A copy of content already processed is
written from the original's rows instead, without a call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rekbatch.backends.base import ImageInput
from rekbatch.calls.caller import Caller
from rekbatch.engine.budget import Budget
from rekbatch.engine.dedup import Dedup, covers
from rekbatch.engine.producer import WorkItem
from rekbatch.errors import BackendError, call_error_from
from rekbatch.records import ObjectRef, Record, utc_now
from rekbatch.sinks.writer import Writer
from rekbatch.sources import Source
from rekbatch.sources.filters import SNIFF_BYTES, classify_head
from rekbatch.store.ledger import Location


@dataclass
class WorkerStats:
    images_sent: int = 0
    deduplicated: int = 0


class Worker:
    def __init__(
        self,
        sources: Sequence[Source],
        caller: Caller,
        writer: Writer,
        budget: Budget,
        dedup: Dedup,
        stats: WorkerStats,
        *,
        sniff: bool,
        needs_bytes: Callable[[ObjectRef], bool],
        stopping: asyncio.Event,
        request_stop: Callable[[str], None],
    ) -> None:
        self.sources = sources
        self.caller = caller
        self.writer = writer
        self.budget = budget
        self.dedup = dedup
        self.stats = stats
        self.sniff = sniff
        self.needs_bytes = needs_bytes
        self.stopping = stopping
        self.request_stop = request_stop

    async def run(self, queue: asyncio.Queue[WorkItem | None]) -> None:
        while (item := await queue.get()) is not None:
            if self.stopping.is_set():
                self._drop(item)  # left for the next run: above the watermark, listed again
                continue
            await self.process(item)

    def _drop(self, item: WorkItem) -> None:
        if item.content is not None:
            self.dedup.settle(item.content, None, 0)

    async def process(self, item: WorkItem) -> None:
        if item.copy_of is not None:
            copy_of = item.copy_of
            original = copy_of if isinstance(copy_of, list) else await asyncio.shield(copy_of)
            if original is not None and covers(original, [op.type for op in item.ops]):
                self._copy(item, original)
                return
            if self.stopping.is_set():
                return
        reason = self.budget.reserve()
        if reason is not None:
            self.request_stop(reason)
            self._drop(item)
            return
        obj = item.obj
        source = self.sources[obj.source_index]
        try:
            data: bytes | None = None
            skip = None
            if self.needs_bytes(obj):
                data = await source.read(obj)
                skip = classify_head(obj, data[:SNIFF_BYTES])
            elif self.sniff:
                skip = classify_head(obj, await source.read_head(obj, SNIFF_BYTES))
            if skip is not None:
                self.budget.release()
                now = utc_now()
                self._done(
                    item,
                    [Record(obj, op.type, "skipped", skip, processed_at=now) for op in item.ops],
                )
                return
        except Exception as exc:
            failure = _read_error(exc)
            now = utc_now()
            self._done(
                item,
                [
                    Record(
                        obj,
                        op.type,
                        "failed",
                        None,
                        failure.code,
                        failure.message,
                        1,
                        processed_at=now,
                    )
                    for op in item.ops
                ],
            )
            return
        image = (
            ImageInput(data=data)
            if data is not None
            else ImageInput(bucket=obj.bucket, key=obj.key)
        )
        self.stats.images_sent += 1
        rows: list[Location] = []
        all_ok = True
        writer = self.writer
        for op in item.ops:
            outcome = await op.process(image, obj, self.caller)
            error = outcome.error
            record = Record(
                obj,
                op.type,
                "ok" if error is None else "failed",
                None,
                None if error is None else error.code,
                None if error is None else error.message,
                outcome.attempts,
                round(outcome.seconds * 1000, 1),
                utc_now(),
                outcome.result,
            )
            offset, length = writer.accept(record)
            rows.append(Location(op.type, offset, length))
            all_ok = all_ok and error is None
        writer.finish(item.lane, item.seq)
        if item.content is not None:
            self.dedup.settle(item.content, rows if all_ok else None, writer.next_commit)

    def _done(self, item: WorkItem, records: list[Record]) -> None:
        for record in records:
            self.writer.accept(record)
        self.writer.finish(item.lane, item.seq)
        self._drop(item)

    def _copy(self, item: WorkItem, rows: list[Location]) -> None:
        """Records of a copy, from the original's rows: same result, not paid again."""
        by_op = {row.operation: row for row in rows}
        now = utc_now()
        for op in item.ops:
            row = by_op[op.type]
            original = self.writer.read_line(row.offset, row.length)
            bucket, key = original["bucket"], original["key"]
            self.writer.accept(
                Record(
                    item.obj,
                    op.type,
                    "ok",
                    attempts=0,
                    latency_ms=0.0,
                    processed_at=now,
                    result=original["result"],
                    dedup_of=f"s3://{bucket}/{key}",
                )
            )
        self.writer.finish(item.lane, item.seq)
        self.stats.deduplicated += 1


def _read_error(exc: BaseException) -> BackendError:
    classified = call_error_from(exc)
    if classified is not None:
        return BackendError(
            classified.code, f"reading the object: {classified.message}", "permanent"
        )
    return BackendError(type(exc).__name__, f"reading the object: {exc}", "permanent")
