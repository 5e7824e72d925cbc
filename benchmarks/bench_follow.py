"""Queue sources: how fast a queue of S3 events is worked off, and how soon an event's row
is durable.

1. Sustained rate. N objects, and N ObjectCreated events waiting in a queue; the fake holds
   DetectLabels to a quota (``--quota``). ``rekbatch run`` with the queue as its source,
   next to ``rekbatch run`` listing the same N objects from the bucket (the same per-object
   work: sniff, call, write), alternated, ``--rounds`` times each. The rate of each run is
   taken from its rows' ``processed_at`` (first to last), so start-up and the idle wait at
   the end are left out. Also measured per object: the CPU time of the rekbatch process
   (and its children) and of the moto process, which serves the queue here; SQS itself
   costs the machine nothing.
2. Latency. ``rekbatch run --follow`` on an empty queue, the fake's quota raised to
   ``--latency-quota``; the events of objects already in the bucket are sent at a steady
   rate (50 a second by default). The time from an event being sent to its row being
   committed in the job's ledger (polled every 10 ms, read-only) is reported as p50 and
   p95.

Every server runs in a process of its own: the objects in ``benchmarks.synthetic_s3`` (moto's
S3 serves a few dozen reads a second on this machine, which would measure moto), the queues
in moto (``benchmarks.moto_server``), and the fake Rekognition, which reads each image
from the synthetic S3.

    python -m benchmarks.bench_follow [--objects 1500] [--quota 25] [--rounds 3]
                                      [--rate 50] [--seconds 20] [--latency-quota 100]
                                      [--latency-only]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.servers import (
    REGION,
    RunningServer,
    bench_client,
    bench_env,
    fake_admin,
    fake_rekognition,
    run_cli,
    synthetic_s3,
    url_server,
)
from benchmarks.synthetic_s3 import OBJECT_SIZE, object_etag, object_key

OPERATION = '[[operations]]\ntype = "detect_labels"\n'
RATE_BUCKET = "bench-follow-rate"
LIVE_BUCKET = "bench-follow-live"


def event(bucket: str, index: int) -> str:
    """The ObjectCreated event of the synthetic bucket's object ``index``."""
    key = object_key(index)
    return json.dumps(
        {
            "Records": [
                {
                    "eventVersion": "2.1",
                    "eventSource": "aws:s3",
                    "eventTime": "2026-12-07T00:00:00.000Z",
                    "eventName": "ObjectCreated:Put",
                    "s3": {
                        "bucket": {"name": bucket},
                        "object": {
                            "key": key,
                            "size": OBJECT_SIZE,
                            "eTag": object_etag(key),
                            "sequencer": f"{index + 1:018X}",
                        },
                    },
                }
            ]
        }
    )


def send_all(sqs: Any, queue_url: str, bodies: list[str]) -> None:
    def batch(start: int) -> None:
        entries = [
            {"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[start : start + 10])
        ]
        sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(batch, range(0, len(bodies), 10)))


def job(
    path: Path, out: Path, uri: str, urls: tuple[str, str, str], quota: float, idle: float
) -> str:
    s3, sqs, rek = urls
    path.write_text(
        f'[job]\nname = "bench-follow"\noutput_dir = "{out}"\n\n'
        f'[source]\nuris = ["{uri}"]\nqueue_idle_seconds = {idle}\n\n'
        f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{s3}"\nsqs_endpoint_url = "{sqs}"\n'
        f'rekognition_endpoint_url = "{rek}"\n\n'
        f"[limits]\nconcurrency = 32\nmax_tps = {quota}\n\n{OPERATION}",
        encoding="utf-8",
    )
    return str(path)


