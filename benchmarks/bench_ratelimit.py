"""Holding the quota: rekbatch's adaptive limiter against the baseline a user would write
(aiobotocore with botocore's adaptive retry mode and a semaphore pool of the same size).

Both run DetectFaces against the fake Rekognition server (its own process) with a quota and
lognormal latency (median 150 ms), for the same wall time per scenario. Rates are read from
the fake's per-second timeline of accepted and throttled calls, the same for both.

``--before DIR`` adds rekbatch from another checkout's ``src`` (the code before a change)
as a contender of its own, run right after this one in every scenario; ``--src DIR`` picks
the code measured as "rekbatch"; ``--no-baseline`` leaves the baseline out.

    python -m benchmarks.bench_ratelimit [--seconds 60] [--concurrency 64]
        [--before /tmp/before/src] [--no-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.src_choice import use_src

# --src must take effect before rekbatch is imported (and in the CLI processes it starts).
SRC = use_src(children=True)

import aioboto3  # noqa: E402
from aiobotocore.config import AioConfig  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from benchmarks.servers import (  # noqa: E402
    CREDENTIALS,
    REGION,
    bench_env,
    fake_admin,
    fake_rekognition,
    fill_bucket,
    moto_s3,
    write_job,
)

RESULTS = Path(__file__).parent / "results"
BUCKET = "bench-ratelimit"
WARMUP = 5  # seconds left out of the steady-state figure (process start, first round trips)


@dataclass
class Scenario:
    name: str
    quota: float
    ceiling: float
    schedule: list[tuple[float, float]] = field(default_factory=list)  # (second, new quota)

    def available(self, second: int) -> float:
        quota = self.quota
        for at, value in self.schedule:
            if second >= at:
                quota = value
        return quota


SCENARIOS = [
    Scenario("quota 50", 50, 50),
    Scenario("quota 100", 100, 100),
    Scenario("ceiling 2x the quota (50)", 50, 100),
    Scenario("quota 100 halves at 20 s, back at 40 s", 100, 100, [(20, 50), (40, 100)]),
]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def _schedule(url: str, scenario: Scenario, started: float) -> threading.Thread:
    def run() -> None:
        for at, quota in scenario.schedule:
            time.sleep(max(0.0, started + at - time.monotonic()))
            fake_admin(url, "/_fake/config", {"quotas": {"DetectFaces": quota}})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_rekbatch(
    s3_url: str,
    rek_url: str,
    scenario: Scenario,
    seconds: float,
    concurrency: int,
    work: Path,
    src: Path,
) -> list[float]:
    name = f"{src.parent.name}-{scenario.quota}-{scenario.ceiling}-{len(scenario.schedule)}"
    out = work / f"rekbatch-{name}"
    config = write_job(
        str(out) + ".toml",
        bucket=BUCKET,
        out=str(out),
        s3_url=s3_url,
        rek_url=rek_url,
        operations='[[operations]]\ntype = "detect_faces"\n',
        limits=f"concurrency = {concurrency}\nmax_tps = {scenario.ceiling}\nmax_attempts = 8",
        source_extra="sniff = false",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "rekbatch", "run", config, "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**bench_env(), "PYTHONPATH": str(src)},
    )
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode not in (0, 130):
        raise RuntimeError(f"rekbatch exited {proc.returncode}: {err[-2000:]}")
    latencies = []
    with (out / "results.jsonl").open() as handle:
        for line in handle:
            row = json.loads(line)
            if row["status"] == "ok":
                latencies.append(float(row["latency_ms"]))
    return latencies


async def _baseline(
    s3_url: str, rek_url: str, seconds: float | None, concurrency: int
) -> list[float]:
    """The baseline for ``seconds``; with None, until every object has been sent once."""
    session = aioboto3.Session(region_name=REGION)
    rek_cfg = AioConfig(
        max_pool_connections=concurrency + 8, retries={"mode": "adaptive", "max_attempts": 8}
    )
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    stopped = False
    async with (
        session.client("s3", endpoint_url=s3_url) as s3,
        session.client("rekognition", endpoint_url=rek_url, config=rek_cfg) as rek,
    ):

        async def one(key: str) -> None:
            async with sem:
                if stopped:
                    return
                started = time.monotonic()
                try:
                    await rek.detect_faces(Image={"S3Object": {"Bucket": BUCKET, "Name": key}})
                except ClientError:
                    return
                latencies.append((time.monotonic() - started) * 1000)

        async def drive() -> None:
            tasks = []
            async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
                tasks += [asyncio.create_task(one(item["Key"])) for item in page["Contents"]]
            await asyncio.gather(*tasks)

        driver = asyncio.create_task(drive())
        if seconds is None:
            await driver
            return latencies
        await asyncio.sleep(seconds)
        # Stop taking work and let calls in flight finish: botocore's adaptive mode does not
        # take cancellation well.
        stopped = True
        await asyncio.wait_for(driver, timeout=300)
    return latencies


def measure(rek_url: str, scenario: Scenario, seconds: float) -> dict[str, Any]:
    stats = fake_admin(rek_url, "/_fake/stats")
    timeline = stats["timeline"].get("DetectFaces", {})
    ok = timeline.get("ok", [])
    throttled = timeline.get("throttled", [])
    end = int(seconds)
    window = range(WARMUP, end)
    accepted = sum(ok[s] for s in window if s < len(ok))
    available = sum(scenario.available(s) for s in window)
    total_ok, total_throttled = sum(ok), sum(throttled)
    result: dict[str, Any] = {
        "ok_calls": total_ok,
        "throttled_calls": total_throttled,
        "quota_share": round(accepted / available, 3),
        "throttled_share": round(total_throttled / max(1, total_ok + total_throttled), 4),
        "ok_per_second": ok[:end],
    }
    if scenario.schedule:
        restored_at = int(scenario.schedule[-1][0])
        target = 0.9 * scenario.available(restored_at)
        back = next((s for s in range(restored_at, end) if s < len(ok) and ok[s] >= target), None)
        result["seconds_to_0.9_of_restored_quota"] = None if back is None else back - restored_at
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--images", type=int, default=7000)
    parser.add_argument("--only", help="run only scenarios whose name contains this")
    parser.add_argument("--src", type=Path, default=SRC, help="the code measured as rekbatch")
    parser.add_argument("--before", type=Path, help="another src measured beside it")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    srcs = {"rekbatch": SRC}
    if args.before:
        srcs["rekbatch before"] = args.before.resolve()
    contenders = [*srcs, *([] if args.no_baseline else ["baseline: aiobotocore adaptive retries"])]
    rows: list[dict[str, Any]] = []
    with (
        moto_s3() as s3_url,
        fake_rekognition(
            s3_url, "--s3-cache", "--latency-ms", "150", "--latency-sigma", "0.5"
        ) as rek_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        fill_bucket(s3_url, BUCKET, args.images)
        # Warm the fake's object cache: otherwise the first contender of a scenario pays
        # for reading from S3 every object the next one gets from the cache.
        fake_admin(rek_url, "/_fake/config", {"quotas": {"DetectFaces": 100_000}})
        asyncio.run(_baseline(s3_url, rek_url, None, args.concurrency))
        for scenario in SCENARIOS:
            if args.only and args.only not in scenario.name:
                continue
            for contender in contenders:
                fake_admin(rek_url, "/_fake/config", {"quotas": {"DetectFaces": scenario.quota}})
                fake_admin(rek_url, "/_fake/reset", {})
                started = time.monotonic()
                _schedule(rek_url, scenario, started)
                if contender in srcs:
                    latencies = run_rekbatch(
                        s3_url,
                        rek_url,
                        scenario,
                        args.seconds,
                        args.concurrency,
                        Path(tmp),
                        srcs[contender],
                    )
                else:
                    latencies = asyncio.run(
                        _baseline(s3_url, rek_url, args.seconds, args.concurrency)
                    )
                row = {"scenario": scenario.name, "contender": contender}
                row.update(measure(rek_url, scenario, args.seconds))
                row["p50_ms"] = _percentile(latencies, 0.5)
                row["p99_ms"] = _percentile(latencies, 0.99)
                rows.append(row)
                brief = {k: v for k, v in row.items() if k != "ok_per_second"}
                print(json.dumps(brief), flush=True)
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "srcs": {name: str(path) for name, path in srcs.items()},
        "rows": rows,
    }
    (RESULTS / "ratelimit.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("\n| scenario | contender | share of quota | throttled | back to 0.9 | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        back = r.get("seconds_to_0.9_of_restored_quota", "")
        print(
            f"| {r['scenario']} | {r['contender']} | {r['quota_share']:.3f} | "
            f"{100 * r['throttled_share']:.2f}% | {back} | {r['p50_ms']} | {r['p99_ms']} |"
        )


if __name__ == "__main__":
    main()
