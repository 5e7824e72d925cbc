"""``rekbatch plan``: list and filter as a run would, then estimate calls, cost and time.

No Rekognition call is made. Sources are listed as a run lists them (in parallel ranges);
objects the output directory already holds for the same job (same ETags) are counted as
done, not again. With ``source.sniff`` the header of a uniform random sample of the
candidates (``--sample N``, 2,000 by default) is read as the run would read it (format,
dimensions, what would be converted), and the counts by type and reason extrapolated with
their 95% margin; ``--sample all`` reads every candidate for exact counts. The offline
backend costs nothing; its time comes from a few of the eligible images analysed on this
machine. With ``prefilter = "faces"`` the offline detector looks at a sample too, and the
expected saving is taken off the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rekbatch.commands import plan_regions, prefilter_estimate
from rekbatch.config import Config, parse_s3_uri, uses_s3
from rekbatch.engine.prepare import read_header
from rekbatch.errors import SetupError
from rekbatch.operations import build_operations
from rekbatch.pricing import PRICE_TABLES, PRICES_AS_OF, PRICES_REGION, estimate_cost
from rekbatch.records import ObjectRef
from rekbatch.sources import (
    S3,
    InventorySource,
    KeyListSource,
    LocalSource,
    Source,
    SqsSource,
    open_source,
)
from rekbatch.sources.filters import (
    AS_IS,
    MAX_CONVERT_BYTES,
    MAX_IMAGE_BYTES,
    MAX_S3_OBJECT_BYTES,
    Convert,
    decide,
    listing_reason,
)
from rekbatch.sources.s3 import buckets_elsewhere, region_error
from rekbatch.store import jobdir
from rekbatch.store.ledger import LedgerDB

DEFAULT_SAMPLE = 2000
Z95 = 1.96  # the normal quantile of a 95% interval
# Images the offline backend analyses per worker to time this machine (pool start-up and
# the first call of each worker, which analyses a reference, timed apart).
TIMED_PER_WORKER = 2


@dataclass
class Sample:
    """A uniform random sample of the candidates (reservoir sampling: memory is the sample,
    whatever the number of objects)."""

    size: int | None  # None: every candidate
    rng: random.Random
    seen: int = 0
    items: list[tuple[int, ObjectRef]] = field(default_factory=list)

    def offer(self, source: int, obj: ObjectRef) -> None:
        self.seen += 1
        if self.size is None or len(self.items) < self.size:
            self.items.append((source, obj))
            return
        at = self.rng.randrange(self.seen)
        if at < self.size:
            self.items[at] = (source, obj)


def margin(hits: int, n: int, population: int) -> int:
    """Half the width of the 95% interval of a count estimated from ``hits`` of ``n``
    sampled out of ``population`` (with the finite population correction)."""
    if n == 0 or n >= population:
        return 0
    p = hits / n
    fpc = math.sqrt((population - n) / max(population - 1, 1))
    return math.ceil(Z95 * math.sqrt(p * (1 - p) / n) * fpc * population)


def _done_lookup(out: Path, cfg: Config) -> LedgerDB | None:
    """The ledger of the same job in the output directory, if it has records."""
    path = jobdir.ledger_path(out)
    if not path.exists():
        return None
    db = LedgerDB(path, readonly=True)
    if db.get_meta("fingerprint") != cfg.fingerprint() or not db.has_records():
        db.close()
        return None
    return db


async def plan_job(
    cfg: Config,
    *,
    sample: int | None = DEFAULT_SAMPLE,
    output_dir: Path | None = None,
    time_offline: bool = True,
) -> dict[str, Any]:
    """The plan of ``cfg``: every object listed (in parallel, as a run lists), sniffing
    estimated from ``sample`` random candidates (None: all of them), what the output
    directory already holds left out."""
    listed = done_objects = candidate_bytes = 0
    skipped: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    listed_by_source: Counter[str] = Counter()
    todo_by_op: Counter[str] = Counter()  # candidates with the operation still to do
    pool = Sample(sample, random.Random(cfg.fingerprint()))
    op_types = [op.type for op in build_operations(cfg)]
    filtered = [op for op in build_operations(cfg) if op.prefilter]
    convert = cfg.source.convert and cfg.source.sniff
    notes: list[str] = []
    ledger = _done_lookup(Path(output_dir or cfg.job.output_dir), cfg)
    started = time.monotonic()
    by_ref_of: dict[int, bool] = {}

    async def consider(source: Source, chunk: list[ObjectRef], max_bytes: int) -> None:
        nonlocal listed, done_objects, candidate_bytes
        listed += len(chunk)
        listed_by_source[source.uri] += len(chunk)
        done: dict[str, dict[str, str]] = {}
        if ledger is not None:
            # On the loop: an indexed read of a thousand keys, and SQLite connections stay
            # on the thread that opened them.
            done = ledger.lookup(source.index, [o.key for o in chunk])
        include, exclude, sniffing = cfg.source.include, cfg.source.exclude, cfg.source.sniff
        for obj in chunk:
            before = done.get(obj.key, {})
            todo = [op for op in op_types if before.get(op) != obj.etag]
            if not todo:
                done_objects += 1
                continue
            reason = listing_reason(obj, include, exclude, max_bytes, sniff=sniffing)
            if reason is not None:
                skipped[reason] += 1
                continue
            candidate_bytes += obj.size
            todo_by_op.update(todo)
            pool.offer(source.index, obj)

    async def list_source(source: Source, max_bytes: int) -> None:
        todo = deque(await source.split(cfg.source.list_concurrency))

        async def lister() -> None:
            while todo:
                rng = todo.popleft()
                chunk: list[ObjectRef] = []
                async for obj in source.list_range(rng, None):
                    chunk.append(obj)
                    if len(chunk) >= 1000:
                        await consider(source, chunk, max_bytes)
                        chunk = []
                await consider(source, chunk, max_bytes)

        async with asyncio.TaskGroup() as group:
            for _ in range(min(cfg.source.list_concurrency, len(todo))):
                group.create_task(lister())

    sem = asyncio.Semaphore(cfg.limits.concurrency)
    sample_kinds: Counter[str] = Counter()
    sample_reasons: Counter[str] = Counter()
    sample_converted: Counter[str] = Counter()
    sample_bytes = sample_converted_bytes = 0
    eligible: list[tuple[int, ObjectRef]] = []  # sampled images that would be sent

    async def examine(source: Source, obj: ObjectRef) -> None:
        nonlocal sample_bytes, sample_converted_bytes
        async with sem:
            _, info = await read_header(source, obj)
        max_bytes = MAX_S3_OBJECT_BYTES if by_ref_of[source.index] else MAX_IMAGE_BYTES
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
            sample_reasons[str(decisions[0])] += 1
            return
        assert info is not None
        sample_kinds[info.format] += 1
        sample_bytes += obj.size
        if any(isinstance(d, Convert) for d in decisions):
            sample_converted[info.format] += 1
            sample_converted_bytes += obj.size
        eligible.append((source.index, obj))

    timing: dict[str, Any] | None = None
    prefilter: prefilter_estimate.PrefilterEstimate | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            s3: S3 | None = None
            if any(uses_s3(uri) for uri in cfg.source.uris):
                import aioboto3

                session = aioboto3.Session(profile_name=cfg.aws.profile, region_name=cfg.aws.region)
                s3 = await stack.enter_async_context(
                    S3(
                        session,
                        endpoint_url=cfg.aws.s3_endpoint_url,
                        pool=cfg.limits.concurrency + cfg.source.list_concurrency + 4,
                    )
                )
            sources: list[Source] = []
            for index, uri in enumerate(cfg.source.uris):
                source = open_source(uri, index, s3, follow_symlinks=cfg.source.follow_symlinks)
                parsed = parse_s3_uri(uri)
                if isinstance(source, SqsSource):
                    notes.append(f"{uri}: a queue; its events are read by run, not planned")
                if isinstance(source, LocalSource):
                    await asyncio.to_thread(source.check)
                elif isinstance(source, InventorySource | KeyListSource):
                    await source.check()
                elif s3 is not None and parsed is not None:
                    await s3.check_bucket(parsed[0])
                by_ref = uses_s3(uri) and cfg.aws.image_mode != "bytes"
                by_ref = by_ref and cfg.backend.kind == "aws"
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
                by_ref_of[index] = by_ref
                sources.append(source)
            for source in sources:
                if convert:
                    max_bytes = MAX_CONVERT_BYTES
                else:
                    max_bytes = MAX_S3_OBJECT_BYTES if by_ref_of[source.index] else MAX_IMAGE_BYTES
                await list_source(source, max_bytes)
            listing_seconds = time.monotonic() - started
            candidates = pool.seen
            if cfg.source.sniff:
                await asyncio.gather(*(examine(sources[i], obj) for i, obj in pool.items))
            else:
                eligible = list(pool.items)
            chosen = [(sources[i], obj) for i, obj in eligible]
            if cfg.backend.kind == "local" and chosen and time_offline:
                timing = await time_local_backend(
                    cfg, chosen[: TIMED_PER_WORKER * _local_workers(cfg)], s3
                )
            if filtered:
                # ``chosen`` is already a random sample of the candidates; the detector
                # looks at a smaller one of it.
                faces = chosen
                if len(faces) > prefilter_estimate.SAMPLE:
                    faces = random.Random(0).sample(faces, prefilter_estimate.SAMPLE)
                prefilter = await prefilter_estimate.estimate(faces)
    finally:
        if ledger is not None:
            ledger.close()
    n = len(pool.items)
    exact = not cfg.source.sniff or n == candidates
    margins: dict[str, int] = {}
    eligible_bytes = converted_bytes = 0
    converted: Counter[str] = Counter()
    share = 1.0  # of the candidates, the images that would be sent
    if not cfg.source.sniff:
        kinds["unsniffed"] = candidates
        eligible_bytes = candidate_bytes
    elif n:
        scale = candidates / n
        share = sum(sample_kinds.values()) / n
        for kind, hits in sample_kinds.items():
            kinds[kind] = round(hits * scale)
            margins[kind] = margin(hits, n, candidates)
        for reason, hits in sample_reasons.items():
            skipped[reason] += round(hits * scale)
            margins[reason] = margin(hits, n, candidates)
        for kind, hits in sample_converted.items():
            converted[kind] = round(hits * scale)
        eligible_bytes = round(sample_bytes * scale)
        converted_bytes = round(sample_converted_bytes * scale)
        margins["images_eligible"] = margin(sum(sample_kinds.values()), n, candidates)
        margins = {k: v for k, v in margins.items() if v}
    else:
        share = 0.0
    images = sum(kinds.values())
    images_by_op = Counter({op: round(count * share) for op, count in todo_by_op.items()})
    calls = planned_calls(cfg, images_by_op, setup=ledger is None)
    saved: dict[str, int] = {}
    if prefilter is not None:
        for op in filtered:
            for api, per_image in op.calls_per_image().items():
                cut = round(images_by_op.get(op.type, 0) * per_image * prefilter.share)
                saved[api] = saved.get(api, 0) + cut
        calls = {api: count - saved.get(api, 0) for api, count in calls.items()}
    by_region = plan_regions.region_ceilings(
        cfg, list(calls), await plan_regions.plan_quotas(cfg, list(calls))
    )
    ceilings = by_region[cfg.aws.region]
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
        seconds = max((count / ceilings[api] for api, count in calls.items()), default=0.0)
        note = "estimates: cost from published list prices, time at the configured rates"
    converted_images = sum(converted.values())
    regions = plan_regions.region_plan(
        cfg,
        calls,
        by_region,
        images=images,
        by_reference=images - converted_images if any(by_ref_of.values()) else 0,
        image_bytes=eligible_bytes,
    )
    return {
        "job": cfg.job.name,
        "backend": cfg.backend.kind,
        "objects_listed": listed,
        "objects_done": done_objects,
        "objects_left": listed - done_objects,
        "listing_seconds": round(listing_seconds, 2),
        "listed_per_second": round(listed / listing_seconds) if listing_seconds > 0 else 0,
        "sample": {
            "candidates": candidates,
            "sniffed": n if cfg.source.sniff else 0,
            "exact": exact,
            "confidence": 0.95,
            "margins": margins,
        },
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
        "regions": regions,
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
        f"objects listed:   {plan['objects_listed']} "
        f"({plan['listed_per_second']}/s over {plan['listing_seconds']:.1f} s)",
        f"already done:     {plan['objects_done']} done, {plan['objects_left']} left "
        "(what the output directory holds is not counted again)",
        f"images eligible:  {plan['images_eligible']}{_pm(plan, 'images_eligible')} "
        + " ".join(f"{k}={v}{_pm(plan, k)}" for k, v in sorted(plan["eligible_by_type"].items())),
        f"bytes eligible:   {plan['eligible_bytes']}",
        f"converted:        {plan['images_converted']} "
        + " ".join(f"{k}={v}" for k, v in sorted(plan["converted_by_type"].items()))
        + f" ({plan['converted_bytes']} bytes downloaded to convert)",
        "skipped:          "
        + (
            ", ".join(
                f"{k}={v}{_pm(plan, k)}" for k, v in sorted(plan["skipped_by_reason"].items())
            )
            or "none"
        ),
    ]
    sampled = plan["sample"]
    if not sampled["exact"]:
        lines.append(
            f"sniffed:          a random {sampled['sniffed']} of {sampled['candidates']} "
            "candidates; counts extrapolated, ± the 95% margin (--sample all: exact)"
        )
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
    lines.extend(plan_regions.render_region_plan(plan.get("regions"), _duration))
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


def _pm(plan: dict[str, Any], name: str) -> str:
    value = plan["sample"]["margins"].get(name)
    return f" ±{value}" if value else ""
