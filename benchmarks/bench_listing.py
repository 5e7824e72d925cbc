"""Listing one big prefix: rekbatch's parallel ranges against one paginator and the best split.

The bucket is ``benchmarks.synthetic_s3`` (keys made from an index, nothing stored) with a
delay on every ListObjectsV2 page, as S3 takes. Contenders, alternated per round:

- ``sequential``: one paginator over the prefix (what rekbatch did before);
- ``best split``: 16 paginators over 16 hand-picked ranges of equal size, chosen knowing the
  keys are ``img/0000000.jpg`` upwards: the best a client can do;
- ``rekbatch``: ``S3Source.split`` (no hint about the layout) and 16 listers over its
  ranges, including the time the split takes;
- ``plan, no latency`` (separately): ``rekbatch plan`` over the same keys with no page
  delay and sniff off, as keys per second, against the raw listing at no delay: how much the
  per-key work of plan costs beside parsing pages.

Run: ``python -m benchmarks.bench_listing --keys 200000 --rounds 3``.

``--keys-listed`` measures something else: how many keys a run reads to list a source, as
moto (in this process) serves them, for a plain run and for N shards (``--shards``) run at
once, each an in-process ``Job`` with the in-process fake backend. For an S3 prefix the keys
ListObjectsV2 returned; for an S3 Inventory report the rows of the data files read; for a
key list its lines read. Layouts: ``p/<hex>/<n>.jpg`` (16 folders, the layout of issue 26)
and two of ``--big`` keys (256 hashed folders; flat numbered names). It runs against
whatever rekbatch is importable, so the figures before a change come from
``PYTHONPATH=<old checkout>/src``.

    python -m benchmarks.bench_listing --keys-listed --label after
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aioboto3

from benchmarks.servers import REGION, synthetic_s3
from benchmarks.synthetic_s3 import object_key
from rekbatch.sources.ranges import KeyRange
from rekbatch.sources.s3 import S3, S3Source

BUCKET = "listing"
RESULTS = Path(__file__).parent / "results" / "listing.json"


async def _drain(source: S3Source, ranges: list[KeyRange], listers: int) -> int:
    todo = deque(ranges)
    count = 0

    async def lister() -> None:
        nonlocal count
        while todo:
            rng = todo.popleft()
            async for _ in source.list_range(rng, None):
                count += 1

    await asyncio.gather(*(lister() for _ in range(min(listers, len(todo)))))
    return count


def _best_split(keys: int, n: int) -> list[KeyRange]:
    cuts = [object_key(keys * i // n - 1) for i in range(1, n)]
    edges: list[str | None] = [None, *cuts, None]
    return [KeyRange(edges[i], edges[i + 1]) for i in range(n)]


def _contenders(s3: S3, keys: int, listers: int) -> dict[str, Callable[[], Awaitable[int]]]:
    source = S3Source(f"s3://{BUCKET}/", 0, s3, BUCKET, "")

    async def sequential() -> int:
        return await _drain(source, [KeyRange(None, None)], 1)

    async def best() -> int:
        return await _drain(source, _best_split(keys, listers), listers)

    async def rekbatch() -> int:
        return await _drain(source, await source.split(listers), listers)

    return {"sequential": sequential, "best split": best, "rekbatch": rekbatch}


async def _rounds(url: str, keys: int, listers: int, rounds: int) -> dict[str, list[float]]:
    session = aioboto3.Session(
        region_name=REGION, aws_access_key_id="bench", aws_secret_access_key="bench"
    )
    async with S3(session, endpoint_url=url, pool=listers * 2 + 4) as s3:
        contenders = _contenders(s3, keys, listers)
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        for round_no in range(rounds):
            order = list(contenders)
            if round_no % 2:
                order.reverse()  # alternate, so no contender always runs first
            for name in order:
                started = time.perf_counter()
                listed = await contenders[name]()
                seconds[name].append(time.perf_counter() - started)
                if listed != keys:
                    raise AssertionError(f"{name} listed {listed} keys of {keys}")
                print(f"round {round_no + 1} {name}: {seconds[name][-1]:.2f} s", file=sys.stderr)
    return seconds


def _plan_rate(url: str, keys: int) -> float:
    from rekbatch.commands.plan import plan_job
    from rekbatch.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "job.toml"
        config.write_text(
            f'[job]\noutput_dir = "{tmp}/out"\n[source]\nuris = ["s3://{BUCKET}/"]\n'
            f'sniff = false\n[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{url}"\n'
            '[[operations]]\ntype = "detect_labels"\n'
        )
        cfg = load_config(config, environ={"AWS_ACCESS_KEY_ID": "b", "AWS_SECRET_ACCESS_KEY": "b"})
        started = time.perf_counter()
        plan = asyncio.run(plan_job(cfg))
        elapsed = time.perf_counter() - started
    if plan["objects_listed"] != keys:
        raise AssertionError(f"plan listed {plan['objects_listed']}")
    return keys / elapsed


KEYS_LISTED = Path(__file__).parent / "results" / "keys_listed.json"


def _layouts(big: int) -> dict[str, list[str]]:
    import hashlib

    def md5(i: int) -> str:
        return hashlib.md5(str(i).encode()).hexdigest()

    return {
        "hex folders, 2,400": [f"p/{i % 16:x}/{i}.jpg" for i in range(2400)],
        f"hashed folders, {big:,}": [f"p/{md5(i)[:2]}/{i}.jpg" for i in range(big)],
        f"numbered, {big:,}": [f"img_{i:07d}.jpg" for i in range(big)],
    }


async def _count_run(cfg: Any, out: Path, shards: int, measure: Callable[[], int]) -> list[int]:
    """Keys read (``measure()`` counts them so far) by a plain run, or by each of ``shards``
    shards run one after the other (so that each one's reads are its own; the first one
    divides the sources)."""
    from tests.support.fake_backend import FakeBackend

    from rekbatch.engine import Job, RunOptions
    from rekbatch.engine.shards import Shard, shard_config

    jobs = []
    if shards == 0:
        jobs.append(Job(cfg, RunOptions(output_dir=out), backend=FakeBackend()))
    for k in range(shards):
        shard = Shard(k, shards)
        own = shard_config(cfg, shard)
        options = RunOptions(Path(own.job.output_dir), shard=shard, job_config=cfg)
        jobs.append(Job(own, options, backend=FakeBackend()))
    reads = []
    for job in jobs:
        before = measure()
        outcome = await job.run()
        if outcome.exit_code != 0:
            raise AssertionError(f"a run ended with {outcome.exit_code}")
        reads.append(measure() - before)
    return reads


def _keys_read(served: Any, kind: str, bucket: str, extra: str) -> int:
    """Keys listed (a prefix), rows of data files read (an inventory), lines of the key
    list read."""
    if kind == "prefix":
        return int(served.listed[bucket])
    key_list = int(served.lines[f"/{extra}/keys.csv"])
    return key_list if kind == "key list" else int(served.lines_under(extra)) - key_list


def keys_listed(big: int, shards: int, label: str) -> dict[str, Any]:
    """Keys read to list each layout as a prefix, an inventory and a key list, by a plain
    run and by ``shards`` shards."""
    import gzip
    import hashlib
    import logging

    import boto3
    from moto.server import ThreadedMotoServer
    from tests.support.moto import Served, put_objects

    from rekbatch.config import load_config

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name=REGION)
    served = Served()
    rows: list[dict[str, Any]] = []
    try:
        for n, (layout, keys) in enumerate(_layouts(big).items()):
            bucket = f"layout-{n}"
            client.create_bucket(
                Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION}
            )
            body = b"\xff\xd8\xff\xe0" + b"x" * 200
            etag = hashlib.md5(body).hexdigest()
            put_objects(bucket, ((key, body) for key in keys))
            extra = f"{bucket}-extra"
            client.create_bucket(
                Bucket=extra, CreateBucketConfiguration={"LocationConstraint": REGION}
            )
            files = []
            for f in range(8):
                data = "".join(f'"{bucket}","{k}","{len(body)}","{etag}"\n' for k in keys[f::8])
                files.append((f"data/{f}.csv.gz", gzip.compress(data.encode())))
            manifest = {
                "destinationBucket": f"arn:aws:s3:::{extra}",
                "fileFormat": "CSV",
                "fileSchema": "Bucket, Key, Size, ETag",
                "files": [{"key": key, "size": len(data)} for key, data in files],
            }
            listing = "".join(f"{bucket},{k},{len(body)},{etag}\n" for k in keys)
            put_objects(
                extra,
                [
                    *files,
                    ("manifest.json", json.dumps(manifest).encode()),
                    ("keys.csv", listing.encode()),
                ],
            )
            sources = {
                "prefix": f"s3://{bucket}/",
                "inventory": f"inventory:s3://{extra}/manifest.json",
                "key list": f"keys:s3://{extra}/keys.csv",
            }
            for kind, uri in sources.items():
                for contender in (0, shards):
                    with tempfile.TemporaryDirectory() as tmp:
                        config = Path(tmp) / "job.toml"
                        config.write_text(
                            f'[job]\noutput_dir = "{tmp}/out"\n[source]\nuris = ["{uri}"]\n'
                            f'sniff = false\n[aws]\nregion = "{REGION}"\n'
                            f's3_endpoint_url = "{url}"\n[output]\nparquet = false\n'
                            '[[operations]]\ntype = "detect_labels"\n'
                        )
                        cfg = load_config(config, environ={})
                        served.clear()
                        with served.counting():
                            each = asyncio.run(
                                _count_run(
                                    cfg,
                                    Path(tmp) / "out",
                                    contender,
                                    functools.partial(_keys_read, served, kind, bucket, extra),
                                )
                            )
                    read = sum(each)
                    row = {
                        "layout": layout,
                        "source": kind,
                        "shards": contender,
                        "keys": len(keys),
                        "keys_read": read,
                        "times_the_keys": round(read / len(keys), 3),
                        "per_shard": each if contender else None,
                    }
                    if kind == "prefix":
                        row["list_requests"] = served.pages[bucket]
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    finally:
        server.stop()
    return {"label": label, "shards": shards, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--listers", type=int, default=16)
    parser.add_argument("--page-latency-ms", default="50-300")
    parser.add_argument("--keys-listed", action="store_true", help="count keys read instead")
    parser.add_argument("--big", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--label", default="after")
    args = parser.parse_args(argv)
    import os

    if args.keys_listed:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        measured = keys_listed(args.big, args.shards, args.label)
        saved = json.loads(KEYS_LISTED.read_text()) if KEYS_LISTED.exists() else {}
        saved[args.label] = measured
        KEYS_LISTED.parent.mkdir(parents=True, exist_ok=True)
        KEYS_LISTED.write_text(json.dumps(saved, indent=2) + "\n")
        return 0

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    results: dict[str, Any] = {"keys": args.keys, "page_latency_ms": args.page_latency_ms}
    with synthetic_s3({BUCKET: args.keys}, page_latency_ms=args.page_latency_ms) as server:
        seconds = asyncio.run(_rounds(server.url, args.keys, args.listers, args.rounds))
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    results["seconds"] = seconds
    results["keys_per_second"] = {name: round(args.keys / t) for name, t in medians.items()}
    results["ratios"] = {
        "best split / sequential": round(medians["sequential"] / medians["best split"], 2),
        "rekbatch / sequential": round(medians["sequential"] / medians["rekbatch"], 2),
        "rekbatch / best split": round(medians["best split"] / medians["rekbatch"], 2),
    }
    with synthetic_s3({BUCKET: args.keys}) as server:
        raw = asyncio.run(_rounds(server.url, args.keys, args.listers, 1))
        plan_rate = _plan_rate(server.url, args.keys)
    results["no_latency"] = {
        "rekbatch listing keys/s": round(args.keys / raw["rekbatch"][0]),
        "plan keys/s": round(plan_rate),
        "plan / listing": round(plan_rate * raw["rekbatch"][0] / args.keys, 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
