"""Where's Ric, the fastest way: rekbatch against the workshop's sequential loop, and the
calls each search_faces strategy makes for several people.

The fake Rekognition server (own process) has CompareFaces, IndexFaces and DetectFaces at
quota 50 and lognormal latency with a 150 ms median; the bucket holds images and, mixed in,
objects that are not images.

    python -m benchmarks.bench_wheres_ric [--images 1000] [--non-images 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from benchmarks.servers import (
    CREDENTIALS,
    REGION,
    fake_admin,
    fake_rekognition,
    moto_s3,
    run_cli,
    s3_client,
    write_job,
)

RESULTS = Path(__file__).parent / "results"
BUCKET = "image-demo-lab"
QUOTA = 50


def _image(i: int) -> bytes:
    return b"\xff\xd8\xff\xe0" + hashlib.sha256(str(i).encode()).digest() * 20 + b"\xff\xd9"


def fill(s3_url: str, images: int, non_images: int) -> dict[str, list[str]]:
    """The bucket, and the fake's identities: every 10th image shows Ric; every 25th
    Andrew; every 40th Jane."""
    s3 = s3_client(s3_url)
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    people: dict[str, list[str]] = {}
    for i in range(images):
        body = _image(i)
        faces = [
            name for name, every in (("ric", 10), ("andrew", 25), ("jane", 40)) if i % every == 0
        ]
        people[hashlib.sha256(body).hexdigest()] = [*faces, "someone"]
        s3.put_object(Bucket=BUCKET, Key=f"photos/{i:05d}.jpg", Body=body)
    for i in range(non_images):
        s3.put_object(Bucket=BUCKET, Key=f"photos/{i:05d}-notes.jpg", Body=b"not a photo " * 10)
    for name, seed in (("ric", 10**6), ("andrew", 10**6 + 1), ("jane", 10**6 + 2)):
        body = _image(seed)
        people[hashlib.sha256(body).hexdigest()] = [name]
        s3.put_object(Bucket=BUCKET, Key=f"refs/{name}.jpg", Body=body)
    return people


def sequential(s3_url: str, rek_url: str) -> dict[str, Any]:
    """The seed workshop's approach: one blocking CompareFaces per listed object."""
    s3 = s3_client(s3_url)
    rek = boto3.client(
        "rekognition",
        endpoint_url=rek_url,
        region_name=REGION,
        config=BotoConfig(retries={"mode": "standard", "max_attempts": 8}),
    )
    started = time.monotonic()
    matched = compared = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="photos/"):
        for item in page["Contents"]:
            try:
                response = rek.compare_faces(
                    SourceImage={"S3Object": {"Bucket": BUCKET, "Name": "refs/ric.jpg"}},
                    TargetImage={"S3Object": {"Bucket": BUCKET, "Name": item["Key"]}},
                    SimilarityThreshold=80,
                )
            except ClientError:
                continue
            compared += 1
            matched += bool(response["FaceMatches"])
    return {
        "seconds": round(time.monotonic() - started, 1),
        "matched": matched,
        "compared": compared,
    }


def rekbatch(s3_url: str, rek_url: str, work: Path, label: str, operation: str) -> dict[str, Any]:
    out = work / label
    config = write_job(
        str(out) + ".toml",
        bucket=BUCKET,
        out=str(out),
        s3_url=s3_url,
        rek_url=rek_url,
        operations=operation,
        limits="concurrency = 32\nmax_tps = 50",
    )
    config_text = Path(config).read_text().replace(f's3://{BUCKET}/"', f's3://{BUCKET}/photos/"')
    Path(config).write_text(config_text)
    started = time.monotonic()
    proc = run_cli("run", config, "--log-format", "json")
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"rekbatch exited {proc.returncode}: {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "seconds": round(wall, 1),
        "run_seconds": summary["elapsed_seconds"],
        "answer": proc.stdout.strip().splitlines()[-3:],
        "summary": summary,
    }


def calls(rek_url: str) -> dict[str, int]:
    return dict(fake_admin(rek_url, "/_fake/stats")["calls"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--non-images", type=int, default=100)
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    rows: list[dict[str, Any]] = []
    quotas = [f"--quota={api}={QUOTA}" for api in ("CompareFaces", "IndexFaces", "DetectFaces")]
    with moto_s3() as s3_url, tempfile.TemporaryDirectory() as tmp:
        people = fill(s3_url, args.images, args.non_images)
        people_file = Path(tmp) / "people.json"
        people_file.write_text(json.dumps(people))
        with fake_rekognition(
            s3_url, "--s3-cache", "--latency-ms", "150", "--people", str(people_file), *quotas
        ) as rek_url:
            compare = (
                '[[operations]]\ntype = "compare_faces"\n'
                f'reference = "s3://{BUCKET}/refs/ric.jpg"\nsimilarity_threshold = 80\n'
            )
            fake_admin(rek_url, "/_fake/reset", {})
            result = rekbatch(s3_url, rek_url, Path(tmp), "one-person", compare)
            made = calls(rek_url)
            answer = result["summary"]["compare_faces"]
            rows.append(
                {
                    "contender": "rekbatch compare_faces",
                    "seconds": result["seconds"],
                    "run_seconds": result["run_seconds"],
                    "calls": made,
                    "images_matched": answer["images_matched"],
                    "images_compared": answer["images_compared"],
                    "share_of_quota": round(
                        made.get("CompareFaces", 0) / result["run_seconds"] / QUOTA, 3
                    ),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

            fake_admin(rek_url, "/_fake/reset", {})
            seq = sequential(s3_url, rek_url)
            rows.append(
                {"contender": "sequential CompareFaces loop", **seq, "calls": calls(rek_url)}
            )
            print(json.dumps(rows[-1]), flush=True)

            for strategy in ("compare", "collection"):
                search = (
                    '[[operations]]\ntype = "search_faces"\n'
                    f'people = {{ ric = ["s3://{BUCKET}/refs/ric.jpg"], '
                    f'andrew = ["s3://{BUCKET}/refs/andrew.jpg"], '
                    f'jane = ["s3://{BUCKET}/refs/jane.jpg"] }}\n'
                    f'strategy = "{strategy}"\ncollection_id = "bench-{strategy}"\n'
                )
                fake_admin(rek_url, "/_fake/reset", {})
                result = rekbatch(s3_url, rek_url, Path(tmp), f"people-{strategy}", search)
                found = {
                    person: p["images_matched"]
                    for person, p in result["summary"]["search_faces"]["people"].items()
                }
                rows.append(
                    {
                        "contender": f"rekbatch search_faces, 3 people, {strategy}",
                        "seconds": result["seconds"],
                        "calls": calls(rek_url),
                        "found": found,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "images": args.images,
        "non_images": args.non_images,
        "quota": QUOTA,
        "latency_median_ms": 150,
        "rows": rows,
    }
    (RESULTS / "wheres_ric.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("\n| contender | wall s | calls made |\n|---|---|---|")
    for row in rows:
        total = sum(row["calls"].values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(row["calls"].items()))
        print(f"| {row['contender']} | {row['seconds']} | {total} ({detail}) |")


if __name__ == "__main__":
    main()
