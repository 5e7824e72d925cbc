"""Seconds from the start of a run to its first Rekognition call, on a 1M-key S3 Inventory.

The report (manifest and gzip CSV data files, in the layout S3 writes) sits in moto's S3
server; the run goes through ``Job`` with the in-process fake backend and ``sniff = false``,
so the time is rekbatch's own: reading the manifest, fetching and parsing the first data
file, and the first chunk through the producer. The run stops at ``max_images = 2000``.

Run: ``python -m benchmarks.bench_inventory_start --keys 1000000 --files 10 --rounds 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.servers import REGION, moto_s3, s3_client

RESULTS = Path(__file__).parent / "results" / "inventory_start.json"


def _build(url: str, keys: int, files: int) -> str:
    s3 = s3_client(url)
    for bucket in ("inv-src", "inv-dest"):
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    per_file = keys // files
    entries = []
    for n in range(files):
        rows = "".join(
            f'"inv-src","img/{i:07d}.jpg","{i:x}","true","false","518",'
            f'"2026-11-30T10:00:00.000Z","{i:032x}"\n'
            for i in range(n * per_file, (n + 1) * per_file)
        )
        body = gzip.compress(rows.encode(), compresslevel=6)
        key = f"inv-src/all/data/{n:04d}.csv.gz"
        s3.put_object(Bucket="inv-dest", Key=key, Body=body)
        entries.append({"key": key, "size": len(body), "MD5checksum": "x"})
    manifest = {
        "sourceBucket": "inv-src",
        "destinationBucket": "arn:aws:s3:::inv-dest",
        "version": "2016-11-30",
        "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, "
        "LastModifiedDate, ETag",
        "files": entries,
    }
    s3.put_object(
        Bucket="inv-dest", Key="inv-src/all/manifest.json", Body=json.dumps(manifest).encode()
    )
    return "inventory:s3://inv-dest/inv-src/all/manifest.json"


def _first_call_seconds(url: str, uri: str) -> float:
    from tests.support.fake_backend import FakeBackend

    from rekbatch.config import load_config
    from rekbatch.engine import Job, RunOptions

    first: list[float] = []

    def hook(number: int, api: str, ident: str) -> None:
        if not first:
            first.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "job.toml"
        config.write_text(
            f'[job]\noutput_dir = "{tmp}/out"\n[source]\nuris = ["{uri}"]\nsniff = false\n'
            f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{url}"\n'
            "[limits]\nmax_images = 2000\n"
            '[[operations]]\ntype = "detect_labels"\n'
        )
        cfg = load_config(config, environ={})
        job = Job(cfg, RunOptions(output_dir=Path(tmp) / "out"), backend=FakeBackend(hook=hook))
        started = time.perf_counter()
        outcome = asyncio.run(job.run())
    if outcome.exit_code != 4 or not first:
        raise AssertionError(f"the run ended with {outcome.exit_code}, calls: {bool(first)}")
    return first[0] - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    with moto_s3() as url:
        uri = _build(url, args.keys, args.files)
        seconds = [_first_call_seconds(url, uri) for _ in range(args.rounds)]
    results: dict[str, Any] = {
        "keys": args.keys,
        "data_files": args.files,
        "seconds_to_first_call": [round(s, 3) for s in seconds],
        "median": round(statistics.median(seconds), 3),
        "target": 5.0,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
