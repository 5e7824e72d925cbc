"""The baseline of bench_engine: what a user would write by hand, run as its own process.

One aioboto3 session, an S3 and a Rekognition client, the bucket listed with the paginator,
one DetectLabels per key (same parameters as rekbatch's defaults) under a semaphore; nothing
is written. Prints one JSON line: calls made, failed calls and seconds from the first listing
to the last answer.

    python -m benchmarks.bare_loop --s3-url URL --rekognition-url URL --bucket NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import aioboto3
from aiobotocore.config import AioConfig

MAX_LABELS = 10
MIN_CONFIDENCE = 55.0


async def bare_loop(
    s3_url: str, rek_url: str, bucket: str, concurrency: int, region: str
) -> dict[str, Any]:
    session = aioboto3.Session(region_name=region)
    cfg = AioConfig(max_pool_connections=concurrency + 8, retries={"total_max_attempts": 1})
    sem = asyncio.Semaphore(concurrency)
    calls = failed = 0
    started = time.monotonic()
    async with (
        session.client("s3", endpoint_url=s3_url, config=cfg) as s3,
        session.client("rekognition", endpoint_url=rek_url, config=cfg) as rek,
    ):

        async def one(key: str) -> None:
            nonlocal calls, failed
            async with sem:
                calls += 1
                try:
                    await rek.detect_labels(
                        Image={"S3Object": {"Bucket": bucket, "Name": key}},
                        MaxLabels=MAX_LABELS,
                        MinConfidence=MIN_CONFIDENCE,
                    )
                except Exception:  # counted, as a user's loop would log and go on
                    failed += 1

        tasks: set[asyncio.Task[None]] = set()
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                tasks.add(asyncio.create_task(one(item["Key"])))
        await asyncio.gather(*tasks)
    return {"calls": calls, "failed": failed, "seconds": round(time.monotonic() - started, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_loop")
    parser.add_argument("--s3-url", required=True)
    parser.add_argument("--rekognition-url", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--region", default="eu-west-1")
    args = parser.parse_args(argv)
    result = asyncio.run(
        bare_loop(args.s3_url, args.rekognition_url, args.bucket, args.concurrency, args.region)
    )
    print(json.dumps(result), flush=True)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
