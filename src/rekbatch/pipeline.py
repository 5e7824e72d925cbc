"""One run of a job: list, filter, call, write, commit.

A producer pages through the sources into a bounded queue; a pool of consumers sniffs each
object, calls every operation through the operation's shared rate limiter, and hands the
object's records to the writer, which appends them to the result files in batches, fsyncs,
and commits them to the ledger with the listing watermark. Stopping (a signal or a budget cap)
closes the queue: in-flight objects finish, everything finished is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from rekbatch.backends.aws import AwsBackend, AwsClients, describe_setup_error
from rekbatch.backends.base import Backend, ImageInput
from rekbatch.calls.limiter import AdaptiveLimiter
from rekbatch.calls.quotas import resolve_ceilings
from rekbatch.calls.retry import RetryPolicy
from rekbatch.clock import MONOTONIC, Clock
from rekbatch.config import CompareFacesOp, Config, SearchFacesOp, parse_s3_uri
from rekbatch.errors import BackendError, SetupError
from rekbatch.operations.search import PeopleSearch, choose_strategy
from rekbatch.operations.specs import OperationSpec, box_text, build_spec
from rekbatch.pricing import estimate_cost
from rekbatch.records import ObjectRef, Record, SkipReason
from rekbatch.sinks.files import DurableFile
from rekbatch.sinks.rows import csv_header, csv_rows, jsonl_line
from rekbatch.sinks.summary import answer_lines, build_summary, search_answer
from rekbatch.sources import open_listing
from rekbatch.sources.filters import (
    MAX_IMAGE_BYTES,
    MAX_S3_OBJECT_BYTES,
    SNIFF_BYTES,
    classify_head,
    classify_listing,
    sniff_kind,
)
from rekbatch.store.jobdir import ledger_path, state_dir
from rekbatch.store.ledger import Ledger, LedgerRow
from rekbatch.store.lock import JobLock
from rekbatch.store.watermark import WatermarkTracker

log = structlog.get_logger("rekbatch")

# Seconds the current task's calls spent on the wire and in backoff (each consumer task has
# its own value): a record's latency_ms.
_call_seconds: ContextVar[float] = ContextVar("call_seconds", default=0.0)

RESULT_FILES = ("results.jsonl", "results.csv", "summary.json")
BATCH_RECORDS = 256
LOOKUP_CHUNK = 500
UPLOAD_EVERY_SECONDS = 900.0
DEDUP_MEMORY = 200_000  # recent distinct contents remembered for deduplication
BATCH_SECONDS = 0.25
GRACE_SECONDS = 30.0

EXIT_OK, EXIT_FAILED_RECORDS, EXIT_BUDGET, EXIT_INTERRUPTED = 0, 3, 4, 130


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class RunOptions:
    output_dir: Path
    fresh: bool = False
    retry_failed: bool = False
    retry_codes: set[str] | None = None
    config_path: str = ""
    progress: bool = False
    # Benchmarks only: no fsync and one ledger commit at the end instead of one per batch,
    # to measure what checkpointing costs. A crash then loses the run's results.
    checkpoint: bool = True


@dataclass
class RunOutcome:
    exit_code: int
    summary: dict[str, Any]
    answers: list[str]
    stop_reason: str | None


@dataclass
class _Work:
    obj: ObjectRef
    seq: int
    ops: list[OperationSpec]


@dataclass
class _Done:
    obj: ObjectRef
    seq: int
    records: list[Record]
    summaries: list[dict[str, Any]]


@dataclass
class RunStats:
    calls: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    throttles: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    listed: int = 0
    objects_done: int = 0
    images_sent: int = 0
    deduplicated: int = 0
    records: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "ok": dict(self.ok),
            "throttles": dict(self.throttles),
            "retries": dict(self.retries),
            "failures": dict(self.failures),
            "listed": self.listed,
            "objects_done": self.objects_done,
            "images_sent": self.images_sent,
            "deduplicated": self.deduplicated,
            "records": dict(self.records),
        }


class Job:
    """A job bound to its output directory; ``run()`` is one run of it."""

    def __init__(self, cfg: Config, options: RunOptions, *, clock: Clock = MONOTONIC) -> None:
        self.cfg = cfg
        self.options = options
        self.out = options.output_dir
        self.clock = clock
        self.run_id = uuid.uuid4().hex[:12]
        self.stats = RunStats()
        self._stop_reason: str | None = None
        self._stopping = asyncio.Event()
        self._rng = random.Random()
        self._search: PeopleSearch | None = None
        self._specs = []
        for op in cfg.operations:
            if isinstance(op, SearchFacesOp):
                api = "IndexFaces" if choose_strategy(op) == "collection" else "CompareFaces"
                self._specs.append(OperationSpec(op.type, api, "Image", {}, lambda _: {}))
            else:
                self._specs.append(build_spec(op))
        self._reference: dict[str, bytes] = {}
        self._reference_info: dict[str, dict[str, Any]] = {}
        # Same content (ETag and size) is called once per run; copies reuse the result.
        self._contents: OrderedDict[tuple[Any, ...], asyncio.Future[_Done | None]] = OrderedDict()
        self._limiters: dict[str, AdaptiveLimiter] = {}
        self._retry = RetryPolicy(max_attempts=cfg.limits.max_attempts)
        self._clients: AwsClients | None = None
        self._backend: Backend | None = None
        self._ledger: Ledger | None = None
        self._started = 0.0
        self._writer: _Writer | None = None
        self._images_before = 0  # images sent by earlier runs of the job, for budget caps
        self._reserved = 0

    # -- control ----------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            log.warning("stopping", reason=reason, hint="in-flight calls finish, then commit")
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def limiters(self) -> dict[str, AdaptiveLimiter]:
        return self._limiters

    @property
    def listing_complete(self) -> bool:
        writer = self._writer
        return writer is not None and len(writer.listing_finished) == len(self.cfg.source.uris)

    # -- set-up -----------------------------------------------------------------------------

    def _open_ledger(self) -> Ledger:
        ledger = Ledger(ledger_path(self.out))
        fingerprint = self.cfg.fingerprint()
        existing = ledger.get_meta("fingerprint")
        if existing is not None and existing != fingerprint and not ledger.has_records():
            existing = None  # an earlier run stopped before any work: nothing to keep
        if existing is not None and (existing != fingerprint or self.options.fresh):
            if not self.options.fresh:
                ledger.close()
                raise SetupError(
                    f"{self.out}: holds a different job (its sources or operations differ "
                    "from this config); use another --output, or --fresh to discard it"
                )
            ledger.close()
            self._discard_job()
            ledger = Ledger(ledger_path(self.out))
            existing = None
        if existing is None:
            ledger.set_meta(
                {
                    "fingerprint": fingerprint,
                    "config": self.cfg.model_dump_json(),
                    "config_path": self.options.config_path,
                    "created_at": utc_now(),
                }
            )
        else:
            # Rates, caps and endpoints may change between runs; keep the latest for resume.
            ledger.set_meta({"config": self.cfg.model_dump_json()})
        ledger.register_sources(self.cfg.source.uris)
        return ledger

    def _discard_job(self) -> None:
        for name in RESULT_FILES:
            (self.out / name).unlink(missing_ok=True)
        for child in state_dir(self.out).iterdir():
            if child.name != "lock":
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()

    def _needs_bytes(self, obj: ObjectRef) -> bool:
        """Rekognition reads S3 objects itself; local files, ``image_mode = "bytes"`` and
        the offline backend need the bytes here."""
        return (
            obj.bucket is None
            or self.cfg.aws.image_mode == "bytes"
            or self.cfg.backend.kind == "local"
        )

    def _max_bytes(self, source_uri: str) -> int:
        by_reference = parse_s3_uri(source_uri) is not None and self.cfg.aws.image_mode == "s3"
        return MAX_S3_OBJECT_BYTES if by_reference else MAX_IMAGE_BYTES

    async def _read_location(self, location: str) -> bytes:
        parsed = parse_s3_uri(location)
        if parsed is None:
            path = Path(location).expanduser()
            return await asyncio.to_thread(path.read_bytes)
        assert self._clients is not None
        return await self._clients.read_object(*parsed)

    async def _read_reference(self, field: str, location: str) -> bytes:
        try:
            data = await self._read_location(location)
        except Exception as exc:
            setup = describe_setup_error(exc, f"{field} {location}")
            if setup is not None:
                raise setup from None
            raise SetupError(f"{field}: cannot read {location}: {exc}") from None
        if sniff_kind(data[:SNIFF_BYTES]) is None:
            raise SetupError(f"{field}: {location} is not a JPEG or PNG image")
        if len(data) > MAX_IMAGE_BYTES:
            raise SetupError(
                f"{field}: {location} is {len(data)} bytes; Rekognition takes at most 5 MB as bytes"
            )
        return data

    async def _check_face(self, field: str, location: str, data: bytes) -> dict[str, Any]:
        """One DetectFaces call before any image is paid for: the reference must hold a
        face. With several, Rekognition compares the largest: say which one that is."""
        outcome, _ = await self.invoke("DetectFaces", {}, {"Image": ImageInput(data=data)})
        if isinstance(outcome, BackendError):
            raise SetupError(f"{field}: {location}: {outcome.code}: {outcome.message}")
        faces = outcome.get("FaceDetails", [])
        if not faces:
            raise SetupError(f"{field}: no face found in {location}")

        def area(face: dict[str, Any]) -> float:
            box = face.get("BoundingBox", {})
            return float(box.get("Width", 0.0)) * float(box.get("Height", 0.0))

        largest = max(faces, key=area)
        if len(faces) > 1:
            box = largest.get("BoundingBox", {})
            log.warning(
                "reference_has_several_faces",
                reference=location,
                faces=len(faces),
                used="the largest",
                left=round(float(box.get("Left", 0.0)), 3),
                top=round(float(box.get("Top", 0.0)), 3),
            )
        return {"faces": len(faces), "face_used": largest.get("BoundingBox")}

    async def _load_references(self) -> None:
        """Each reference is read once per run, checked for a face, and sent as bytes."""
        for op in self.cfg.operations:
            if isinstance(op, CompareFacesOp):
                field = "operations.compare_faces.reference"
                data = await self._read_reference(field, op.reference)
                self._reference_info[op.type] = await self._check_face(field, op.reference, data)
                self._reference[op.type] = data
            elif isinstance(op, SearchFacesOp):
                people: dict[str, list[tuple[str, bytes]]] = {}
                for person, refs in op.people.items():
                    field = f"operations.search_faces.people.{person}"
                    for ref in refs:
                        data = await self._read_reference(field, ref)
                        await self._check_face(field, ref, data)
                        people.setdefault(person, []).append((ref, data))
                self._search = PeopleSearch(op, people)
                await self._search.prepare(self.invoke)

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> RunOutcome:
        self.out.mkdir(parents=True, exist_ok=True)
        lock = JobLock(state_dir(self.out) / "lock")
        lock.acquire()
        try:
            return await self._run_locked()
        finally:
            lock.release()

    async def _run_locked(self) -> RunOutcome:
        ledger = self._ledger = self._open_ledger()
        try:
            if self.options.retry_failed:
                failed = ledger.failed(self.options.retry_codes)
                await self._forget(ledger, failed)
            s3_sources = [p for p in map(parse_s3_uri, self.cfg.source.uris) if p is not None]
            for uri in self.cfg.source.uris:
                local = parse_s3_uri(uri) is None
                if local and not await asyncio.to_thread(Path(uri).expanduser().is_dir):
                    raise SetupError(f"source.uris: {uri} is not a directory")
            async with AwsClients(
                region=self.cfg.aws.region,
                profile=self.cfg.aws.profile,
                s3_endpoint_url=self.cfg.aws.s3_endpoint_url,
                rekognition_endpoint_url=self.cfg.aws.rekognition_endpoint_url,
                concurrency=self.cfg.limits.concurrency,
                with_rekognition=self.cfg.backend.kind == "aws",
            ) as clients:
                self._clients = clients
                for bucket, _ in s3_sources:
                    await clients.check_bucket(bucket)
                self._backend = self._make_backend(clients)
                try:
                    self._build_limiters()
                    await self._load_references()
                    return await self._execute(ledger)
                finally:
                    await self._backend.aclose()
        finally:
            ledger.close()

    def _build_limiters(self) -> None:
        ceilings = resolve_ceilings(
            self.cfg.limits.max_tps, self.cfg.aws.region, [s.api for s in self._specs]
        )
        self._limiters = {
            api: AdaptiveLimiter(rate, clock=self.clock, name=api) for api, rate in ceilings.items()
        }

    def _make_backend(self, clients: AwsClients) -> Backend:
        if self.cfg.backend.kind == "aws":
            return AwsBackend(clients.rekognition)
        from rekbatch.backends.local.backend import LocalBackend  # optional extra

        backend: Backend = LocalBackend(state_dir(self.out) / "collections")
        return backend

    async def _forget(self, ledger: Ledger, keys: list[tuple[int, str, str]]) -> None:
        """Take failed records out of the ledger and the result files so they run again and
        still appear exactly once."""
        if not keys:
            return
        drop = {(k[1], k[2]) for k in keys}
        sizes = ledger.sink_sizes() or {}
        for name in ("results.jsonl", "results.csv"):
            path = self.out / name
            if not path.exists():
                continue
            committed = sizes.get(name, path.stat().st_size)
            sizes[name] = await asyncio.to_thread(_rewrite_without, path, committed, drop)
        ledger.forget(keys)
        ledger.set_meta({"sink_sizes": json.dumps(sizes)})
        ledger.reset_listing({k[0] for k in keys})
        log.info("retrying_failed", records=len(keys))

    async def _execute(self, ledger: Ledger) -> RunOutcome:
        sizes = ledger.sink_sizes()
        jsonl = DurableFile(self.out / "results.jsonl")
        csvf = DurableFile(self.out / "results.csv", csv_header())
        await jsonl.open(None if sizes is None else sizes.get("results.jsonl"))
        await csvf.open(None if sizes is None else sizes.get("results.csv"))
        if sizes is None:
            ledger.set_meta(
                {"sink_sizes": json.dumps({"results.jsonl": jsonl.size, "results.csv": csvf.size})}
            )
        self._images_before = ledger.images_sent()
        ledger.start_run(self.run_id, os.getpid())
        self._started = self.clock.now()
        log.info(
            "run_started",
            run_id=self.run_id,
            job=self.cfg.job.name,
            output=str(self.out),
            operations=[s.type for s in self._specs],
            ceilings={api: lim.ceiling for api, lim in self._limiters.items()},
            concurrency=self.cfg.limits.concurrency,
        )
        queue: asyncio.Queue[_Work | None] = asyncio.Queue(maxsize=self.cfg.limits.concurrency * 2)
        writer = self._writer = _Writer(self, ledger, jsonl, csvf)
        trackers: dict[int, WatermarkTracker] = {}
        writer.trackers = trackers
        writer_task = asyncio.create_task(writer.run(), name="writer")
        consumers = [
            asyncio.create_task(self._consume(queue, writer), name=f"consumer-{i}")
            for i in range(self.cfg.limits.concurrency)
        ]
        producer = asyncio.create_task(self._produce(queue, writer, trackers), name="producer")
        side_tasks = [asyncio.create_task(self._heartbeat(ledger), name="heartbeat")]
        if self.options.progress:
            from rekbatch.commands.progress import show_progress

            side_tasks.append(asyncio.create_task(show_progress(self), name="progress"))
        if self.cfg.output.upload_uri:
            side_tasks.append(asyncio.create_task(self._upload_parts(ledger), name="upload"))
        try:
            await self._wait_producer(producer)
            for _ in consumers:
                await queue.put(None)
            for task in asyncio.as_completed(consumers):
                await task
        except BaseException:
            for task in (producer, *consumers):
                task.cancel()
            await asyncio.gather(producer, *consumers, return_exceptions=True)
            raise
        finally:
            await writer.close()
            with contextlib.suppress(BaseException):
                await writer_task
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            await jsonl.close()
            await csvf.close()
        writer_exc = writer_task.exception() if writer_task.done() else None
        if writer_exc is not None:
            raise writer_exc
        await self._finish_search(ledger)
        return await self._finish(ledger)

    async def _wait_producer(self, producer: asyncio.Task[None]) -> None:
        stop = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({producer, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not producer.done():
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
        else:
            stop.cancel()
            producer.result()

    async def _heartbeat(self, ledger: Ledger) -> None:
        while True:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(ledger.heartbeat, self.run_id, self._live_stats())

    def _live_stats(self) -> dict[str, Any]:
        elapsed = max(self.clock.now() - self._started, 1e-9)
        stats = self.stats.as_dict()
        stats["elapsed_seconds"] = round(elapsed, 3)
        stats["calls_per_second"] = round(sum(self.stats.calls.values()) / elapsed, 2)
        stats["limiters"] = {api: lim.snapshot() for api, lim in self._limiters.items()}
        return stats

    # -- producer ---------------------------------------------------------------------------

    async def _produce(
        self,
        queue: asyncio.Queue[_Work | None],
        writer: _Writer,
        trackers: dict[int, WatermarkTracker],
    ) -> None:
        ledger, clients = self._ledger, self._clients
        assert ledger is not None and clients is not None
        sources = ledger.sources()
        if sources and all(row["listing_done"] for row in sources):
            # A finished job run again: list everything once more to pick up new and changed
            # objects; unchanged ones are recognised in the ledger and cost nothing.
            ledger.reset_listing(range(len(sources)))
        for index, uri in enumerate(self.cfg.source.uris):
            mark = ledger.watermark(index)
            ledger.rebase_listed(index, mark)
            tracker = trackers[index] = WatermarkTracker(mark)
            log.info("listing", source=uri, start_after=mark)
            chunk: list[ObjectRef] = []
            async for obj in open_listing(uri, index, clients.s3, mark):
                chunk.append(obj)
                if len(chunk) >= LOOKUP_CHUNK:
                    await self._dispatch(chunk, uri, queue, writer, tracker)
                    chunk = []
            await self._dispatch(chunk, uri, queue, writer, tracker)
            writer.listing_finished.add(index)
            log.info("listed", source=uri, objects=writer.listed[index])

    async def _dispatch(
        self,
        chunk: list[ObjectRef],
        uri: str,
        queue: asyncio.Queue[_Work | None],
        writer: _Writer,
        tracker: WatermarkTracker,
    ) -> None:
        """Send a chunk of listed objects on, minus the operations the ledger already holds
        for the same ETag (an object whose ETag changed is processed again)."""
        if not chunk:
            return
        assert self._ledger is not None
        source = chunk[0].source_index
        keys = [obj.key for obj in chunk]
        finished = await asyncio.to_thread(self._ledger.lookup, source, keys)
        cfg = self.cfg.source
        max_bytes = self._max_bytes(uri)
        for obj in chunk:
            self.stats.listed += 1
            writer.listed[source] += 1
            seq = tracker.push(obj.key)
            before = finished.get(obj.key, {})
            todo = [s for s in self._specs if before.get(s.type) != obj.etag]
            if not todo:
                tracker.complete(seq)
                continue
            reason = classify_listing(obj, cfg.include, cfg.exclude, max_bytes, sniff=cfg.sniff)
            if reason is not None:
                await writer.put(self._skipped(obj, seq, todo, reason))
                continue
            await queue.put(_Work(obj, seq, todo))

    # -- consumers --------------------------------------------------------------------------

    async def _consume(self, queue: asyncio.Queue[_Work | None], writer: _Writer) -> None:
        while True:
            work = await queue.get()
            if work is None:
                return
            if self.stopping:
                continue  # left for the next run: above the watermark, listed again
            done = await self._process(work)
            if done is not None:
                await writer.put(done)

    def _reserve_image(self) -> bool:
        """Take one image from the budget, or stop the run when a cap is reached. Checking and
        taking happen with no await between them, so consumers never overshoot a cap."""
        images = self._images_before + self._reserved
        max_images = self.cfg.limits.max_images
        if max_images is not None and images >= max_images:
            self.request_stop("budget: limits.max_images reached")
            return False
        max_cost = self.cfg.limits.max_cost_usd
        if max_cost is not None:
            cost = estimate_cost({s.api: images + 1 for s in self._specs})
            if cost > max_cost:
                self.request_stop("budget: limits.max_cost_usd reached")
                return False
        self._reserved += 1
        return True

    async def _process(self, work: _Work) -> _Done | None:
        """Process an object, or reuse the result of an object with the same content (ETag
        and size) processed earlier in this run: a copy is not paid for twice."""
        obj = work.obj
        if obj.bucket is None:  # a local file's ETag is not a content hash
            return await self._process_once(work)
        content = (obj.etag, obj.size, tuple(s.type for s in work.ops))
        pending = self._contents.get(content)
        if pending is not None:
            original = await asyncio.shield(pending)
            if original is not None:
                return self._copy_of(original, work)
            return await self._process_once(work)
        future: asyncio.Future[_Done | None] = asyncio.get_running_loop().create_future()
        self._contents[content] = future
        if len(self._contents) > DEDUP_MEMORY:
            self._contents.popitem(last=False)
        done: _Done | None = None
        try:
            done = await self._process_once(work)
            return done
        finally:
            future.set_result(done)

    def _copy_of(self, original: _Done, work: _Work) -> _Done:
        uri = original.obj.uri
        records, summaries = [], []
        for record, summary in zip(original.records, original.summaries, strict=True):
            copy = self._record(
                work.obj,
                record.operation,
                record.status,
                reason=record.reason,
                result=record.result,
            )
            copy.error_code, copy.error_message = record.error_code, record.error_message
            copy.latency_ms = 0.0
            copy.extra["dedup_of"] = uri
            records.append(copy)
            summaries.append({**summary, "dedup_of": uri})
        self.stats.deduplicated += 1
        return _Done(work.obj, work.seq, records, summaries)

    async def _process_once(self, work: _Work) -> _Done | None:
        obj = work.obj
        if not self._reserve_image():
            return None
        try:
            if self.cfg.source.sniff or self._needs_bytes(obj):
                reason = classify_head(obj, await self._read_head(obj))
                if reason is not None:
                    self._reserved -= 1
                    return self._skipped(obj, work.seq, work.ops, reason)
            data = await self._read_bytes(obj) if self._needs_bytes(obj) else None
        except Exception as exc:
            error = _read_error(exc)
            return self._failed_all(obj, work.seq, work.ops, error)
        image = (
            ImageInput(data=data)
            if data is not None
            else ImageInput(bucket=obj.bucket, key=obj.key)
        )
        self.stats.images_sent += 1
        records, summaries = [], []
        for spec in work.ops:
            if spec.type == "search_faces":
                record, summary = await self._search_one(spec, obj, image)
            else:
                record, summary = await self._call(spec, obj, image)
            records.append(record)
            summaries.append(summary)
        return _Done(obj, work.seq, records, summaries)

    async def _search_one(
        self, spec: OperationSpec, obj: ObjectRef, image: ImageInput
    ) -> tuple[Record, dict[str, Any]]:
        assert self._search is not None
        _call_seconds.set(0.0)
        outcome, attempts, summary = await self._search.process(
            self.invoke, obj.bucket, obj.key, image
        )
        record, _ = self._outcome_record(obj, spec, outcome, attempts)
        return record, summary

    async def _read_head(self, obj: ObjectRef) -> bytes:
        if obj.bucket is None:
            path = Path(obj.root or ".") / obj.key
            return await asyncio.to_thread(_read_prefix, path, SNIFF_BYTES)
        assert self._clients is not None
        return await self._clients.read_head(obj.bucket, obj.key, SNIFF_BYTES)

    async def _read_bytes(self, obj: ObjectRef) -> bytes:
        if obj.bucket is None:
            return await asyncio.to_thread((Path(obj.root or ".") / obj.key).read_bytes)
        assert self._clients is not None
        return await self._clients.read_object(obj.bucket, obj.key)

    async def invoke(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> tuple[dict[str, Any] | BackendError, int]:
        """One Rekognition request through the operation's shared limiter, retried with
        backoff while the failure is transient: the response, or the last error, and the
        number of attempts it took."""
        assert self._backend is not None
        limiter = self._limiter(api)
        attempts = 0
        while True:
            attempts += 1
            permit = await limiter.acquire()
            self.stats.calls[api] += 1
            sent = self.clock.now()
            try:
                result = await self._backend.call(api, params, images)
            except BackendError as error:
                _call_seconds.set(_call_seconds.get() + self.clock.now() - sent)
                if error.kind == "throttle":
                    limiter.on_throttle(permit)
                    self.stats.throttles[api] += 1
                else:
                    limiter.on_error(permit)
                if not error.retryable or attempts >= self._retry.max_attempts:
                    self.stats.failures[api] += 1
                    return error, attempts
                self.stats.retries[api] += 1
                pause = self._retry.delay(attempts, self._rng)
                _call_seconds.set(_call_seconds.get() + pause)
                await self.clock.sleep(pause)
                continue
            except BaseException:
                limiter.on_error(permit)
                raise
            _call_seconds.set(_call_seconds.get() + self.clock.now() - sent)
            limiter.on_success(permit)
            self.stats.ok[api] += 1
            return result, attempts

    def _limiter(self, api: str) -> AdaptiveLimiter:
        limiter = self._limiters.get(api)
        if limiter is None:
            # An API no operation declared up front (collections): its default ceiling.
            (rate,) = resolve_ceilings(self.cfg.limits.max_tps, self.cfg.aws.region, [api]).values()
            limiter = self._limiters[api] = AdaptiveLimiter(rate, clock=self.clock, name=api)
        return limiter

    async def _call(
        self, spec: OperationSpec, obj: ObjectRef, image: ImageInput
    ) -> tuple[Record, dict[str, Any]]:
        images = {spec.image_field: image}
        if spec.type in self._reference:
            images["SourceImage"] = ImageInput(data=self._reference[spec.type])
        _call_seconds.set(0.0)
        outcome, attempts = await self.invoke(spec.api, spec.params, images)
        return self._outcome_record(obj, spec, outcome, attempts)

    def _outcome_record(
        self,
        obj: ObjectRef,
        spec: OperationSpec,
        outcome: dict[str, Any] | BackendError,
        attempts: int,
    ) -> tuple[Record, dict[str, Any]]:
        if isinstance(outcome, BackendError):
            record = self._record(obj, spec.type, "failed", attempts=attempts)
            record.error_code, record.error_message = outcome.code, outcome.message
            summary: dict[str, Any] = {}
        else:
            record = self._record(obj, spec.type, "ok", attempts=attempts, result=outcome)
            summary = spec.summarize(outcome)
        # On the wire and in backoff; not the wait for the limiter's first permit.
        record.latency_ms = round(_call_seconds.get() * 1000, 1)
        return record, summary

    # -- records ----------------------------------------------------------------------------

    def _record(
        self,
        obj: ObjectRef,
        operation: str,
        status: str,
        *,
        attempts: int = 0,
        reason: SkipReason | None = None,
        result: dict[str, Any] | None = None,
    ) -> Record:
        return Record(
            run_id=self.run_id,
            obj=obj,
            operation=operation,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            attempts=attempts,
            processed_at=utc_now(),
            result=result,
        )

    def _skipped(
        self, obj: ObjectRef, seq: int, ops: list[OperationSpec], reason: SkipReason
    ) -> _Done:
        records = [self._record(obj, s.type, "skipped", reason=reason) for s in ops]
        return _Done(obj, seq, records, [{} for _ in ops])

    def _failed_all(
        self, obj: ObjectRef, seq: int, ops: list[OperationSpec], error: BackendError
    ) -> _Done:
        records = []
        for spec in ops:
            record = self._record(obj, spec.type, "failed", attempts=1)
            record.error_code, record.error_message = error.code, error.message
            records.append(record)
        return _Done(obj, seq, records, [{} for _ in ops])

    # -- the end ----------------------------------------------------------------------------

    async def _finish_search(self, ledger: Ledger) -> None:
        """Turn search_faces records into per-person matches in the ledger. The collection
        strategy searches once every image is indexed: on a completed run only."""
        search = self._search
        if search is None:
            return
        rows: list[tuple[str, int, str, str | None, float, str | None]] = []
        if search.strategy == "compare":
            for row in ledger.operation_rows("search_faces"):
                for person, (similarity, box) in json.loads(row["detail"] or "{}").items():
                    rows.append(
                        (
                            person,
                            row["source"],
                            row["key"],
                            row["bucket"],
                            similarity,
                            box_text(box),
                        )
                    )
        elif self._stop_reason is None:
            found = await search.search(self.invoke)
            for person, external_id, similarity, box in found:
                for obj in ledger.objects_with_detail("search_faces", external_id):
                    rows.append(
                        (
                            person,
                            obj["source"],
                            obj["key"],
                            obj["bucket"],
                            similarity,
                            box_text(box),
                        )
                    )
            await search.cleanup(self.invoke)
        else:
            log.info("search_deferred", reason="the collection is searched when indexing ends")
        await asyncio.to_thread(ledger.save_person_matches, rows)

    async def _upload_parts(self, ledger: Ledger) -> None:
        """Long runs: a snapshot of the results goes to S3 every ``UPLOAD_EVERY_SECONDS``."""
        from rekbatch.sinks.upload import upload_results

        assert self._clients is not None and self.cfg.output.upload_uri
        while True:
            await asyncio.sleep(UPLOAD_EVERY_SECONDS)
            part = int(ledger.get_meta("upload_parts") or 0) + 1
            await upload_results(self._clients.s3, self.out, self.cfg.output.upload_uri, part=part)
            await asyncio.to_thread(ledger.set_meta, {"upload_parts": str(part)})
            log.info("uploaded_part", part=part, uri=self.cfg.output.upload_uri)

    async def _outputs(self) -> list[str]:
        """The analytics files beside the JSONL and CSV: Parquet when pyarrow is installed."""
        paths = [str(self.out / "results.jsonl"), str(self.out / "results.csv")]
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            log.info("parquet_skipped", hint="pip install 'rekbatch[parquet]' for Parquet outputs")
            return paths
        from rekbatch.sinks.parquet import write_parquet

        written = await asyncio.to_thread(write_parquet, self.out)
        return paths + [str(p) for p in written]

    async def _finish(self, ledger: Ledger) -> RunOutcome:
        live = self._live_stats()  # the rate of the calls, before the output files are made
        outputs = await self._outputs()
        summary = build_summary(ledger, self.cfg, live)
        summary["outputs"] = [*outputs, str(self.out / "summary.json")]
        if "compare_faces" in summary:
            summary["compare_faces"].update(self._reference_info.get("compare_faces", {}))
        if self._search is not None:
            summary["search_faces"] = search_answer(ledger, self._search.op, self._search.strategy)
        summary["run_id"] = self.run_id
        summary["stopped"] = self._stop_reason
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.cfg.output.upload_uri:
            from rekbatch.sinks.upload import upload_results

            assert self._clients is not None
            uploaded = await upload_results(self._clients.s3, self.out, self.cfg.output.upload_uri)
            log.info("uploaded", files=len(uploaded), uri=self.cfg.output.upload_uri)
        if self._stop_reason is None:
            code = EXIT_FAILED_RECORDS if summary["counts"]["by_status"].get("failed") else EXIT_OK
        elif self._stop_reason.startswith("budget"):
            code = EXIT_BUDGET
        else:
            code = EXIT_INTERRUPTED
        ledger.end_run(self.run_id, code, live)
        log.info(
            "run_finished",
            exit_code=code,
            stopped=self._stop_reason,
            by_status=summary["counts"]["by_status"],
            calls=summary["calls"]["total"],
            throttles=summary["calls"]["throttles"],
            retries=summary["calls"]["retries"],
            settled_tps={a: s.get("rate") for a, s in summary["limiters"].items()},
        )
        return RunOutcome(code, summary, answer_lines(summary), self._stop_reason)


class _Writer:
    """The single task that owns the result files and the ledger's commits."""

    def __init__(self, job: Job, ledger: Ledger, jsonl: DurableFile, csvf: DurableFile) -> None:
        self.job = job
        self.ledger = ledger
        self.jsonl = jsonl
        self.csvf = csvf
        self.trackers: dict[int, WatermarkTracker] = {}
        self.listed: Counter[int] = Counter()
        self.listing_finished: set[int] = set()
        self._committed_listed: Counter[int] = Counter()
        self._queue: asyncio.Queue[_Done | None] = asyncio.Queue(maxsize=BATCH_RECORDS * 4)
        self._deferred: list[LedgerRow] = []
        self._closing = False

    async def put(self, done: _Done) -> None:
        await self._queue.put(done)

    async def close(self) -> None:
        await self._queue.put(None)

    async def run(self) -> None:
        batch: list[_Done] = []
        deadline: float | None = None
        closing = False
        while not closing:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                item = _FLUSH
            if item is None:
                closing = self._closing = True
            elif item is not _FLUSH:
                batch.append(item)
                if deadline is None:
                    deadline = time.monotonic() + BATCH_SECONDS
            records = sum(len(d.records) for d in batch)
            if closing or item is _FLUSH or records >= BATCH_RECORDS:
                await self._commit(batch)
                batch, deadline = [], None

    async def _commit(self, batch: list[_Done]) -> None:
        lines: list[bytes] = []
        rows: list[LedgerRow] = []
        records: list[Record] = []
        summaries: list[dict[str, Any]] = []
        for done in batch:
            for record, summary in zip(done.records, done.summaries, strict=True):
                lines.append(jsonl_line(record))
                records.append(record)
                summaries.append(summary)
                rows.append(_ledger_row(record, summary))
        durable = self.job.options.checkpoint
        jsonl_size = await self.jsonl.append(b"".join(lines), sync=durable)
        csv_size = await self.csvf.append(csv_rows(records, summaries), sync=durable)
        for done in batch:
            self.trackers[done.obj.source_index].complete(done.seq)
            self.job.stats.objects_done += 1
            self.job.stats.records.update(r.status for r in done.records)
        marks = {}
        for index, tracker in self.trackers.items():
            if tracker.moved and tracker.mark is not None:
                marks[index] = tracker.mark
                tracker.moved = False
        listed = {i: n - self._committed_listed[i] for i, n in self.listed.items()}
        self._committed_listed = Counter(self.listed)
        finished = [
            i
            for i in self.listing_finished
            if self.trackers.get(i) and not self.trackers[i].outstanding
        ]
        if not rows and not marks and not any(listed.values()) and not finished:
            return
        if not durable:
            self._deferred.extend(rows)
            if not self._closing:
                return
            rows, self._deferred = self._deferred, []
        await asyncio.to_thread(
            self.ledger.commit,
            rows,
            {"results.jsonl": jsonl_size, "results.csv": csv_size},
            marks,
            listed,
            finished,
        )


