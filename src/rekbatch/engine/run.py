"""One run of a job, supervised.

``Job.run`` takes the job directory's lock, opens the ledger and the services, prepares the
operations, then runs every task of the run under one ``asyncio.TaskGroup``: the producer,
the workers, the writer, the heartbeat, the periodic upload and the side tasks handed to
the job (the command line's progress display). The first unexpected failure of any of them
cancels the others; what is finished is committed and the run ends with exit 1 and one
line naming the task (or the cause, when the run stopped itself: the failure breaker,
refused credentials, an endpoint out of reach).
Stopping (a signal or a budget cap) instead closes the producer: in-flight objects have
``limits.stop_grace_seconds`` to finish, no call is retried meanwhile, and then the
producer and the workers are cancelled; everything finished is committed.

Then the operations finish (search a face collection), and summary.json, Parquet and the
upload are written from the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from rekbatch.backends.base import Backend
from rekbatch.calls.breaker import FailureBreaker
from rekbatch.calls.caller import Caller
from rekbatch.calls.limiter import AdaptiveLimiter
from rekbatch.calls.quotas import resolve_ceilings
from rekbatch.calls.regions import BucketRegions, Regions, region_totals
from rekbatch.calls.retry import RetryPolicy
from rekbatch.calls.service_quotas import QuotaReading, account_quotas
from rekbatch.clock import MONOTONIC, Clock
from rekbatch.config import Config, parse_s3_uri, uses_s3
from rekbatch.engine.budget import Budget
from rekbatch.engine.dedup import Dedup
from rekbatch.engine.delivery import Delivery, find_delivery
from rekbatch.engine.follow import QueueFeeder
from rekbatch.engine.listing import ListingRules
from rekbatch.engine.prepare import ImagePreparer
from rekbatch.engine.producer import Producer, WorkItem
from rekbatch.engine.shard_split import Agreement, agree, give_references, take_references
from rekbatch.engine.shards import JobSplit, Shard, write_job_file
from rekbatch.engine.worker import Worker, WorkerStats
from rekbatch.errors import (
    EXIT_BUDGET,
    EXIT_FAILED_RECORDS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNEXPECTED,
    BackendError,
    ConfigError,
    Interrupted,
    RekbatchError,
    SetupError,
    TaskFailed,
)
from rekbatch.operations import Operation, OperationContext, build_operations
from rekbatch.sinks.summary import answer_lines, build_summary, write_summary
from rekbatch.sinks.writer import Writer
from rekbatch.sources import S3, Source, check_sources, open_source
from rekbatch.sources.convert import Converter
from rekbatch.sources.decoding import MB, MemoryBudget
from rekbatch.sources.sqs import SqsQueue, is_queue_uri, open_queues
from rekbatch.store import jobdir, retry_failed
from rekbatch.store.ledger import Ledger, LedgerDB
from rekbatch.store.lock import JobLock

if TYPE_CHECKING:
    from rekbatch.backends.aws import AwsBackend

log = structlog.get_logger("rekbatch")

UPLOAD_EVERY_SECONDS = 900.0
HEARTBEAT_SECONDS = 1.0


@dataclass
class RunOptions:
    output_dir: Path
    fresh: bool = False
    retry_failed: bool = False
    retry_codes: set[str] | None = None
    config_path: str = ""
    # Benchmarks only (benchmarks/run_unchecked.py; the CLI never turns it off): no fsync
    # and no synchronous SQLite commits, to measure what checkpointing costs. A machine
    # crash then loses results; a process crash does not.
    checkpoint: bool = True
    # ``rekbatch scan``: the config built from its flags, written into the job directory
    # (as ``config_file``) once the directory holds the job.
    config_text: str | None = None
    config_file: str = "rekbatch.toml"
    # One shard of a sharded job: only its objects, 1/N of the ceilings, and ``job_config``
    # (the whole job's config) in job.json for ``merge``.
    shard: Shard | None = None
    job_config: Config | None = None
    # The offline backend's workers (processes or Ray actors); None: one per core (pool) or
    # per free CPU of the cluster (Ray). A shard run as a Ray task sets its share.
    local_workers: int | None = None
    # ``--follow``: after the listing, read the queue sources until stopped; the Parquet
    # files (and the upload, as a part) are refreshed every ``export_every_seconds``.
    follow: bool = False
    export_every_seconds: float = 300.0


@dataclass
class RunOutcome:
    exit_code: int
    summary: dict[str, Any]
    answers: list[str]
    stop_reason: str | None
    failure: str | None = None
    notes: list[str] = field(default_factory=list)
    resume_args: str = ""  # what ``rekbatch resume DIR`` needs added to take the job up


async def _named(name: str, work: Awaitable[None]) -> None:
    """Run a task of the run; an unexpected failure says which task it was."""
    try:
        await work
    except Exception as exc:
        raise TaskFailed(name, exc) from exc


class Job:
    """A job bound to its output directory; ``run()`` is one run of it.

    ``backend`` replaces the configured one (tests hand the engine an in-process fake), and
    ``backends`` the other calling Regions' (Region -> backend)."""

    def __init__(
        self,
        cfg: Config,
        options: RunOptions,
        *,
        backend: Backend | None = None,
        backends: Mapping[str, Backend] | None = None,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.cfg = cfg
        self.options = options
        self.out = options.output_dir
        self.clock = clock
        self.run_id = uuid.uuid4().hex[:12]
        self.stop_reason: str | None = None
        self.stopping = asyncio.Event()
        self._given_backend = backend
        self._given_backends = backends
        self.caller: Caller | None = None
        self.regions: Regions | None = None  # several calling Regions
        self._lanes = cfg.aws.calling_regions()
        self._bucket_regions: dict[str, str] = {}  # the source buckets' Regions
        self.writer: Writer | None = None
        self.producer: Producer | None = None
        self.worker_stats = WorkerStats()
        self._faces: Callable[[bytes], Awaitable[bool]] | None = None
        self._started = 0.0
        self.delivery = Delivery.of(cfg)  # with the buckets elsewhere once they are known
        self.split: JobSplit | None = None  # a shard's: the job's listing divided
        self.converter: Converter | None = None
        self.queues: list[SqsQueue] = []
        self.feeder: QueueFeeder | None = None
        # Decoded-image memory for all conversions and offline decodes at once.
        self.memory = MemoryBudget(cfg.source.convert_memory_mb * MB)
        self.unrecorded: Counter[str] = Counter()
        self._work: list[asyncio.Task[None]] = []  # the producer and the workers
        self._grace_over = False
        self._main: asyncio.Task[Any] | None = None  # the task running ``run``
        self._startup_cancelled = False
        self._grace: asyncio.TimerHandle | None = None
        # Tasks run beside the work (the command line's progress display): supervised with
        # the run's own, cancelled when the work ends; a failure ends the run as theirs do.
        self.side_tasks: list[tuple[str, Callable[[Job], Coroutine[Any, Any, None]]]] = []

    # -- control ----------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            grace = self.cfg.limits.stop_grace_seconds
            log.warning(
                "stopping",
                reason=reason,
                hint=f"in-flight calls have {grace:g} s to finish, then commit",
            )
            self._grace = asyncio.get_running_loop().call_later(grace, self._end_grace)
        self.stopping.set()

    def _end_grace(self) -> None:
        """The grace period is over: cancel the producer and the workers; what they
        finished is committed, the rest stays to do."""
        self._grace_over = True
        if not self._work and self._main is not None and not self._main.done():
            # Still starting (a reference check on a stalled endpoint, say): cancel that.
            self._startup_cancelled = True
            log.warning("grace_over", cancelled="startup")
            self._main.cancel()
            return
        running = [task for task in self._work if not task.done()]
        if running:
            log.warning("grace_over", cancelled_tasks=len(running))
        for task in running:
            task.cancel()

    @property
    def limiters(self) -> dict[str, AdaptiveLimiter]:
        return {} if self.caller is None else self.caller.limiters

    @property
    def listing_complete(self) -> bool:
        return self.writer is not None and self.writer.listing_complete

    def live_stats(self) -> dict[str, Any]:
        """The run's counters as they stand (heartbeat, progress, summary)."""
        elapsed = max(self.clock.now() - self._started, 1e-9)
        calls = self.caller.stats.as_dict() if self.caller else {}
        writer = self.writer
        total = sum(calls.get("calls", {}).values())
        return {
            **calls,
            "listed": sum(writer.listed.values()) if writer else 0,
            "listing_complete": self.listing_complete,
            "objects_done": writer.objects_done if writer else 0,
            "records": dict(writer.records) if writer else {},
            "images_sent": self.worker_stats.images_sent,
            "images_converted": self.converter.converted if self.converter else 0,
            "deduplicated": self.worker_stats.deduplicated,
            "no_face_local": self.worker_stats.no_face_local,
            "elapsed_seconds": round(elapsed, 3),
            "calls_per_second": round(total / elapsed, 2),
            "limiters": {api: lim.snapshot() for api, lim in self.limiters.items()},
            "regions": self._region_stats(elapsed),
            "listing": self.producer.listing_stats() if self.producer else {},
            **({"queues": self.feeder.stats()} if self.feeder else {}),
        }

    def _region_stats(self, elapsed: float) -> dict[str, dict[str, Any]]:
        """Calls, rate and throttles per Region (the home Region alone without spreading)."""
        caller = self.caller
        if caller is None or self.cfg.backend.kind != "aws":
            return {}
        stats = caller.stats
        return region_totals(
            self.regions, self.cfg.aws.region, stats.calls, stats.ok, stats.throttles, elapsed
        )

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> RunOutcome:
        self._main = asyncio.current_task()
        created = await asyncio.to_thread(jobdir.make_output, self.out)
        lock = JobLock(jobdir.state_dir(self.out) / "lock")
        lock.acquire()
        worked = False
        try:
            worked, self.cfg = await asyncio.to_thread(
                jobdir.claim,
                self.out,
                self.cfg,
                fresh=self.options.fresh,
                config_path=self.options.config_path,
            )
            if self.options.config_text is not None:
                path = self.out / self.options.config_file
                await asyncio.to_thread(path.write_text, self.options.config_text, "utf-8")
            shard = self.options.shard
            if shard is not None:
                await asyncio.to_thread(
                    write_job_file, self.out, self.options.job_config or self.cfg, shard
                )
            return await self._until_grace()
        except RekbatchError:
            if created and not worked and self.writer is None:
                # Nothing was done: leave no job behind for a config that never ran.
                lock.release()
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        finally:
            if self._grace is not None:
                self._grace.cancel()  # the run is over: nothing left to cancel
            lock.release()

    async def _until_grace(self) -> RunOutcome:
        """``_run_claimed``, whose startup the end of the grace period may cancel."""
        try:
            return await self._run_claimed()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._startup_cancelled or task is None or task.uncancel():
                raise  # cancelled from outside too
            raise Interrupted(
                f"{self.stop_reason}: stopped before the work began, nothing was recorded"
            ) from None

    async def _run_claimed(self) -> RunOutcome:
        cfg = self.cfg
        ledger = Ledger(jobdir.ledger_path(self.out), durable=self.options.checkpoint)
        try:
            await ledger.write(retry_failed.recover, self.out)
            async with contextlib.AsyncExitStack() as stack:
                s3 = await self._open_s3(stack)
                sources = [
                    open_source(uri, i, s3, follow_symlinks=cfg.source.follow_symlinks)
                    for i, uri in enumerate(cfg.source.uris)
                ]
                await self._check_sources(sources, s3)
                self.queues = await self._open_queues(stack)
                agreement = await self._agree(sources, s3, ledger)
                backend = self._given_backend or await self._open_backend(stack)
                if cfg.source.convert and cfg.source.sniff:
                    self.converter = await stack.enter_async_context(
                        Converter(max_pixels=cfg.source.max_pixels, memory=self.memory)
                    )
                operations = build_operations(cfg)
                self._faces = await self._open_prefilter(stack, backend, operations)
                quotas = await self._account_quotas(operations)
                self.caller = Caller(
                    backend,
                    max_tps=cfg.limits.max_tps,
                    region=cfg.aws.region,
                    # The limiter sets the rate; backoff only spreads the retries, so it
                    # need not grow for long (a 20 s pause holds an object for nothing).
                    retry=RetryPolicy(max_attempts=cfg.limits.max_attempts, cap=2.0),
                    apis=[api for op in operations for api in op.calls_per_image()],
                    clock=self.clock,
                    unreachable_seconds=cfg.limits.unreachable_seconds,
                    share=1.0 / self.options.shard.count if self.options.shard else 1.0,
                    stopping=self.stopping,
                    applied=quotas.for_region(cfg.aws.region),
                )
                await self._open_regions(stack, backend, quotas, s3)
                ctx = OperationContext(self.caller, ledger, s3, self.out)
                if agreement is not None:
                    wanted = any(op.setup_calls() for op in operations)
                    await take_references(agreement, ledger, wanted=wanted)
                for op in operations:
                    await op.prepare(ctx)
                if agreement is not None:
                    await give_references(agreement, ledger)

                def new_writer() -> Writer:
                    return Writer(
                        self.out,
                        ledger,
                        self.run_id,
                        cfg.source.uris,
                        durable=self.options.checkpoint,
                        csv_formulas=cfg.output.csv_formulas,
                    )

                writer = new_writer()
                await writer.open()
                if self.options.retry_failed:
                    await writer.close()
                    dropped = await ledger.write(
                        retry_failed.rewrite, self.out, self.options.retry_codes
                    )
                    log.info("retrying_failed", records=dropped)
                    writer = new_writer()
                    await writer.open()
                self.writer = writer
                try:
                    for op in operations:
                        await op.reconcile(ctx)  # every row written is committed by now
                except BaseException:
                    await writer.close()
                    raise
                # Paid calls that no record holds (reference checks, collections): the
                # job's cost counts them as this run's does.
                self.unrecorded = Counter(self.caller.stats.ok)
                return await self._execute(ledger, sources, operations, ctx, s3)
        finally:
            await ledger.close()

    async def _agree(
        self, sources: list[Source], s3: S3 | None, ledger: Ledger
    ) -> Agreement | None:
        """A shard's part of the job's listing, agreed with the other shards."""
        shard = self.options.shard
        if shard is None:
            return None
        job = self.options.job_config or self.cfg
        agreement = await agree(job, shard, sources, s3, ledger)
        self.split = agreement.split
        await asyncio.to_thread(write_job_file, self.out, job, shard, agreement.split)
        return agreement

    async def _open_s3(self, stack: contextlib.AsyncExitStack) -> S3 | None:
        cfg = self.cfg
        locations = [*cfg.source.uris, *_reference_locations(cfg)]
        if cfg.output.upload_uri:
            locations.append(cfg.output.upload_uri)
        if not any(parse_s3_uri(uri) or uses_s3(uri) for uri in locations):
            return None
        s3 = S3(
            self._session(),
            endpoint_url=cfg.aws.s3_endpoint_url,
            # Listing, sniffing and downloads share it.
            pool=cfg.limits.concurrency + cfg.source.list_concurrency + 4,
            unreachable_seconds=cfg.limits.unreachable_seconds,
            clock=self.clock,
        )
        return await stack.enter_async_context(s3)

    def _session(self) -> Any:
        if not hasattr(self, "_aws_session"):
            self._aws_session = self._new_session()
        return self._aws_session

    def _new_session(self) -> Any:
        """A session resolving the credentials afresh (environment, files, instance role)."""
        import aioboto3
        import botocore.exceptions as bexc

        try:
            return aioboto3.Session(
                profile_name=self.cfg.aws.profile, region_name=self.cfg.aws.region
            )
        except bexc.ProfileNotFound as exc:
            raise SetupError(f"aws.profile: {exc}") from None

    async def _check_sources(self, sources: list[Source], s3: S3 | None) -> None:
        await check_sources(sources, s3)
        placement = await find_delivery(self.cfg, s3)
        self.delivery = placement.delivery
        self._bucket_regions.update(placement.bucket_regions)
        self._lanes = placement.lanes
        for bucket, region in placement.as_bytes.items():
            log.warning(
                "bucket_in_other_region",
                bucket=bucket,
                bucket_region=region,
                rekognition_region=self.cfg.aws.region,
                action="sending its images as bytes (image_mode auto)",
            )

    async def _open_queues(self, stack: contextlib.AsyncExitStack) -> list[SqsQueue]:
        cfg = self.cfg
        queues = [uri for uri in cfg.source.uris if is_queue_uri(uri)]
        if self.options.follow and not queues:
            raise ConfigError("--follow: needs a queue source (sqs://QUEUE) in source.uris")
        if queues and self.options.shard is not None:
            raise ConfigError(f"--shard: a queue source cannot be sharded: {queues[0]}")
        if not queues:
            return []
        return await open_queues(
            stack,
            self._session(),
            cfg.source.uris,
            endpoint_url=cfg.aws.sqs_endpoint_url,
            unreachable_seconds=cfg.limits.unreachable_seconds,
            clock=self.clock,
        )

    def _aws_backend(self, region: str | None) -> AwsBackend:
        """A Rekognition client for the run: in ``region``, or the session's (None)."""
        from rekbatch.backends.aws import AwsBackend

        cfg = self.cfg
        return AwsBackend(
            self._session(),
            endpoint_url=cfg.aws.rekognition_endpoint_url,
            pool=cfg.limits.concurrency + 16,
            call_path=cfg.aws.call_path,
            new_session=self._new_session,
            region=region,
        )

    async def _open_backend(self, stack: contextlib.AsyncExitStack) -> Backend:
        cfg = self.cfg
        if cfg.backend.kind == "aws":
            return await stack.enter_async_context(self._aws_backend(None))
        from rekbatch.backends.local.backend import LocalBackend  # optional extra

        executor = None
        if cfg.backend.executor == "ray":
            from rekbatch.backends.local.ray_actors import RayActorExecutor

            executor = RayActorExecutor(self.options.local_workers, address=cfg.backend.ray_address)
            stack.callback(executor.shutdown)
        local = LocalBackend(
            jobdir.state_dir(self.out) / "collections",
            executor=executor,
            workers=self.options.local_workers,
            memory=self.memory,
        )
        stack.push_async_callback(local.aclose)
        return local

    async def _account_quotas(self, operations: list[Operation]) -> QuotaReading:
        """The applied quotas of the calling Regions, where the ceilings need them."""
        cfg = self.cfg
        if cfg.backend.kind != "aws" or self._given_backend is not None:
            return QuotaReading()
        apis = [api for op in operations for api in (*op.calls_per_image(), *op.setup_calls())]
        return await account_quotas(
            self._session(),
            regions=[cfg.aws.region, *self._lanes],
            apis=apis,
            max_tps=cfg.limits.max_tps,
            endpoint_url=cfg.aws.rekognition_endpoint_url,
        )

    async def _open_regions(
        self,
        stack: contextlib.AsyncExitStack,
        home_backend: Backend,
        quotas: QuotaReading,
        s3: S3 | None,
    ) -> None:
        """Several calling Regions: a client in each (the home one is the run's), a limiter
        per (Region, API), and the dispatcher between them (``calls.regions``)."""
        cfg = self.cfg
        home = cfg.aws.region
        caller = self.caller
        assert caller is not None
        if cfg.backend.kind != "aws" or self._lanes == [home]:
            return
        backends: dict[str, Backend] = {}
        for region in self._lanes:
            if region == home:
                backends[region] = home_backend
            elif self._given_backends is not None:
                backends[region] = self._given_backends[region]
            else:
                client = self._aws_backend(region)
                backends[region] = await stack.enter_async_context(client)
        share = 1.0 / self.options.shard.count if self.options.shard else 1.0

        def limiter(region: str, api: str) -> AdaptiveLimiter:
            if region == home:
                return caller.limiter(api)
            applied = quotas.for_region(region)
            (rate,) = resolve_ceilings(cfg.limits.max_tps, region, [api], applied).values()
            return AdaptiveLimiter(rate * share, clock=self.clock, name=f"{api}@{region}")

        self.regions = caller.regions = Regions(
            backends,
            home=home,
            limiter=limiter,
            buckets=BucketRegions(
                None if s3 is None else s3.bucket_region, home, self._bucket_regions
            ),
            pin=cfg.aws.image_mode == "s3" or cfg.aws.rekognition_region == "bucket",
            clock=self.clock,
        )
        stack.push_async_callback(self.regions.aclose)
        log.info("regions", calling=self._lanes, home=home, stateful_calls_in=home)

    async def _open_prefilter(
        self, stack: contextlib.AsyncExitStack, backend: Backend, operations: list[Operation]
    ) -> Callable[[bytes], Awaitable[bool]] | None:
        """The local face detector for operations with ``prefilter = "faces"``: the offline
        backend's own pool when that is the backend, else a pool of its own."""
        filtered = [op.type for op in operations if op.prefilter]
        if not filtered:
            return None
        from rekbatch.backends.local.backend import local_backend_available

        missing = local_backend_available()
        if missing is not None:
            raise SetupError(f"operations.{filtered[0]}.prefilter: {missing}")
        from rekbatch.backends.local.backend import FaceFinder, LocalBackend

        if isinstance(backend, LocalBackend):
            return backend.has_face
        finder = FaceFinder(memory=self.memory)
        stack.push_async_callback(finder.aclose)
        log.info("prefilter_started", operations=filtered)
        return finder.has_face

    async def _execute(
        self,
        ledger: Ledger,
        sources: list[Source],
        operations: list[Operation],
        ctx: OperationContext,
        s3: S3 | None,
    ) -> RunOutcome:
        cfg = self.cfg
        writer = self.writer
        caller = self.caller
        assert writer is not None and caller is not None
        per_image: dict[str, int] = {}
        for op in operations:
            for api, n in op.calls_per_image().items():
                per_image[api] = per_image.get(api, 0) + n
        budget = Budget(
            max_images=cfg.limits.max_images,
            max_cost_usd=cfg.limits.max_cost_usd,
            region=cfg.aws.region,
            calls_per_image=per_image,
            images_before=await ledger.read(LedgerDB.images_sent),
        )
        dedup = Dedup()
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=cfg.limits.concurrency * 2)
        rules = ListingRules.of(cfg, self.delivery)
        max_bytes = list(rules.max_bytes)
        feeder = None
        if self.queues:
            feeder = self.feeder = QueueFeeder(
                cfg,
                self.queues,
                sources,
                operations,
                ledger,
                writer,
                dedup,
                self.stopping,
                max_bytes,
                follow=self.options.follow,
                clock=self.clock,
            )
        producer = self.producer = Producer(
            cfg,
            sources,
            operations,
            ledger,
            writer,
            dedup,
            self.stopping,
            rules,
            shard=self.options.shard,
            split=self.split,
            after_listing=feeder.run if feeder else None,
        )
        worker = Worker(
            sources,
            caller,
            writer,
            budget,
            dedup,
            self.worker_stats,
            preparer=ImagePreparer(
                sources,
                sniff=cfg.source.sniff,
                converter=self.converter,
                delivery=self.delivery,
                max_pixels=cfg.source.max_pixels,
            ),
            stopping=self.stopping,
            request_stop=self.request_stop,
            faces=self._faces,
            breaker=FailureBreaker(cfg.limits.max_failed_share, cfg.limits.failure_window),
        )
        await ledger.write(LedgerDB.start_run, self.run_id, os.getpid())
        self._started = self.clock.now()
        log.info(
            "run_started",
            run_id=self.run_id,
            job=cfg.job.name,
            output=str(self.out),
            operations=[op.type for op in operations],
            ceilings={api: lim.ceiling for api, lim in caller.limiters.items()},
            concurrency=cfg.limits.concurrency,
        )
        side: list[tuple[str, Coroutine[Any, Any, None]]] = [("heartbeat", self._heartbeat(ledger))]
        side += [(name, start(self)) for name, start in self.side_tasks]
        if feeder is not None:
            side.append(("queue", feeder.keep()))
        if self.options.follow:
            every = self.options.export_every_seconds
            side.append(("upload", self._upload_parts(ledger, s3, every, export=True)))
        elif cfg.output.upload_uri and s3 is not None:
            side.append(("upload", self._upload_parts(ledger, s3)))
        failure: TaskFailed | None = None
        try:
            await self._supervise(producer, worker, queue, writer, side)
        except* TaskFailed as group:
            first = group.exceptions[0]
            assert isinstance(first, TaskFailed)
            failure = first
            log.error("run_failed", task=first.task, error=str(first.cause))
        finally:
            try:
                await writer.close()
            except Exception as exc:  # the writer itself failed: its rows are in the journal
                if failure is None:
                    failure = TaskFailed("writer", exc)
            if feeder is not None:
                await feeder.close()  # the messages the last commit settled
        if failure is not None:
            return await self._failed(ledger, operations, failure)
        if self.stop_reason is None:
            before = Counter(caller.stats.ok)
            for op in operations:
                try:
                    await op.finish(ctx)
                except BackendError as exc:
                    ctx.failures[op.type] = f"{exc.code}: {exc.message}"
                    log.error("finish_failed", operation=op.type, error=str(exc))
                except Interrupted as exc:  # a signal during the last step: left for resume
                    ctx.failures[op.type] = str(exc)
                    break
            self.unrecorded.update(Counter(caller.stats.ok) - before)
        return await self._finish(ledger, operations, ctx, s3)

    async def _supervise(
        self,
        producer: Producer,
        worker: Worker,
        queue: asyncio.Queue[WorkItem | None],
        writer: Writer,
        side: list[tuple[str, Coroutine[Any, Any, None]]],
    ) -> None:
        workers = self.cfg.limits.concurrency
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_named("writer", writer.run()), name="writer")
            services = [tg.create_task(_named(name, coro), name=name) for name, coro in side]
            work = [tg.create_task(_named("producer", producer.run(queue, workers)))]
            work += [
                tg.create_task(_named(f"worker-{i}", worker.run(queue)), name=f"worker-{i}")
                for i in range(workers)
            ]
            self._work = work
            if self._grace_over:  # stopped, and the grace ran out before the work began
                for task in work:
                    task.cancel()

            async def close() -> None:
                await asyncio.wait(work)
                writer.stop()
                for task in services:
                    task.cancel()

            tg.create_task(close(), name="closer")

    async def _heartbeat(self, ledger: Ledger) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            await ledger.write(LedgerDB.heartbeat, self.run_id, self.live_stats())

    async def _upload_parts(
        self,
        ledger: Ledger,
        s3: S3 | None,
        every: float | None = None,
        *,
        export: bool = False,
    ) -> None:
        """Long runs: a snapshot of the results goes to S3 every ``every`` seconds (default
        ``UPLOAD_EVERY_SECONDS``); with ``export`` (a follow run, which has no end to wait
        for) the Parquet files are written first."""
        from rekbatch.sinks.upload import upload_results

        uri = self.cfg.output.upload_uri
        while True:
            await asyncio.sleep(UPLOAD_EVERY_SECONDS if every is None else every)
            if export:
                try:
                    await self._outputs()
                except SetupError as exc:  # the JSONL and CSV hold every row all the same
                    log.warning("export_failed", error=str(exc))
            if not uri or s3 is None:
                continue
            part = int(await ledger.read(LedgerDB.get_meta, "upload_parts") or 0) + 1
            await upload_results(s3.client, self.out, uri, part=part)
            await ledger.write(LedgerDB.set_meta, {"upload_parts": str(part)})
            log.info("uploaded_part", part=part, uri=uri)

    # -- the end ----------------------------------------------------------------------------

    async def _outputs(self) -> list[str]:
        """The analytics files beside the JSONL and CSV: Parquet when pyarrow is installed."""
        paths = [str(self.out / "results.jsonl"), str(self.out / "results.csv")]
        if not self.cfg.output.parquet_enabled():
            return paths
        from rekbatch.sinks.parquet import export_in_child

        written = await export_in_child(self.out)
        return paths + [str(p) for p in written]

    async def _summary(
        self,
        ledger: Ledger,
        operations: list[Operation],
        ctx: OperationContext,
        live: dict[str, Any],
    ) -> dict[str, Any]:
        summary = await ledger.read(build_summary, self.cfg, operations, live, ctx.failures)
        summary["run_id"] = self.run_id
        summary["stopped"] = self.stop_reason
        return summary

    async def _finish(
        self, ledger: Ledger, operations: list[Operation], ctx: OperationContext, s3: S3 | None
    ) -> RunOutcome:
        live = self.live_stats()  # the rate of the calls, before the output files are made
        await ledger.write(LedgerDB.add_unrecorded_calls, dict(self.unrecorded))
        outputs = await self._outputs()
        summary = await self._summary(ledger, operations, ctx, live)
        summary["outputs"] = [*outputs, str(self.out / "summary.json")]
        await asyncio.to_thread(write_summary, self.out, summary)
        if self.cfg.output.upload_uri and s3 is not None:
            from rekbatch.sinks.upload import upload_results

            uploaded = await upload_results(s3.client, self.out, self.cfg.output.upload_uri)
            log.info("uploaded", files=len(uploaded), uri=self.cfg.output.upload_uri)
        if self.stop_reason is None:
            failed = summary["counts"]["by_status"].get("failed") or ctx.failures
            code = EXIT_FAILED_RECORDS if failed else EXIT_OK
        elif self.stop_reason.startswith("budget"):
            code = EXIT_BUDGET
        else:
            code = EXIT_INTERRUPTED
        await ledger.write(LedgerDB.end_run, self.run_id, code, live)
        log.info(
            "run_finished",
            exit_code=code,
            stopped=self.stop_reason,
            by_status=summary["counts"]["by_status"],
            calls=summary["calls"]["total"],
            throttles=summary["calls"]["throttles"],
            retries=summary["calls"]["retries"],
        )
        notes = [f"{op}: {error}; resume to try it again" for op, error in ctx.failures.items()]
        return RunOutcome(code, summary, answer_lines(summary), self.stop_reason, notes=notes)

    async def _failed(
        self, ledger: Ledger, operations: list[Operation], failure: TaskFailed
    ) -> RunOutcome:
        """A task failed, or the run stopped itself for a stated reason (a ``RekbatchError``:
        its exit code and line): keep what is finished, say why, stay resumable."""
        cause = failure.cause
        if isinstance(cause, RekbatchError):
            code, line, resume = cause.exit_code, str(cause), getattr(cause, "resume_args", "")
        else:
            code, line, resume = EXIT_UNEXPECTED, str(failure), ""
        live = self.live_stats()
        summary: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            await ledger.write(LedgerDB.add_unrecorded_calls, dict(self.unrecorded))
        with contextlib.suppress(Exception):
            assert self.caller is not None
            ctx = OperationContext(self.caller, ledger, None)
            summary = await self._summary(ledger, operations, ctx, live)
            summary["failed"] = str(cause)
            await asyncio.to_thread(write_summary, self.out, summary)
        with contextlib.suppress(Exception):
            await ledger.write(LedgerDB.end_run, self.run_id, code, live)
        return RunOutcome(code, summary, [], self.stop_reason, failure=line, resume_args=resume)


def _reference_locations(cfg: Config) -> list[str]:
    from rekbatch.config import CompareFacesOp, SearchFacesOp

    found: list[str] = []
    for op in cfg.operations:
        if isinstance(op, CompareFacesOp):
            found.append(op.reference)
        elif isinstance(op, SearchFacesOp):
            found.extend(ref for refs in op.people.values() for ref in refs)
    return found


async def run_job(
    cfg: Config,
    options: RunOptions,
    *,
    on_job: Callable[[Job], Awaitable[None] | None] | None = None,
    backend: Backend | None = None,
) -> RunOutcome:
    job = Job(cfg, options, backend=backend)
    if on_job is not None:
        maybe = on_job(job)
        if maybe is not None:
            await maybe
    return await job.run()


__all__ = ["Job", "RunOptions", "RunOutcome", "run_job"]
