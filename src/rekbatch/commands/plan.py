"""``rekbatch plan``: list and filter as a run would, then estimate calls, cost and time.

No Rekognition call is made; with ``source.sniff`` the first bytes of each candidate are read
from S3 (ranged GETs), exactly as the run would before paying for a call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

from rekbatch.calls.quotas import resolve_ceilings
from rekbatch.commands import prefilter_estimate
from rekbatch.config import Config, parse_s3_uri
from rekbatch.operations import build_operations
from rekbatch.pricing import PRICES_AS_OF, PRICES_REGION, estimate_cost
from rekbatch.records import ObjectRef
from rekbatch.sources import S3, LocalSource, Source, open_source
from rekbatch.sources.filters import (
    MAX_IMAGE_BYTES,
    MAX_S3_OBJECT_BYTES,
    SNIFF_BYTES,
    classify_head,
    classify_listing,
    sniff_kind,
)


async def plan_job(cfg: Config) -> dict[str, Any]:
    listed = 0
    skipped: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    eligible_bytes = 0
    sem = asyncio.Semaphore(cfg.limits.concurrency)
    filtered = [op for op in build_operations(cfg) if op.prefilter]
    sample = prefilter_estimate.Reservoir()

    async def sniff(source: Source, obj: ObjectRef) -> None:
        nonlocal eligible_bytes
        kind: str | None = "unsniffed"
        if cfg.source.sniff:
            async with sem:
                head = await source.read_head(obj, SNIFF_BYTES)
            reason = classify_head(obj, head)
            if reason is not None:
                skipped[reason] += 1
                return
            kind = sniff_kind(head)
        kinds[kind or "unsniffed"] += 1
        eligible_bytes += obj.size
        if filtered:
            sample.offer(source, obj)

    async with contextlib.AsyncExitStack() as stack:
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
            by_ref = parsed is not None and cfg.aws.image_mode == "s3" and cfg.backend.kind == "aws"
            max_bytes = MAX_S3_OBJECT_BYTES if by_ref else MAX_IMAGE_BYTES
            pending: set[asyncio.Task[None]] = set()
            async for obj in source.list(None):
                listed += 1
                reason = classify_listing(
                    obj, cfg.source.include, cfg.source.exclude, max_bytes, sniff=cfg.source.sniff
                )
                if reason is not None:
                    skipped[reason] += 1
                    continue
                pending.add(asyncio.create_task(sniff(source, obj)))
                if len(pending) >= cfg.limits.concurrency * 4:
                    done, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                    for task in done:
                        task.result()
            for finished in asyncio.as_completed(pending):
                await finished
        prefilter = await prefilter_estimate.estimate(sample.items) if filtered else None
    images = sum(kinds.values())
    calls = planned_calls(cfg, images)
    saved: dict[str, int] = {}
    if prefilter is not None:
        for op in filtered:
            for api, n in op.calls_per_image().items():
                saved[api] = saved.get(api, 0) + round(images * n * prefilter.share)
        calls = {api: n - saved.get(api, 0) for api, n in calls.items()}
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
        "prefilter": None
        if prefilter is None
        else {
            **prefilter.as_dict(),
            "operations": [op.type for op in filtered],
            "calls_saved": saved,
            "cost_saved_usd": estimate_cost(saved, region=cfg.aws.region),
        },
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
    prefilter = plan.get("prefilter")
    if prefilter:
        lines.append(
            f"prefilter faces:  {prefilter['no_face']} of {prefilter['sampled']} sampled images "
            f"have no face found locally ({100 * prefilter['share_no_face']:.0f}% "
            f"± {100 * prefilter['margin']:.0f}%); saves about "
            f"{sum(prefilter['calls_saved'].values())} calls "
            f"(${prefilter['cost_saved_usd']:.2f}), already taken off the figures above"
        )
    return "\n".join(lines)
