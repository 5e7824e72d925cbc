"""``rekbatch plan``: list and filter as a run would, then estimate calls, cost and time.

No Rekognition call is made; with ``source.sniff`` the first bytes of each candidate are read
from S3 (ranged GETs), exactly as the run would before paying for a call.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from rekbatch.backends.aws import AwsClients
from rekbatch.calls.quotas import resolve_ceilings
from rekbatch.config import CompareFacesOp, Config, SearchFacesOp, parse_s3_uri
from rekbatch.operations.search import choose_strategy
from rekbatch.operations.specs import build_spec
from rekbatch.pricing import PRICES_AS_OF, PRICES_REGION, estimate_cost
from rekbatch.records import ObjectRef
from rekbatch.sources import open_listing
from rekbatch.sources.filters import (
    MAX_IMAGE_BYTES,
    MAX_S3_OBJECT_BYTES,
    SNIFF_BYTES,
    classify_head,
    classify_listing,
    sniff_kind,
)


async def _head(clients: AwsClients, obj: ObjectRef) -> bytes:
    if obj.bucket is None:
        path = Path(obj.root or ".") / obj.key
        return await asyncio.to_thread(lambda: path.open("rb").read(SNIFF_BYTES))
    return await clients.read_head(obj.bucket, obj.key, SNIFF_BYTES)


async def plan_job(cfg: Config) -> dict[str, Any]:
    listed = 0
    skipped: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    eligible_bytes = 0
    sem = asyncio.Semaphore(cfg.limits.concurrency)

    async def sniff(clients: AwsClients, obj: ObjectRef) -> None:
        nonlocal eligible_bytes
        kind: str | None = "unsniffed"
        if cfg.source.sniff:
            async with sem:
                head = await _head(clients, obj)
            reason = classify_head(obj, head)
            if reason is not None:
                skipped[reason] += 1
                return
            kind = sniff_kind(head)
        kinds[kind or "unsniffed"] += 1
        eligible_bytes += obj.size

    async with AwsClients(
        region=cfg.aws.region,
        profile=cfg.aws.profile,
        s3_endpoint_url=cfg.aws.s3_endpoint_url,
        rekognition_endpoint_url=None,
        concurrency=cfg.limits.concurrency,
        with_rekognition=False,
    ) as clients:
        for index, uri in enumerate(cfg.source.uris):
            parsed = parse_s3_uri(uri)
            if parsed is not None:
                await clients.check_bucket(parsed[0])
            by_ref = parsed is not None and cfg.aws.image_mode == "s3"
            max_bytes = MAX_S3_OBJECT_BYTES if by_ref else MAX_IMAGE_BYTES
            pending: set[asyncio.Task[None]] = set()
            async for obj in open_listing(uri, index, clients.s3):
                listed += 1
                reason = classify_listing(
                    obj, cfg.source.include, cfg.source.exclude, max_bytes, sniff=cfg.source.sniff
                )
                if reason is not None:
                    skipped[reason] += 1
                    continue
                pending.add(asyncio.create_task(sniff(clients, obj)))
                if len(pending) >= cfg.limits.concurrency * 4:
                    done, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                    for task in done:
                        task.result()
            for finished in asyncio.as_completed(pending):
                await finished
    images = sum(kinds.values())
    calls = planned_calls(cfg, images)
    ceilings = resolve_ceilings(cfg.limits.max_tps, cfg.aws.region, list(calls))
    seconds = max((n / ceilings[api] for api, n in calls.items()), default=0.0)
    return {
        "job": cfg.job.name,
        "objects_listed": listed,
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
    for op in cfg.operations:
        if isinstance(op, SearchFacesOp):
            references = sum(len(refs) for refs in op.people.values())
            calls["DetectFaces"] += references  # each reference is checked for a face
            if choose_strategy(op) == "collection":
                calls["IndexFaces"] += images
                calls["SearchFacesByImage"] += references
            else:
                calls["CompareFaces"] += images * references
            continue
        if isinstance(op, CompareFacesOp):
            calls["DetectFaces"] += 1
        calls[build_spec(op).api] += images
    return dict(calls)


def render_plan(plan: dict[str, Any]) -> str:
    lines = [
        f"plan for {plan['job']} (an estimate; no Rekognition call was made)",
        f"objects listed:   {plan['objects_listed']}",
        f"images eligible:  {plan['images_eligible']} "
        + " ".join(f"{k}={v}" for k, v in sorted(plan["eligible_by_type"].items())),
        f"bytes eligible:   {plan['eligible_bytes']}",
        "skipped:          "
        + (", ".join(f"{k}={v}" for k, v in sorted(plan["skipped_by_reason"].items())) or "none"),
    ]
    for api, n in plan["calls_by_api"].items():
        lines.append(f"calls {api}: {n} at up to {plan['ceilings_tps'][api]:g}/s")
    prices = plan["prices"]
    lines.append(
        f"estimated cost:   ${plan['estimated_cost_usd']:.2f} (list prices for {prices['region']} "
        f"as of {prices['as_of']})"
    )
    lines.append(f"estimated time:   {plan['estimated_seconds']:.0f} s")
    return "\n".join(lines)
