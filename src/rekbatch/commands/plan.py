"""``rekbatch plan``: list and filter as a run would, then estimate calls, cost and time.

No Rekognition call is made. Three steps, each with the run's own code where the run decides:

- **list** (``list_candidates``): the sources are split and listed as a run lists them
  (``engine/listing.py``); objects the output directory already holds for the same job (same
  ETags) are counted as done, and the listing entry alone rules out what the globs exclude
  and what is empty or too large for the way its image goes (``engine/delivery.py``);
- **sample** (``sniff_sample``): with ``source.sniff`` the header of a uniform random sample
  of the candidates (``--sample N``, 2,000 by default; ``all`` for every one) is read and
  decided per operation as the run decides it (``engine/prepare.decisions``: format,
  dimensions, what would be converted);
- **estimate** (``estimate``): the sample's counts scaled to all candidates with their 95%
  margin, calls per API from the images each operation would be sent, cost at list prices
  and time at the ceilings. The offline backend costs nothing; its time comes from a few of
  the eligible images analysed on this machine. With ``prefilter = "faces"`` the offline
  detector looks at a sample too, and the expected saving is taken off the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rekbatch.calls.service_quotas import QuotaReading
from rekbatch.commands import plan_regions, prefilter_estimate
from rekbatch.config import Config, parse_s3_uri, uses_s3
from rekbatch.engine.delivery import Delivery, find_delivery
from rekbatch.engine.listing import ListingRules, RangeTodo, list_ranges, still_to_do
from rekbatch.engine.prepare import decisions, read_header
from rekbatch.operations import Operation, build_operations
from rekbatch.pricing import PRICE_TABLES, PRICES_AS_OF, PRICES_REGION, estimate_cost
from rekbatch.records import ObjectRef
from rekbatch.sources import S3, Source, SqsSource, check_sources, open_source
from rekbatch.sources.filters import AS_IS, Convert
from rekbatch.store import jobdir
from rekbatch.store.ledger import LedgerDB

DEFAULT_SAMPLE = 2000
Z95 = 1.96  # the normal quantile of a 95% interval
# Images the offline backend analyses per worker to time this machine (pool start-up and
# the first call of each worker, which analyses a reference, timed apart).
TIMED_PER_WORKER = 2
CHUNK = 1000  # listed objects looked up in the ledger at once


@dataclass(frozen=True, slots=True)
class Candidate:
    """A listed object that still needs some operation and that its listing entry does not
    rule out."""

    source: int
    obj: ObjectRef
    todo: tuple[str, ...]  # the operation types it still needs


@dataclass
class Sample:
    """A uniform random sample of the candidates (reservoir sampling: memory is the sample,
    whatever the number of objects)."""

    size: int | None  # None: every candidate
    rng: random.Random
    seen: int = 0
    items: list[Candidate] = field(default_factory=list)

    def offer(self, candidate: Candidate) -> None:
        self.seen += 1
        if self.size is None or len(self.items) < self.size:
            self.items.append(candidate)
            return
        at = self.rng.randrange(self.seen)
        if at < self.size:
            self.items[at] = candidate


@dataclass
class Listing:
    """What listing found, from the listing entries alone."""

    pool: Sample
    listed: int = 0
    done: int = 0  # objects the output directory holds for every operation
    candidate_bytes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # objects, by reason
    skipped_by_op: dict[str, Counter[str]] = field(default_factory=dict)
    todo_by_op: Counter[str] = field(default_factory=Counter)  # candidates per operation
    seconds: float = 0.0


@dataclass
class Findings:
    """What the sniffed sample says (every count is of sampled candidates)."""

    sniffed: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # sent for some operation, by format
    reasons: Counter[str] = field(default_factory=Counter)  # sent for none: the first reason
    converted: Counter[str] = field(default_factory=Counter)
    sent_bytes: int = 0
    converted_bytes: int = 0
    sent_by_op: Counter[str] = field(default_factory=Counter)
    skipped_by_op: dict[str, Counter[str]] = field(default_factory=dict)
    eligible: list[Candidate] = field(default_factory=list)  # would be sent


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
    operations = build_operations(cfg)
    ledger = _done_lookup(Path(output_dir or cfg.job.output_dir), cfg)
    timing: dict[str, Any] | None = None
    prefilter: prefilter_estimate.PrefilterEstimate | None = None
    notes: list[str] = []
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
            sources = [
                open_source(uri, i, s3, follow_symlinks=cfg.source.follow_symlinks)
                for i, uri in enumerate(cfg.source.uris)
            ]
            await check_sources(sources, s3)
            notes += [
                f"{s.uri}: a queue; its events are read by run, not planned"
                for s in sources
                if isinstance(s, SqsSource)
            ]
            placement = await find_delivery(cfg, s3)
            delivery = placement.delivery
            references = any(
                uses_s3(uri) and delivery.by_reference(parsed[0] if parsed else "")
                for uri, parsed in ((u, parse_s3_uri(u)) for u in cfg.source.uris)
            )
            notes += [
                f"s3://{bucket} is in {region}, Rekognition in {cfg.aws.region}: "
                "its images are sent as bytes (image_mode auto)"
                for bucket, region in placement.as_bytes.items()
            ]
            listing = await list_candidates(
                cfg, sources, operations, ListingRules.of(cfg, delivery), ledger, sample
            )
            findings = await sniff_sample(cfg, sources, delivery, listing.pool)
            chosen = [(sources[c.source], c.obj) for c in findings.eligible]
            if cfg.backend.kind == "local" and chosen and time_offline:
                timing = await time_local_backend(
                    cfg, chosen[: TIMED_PER_WORKER * _local_workers(cfg)], s3
                )
            if any(op.prefilter for op in operations):
                # ``chosen`` is already a random sample of the candidates; the detector
                # looks at a smaller one of it.
                faces = chosen
                if len(faces) > prefilter_estimate.SAMPLE:
                    faces = random.Random(0).sample(faces, prefilter_estimate.SAMPLE)
                prefilter = await prefilter_estimate.estimate(faces)
    finally:
        if ledger is not None:
            ledger.close()
    apis = list(planned_calls(cfg, 1))
    return estimate(
        cfg,
        operations,
        listing,
        findings,
        setup=ledger is None,
        timing=timing,
        prefilter=prefilter,
        notes=notes,
        quotas=await plan_regions.plan_quotas(cfg, apis),
        references=references,
    )


async def list_candidates(
    cfg: Config,
    sources: list[Source],
    operations: list[Operation],
    rules: ListingRules,
    ledger: LedgerDB | None,
    sample: int | None,
) -> Listing:
    """Every source listed as a run lists it: counts by what the listing entries decide,
    and a random sample of the candidates."""
    listing = Listing(Sample(sample, random.Random(cfg.fingerprint())))
    started = time.monotonic()

    async def consider(source: Source, objects: list[ObjectRef]) -> None:
        listing.listed += len(objects)
        done: dict[str, dict[str, str]] = {}
        if ledger is not None:
            # On the loop: an indexed read of a thousand keys, and SQLite connections stay
            # on the thread that opened them.
            done = ledger.lookup(source.index, [o.key for o in objects])
        for obj in objects:
            todo = [op.type for op in still_to_do(operations, obj, done.get(obj.key))]
            if not todo:
                listing.done += 1
                continue
            reason = rules.skip_reason(obj)
            if reason is not None:
                listing.skipped[reason] += 1
                for op in todo:
                    listing.skipped_by_op.setdefault(op, Counter())[reason] += 1
                continue
            listing.candidate_bytes += obj.size
            listing.todo_by_op.update(todo)
            listing.pool.offer(Candidate(source.index, obj, tuple(todo)))

    async def list_source(source: Source) -> None:
        ranges = await source.split(cfg.source.list_concurrency)

        async def take(_: None, objects: list[ObjectRef]) -> None:
            await consider(source, objects)

        await list_ranges(
            source,
            [RangeTodo(i, rng) for i, rng in enumerate(ranges)],
            listers=cfg.source.list_concurrency,
            chunk=CHUNK,
            start=lambda _: None,
            take=take,
        )

    for source in sources:
        await list_source(source)
    listing.seconds = time.monotonic() - started
    return listing


async def sniff_sample(
    cfg: Config, sources: list[Source], delivery: Delivery, pool: Sample
) -> Findings:
    """The sampled candidates' headers read and decided per operation as the run decides;
    without sniffing, every candidate is sent for every operation it still needs."""
    findings = Findings()
    if not cfg.source.sniff:
        findings.eligible = list(pool.items)
        for candidate in pool.items:
            findings.sent_by_op.update(candidate.todo)
        return findings
    sem = asyncio.Semaphore(cfg.limits.concurrency)

    async def examine(candidate: Candidate) -> None:
        obj = candidate.obj
        async with sem:
            _, info = await read_header(sources[candidate.source], obj)
        decided = decisions(
            obj,
            info,
            candidate.todo,
            by_reference=delivery.by_reference(obj.bucket),
            convert=delivery.convert,
            max_pixels=cfg.source.max_pixels,
        )
        sending = [op for op, d in decided.items() if d == AS_IS or isinstance(d, Convert)]
        findings.sent_by_op.update(sending)
        for op, decision in decided.items():
            if op not in sending:
                findings.skipped_by_op.setdefault(op, Counter())[str(decision)] += 1
        if not sending:
            findings.reasons[str(decided[candidate.todo[0]])] += 1
            return
        assert info is not None
        findings.kinds[info.format] += 1
        findings.sent_bytes += obj.size
        if any(isinstance(d, Convert) for d in decided.values()):
            findings.converted[info.format] += 1
            findings.converted_bytes += obj.size
        findings.eligible.append(candidate)

    await asyncio.gather(*(examine(c) for c in pool.items))
    findings.sniffed = len(pool.items)
    return findings


def estimate(
    cfg: Config,
    operations: list[Operation],
    listing: Listing,
    findings: Findings,
    *,
    setup: bool,
    timing: dict[str, Any] | None,
    prefilter: prefilter_estimate.PrefilterEstimate | None,
    notes: list[str],
    quotas: QuotaReading,
    references: bool,
) -> dict[str, Any]:
    """The plan: the sample's findings scaled to every candidate (with their 95% margins),
    calls by API from the images each operation would be sent, cost and time (at the
    ceilings ``quotas`` give, per Region); ``references``: some source goes by S3
    reference."""
    candidates = listing.pool.seen
    n = len(listing.pool.items)
    exact = not cfg.source.sniff or n == candidates
    scale = candidates / n if n else 0.0
    kinds: Counter[str] = Counter()
    skipped = Counter(listing.skipped)
    skipped_by_op = {op: Counter(c) for op, c in listing.skipped_by_op.items()}
    margins: dict[str, int] = {}
    converted: Counter[str] = Counter()
    if not cfg.source.sniff:
        kinds["unsniffed"] = candidates
        eligible_bytes, converted_bytes = listing.candidate_bytes, 0
        images_by_op = Counter(listing.todo_by_op)
    else:
        for kind, hits in findings.kinds.items():
            kinds[kind] = round(hits * scale)
            margins[kind] = margin(hits, n, candidates)
        for reason, hits in findings.reasons.items():
            skipped[reason] += round(hits * scale)
            margins[reason] = margin(hits, n, candidates)
        for op_type, reasons in findings.skipped_by_op.items():
            for reason, hits in reasons.items():
                skipped_by_op.setdefault(op_type, Counter())[reason] += round(hits * scale)
        converted = Counter({k: round(hits * scale) for k, hits in findings.converted.items()})
        eligible_bytes = round(findings.sent_bytes * scale)
        converted_bytes = round(findings.converted_bytes * scale)
        margins["images_eligible"] = margin(sum(findings.kinds.values()), n, candidates)
        margins = {k: v for k, v in margins.items() if v}
        images_by_op = Counter({t: round(h * scale) for t, h in findings.sent_by_op.items()})
    calls = planned_calls(cfg, images_by_op, setup=setup)
    filtered = [op for op in operations if op.prefilter]
    saved: dict[str, int] = {}
    if prefilter is not None:
        for op in filtered:
            for api, per_image in op.calls_per_image().items():
                cut = round(images_by_op.get(op.type, 0) * per_image * prefilter.share)
                saved[api] = saved.get(api, 0) + cut
        calls = {api: count - saved.get(api, 0) for api, count in calls.items()}
    by_region = plan_regions.region_ceilings(cfg, list(calls), quotas)
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
    images = sum(kinds.values())
    regions = plan_regions.region_plan(
        cfg,
        calls,
        by_region,
        images=images,
        by_reference=images - sum(converted.values()) if references else 0,
        image_bytes=eligible_bytes,
    )
    listed, listing_seconds = listing.listed, listing.seconds
    return {
        "job": cfg.job.name,
        "backend": cfg.backend.kind,
        "objects_listed": listed,
        "objects_done": listing.done,
        "objects_left": listed - listing.done,
        "listing_seconds": round(listing_seconds, 2),
        "listed_per_second": round(listed / listing_seconds) if listing_seconds > 0 else 0,
        "sample": {
            "candidates": candidates,
            "sniffed": findings.sniffed,
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
        # Per operation (records, as the run writes them): images sent, and skips by reason.
        "images_by_operation": {t: k for t, k in images_by_op.items() if k},
        "skipped_by_operation": {
            t: {r: k for r, k in reasons.items() if k}
            for t, reasons in skipped_by_op.items()
            if any(reasons.values())
        },
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
    per_op = plan.get("images_by_operation", {})
    skips = plan.get("skipped_by_operation", {})
    if len(set(per_op) | set(skips)) > 1:
        for op in sorted(set(per_op) | set(skips)):
            why = ", ".join(f"{k}={v}" for k, v in sorted(skips.get(op, {}).items()))
            skipped = f"; skipped {why}" if why else ""
            lines.append(f"  {op}: {per_op.get(op, 0)} images{skipped}")
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
