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
"""

from __future__ import annotations

import argparse
import asyncio
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--listers", type=int, default=16)
    parser.add_argument("--page-latency-ms", default="50-300")
    args = parser.parse_args(argv)
    import os

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