_FLUSH: Any = object()


def _ledger_row(record: Record, summary: dict[str, Any]) -> LedgerRow:
    obj = record.obj
    return LedgerRow(
        source=obj.source_index,
        key=obj.key,
        operation=record.operation,
        bucket=obj.bucket,
        etag=obj.etag,
        size=obj.size,
        status=record.status,
        reason=record.reason,
        error_code=record.error_code,
        error_message=record.error_message,
        attempts=record.attempts,
        billed=1 if record.status == "ok" and "dedup_of" not in record.extra else 0,
        matched=summary.get("matched"),
        similarity=summary.get("best_similarity"),
        match_box=summary.get("match_box"),
        detail=summary.get("detail"),
        dedup_of=record.extra.get("dedup_of"),
        processed_at=record.processed_at,
    )


def _read_prefix(path: Path, nbytes: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(nbytes)


def _read_error(exc: BaseException) -> BackendError:
    from rekbatch.backends.aws import backend_error_from

    classified = backend_error_from(exc)
    if classified is not None:
        return BackendError(
            classified.code, f"reading the object: {classified.message}", "permanent"
        )
    return BackendError(type(exc).__name__, f"reading the object: {exc}", "permanent")


def _rewrite_without(path: Path, committed: int, drop: set[tuple[str, str]]) -> int:
    """Copy ``path`` up to ``committed`` bytes without the rows of ``drop`` (key, operation);
    replace it atomically; return the new size."""
    import csv
    import io

    tmp = path.with_suffix(path.suffix + ".tmp")
    with path.open("rb") as src, tmp.open("wb") as dst:
        data = src.read(committed)
        if path.suffix == ".jsonl":
            for line in data.splitlines(keepends=True):
                row = json.loads(line)
                if (row["key"], row["operation"]) not in drop:
                    dst.write(line)
        else:
            text = data.decode("utf-8")
            reader = csv.reader(io.StringIO(text, newline=""))
            header = next(reader)
            key_i, op_i = header.index("key"), header.index("operation")
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(header)
            for row in reader:
                if (row[key_i], row[op_i]) not in drop:
                    writer.writerow(row)
            dst.write(out.getvalue().encode("utf-8"))
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


async def run_job(
    cfg: Config,
    options: RunOptions,
    *,
    on_job: Callable[[Job], Awaitable[None] | None] | None = None,
) -> RunOutcome:
    job = Job(cfg, options)
    if on_job is not None:
        maybe = on_job(job)
        if maybe is not None:
            await maybe
    return await job.run()
