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
from rekbatch.config import Config, parse_s3_uri
from rekbatch.engine.prepare import read_header
from rekbatch.errors import SetupError
from rekbatch.operations import build_operations
from rekbatch.pricing import PRICES_AS_OF, PRICES_REGION, estimate_cost
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


async def plan_job(cfg: Config) -> dict[str, Any]:
    listed = 0
    skipped: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    eligible_bytes = 0
    # Converted images are downloaded (and decoded) here before they are sent as bytes.
    converted: Counter[str] = Counter()
    converted_bytes = 0
    sem = asyncio.Semaphore(cfg.limits.concurrency)
    op_types = [op.type for op in cfg.operations]
    convert = cfg.source.convert and cfg.source.sniff
    notes: list[str] = []

    async def examine(source: Source, obj: ObjectRef, by_ref: bool) -> None:
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
                reason = classify_listing(
                    obj, cfg.source.include, cfg.source.exclude, max_bytes, sniff=cfg.source.sniff
                )
                if reason is not None:
                    skipped[reason] += 1
                    continue
                pending.add(asyncio.create_task(examine(source, obj, by_ref)))
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
        "images_converted": sum(converted.values()),
        "converted_by_type": dict(converted),
        "converted_bytes": converted_bytes,
        "skipped_by_reason": dict(skipped),
        "calls_by_api": calls,
        "ceilings_tps": ceilings,
        "estimated_cost_usd": estimate_cost(calls, region=cfg.aws.region),
        "prices": {"as_of": PRICES_AS_OF, "region": PRICES_REGION},
        "estimated_seconds": round(seconds, 1),
        "note": "estimates: cost from published list prices, time at the configured rates",
        "notes": notes,
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
        f"converted:        {plan['images_converted']} "
        + " ".join(f"{k}={v}" for k, v in sorted(plan["converted_by_type"].items()))
        + f" ({plan['converted_bytes']} bytes downloaded to convert)",
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
    lines.extend(f"note: {note}" for note in plan.get("notes", []))
    return "\n".join(lines)