def rows_rate(out: Path) -> tuple[int, float]:
    """(rows, rows per second from the first row's processed_at to the last's)."""
    stamps = []
    with (out / "results.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            stamps.append(datetime.fromisoformat(json.loads(line)["processed_at"]).timestamp())
    span = max(stamps) - min(stamps)
    return len(stamps), (len(stamps) - 1) / span if span > 0 else float("nan")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sustained(
    urls: tuple[str, str, str], moto: RunningServer, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    bucket = RATE_BUCKET
    bodies = [event(bucket, i) for i in range(args.objects)]
    sqs = bench_client("sqs", urls[1])
    rates: dict[str, list[float]] = {"queue": [], "listing": []}
    cpu: dict[str, list[float]] = {"queue": [], "listing": []}
    moto_cpu: dict[str, list[float]] = {"queue": [], "listing": []}
    for round_ in range(args.rounds):
        for contender in ("queue", "listing"):
            out = work / f"{contender}-{round_}"
            if contender == "queue":
                name = f"bench-rate-{round_}"
                queue_url = sqs.create_queue(
                    QueueName=name, Attributes={"VisibilityTimeout": "60"}
                )["QueueUrl"]
                send_all(sqs, queue_url, bodies)
                uri = f"sqs://{name}"
            else:
                uri = f"s3://{bucket}/"
            config = job(work / f"{contender}-{round_}.toml", out, uri, urls, args.quota, 2)
            before, moto_before = children_cpu(), moto.cpu_seconds()
            done = run_cli("run", config, "--log-format", "json")
            per_object = 1000.0 / args.objects
            cpu[contender].append(round((children_cpu() - before) * per_object, 2))
            moto_cpu[contender].append(round((moto.cpu_seconds() - moto_before) * per_object, 2))
            if done.returncode != 0:
                raise RuntimeError(f"{contender} run failed: {done.stderr[-2000:]}")
            rows, rate = rows_rate(out)
            assert rows == args.objects, (contender, rows)
            if contender == "queue":
                left = sqs.get_queue_attributes(
                    QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
                )["Attributes"]["ApproximateNumberOfMessages"]
                assert int(left) == 0, left
            rates[contender].append(rate)
            print(
                f"round {round_} {contender}: {rate:.1f} objects/s, rekbatch "
                f"{cpu[contender][-1]} ms CPU an object, moto {moto_cpu[contender][-1]} ms",
                flush=True,
            )
    queue, listing = statistics.median(rates["queue"]), statistics.median(rates["listing"])
    queue_cpu, listing_cpu = statistics.median(cpu["queue"]), statistics.median(cpu["listing"])
    return {
        "objects": args.objects,
        "quota_per_second": args.quota,
        "queue_per_second": [round(r, 1) for r in rates["queue"]],
        "listing_per_second": [round(r, 1) for r in rates["listing"]],
        "rekbatch_cpu_ms_per_object": cpu,
        "moto_cpu_ms_per_object": moto_cpu,
        "median_queue_per_second": round(queue, 1),
        "median_listing_per_second": round(listing, 1),
        "queue_over_listing": round(queue / listing, 3),
        "queue_over_quota": round(queue / args.quota, 3),
        "rekbatch_cpu_queue_over_listing": round(queue_cpu / listing_cpu, 3),
    }


def latency(urls: tuple[str, str, str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    fake_admin(urls[2], "/_fake/config", {"quotas": {"DetectLabels": args.latency_quota}})
    bucket = LIVE_BUCKET
    sqs = bench_client("sqs", urls[1])
    queue_url = sqs.create_queue(QueueName="bench-live", Attributes={"VisibilityTimeout": "60"})[
        "QueueUrl"
    ]
    out = work / "live"
    config = job(work / "live.toml", out, "sqs://bench-live", urls, args.latency_quota, 20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rekbatch", "run", config, "--follow", "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=bench_env(),
    )
    ledger = out / ".rekbatch" / "ledger.sqlite"
    deadline = time.monotonic() + 60
    while not ledger.exists():  # the run is up once its ledger is
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the follow run did not start")
        time.sleep(0.05)
    time.sleep(1.0)
    count = int(args.rate * args.seconds)
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}

    def sender() -> None:
        # Each event at its time on a steady schedule, from a few threads: one SendMessage
        # to moto takes longer than the 20 ms between events when the machine is busy.
        start = time.monotonic()

        def send(i: int) -> None:
            time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
            sqs.send_message(QueueUrl=queue_url, MessageBody=event(bucket, i))
            sent[object_key(i)] = time.monotonic()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, range(count)))

    thread = threading.Thread(target=sender)
    started = time.monotonic()
    thread.start()
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=10)
    try:
        while len(seen) < count and time.monotonic() - started < args.seconds + 60:
            now = time.monotonic()
            for (key,) in db.execute("SELECT key FROM records WHERE status = 'ok'"):
                seen.setdefault(key, now)
            time.sleep(0.01)
    finally:
        db.close()
    thread.join()
    sent_span = max(sent.values()) - min(sent.values())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 130:
        raise RuntimeError(f"the follow run ended with {proc.returncode}: {err[-2000:]!r}")
    in_order = [seen[k] - sent[k] for k in sorted(sent) if k in seen]
    fifth = max(1, len(in_order) // 5)
    # A backlog shows as waits that grow from the first fifth of the events to the last.
    by_fifth = [
        round(statistics.median(in_order[i : i + fifth]), 3)
        for i in range(0, fifth * 5, fifth)
        if in_order[i : i + fifth]
    ]
    waits = sorted(in_order)
    quantiles = statistics.quantiles(waits, n=100)
    return {
        "events": count,
        "rate_per_second": args.rate,
        "quota_per_second": args.latency_quota,
        "achieved_send_rate": round((count - 1) / sent_span, 1),
        "durable": len(waits),
        "p50_seconds": round(quantiles[49], 3),
        "p95_seconds": round(quantiles[94], 3),
        "max_seconds": round(waits[-1], 3),
        "p50_by_fifth_seconds": by_fifth,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=1500)
    parser.add_argument("--quota", type=float, default=25.0)
    parser.add_argument("--latency-quota", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--latency-only", action="store_true", help="skip the sustained rate")
    args = parser.parse_args()
    argv = [sys.executable, "-m", "benchmarks.moto_server"]
    live = int(args.rate * args.seconds)
    with (
        tempfile.TemporaryDirectory() as tmp,
        synthetic_s3({RATE_BUCKET: args.objects, LIVE_BUCKET: live}) as s3,
        url_server(argv) as moto,
        fake_rekognition(
            s3.url, "--quota", f"DetectLabels={args.quota:g}", "--latency-ms", "50"
        ) as rek,
    ):
        work = Path(tmp)
        urls = (s3.url, moto.url, rek)
        result = {
            "machine_load": os.getloadavg(),
            "sustained": None if args.latency_only else sustained(urls, moto, args, work),
            "latency": latency(urls, args, work),
        }
        result["machine_load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
