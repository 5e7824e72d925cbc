"""``rekbatch plan``: list and filter as a run would, then estimate calls, cost and time.

No Rekognition call is made; with ``source.sniff`` the first bytes of each candidate are read
from S3 (ranged GETs), exactly as the run would before paying for a call.

What the output directory already holds (the same job, with the same ETags) is not counted
again. The offline backend costs nothing; its time comes from a few of the eligible images
analysed on this machine (``TIMED_IMAGES``), since its speed depends on the machine alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rekbatch.calls.quotas import resolve_ceilings
from rekbatch.commands import prefilter_estimate
from rekbatch.config import Config, parse_s3_uri
from rekbatch.engine.prepare import read_header
from rekbatch.errors import SetupError
from rekbatch.operations import build_operations
from rekbatch.pricing import PRICE_TABLES, PRICES_AS_OF, PRICES_REGION, estimate_cost
from rekbatch.records import ObjectRef
from rekbatch.sources import S3, LocalSource, Source, open_source
from rekbatch.sources.filters import (
    AS_IS,
    MAX_CONVERT_BYTES,
    MAX_IMAGE_BYTES,
    MAX_S3_OBJECT_BYTES,
    Convert,
    classify_listing,
    decide,
)
from rekbatch.sources.s3 import buckets_elsewhere, region_error

# Images the offline backend analyses per worker to time this machine (pool start-up and
# the first call of each worker, which analyses a reference, timed apart).
TIMED_PER_WORKER = 2


class _Done:
    """What the output directory already holds of this job: (source, key) -> operation ->
    ETag, read from its ledger; empty for a new directory or another job."""

    def __init__(self, cfg: Config) -> None:
        from rekbatch.store.jobdir import ledger_path
        from rekbatch.store.ledger import LedgerDB

        self.started = False
        self._db: LedgerDB | None = None
        path = ledger_path(Path(cfg.job.output_dir))
        if not path.exists():
            return
        db = LedgerDB(path, readonly=True)
        if db.get_meta("fingerprint") != cfg.fingerprint() or not db.has_records():
            db.close()
            return
        self._db, self.started = db, True

    def todo(self, obj: ObjectRef, ops: list[str]) -> list[str]:
        if self._db is None:
            return ops
        before = self._db.lookup(obj.source_index, [obj.key]).get(obj.key, {})
        return [op for op in ops if before.get(op) != obj.etag]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


async def plan_job(cfg: Config, *, time_offline: bool = True) -> dict[str, Any]:
    listed = 0
    skipped: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    eligible_bytes = 0
    # Converted images are downloaded (and decoded) here before they are sent as bytes.
    converted: Counter[str] = Counter()
    converted_bytes = 0
    sem = asyncio.Semaphore(cfg.limits.concurrency)
    op_types: list[str] = [op.type for op in cfg.operations]
    convert = cfg.source.convert and cfg.source.sniff
    notes: list[str] = []
    ledger_done = _Done(cfg)
    already = 0
    images_by_op: Counter[str] = Counter()
    samples: list[tuple[Source, ObjectRef]] = []
    filtered = [op for op in build_operations(cfg) if op.prefilter]
    face_sample = prefilter_estimate.Reservoir()

    async def examine(source: Source, obj: ObjectRef, by_ref: bool, todo: list[str]) -> None:
        nonlocal eligible_bytes, converted_bytes
        kind: str = "unsniffed"
        if cfg.source.sniff:
            async with sem:
                _, info = await read_header(source, obj)
            max_bytes = MAX_S3_OBJECT_BYTES if by_ref else MAX_IMAGE_BYTES
            decisions = [
                decide(
                    obj,
                    info,
                    op,
                    max_bytes=max_bytes,
                    convert=convert,
                    max_pixels=cfg.source.max_pixels,
                )
                for op in op_types
            ]
            if not any(d == AS_IS or isinstance(d, Convert) for d in decisions):
                skipped[str(decisions[0])] += 1
                return
            assert info is not None
            kind = info.format
            if any(isinstance(d, Convert) for d in decisions):
                converted[kind] += 1
                converted_bytes += obj.size
        kinds[kind] += 1
        eligible_bytes += obj.size
        images_by_op.update(todo)
        if filtered:
            face_sample.offer(source, obj)
        if len(samples) < TIMED_PER_WORKER * _local_workers(cfg):
            samples.append((source, obj))

    async with contextlib.AsyncExitStack() as stack:
        stack.callback(ledger_done.close)
        s3: S3 | None = None
        if any(parse_s3_uri(uri) for uri in cfg.source.uris):
            import aioboto3

            session = aioboto3.Session(profile_name=cfg.aws.profile, region_name=cfg.aws.region)
            s3 = await stack.enter_async_context(
                S3(session, endpoint_url=cfg.aws.s3_endpoint_url, pool=cfg.limits.concurrency + 16)
            )
        for index, uri in enumerate(cfg.source.uris):
            source = open_source(uri, index, s3)
            parsed = parse_s3_uri(uri)
            if isinstance(source, LocalSource):
                await asyncio.to_thread(source.check)
            elif s3 is not None and parsed is not None:
                await s3.check_bucket(parsed[0])
            by_ref = (
                parsed is not None and cfg.aws.image_mode != "bytes" and cfg.backend.kind == "aws"
            )
            if by_ref and s3 is not None and parsed is not None:
                elsewhere = await buckets_elsewhere(s3, [parsed[0]], cfg.aws.region)
                for bucket, region in elsewhere.items():
                    if cfg.aws.image_mode == "s3":
                        raise SetupError(region_error(bucket, region, cfg.aws.region))
                    by_ref = False
                    notes.append(
                        f"s3://{bucket} is in {region}, Rekognition in {cfg.aws.region}: "
                        "its images are sent as bytes (image_mode auto)"
                    )
            if convert:
                max_bytes = MAX_CONVERT_BYTES
            else:
                max_bytes = MAX_S3_OBJECT_BYTES if by_ref else MAX_IMAGE_BYTES
            pending: set[asyncio.Task[None]] = set()
            async for obj in source.list(None):
                listed += 1
                todo = ledger_done.todo(obj, op_types)
                if not todo:
                    already += 1
                    continue
                reason = classify_listing(
                    obj, cfg.source.include, cfg.source.exclude, max_bytes, sniff=cfg.source.sniff
                )
                if reason is not None:
                    skipped[reason] += 1
                    continue
                pending.add(asyncio.create_task(examine(source, obj, by_ref, todo)))
                if len(pending) >= cfg.limits.concurrency * 4:
                    done, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                    for task in done:
                        task.result()
            for finished in asyncio.as_completed(pending):
                await finished
        timing = None
        if cfg.backend.kind == "local" and samples and time_offline:
            timing = await time_local_backend(cfg, samples, s3)
        prefilter = await prefilter_estimate.estimate(face_sample.items) if filtered else None
    images = sum(kinds.values())
    calls = planned_calls(cfg, images_by_op, setup=not ledger_done.started)
    saved: dict[str, int] = {}
    if prefilter is not None:
        for op in filtered:
            for api, n in op.calls_per_image().items():
                share = round(images_by_op.get(op.type, 0) * n * prefilter.share)
                saved[api] = saved.get(api, 0) + share
        calls = {api: n - saved.get(api, 0) for api, n in calls.items()}
    ceilings = resolve_ceilings(cfg.limits.max_tps, cfg.aws.region, list(calls))
    priced_region = cfg.aws.region if cfg.aws.region in PRICE_TABLES else PRICES_REGION
    if cfg.backend.kind == "local":
        cost = 0.0
        units = sum(images_by_op.values())  # (image, operation) pairs to do
        seconds = 0.0
        if timing is not None and units:
            seconds = timing["startup_seconds"] + units / timing["units_per_second"]
        basis = (
            f"time from {timing['images']} image(s) analysed on this machine"
            if timing
            else "no image to time"
        )
        note = f"offline backend: nothing is billed; {basis}"
    else:
        cost = estimate_cost(calls, region=cfg.aws.region)
        seconds = max((n / ceilings[api] for api, n in calls.items()), default=0.0)
        timing = None
        note = "estimates: cost from published list prices, time at the configured rates"
    return {
        "job": cfg.job.name,
        "backend": cfg.backend.kind,
        "objects_listed": listed,
        "objects_already_done": already,
        "images_eligible": images,
        "eligible_by_type": dict(kinds),
        "eligible_bytes": eligible_bytes,
        "images_converted": sum(converted.values()),
        "converted_by_type": dict(converted),
        "converted_bytes": converted_bytes,
        "skipped_by_reason": dict(skipped),
        "calls_by_api": calls,
        "ceilings_tps": ceilings,
        "estimated_cost_usd": cost,
        "prices": {
            "as_of": PRICES_AS_OF,
            "region": priced_region,
            "configured_region": cfg.aws.region,
        },
        "offline_timing": timing,
        "estimated_seconds": round(seconds, 1),
        "prefilter": None
        if prefilter is None
        else {
            **prefilter.as_dict(),
            "operations": [op.type for op in filtered],
            "calls_saved": saved,
            "cost_saved_usd": estimate_cost(saved, region=cfg.aws.region),
        },
        "note": note,
        "notes": notes,
    }


def planned_calls(cfg: Config, images: int | Counter[str], *, setup: bool = True) -> dict[str, int]:
    """Rekognition calls a run of ``cfg`` makes over the eligible images (a number, or a
    count per operation type of the images it has still to do), by API, before
    deduplication of identical objects, which can only lower them. ``setup``: the calls made
    once per job (a reference's face check), which a started job has made already."""
    calls: Counter[str] = Counter()
    for op in build_operations(cfg):
        if setup:
            calls.update(op.setup_calls())
        count = images if isinstance(images, int) else images.get(op.type, 0)
        for api, n in op.calls_per_image().items():
            calls[api] += count * n
    return {api: n for api, n in calls.items() if n or setup}


def _local_workers(cfg: Config) -> int:
    from rekbatch.backends.local.backend import default_workers

    return max(1, min(default_workers(), cfg.limits.concurrency))


async def time_local_backend(
    cfg: Config, samples: list[tuple[Source, ObjectRef]], s3: S3 | None
) -> dict[str, Any] | None:
    """Run the job's operations on ``samples`` with the offline backend, on as many workers
    as a run would use and as concurrently: the seconds to start the pool, to make each
    worker's first calls (which analyse the references), and the rate of the rest in
    (image, operation) pairs a second. None when no image could be timed."""
    from rekbatch.backends.base import ImageInput
    from rekbatch.backends.local.backend import LocalBackend
    from rekbatch.config import CompareFacesOp, SearchFacesOp
    from rekbatch.errors import BackendError
    from rekbatch.sources import read_location

    # The offline backend's work per image and operation: a detection, or a detection and
    # an embedding to compare (search_faces compares with its first reference, close to
    # what indexing or searching a collection costs per image).
    steps: list[tuple[str, bytes | None]] = []
    for op in cfg.operations:
        if isinstance(op, CompareFacesOp):
            steps.append(("CompareFaces", await read_location(op.reference, s3)))
        elif isinstance(op, SearchFacesOp):
            one = next(iter(op.people.values()))[0]
            steps.append(("CompareFaces", await read_location(one, s3)))
        else:
            steps.append(("DetectFaces", None))
    workers = _local_workers(cfg)
    images = [await source.read(obj) for source, obj in samples]

    async def analyse(data: bytes) -> int:
        done = 0
        for api, reference in steps:
            fields = (
                {"Image": ImageInput(data=data)}
                if reference is None
                else {
                    "SourceImage": ImageInput(data=reference),
                    "TargetImage": ImageInput(data=data),
                }
            )
            params = {} if reference is None else {"SimilarityThreshold": 80.0}
            try:
                await backend.call(api, params, fields)
                done += 1
            except BackendError:
                pass  # an image it refuses says nothing about the speed
        return done

    backend = LocalBackend(workers=workers)
    try:
        started = time.perf_counter()
        await backend.start()
        ready = time.perf_counter()
        first, rest = images[:workers], images[workers:]
        await asyncio.gather(*(analyse(data) for data in first))
        warmed = time.perf_counter()
        units = sum(await asyncio.gather(*(analyse(data) for data in rest)))
        ended = time.perf_counter()
    finally:
        await backend.aclose()
    if units == 0 or ended <= warmed:
        return None
    return {
        "images": len(images),
        "workers": workers,
        "startup_seconds": round(warmed - started, 2),
        "pool_start_seconds": round(ready - started, 2),
        "units_per_second": round(units / (ended - warmed), 3),
    }


def render_plan(plan: dict[str, Any]) -> str:
    lines = [
        f"plan for {plan['job']} (an estimate; no Rekognition call was made)",
        f"objects listed:   {plan['objects_listed']}",
    ]
    if plan.get("objects_already_done"):
        lines.append(
            f"already done:     {plan['objects_already_done']} (in the output directory; "
            "not counted again)"
        )
    lines += [
        f"images eligible:  {plan['images_eligible']} "
        + " ".join(f"{k}={v}" for k, v in sorted(plan["eligible_by_type"].items())),
        f"bytes eligible:   {plan['eligible_bytes']}",
        f"converted:        {plan['images_converted']} "
        + " ".join(f"{k}={v}" for k, v in sorted(plan["converted_by_type"].items()))
        + f" ({plan['converted_bytes']} bytes downloaded to convert)",
        "skipped:          "
        + (", ".join(f"{k}={v}" for k, v in sorted(plan["skipped_by_reason"].items())) or "none"),
    ]
    for api, n in plan["calls_by_api"].items():
        lines.append(f"calls {api}: {n} at up to {plan['ceilings_tps'][api]:g}/s")
    prices = plan["prices"]
    if plan.get("backend") == "local":
        lines.append("estimated cost:   $0 (offline backend: nothing is billed)")
        timing = plan.get("offline_timing")
        if timing:
            basis = (
                f"measured on {timing['images']} image(s) with {timing['workers']} worker(s): "
                f"{timing['startup_seconds']:.1f} s to start, then "
                f"{timing['units_per_second']:.2f} images a second per operation"
            )
        else:
            basis = "nothing to analyse"
        lines.append(f"estimated time:   {_duration(plan['estimated_seconds'])} ({basis})")
        return "\n".join(lines)
    configured = prices.get("configured_region", prices["region"])
    if configured != prices["region"]:
        lines.append(f"no price table for {configured}; showing {prices['region']}")
    lines.append(
        f"estimated cost:   ${plan['estimated_cost_usd']:.2f} (list prices for {prices['region']} "
        f"as of {prices['as_of']})"
    )
    lines.append(
        f"estimated time:   {_duration(plan['estimated_seconds'])} (at the configured rates)"
    )
    prefilter = plan.get("prefilter")
    if prefilter:
        lines.append(
            f"prefilter faces:  {prefilter['no_face']} of {prefilter['sampled']} sampled images "
            f"have no face found locally ({100 * prefilter['share_no_face']:.0f}% "
            f"± {100 * prefilter['margin']:.0f}%); saves about "
            f"{sum(prefilter['calls_saved'].values())} calls "
            f"(${prefilter['cost_saved_usd']:.2f}), already taken off the figures above"
        )
    lines.extend(f"note: {note}" for note in plan.get("notes", []))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 1 or seconds == 0 else "under 1 s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
