"""A worker: takes one object at a time from the queue to its records.

Per object: take it from the budget, prepare it (sniff its header, since names lie; read
it when the image goes as bytes; convert it when Rekognition would refuse it; see
``prepare.py``), look for a face locally where an operation asks (``prefilter = "faces"``),
run each operation through the caller, and hand each record to the writer as soon as it
exists (durable from then on). A copy of content already processed is written from the
original's rows instead, without a call.

Every record that cost a call (or a read) goes to the failure breaker; when it trips, the
worker raises ``TooManyFailures`` once the object's records are all written, which stops
the run. A call the caller would not start because the run is stopping (``Interrupted``)
leaves the object to the next run, with the records of its other operations kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog

from rekbatch.backends.base import ImageInput
from rekbatch.calls.breaker import FailureBreaker
from rekbatch.calls.caller import Caller
from rekbatch.calls.classify import failure_of
from rekbatch.engine.budget import Budget
from rekbatch.engine.dedup import Dedup, covers
from rekbatch.engine.prepare import Failure, ImagePreparer, Prepared, Skip
from rekbatch.engine.producer import WorkItem
from rekbatch.errors import BackendError, Interrupted, TooManyFailures
from rekbatch.records import IMAGE_FIELDS, ObjectRef, Record, utc_now
from rekbatch.sinks.writer import Writer
from rekbatch.sources import Source
from rekbatch.store.ledger import Location

log = structlog.get_logger("rekbatch")


@dataclass
class WorkerStats:
    images_sent: int = 0
    deduplicated: int = 0
    no_face_local: int = 0  # images the face pre-filter kept from at least one call


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
        preparer: ImagePreparer,
        stopping: asyncio.Event,
        request_stop: Callable[[str], None],
        faces: Callable[[bytes], Awaitable[bool]] | None = None,
        breaker: FailureBreaker | None = None,
    ) -> None:
        self.sources = sources
        self.caller = caller
        self.writer = writer
        self.budget = budget
        self.dedup = dedup
        self.stats = stats
        self.preparer = preparer
        self.stopping = stopping
        self.request_stop = request_stop
        self.faces = faces  # the local face detector, when an operation has prefilter = "faces"
        self.breaker = breaker

    async def run(self, queue: asyncio.Queue[WorkItem | None]) -> None:
        while (item := await queue.get()) is not None:
            if self.stopping.is_set():
                self._drop(item)  # left for the next run: above the watermark, listed again
                continue
            try:
                await self.process(item)
            except Interrupted:
                self._drop(item)  # the same; the records of its other operations are kept

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
        try:
            prepared = await self.preparer.prepare(obj, [op.type for op in item.ops])
            if self.faces is not None:
                await self._prefilter(item, prepared)
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
            self._judge(failure.code for _ in item.ops)
            return
        if prepared.sends:
            self.stats.images_sent += 1
        elif prepared.skipped:
            self.budget.release()  # the ledger does not count an object only skipped
        rows: list[Location] = []
        all_ok = True
        called: list[str | None] = []  # the outcome of each record that cost a call
        writer = self.writer
        for op in item.ops:
            got = prepared.outcomes[op.type]
            extra = prepared.extra[op.type]
            if isinstance(got, Failure):
                record = Record(
                    obj,
                    op.type,
                    "failed",
                    None,
                    got.code,
                    got.message,
                    1,
                    processed_at=utc_now(),
                    extra=extra,
                )
            elif isinstance(got, Skip):
                record = Record(
                    obj,
                    op.type,
                    "skipped",
                    got.reason,
                    error_message=got.message,
                    processed_at=utc_now(),
                    extra=extra,
                )
            elif not isinstance(got, ImageInput):
                record = Record(obj, op.type, "skipped", got, processed_at=utc_now(), extra=extra)
            else:
                outcome = await op.process(got, obj, self.caller)
                error = outcome.error
                called.append(None if error is None else error.code)
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
                    extra=extra,
                )
            offset, length = writer.accept(record)
            rows.append(Location(op.type, offset, length))
            all_ok = all_ok and record.status == "ok"
        writer.finish(item.lane, item.seq)
        if item.content is not None:
            self.dedup.settle(item.content, rows if all_ok else None, writer.next_commit)
        self._judge(called)

    def _judge(self, outcomes: Iterable[str | None]) -> None:
        """Feed the breaker the outcomes of an object's calls (None: ok, else the code)."""
        if self.breaker is None:
            return
        for code in outcomes:
            trip = self.breaker.record(code)
            if trip is not None:
                raise TooManyFailures(trip.reason(), trip.code)

    async def _prefilter(self, item: WorkItem, prepared: Prepared) -> None:
        """Operations with ``prefilter = "faces"`` whose image shows no face to the local
        detector become ``no_face_local`` skips; the others keep what ``prepare`` gave."""
        targets = [
            op.type
            for op in item.ops
            if op.prefilter and isinstance(prepared.outcomes[op.type], ImageInput)
        ]
        if not targets:
            return
        image = prepared.outcomes[targets[0]]
        assert isinstance(image, ImageInput)
        obj = item.obj
        data = image.data
        if data is None:  # sent by reference: read here for the detector alone
            data = await self.sources[obj.source_index].read(obj)
        if await self._face_found(data, obj):
            return
        self.stats.no_face_local += 1
        for op_type in targets:
            prepared.outcomes[op_type] = "no_face_local"

    async def _face_found(self, data: bytes, obj: ObjectRef) -> bool:
        """The pre-filter's verdict. When the local detector cannot tell (it could not decode
        the image, its pool failed), the image is sent: the pre-filter only ever saves calls,
        it does not decide failures."""
        assert self.faces is not None
        try:
            return await self.faces(data)
        except Exception as exc:
            log.warning("prefilter_failed", key=obj.key, error=f"{type(exc).__name__}: {exc}")
            return True

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
            image = {k: original[k] for k in IMAGE_FIELDS if k in original}
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
                    extra=image or None,
                )
            )
        self.writer.finish(item.lane, item.seq)
        self.stats.deduplicated += 1


def _read_error(exc: BaseException) -> BackendError:
    classified = failure_of(exc)
    if classified is not None:
        return BackendError(
            classified.code, f"reading the object: {classified.message}", "permanent"
        )
    return BackendError(type(exc).__name__, f"reading the object: {exc}", "permanent")
