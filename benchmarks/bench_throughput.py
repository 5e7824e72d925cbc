"""Pipeline overhead: calls per second against the fake with no latency and no quota,
rekbatch (through its CLI) next to a bare aiobotocore loop at the same concurrency.

    python -m benchmarks.bench_throughput [--images 3000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aioboto3
from aiobotocore.config import AioConfig

from benchmarks.servers import (
    CREDENTIALS,
    REGION,
    fake_admin,
    fake_rekognition,
    fill_bucket,
    moto_s3,
    run_cli,
    run_module,
    write_job,
)

RESULTS = Path(__file__).parent / "results"


async def bare_loop(s3_url: str, rek_url: str, bucket: str, concurrency: int) -> dict[str, Any]:
    """What a user would write by hand: list, then DetectFaces per key under a semaphore."""
    session = aioboto3.Session(region_name=REGION)
    cfg = AioConfig(max_pool_connections=concurrency + 8, retries={"total_max_attempts": 1})
    sem = asyncio.Semaphore(concurrency)
    calls = 0
    started = time.monotonic()
    async with (
        session.client("s3", endpoint_url=s3_url, config=cfg) as s3,
        session.client("rekognition", endpoint_url=rek_url, config=cfg) as rek,
    ):

        async def one(key: str) -> None:
            nonlocal calls
            async with sem:
                await rek.detect_faces(Image={"S3Object": {"Bucket": bucket, "Name": key}})
                calls += 1

        tasks: set[asyncio.Task[None]] = set()
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                tasks.add(asyncio.create_task(one(item["Key"])))
        await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    return {
        "calls": calls,
        "seconds": round(elapsed, 2),
        "calls_per_second": round(calls / elapsed, 1),
    }


def rekbatch_run(
    s3_url: str,
    rek_url: str,
    bucket: str,
    concurrency: int,
    sniff: bool,
    work: Path,
    label: str,
    checkpoint: bool = True,
) -> dict[str, Any]:
    out = work / f"out-{label}"
    config = write_job(
        str(work / f"{label}.toml"),
        bucket=bucket,
        out=str(out),
        s3_url=s3_url,
        rek_url=rek_url,
        operations='[[operations]]\ntype = "detect_faces"\n',
        limits=f"concurrency = {concurrency}\nmax_tps = 100000",
        source_extra=f"sniff = {'true' if sniff else 'false'}",
    )
    if checkpoint:
        proc = run_cli("run", config, "--log-format", "json")
    else:  # the same command line path with RunOptions(checkpoint=False)
        proc = run_module("benchmarks.run_unchecked", config)
    if proc.returncode != 0:
        raise RuntimeError(f"rekbatch exited {proc.returncode}: {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "calls": summary["calls"]["total"],
        "seconds": summary["elapsed_seconds"],
        "calls_per_second": summary["calls_per_second"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    rows: list[dict[str, Any]] = []
    with (
        moto_s3() as s3_url,
        fake_rekognition(s3_url, "--s3-cache") as rek_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        bucket = "bench-throughput"
        fill_bucket(s3_url, bucket, args.images)
        work = Path(tmp)
        # Warm the fake's object cache so every contender sees the same server.
        asyncio.run(bare_loop(s3_url, rek_url, bucket, args.concurrency))
        for label, fn in (
            (
                "bare aiobotocore loop",
                lambda: asyncio.run(bare_loop(s3_url, rek_url, bucket, args.concurrency)),
            ),
            (
                "rekbatch, sniff off",
                lambda: rekbatch_run(
                    s3_url, rek_url, bucket, args.concurrency, False, work, "nosniff"
                ),
            ),
            (
                "rekbatch, sniff off, checkpointing off",
                lambda: rekbatch_run(
                    s3_url, rek_url, bucket, args.concurrency, False, work, "nockpt", False
                ),
            ),
            (
                "rekbatch, sniff on",
                lambda: rekbatch_run(
                    s3_url, rek_url, bucket, args.concurrency, True, work, "sniff"
                ),
            ),
        ):
            fake_admin(rek_url, "/_fake/reset", {})
            result = fn()
            result["contender"] = label
            rows.append(result)
            print(f"{label}: {result}", flush=True)
    payload = {
        "images": args.images,
        "concurrency": args.concurrency,
        "rows": rows,
        "cores": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("\n| contender | calls | seconds | calls/s |\n|---|---|---|---|")
    for row in rows:
        cells = (row["contender"], row["calls"], row["seconds"], row["calls_per_second"])
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
