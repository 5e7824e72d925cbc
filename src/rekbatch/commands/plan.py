"""``rekbatch plan``: list and filter as a run would, then estimate calls, cost and time.

No Rekognition call is made. Sources are listed as a run lists them (in parallel ranges);
objects the output directory already holds for the same job are counted as done, not
again. With ``source.sniff`` the first bytes of a uniform random sample of the candidates
(``--sample N``, 2,000 by default) are read, and the counts by type and reason extrapolated
with their 95% margin; ``--sample all`` reads every candidate for exact counts.
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

from rekbatch.calls.quotas import resolve_ceilings
from rekbatch.config import Config, parse_s3_uri, uses_s3
from rekbatch.operations import build_operations
from rekbatch.pricing import PRICES_AS_OF, PRICES_REGION, estimate_cost
from rekbatch.records import ObjectRef
from rekbatch.sources import S3, InventorySource, KeyListSource, LocalSource, Source, open_source
from rekbatch.sources.filters import (
    MAX_IMAGE_BYTES,
    MAX_S3_OBJECT_BYTES,
    SNIFF_BYTES,
    classify_head,
    classify_listing,
    sniff_kind,
)
from rekbatch.store import jobdir
from rekbatch.store.ledger import LedgerDB

DEFAULT_SAMPLE = 2000
Z95 = 1.96  # the normal quantile of a 95% interval


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
    """The ledger of the same job in the output directory, if there is one."""
    path = jobdir.ledger_path(out)
    if not path.exists():
        return None
    db = LedgerDB(path, readonly=True)
    if db.get_meta("fingerprint") != cfg.fingerprint():
        db.close()
        return None
    return db


async def plan_job(
    cfg: Config, *, sample: int | None = DEFAULT_SAMPLE, output_dir: Path | None = None
) -> dict[str, Any]:
    """The plan of ``cfg``: every object listed (in parallel, as a run lists), sniffing
    estimated from ``sample`` random candidates (None: all of them), what the output
    directory already holds left out."""
    listed = 0
    done_objects = 0
    skipped: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    eligible_bytes = 0
    candidate_bytes = 0
    listed_by_source: Counter[str] = Counter()
    pool = Sample(sample, random.Random(cfg.fingerprint()))
    op_types = [op.type for op in build_operations(cfg)]
    ledger = _done_lookup(Path(output_dir or cfg.job.output_dir), cfg)
    started = time.monotonic()

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
            before = done.get(obj.key)
            if before and all(before.get(op) == obj.etag for op in op_types):
                done_objects += 1
                continue
            reason = obj.skip or classify_listing(obj, include, exclude, max_bytes, sniff=sniffing)
            if reason is not None:
                skipped[reason] += 1
                continue
            candidate_bytes += obj.size
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
    sample_bytes = 0

    async def sniff(source: Source, obj: ObjectRef) -> None:
        nonlocal sample_bytes
        async with sem:
            head = await source.read_head(obj, SNIFF_BYTES)
        reason = classify_head(obj, head)
        if reason is not None:
            sample_reasons[reason] += 1
            return
        sample_kinds[sniff_kind(head) or "unsniffed"] += 1
        sample_bytes += obj.size

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
                source = open_source(uri, index, s3)
                parsed = parse_s3_uri(uri)
                if isinstance(source, LocalSource):
                    await asyncio.to_thread(source.check)
                elif isinstance(source, InventorySource | KeyListSource):
                    await source.check()
                elif s3 is not None and parsed is not None:
                    await s3.check_bucket(parsed[0])
                sources.append(source)
            for source in sources:
                by_ref = uses_s3(source.uri) and cfg.aws.image_mode == "s3"
                by_ref = by_ref and cfg.backend.kind == "aws"
                await list_source(source, MAX_S3_OBJECT_BYTES if by_ref else MAX_IMAGE_BYTES)
            listing_seconds = time.monotonic() - started
            candidates = pool.seen
            if cfg.source.sniff:
                await asyncio.gather(*(sniff(sources[i], obj) for i, obj in pool.items))
    finally:
        if ledger is not None:
            ledger.close()
    n = len(pool.items)
    exact = not cfg.source.sniff or n == candidates
    margins: dict[str, int] = {}
    if not cfg.source.sniff:
        kinds["unsniffed"] = candidates
        eligible_bytes = candidate_bytes
    elif n:
        scale = candidates / n
        for kind, hits in sample_kinds.items():
            kinds[kind] = round(hits * scale)
            margins[kind] = margin(hits, n, candidates)
        for reason, hits in sample_reasons.items():
            skipped[reason] += round(hits * scale)
            margins[reason] = margin(hits, n, candidates)
        eligible_bytes = round(sample_bytes * scale)
        margins["images_eligible"] = margin(sum(sample_kinds.values()), n, candidates)
        margins = {k: v for k, v in margins.items() if v}
    images = sum(kinds.values())
    calls = planned_calls(cfg, images)
    ceilings = resolve_ceilings(cfg.limits.max_tps, cfg.aws.region, list(calls))
    seconds = max((n / ceilings[api] for api, n in calls.items()), default=0.0)
    return {
        "job": cfg.job.name,
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
        "skipped_by_reason": dict(skipped),
        "calls_by_api": calls,
        "ceilings_tps": ceilings,
        "estimated_cost_usd": estimate_cost(calls, region=cfg.aws.region),
        "prices": {"as_of": PRICES_AS_OF, "region": PRICES_REGION},
        "estimated_seconds": round(seconds, 1),
        "note": "estimates: cost from published list prices, time at the configured rates",
    }


def planned_calls(cfg: Config, images: int) -> dict[str, int]:
    """Rekognition calls a run of ``cfg`` makes over ``images`` eligible images, by API
    (before deduplication of identical objects, which can only lower them)."""
    calls: Counter[str] = Counter()
    for op in build_operations(cfg):
        calls.update(op.setup_calls())
        for api, n in op.calls_per_image().items():
            calls[api] += images * n
    return dict(calls)


def render_plan(plan: dict[str, Any]) -> str:
    lines = [
        f"plan for {plan['job']} (an estimate; no Rekognition call was made)",
        f"objects listed:   {plan['objects_listed']} "
        f"({plan['listed_per_second']}/s over {plan['listing_seconds']:.1f} s)",
        f"already done:     {plan['objects_done']} done, {plan['objects_left']} left",
        f"images eligible:  {plan['images_eligible']}{_pm(plan, 'images_eligible')} "
        + " ".join(f"{k}={v}{_pm(plan, k)}" for k, v in sorted(plan["eligible_by_type"].items())),
        f"bytes eligible:   {plan['eligible_bytes']}",
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
    lines.append(
        f"estimated cost:   ${plan['estimated_cost_usd']:.2f} (list prices for {prices['region']} "
        f"as of {prices['as_of']})"
    )
    lines.append(f"estimated time:   {plan['estimated_seconds']:.0f} s")
    return "\n".join(lines)


def _pm(plan: dict[str, Any], name: str) -> str:
    value = plan["sample"]["margins"].get(name)
    return f" ±{value}" if value else ""
