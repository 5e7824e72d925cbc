"""Throughput through faults: ok calls per second under each fault mix, as a share of the
fault-free rate at the same ceiling, rekbatch beside aiobotocore's adaptive retry mode.

DetectLabels over ``--images`` objects against the fake Rekognition (median latency
``--latency-ms``) with the faults of each mix injected at random: 10% ThrottlingException
(the service's load, not the quota, which is far away), 20% InternalServerError, 2%
dropped connections (closed without an answer), and all three at once. Both contenders
send at most ``--ceiling`` calls a second with ``--concurrency`` in flight:

- rekbatch through its CLI (``max_tps`` = the ceiling); ok calls/s = objects answered ok
  over the run's own elapsed seconds (summary.json);
- the baseline, what a user would write: one aioboto3 client with
  ``retries={"mode": "adaptive", "max_attempts": 8}``, ``--concurrency`` tasks and a pacer
  at the ceiling; ok calls/s = objects answered over its elapsed seconds (it stops taking
  objects after ``--budget`` seconds).

Rounds alternate the contenders; the table shows medians.

``--paired`` runs a fault-free run of the same contender just before each faulty one and
adds the median of those pairs' shares (for a machine whose load changes by the minute).
``--before DIR`` adds rekbatch from another checkout's ``src`` (the code before a change) as a
contender of its own; ``--src DIR`` picks the code measured as "rekbatch" (this checkout's by
default); ``--no-baseline`` leaves the baseline out. ``--cpu-hog N`` runs N processes that
only spin beside the whole benchmark, as other work on a shared machine does: every process
(rekbatch, the fake, moto) gets less of the cores and in slices, so answers come late and
unevenly.

    python -m benchmarks.bench_faults [--images 2000] [--rounds 3] [--cpu-hog 2]
        [--before /tmp/before/src] [--no-baseline] [--paired]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.src_choice import use_src

# --src must take effect before rekbatch is imported (and in the CLI processes it starts).
SRC = use_src(children=True)

import aioboto3  # noqa: E402
from aiobotocore.config import AioConfig  # noqa: E402

from benchmarks.servers import (  # noqa: E402
    CREDENTIALS,
    REGION,
    fake_admin,
    fake_rekognition,
    fill_bucket,
    moto_s3,
    run_cli,
    write_job,
)

RESULTS = Path(__file__).parent / "results"
MIXES: dict[str, dict[str, float]] = {
    "no faults": {},
    "10% throttles": {"throttle_rate": 0.10},
    "20% 500s": {"error_rate": 0.20},
    "2% dropped connections": {"drop_rate": 0.02},
    "all three": {"throttle_rate": 0.10, "error_rate": 0.20, "drop_rate": 0.02},
}
NO_FAULTS = {"throttle_rate": 0.0, "error_rate": 0.0, "drop_rate": 0.0}


async def baseline(
    rek_url: str, s3_url: str, bucket: str, concurrency: int, ceiling: float, budget: float
) -> dict[str, Any]:
    session = aioboto3.Session(region_name=REGION)
    cfg = AioConfig(
        max_pool_connections=concurrency + 8,
        retries={"mode": "adaptive", "max_attempts": 8},
        read_timeout=60,
    )
    ok = failed = 0
    next_at = time.monotonic()
    lock = asyncio.Lock()

    async def pace() -> None:
        nonlocal next_at
        async with lock:
            now = time.monotonic()
            wait = next_at - now
            next_at = max(now, next_at) + 1.0 / ceiling
        if wait > 0:
            await asyncio.sleep(wait)

    async with (
        session.client("s3", endpoint_url=s3_url, config=cfg) as s3,
        session.client("rekognition", endpoint_url=rek_url, config=cfg) as rek,
    ):
        keys: list[str] = []
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        started = time.monotonic()
        todo = iter(keys)

        async def worker() -> None:
            # Stops taking keys once the time allowed is up: the rate so far is the answer.
            nonlocal ok, failed
            for key in todo:
                if time.monotonic() - started > budget:
                    return
                await pace()
                try:
                    await rek.detect_labels(Image={"S3Object": {"Bucket": bucket, "Name": key}})
                    ok += 1
                except Exception:
                    failed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {
        "ok": ok,
        "failed": failed,
        "seconds": round(elapsed, 2),
        "ok_per_second": round(ok / elapsed, 1),
        "finished": ok + failed == len(keys),
    }


@contextlib.contextmanager
def cpu_hog(processes: int) -> Iterator[list[int]]:
    """``processes`` busy loops beside the benchmark (their pids); stopped on the way out."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    try:
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def rekbatch_run(
    rek_url: str,
    s3_url: str,
    bucket: str,
    concurrency: int,
    ceiling: float,
    work: Path,
    n: int,
    src: Path,
) -> dict[str, Any]:
    out = work / f"out-{n}"
    config = write_job(
        str(work / f"job-{n}.toml"),
        bucket=bucket,
        out=str(out),
        s3_url=s3_url,
        rek_url=rek_url,
        operations='[[operations]]\ntype = "detect_labels"\n',
        limits=f"concurrency = {concurrency}\nmax_tps = {ceiling}",
        source_extra="sniff = false",
    )
    proc = run_cli(
        "run", config, "--log-format", "json", timeout=1800, env={"PYTHONPATH": str(src)}
    )
    summary = json.loads((out / "summary.json").read_text())
    statuses = summary["counts"]["by_status"]
    elapsed = summary["elapsed_seconds"]
    return {
        "ok": statuses.get("ok", 0),
        "failed": statuses.get("failed", 0),
        "exit_code": proc.returncode,
        "seconds": round(elapsed, 2),
        "ok_per_second": round(statuses.get("ok", 0) / elapsed, 1),
        "background_share": {
            api: lim.get("background_share") for api, lim in summary["limiters"].items()
        },
        "cuts": {api: lim.get("cuts") for api, lim in summary["limiters"].items()},
        "finished": proc.returncode in (0, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ceiling", type=float, default=400.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per baseline run")
    parser.add_argument("--src", type=Path, default=SRC, help="the code measured as rekbatch")
    parser.add_argument("--before", type=Path, help="another src measured beside it")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--cpu-hog", type=int, default=0, metavar="N")
    parser.add_argument("--only", help="run only the mixes whose name contains this")
    parser.add_argument(
        "--paired", action="store_true", help="a fault-free run just before every faulty one"
    )
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    srcs = {"rekbatch": SRC}
    if args.before:
        srcs["rekbatch before"] = args.before.resolve()
    contenders = [*srcs, *([] if args.no_baseline else ["baseline"])]
    mixes = {
        name: faults
        for name, faults in MIXES.items()
        if name == "no faults" or not args.only or args.only in name
    }
    runs: list[dict[str, Any]] = []
    with (
        cpu_hog(args.cpu_hog),
        moto_s3() as s3_url,
        fake_rekognition(
            s3_url, "--s3-cache", "--latency-ms", str(args.latency_ms), "--seed", "5"
        ) as rek_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        bucket = "bench-faults"
        fill_bucket(s3_url, bucket, args.images)
        work = Path(tmp)
        # Warm the fake's object cache first, so the first timed run is like the others.
        asyncio.run(baseline(rek_url, s3_url, bucket, args.concurrency, 10_000.0, args.budget))
        n = 0

        def one(contender: str, mix: str, round_: int, pair: int | None) -> None:
            nonlocal n
            fake_admin(rek_url, "/_fake/config", {**NO_FAULTS, **MIXES[mix]})
            fake_admin(rek_url, "/_fake/reset", {})
            n += 1
            if contender in srcs:
                result = rekbatch_run(
                    rek_url,
                    s3_url,
                    bucket,
                    args.concurrency,
                    args.ceiling,
                    work,
                    n,
                    srcs[contender],
                )
            else:
                result = asyncio.run(
                    baseline(rek_url, s3_url, bucket, args.concurrency, args.ceiling, args.budget)
                )
            result.update(round=round_, mix=mix, contender=contender, pair=pair)
            runs.append(result)
            print(json.dumps(result), flush=True)

        pairs = 0
        for round_ in range(args.rounds):
            for mix in mixes:
                if args.paired and mix == "no faults":
                    continue
                # Each round starts with the next contender: none is always first or last.
                shift = round_ % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    pair = None
                    if args.paired:
                        pairs += 1
                        pair = pairs
                        one(contender, "no faults", round_, pair)
                    one(contender, mix, round_, pair)
    table: list[dict[str, Any]] = []
    for contender in contenders:
        free = statistics.median(
            r["ok_per_second"]
            for r in runs
            if r["contender"] == contender and r["mix"] == "no faults"
        )
        for mix in mixes:
            rates = [
                r["ok_per_second"] for r in runs if r["contender"] == contender and r["mix"] == mix
            ]
            failed = [r["failed"] for r in runs if r["contender"] == contender and r["mix"] == mix]
            finished = all(
                r["finished"] for r in runs if r["contender"] == contender and r["mix"] == mix
            )
            median = statistics.median(rates)
            row = {
                "contender": contender,
                "mix": mix,
                "ok_per_second": median,
                "share_of_fault_free": round(median / free, 3),
                "failed_records": max(failed),
                "all_finished": finished,
            }
            if args.paired and mix != "no faults":
                row["paired_shares"] = paired_shares(runs, contender, mix)
                row["paired_share"] = round(statistics.median(row["paired_shares"]), 3)
            table.append(row)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"args": settings, "runs": runs, "table": table, "cores": os.cpu_count()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(
        "\n| contender | fault mix | ok calls/s (median) | share of fault-free "
        "| paired share (median) | failed records | finished |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in table:
        print(
            f"| {row['contender']} | {row['mix']} | {row['ok_per_second']} | "
            f"{row['share_of_fault_free']} | {row.get('paired_share', '')} | "
            f"{row['failed_records']} | {row['all_finished']} |"
        )


def paired_shares(runs: list[dict[str, Any]], contender: str, mix: str) -> list[float]:
    """Each run of ``mix`` over the fault-free run just before it (same contender): on a
    machine whose load changes from minute to minute, a share of rates measured far apart
    says more about the load than about the faults."""
    free = {
        r["pair"]: r["ok_per_second"]
        for r in runs
        if r["contender"] == contender and r["mix"] == "no faults" and r["pair"] is not None
    }
    return [
        round(r["ok_per_second"] / free[r["pair"]], 3)
        for r in runs
        if r["contender"] == contender and r["mix"] == mix and r["pair"] in free
    ]


if __name__ == "__main__":
    main()
