"""Parallel listing of one S3 prefix: disjoint key ranges, every key once, resume per range."""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from random import Random
from typing import Any

import aioboto3
import pytest

from rekbatch.engine import Job, RunOptions
from rekbatch.engine import producer as producer_module
from rekbatch.sources import S3, S3Source
from rekbatch.sources.ranges import KeyRange, KeySpace, Splitter, ranges_from_boundaries
from rekbatch.store.jobdir import ledger_path
from tests.conftest import REGION, make_bucket
from tests.helpers import fake_jpeg, read_jsonl, write_config
from tests.support.clients import aws_client
from tests.support.fake_backend import FakeBackend
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import put_objects
from tests.support.servers import ServedJob, StartFake
from tests.test_engine import assert_exactly_once, make_config

BUCKET = "listing-bucket"
ODD = ["café/photo 1+2.jpg", "ünï cödé/ß+ẞ.jpg", "x y/+plus+.jpg", "a+b/ c.jpg", "日本/写真.jpg"]


def _keys() -> list[str]:
    nested = [f"nested/{a}/{b:02d}/{c:03d}.jpg" for a in "pqr" for b in range(8) for c in range(70)]
    flat = [f"flat/img_{i:05d}.jpg" for i in range(1300)]
    odd = [f"odd/{name}".replace(".jpg", f"-{i}.jpg") for name in ODD for i in range(40)]
    return sorted(nested + flat + odd)


@pytest.fixture(scope="module")
def listing_bucket(moto_endpoint: str) -> list[str]:
    """About 3,200 keys over nested prefixes, a flat one and keys with unicode, spaces, +."""
    client = aws_client("s3", moto_endpoint)
    make_bucket(client, BUCKET)
    keys = _keys()
    put_objects(BUCKET, ((k, fake_jpeg(i)) for i, k in enumerate(keys)))
    return keys


def _in_memory(keys: list[str]) -> Any:
    """ListObjectsV2 over sorted ``keys`` (Prefix, StartAfter, MaxKeys, Delimiter)."""
    keys = sorted(keys)

    async def page(**kw: Any) -> dict[str, Any]:
        prefix, delimiter, limit = kw.get("Prefix", ""), kw.get("Delimiter"), kw["MaxKeys"]
        at = bisect.bisect_right(keys, kw["StartAfter"]) if kw.get("StartAfter") else 0
        at = max(at, bisect.bisect_left(keys, prefix))
        contents: list[dict[str, Any]] = []
        prefixes: list[str] = []
        while (
            at < len(keys) and keys[at].startswith(prefix) and len(contents) + len(prefixes) < limit
        ):
            rest = keys[at][len(prefix) :]
            if delimiter and delimiter in rest:
                sub = prefix + rest[: rest.index(delimiter) + 1]
                prefixes.append(sub)
                at = bisect.bisect_left(keys, sub + "\U0010ffff")
                continue
            contents.append({"Key": keys[at]})
            at += 1
        more = at < len(keys) and keys[at].startswith(prefix)
        return {
            "Contents": contents,
            "CommonPrefixes": [{"Prefix": p} for p in prefixes],
            "IsTruncated": more,
        }

    return page


LAYOUTS = {
    "numbered": [f"img_{i:06d}.jpg" for i in range(60_000)],
    "nested": [
        f"{a}/{b:03d}/{c}.jpg" for a in ("cats", "dogs") for b in range(40) for c in range(300)
    ],
    "one folder": [f"photos/{i}.jpg" for i in range(40_000)],
    "uuids": [uuid.UUID(int=Random(i).getrandbits(128)).hex + ".png" for i in range(40_000)],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
async def test_the_splitter_cuts_any_layout_into_even_disjoint_ranges(layout: str) -> None:
    keys = sorted(LAYOUTS[layout])
    splitter = Splitter(_in_memory(keys), "b", "", want=64, concurrency=16)
    ranges = await splitter.split()
    counts = [sum(1 for k in keys if r.holds(k)) for r in ranges]
    assert sum(counts) == len(keys)  # disjoint and complete
    assert len(ranges) >= 32
    # No hint about the layout, yet no range holds more than a few times its share (ends
    # moved to prefix ends, at most half way to the next boundary, cost a little of it).
    assert max(counts) <= 0.09 * len(keys), sorted(counts)[-4:]
    assert splitter.requests <= 120


async def test_one_page_or_less_is_one_range() -> None:
    splitter = Splitter(_in_memory([f"k{i}" for i in range(999)]), "b", "", want=64, concurrency=4)
    assert await splitter.split() == [KeyRange(None, None)]


def test_any_boundaries_cover_every_key_exactly_once() -> None:
    rng = Random(7)
    keys = ["".join(rng.choice("ab/+ é") for _ in range(rng.randint(1, 6))) for _ in range(2000)]
    cuts = [*rng.sample(keys, 30), "", "zzz", "a", "a/"]
    ranges = ranges_from_boundaries(cuts)
    for key in keys:
        assert sum(r.holds(key) for r in ranges) == 1


def test_key_space_strings_keep_their_order() -> None:
    space = KeySpace("img_", "0123456789.jpg")
    spread = space.spread("img_000000.jpg", space.value("img_2"), 20)
    assert spread == sorted(spread) and len(spread) == 19
    assert spread[0] > "img_000000.jpg" and spread[-1] < "img_2"
    assert spread[4].startswith("img_0") and spread[14].startswith("img_1")


async def _list_all(moto: str, prefix: str, concurrency: int, page_size: int) -> list[str]:
    session = aioboto3.Session(region_name=REGION)
    async with S3(session, endpoint_url=moto, pool=32) as s3:
        source = S3Source(f"s3://{BUCKET}/{prefix}", 0, s3, BUCKET, prefix)
        ranges = await source.split(concurrency)

        async def one(rng: KeyRange) -> list[str]:
            return [o.key async for o in source.list_range(rng, None, page_size)]

        parts = await asyncio.gather(*(one(r) for r in ranges))
    assert len(ranges) > 1 or concurrency == 1
    return [key for part in parts for key in part]


@pytest.mark.parametrize(("prefix", "page_size"), [("", 97), ("flat/", 50)])
async def test_parallel_listing_against_s3_lists_every_key_once(
    listing_bucket: list[str], moto_endpoint: str, prefix: str, page_size: int
) -> None:
    listed = await _list_all(moto_endpoint, prefix, 16, page_size)
    expected = [k for k in listing_bucket if k.startswith(prefix)]
    counted = Counter(listed)
    assert set(counted) == set(expected)
    assert max(counted.values()) == 1


def _ledger_ranges(out: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(ledger_path(out))
    try:
        return db.execute("SELECT idx, after, upto, watermark, done FROM source_ranges").fetchall()
    finally:
        db.close()


async def test_a_stopped_run_resumes_its_ranges_and_lists_no_finished_range_again(
    listing_bucket: list[str],
    moto_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(producer_module, "CHUNK", 50)  # memory: a chunk per lister
    uri = f"s3://{BUCKET}/nested/"
    extra = (
        f'max_images = 1000\n\n[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{moto_endpoint}"\n\n'
    )
    cfg = make_config(tmp_path, [uri], ops='[[operations]]\ntype = "detect_labels"\n', extra=extra)
    cfg = cfg.model_copy(
        update={
            "source": cfg.source.model_copy(
                update={"include": ["*.jpg"], "sniff": False, "list_concurrency": 8}
            )
        }
    )
    out = tmp_path / "out"
    outstanding: list[int] = []

    def watch(job: Job) -> asyncio.Task[None]:
        async def sample() -> None:
            while True:
                if job.writer is not None:
                    outstanding.append(sum(t.outstanding for t in job.writer.trackers.values()))
                await asyncio.sleep(0.005)

        return asyncio.create_task(sample())

    first = Job(cfg, RunOptions(output_dir=out), backend=FakeBackend(latency=0.002))
    watcher = watch(first)
    async with asyncio.timeout(60):
        outcome = await first.run()
    watcher.cancel()
    assert outcome.exit_code == 4  # stopped at the cap: resumable
    ranges = _ledger_ranges(out)
    done = {(after, upto) for _, after, upto, _, is_done in ranges if is_done}
    assert len(ranges) > 8 and 0 < len(done) < len(ranges)
    # Memory is the work in flight, not the bucket: per lister a chunk, plus the queue.
    assert max(outstanding) <= 8 * 50 + 2 * 8 + 8 + 50, max(outstanding)

    listed_ranges: list[KeyRange] = []
    original = S3Source.list_range

    def spy(self: S3Source, rng: KeyRange, start_after: str | None, page_size: int = 1000) -> Any:
        listed_ranges.append(rng)
        return original(self, rng, start_after, page_size)

    monkeypatch.setattr(S3Source, "list_range", spy)
    raised = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_images": None})})
    async with asyncio.timeout(60):
        outcome = await Job(raised, RunOptions(output_dir=out), backend=FakeBackend()).run()
    assert outcome.exit_code == 0
    assert listed_ranges and not {(r.after, r.upto) for r in listed_ranges} & done
    assert len(listed_ranges) == len(ranges) - len(done)
    nested = {k for k in listing_bucket if k.startswith("nested/")}
    assert_exactly_once(out, {(uri, k, "detect_labels") for k in nested})
    assert all(is_done for *_, is_done in _ledger_ranges(out))


@pytest.fixture
def slow_fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(latency_median_ms=5, quotas={"DetectLabels": 300})


def test_sigkill_mid_listing_then_resume_lists_only_the_rest_exactly_once(
    s3: Any, slow_fake: FakeRekognition, tmp_path: Path, served_job: ServedJob
) -> None:
    make_bucket(s3, "kill-listing")
    keys = [f"{a}/{i:04d}.jpg" for a in ("north", "south", "east", "west") for i in range(200)]
    keys += [f"flat_{i:04d}.jpg" for i in range(400)]
    put_objects("kill-listing", ((k, fake_jpeg(i)) for i, k in enumerate(keys)))
    config = served_job(
        slow_fake,
        "s3://kill-listing/",
        operations='[[operations]]\ntype = "detect_labels"\n',
        limits={"concurrency": 8, "max_tps": 300},
        # No header sniffing: listing and resume are the subject, and each sniff is one more
        # GET to moto per object in the test process.
        source={"list_concurrency": 4, "sniff": False},
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rekbatch", "run", str(config), "--log-format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        path = out / "results.jsonl"
        if path.exists() and path.stat().st_size > 150 * 300:  # a hundred rows or so
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)

    ranges = _ledger_ranges(out)
    done = sum(1 for *_, is_done in ranges if is_done)
    assert len(ranges) > 4 and done < len(ranges)

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(line) for line in resumed.stderr.splitlines() if line.startswith("{")]
    listing = next(e for e in events if e.get("event") == "listing")
    assert listing["ranges"] == len(ranges) and listing["ranges_left"] == len(ranges) - done
    rows = read_jsonl(out / "results.jsonl")
    counted = Counter(r["key"] for r in rows)
    assert set(counted) == set(keys) and max(counted.values()) == 1
    billed = slow_fake.stats()["billed"]
    assert {ident for _, ident in billed} == {f"s3://kill-listing/{k}" for k in keys}


def test_list_concurrency_is_a_config_key_that_does_not_change_the_job(tmp_path: Path) -> None:
    from rekbatch.config import load_config

    base = '[source]\nuris = ["s3://bkt/"]\n{extra}\n[[operations]]\ntype = "detect_labels"\n'
    one = load_config(write_config(tmp_path / "a.toml", base.format(extra="")), environ={})
    two = load_config(
        write_config(tmp_path / "b.toml", base.format(extra="list_concurrency = 64")), environ={}
    )
    assert one.source.list_concurrency == 16 and two.source.list_concurrency == 64
    assert one.fingerprint() == two.fingerprint()
    env = load_config(tmp_path / "a.toml", environ={"REKBATCH_SOURCE__LIST_CONCURRENCY": "4"})
    assert env.source.list_concurrency == 4


async def test_a_store_that_refuses_a_probe_is_listed_by_one_paginator() -> None:
    from botocore.exceptions import ClientError

    page = _in_memory([f"k/{i:05d}" for i in range(3000)])

    class NoDelimiter:
        async def list_page(self, **kw: Any) -> dict[str, Any]:
            if kw.get("Delimiter"):
                error = {"Error": {"Code": "NotImplemented", "Message": "no delimiter"}}
                raise ClientError(error, "ListObjectsV2")  # type: ignore[arg-type]
            return dict(await page(**kw))

    source = S3Source("s3://b/", 0, NoDelimiter(), "b", "")  # type: ignore[arg-type]
    assert await source.split(16) == [KeyRange(None, None)]


# -- keys read: each key about once ------------------------------------------------------------


class CountingPages:
    """ListObjectsV2 over sorted keys in memory, counting requests and keys returned: the S3
    client seam as ``S3Source`` sees it."""

    def __init__(self, keys: list[str]) -> None:
        self._page = _in_memory(keys)
        self.requests = 0
        self.keys_read = 0

    async def list_page(self, **kw: Any) -> dict[str, Any]:
        page = dict(await self._page(**kw))
        page["Contents"] = [{"Key": item["Key"], "Size": 10} for item in page["Contents"]]
        self.requests += 1
        self.keys_read += len(page["Contents"])
        return page


def _md5(i: int) -> str:
    return hashlib.md5(str(i).encode()).hexdigest()


SMALL_LAYOUTS = {
    # The layout the figures of issue 26 were taken on: 16 folders named by a hex digit.
    "hex folders": [f"p/{i % 16:x}/{i}.jpg" for i in range(2400)],
    "hashed folders": [f"p/{_md5(i)[:2]}/{i}.jpg" for i in range(2400)],
    "one key a folder": [f"p/{_md5(i)}/{i}.jpg" for i in range(2400)],
    "numbered": [f"img_{i:05d}.jpg" for i in range(2400)],
    "uuids": [uuid.UUID(int=Random(i).getrandbits(128)).hex + ".png" for i in range(2400)],
    "two levels": [
        f"{a}/{b:03d}/{c}.jpg" for a in ("cat", "dog") for b in range(40) for c in range(30)
    ],
    "skewed": [f"a/{i}.jpg" for i in range(2160)] + [f"b/{i:05d}/x.jpg" for i in range(240)],
}


@pytest.mark.parametrize(
    ("layout", "copies"),
    [(name, 1) for name in sorted(SMALL_LAYOUTS)] + [("hex folders", 10), ("uuids", 10)],
)
async def test_splitting_and_listing_read_each_key_about_once(layout: str, copies: int) -> None:
    base = SMALL_LAYOUTS[layout]
    keys = sorted(base if copies == 1 else [f"{n:02d}{k}" for n in range(copies) for k in base])
    pages = CountingPages(keys)
    source = S3Source("s3://b/", 0, pages, "b", "")  # type: ignore[arg-type]
    ranges = await source.split(16)

    async def one(rng: KeyRange) -> list[str]:
        return [o.key async for o in source.list_range(rng, None)]

    parts = await asyncio.gather(*(one(r) for r in ranges))
    listed = Counter(k for part in parts for k in part)
    assert set(listed) == set(keys) and max(listed.values()) == 1
    # Splitting included: at most a tenth more than the bucket.
    assert pages.keys_read <= 1.1 * len(keys), (len(ranges), pages.keys_read, len(keys))


class ListingCounter:
    """Keys and pages ListObjectsV2 returned to the run, counted at the S3 client seam."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys = 0
        self.pages = 0
        original = S3.list_page
        counter = self

        async def counting(self: S3, **kwargs: Any) -> dict[str, Any]:
            page = await original(self, **kwargs)
            counter.pages += 1
            counter.keys += len(page.get("Contents", ()))
            return page

        monkeypatch.setattr(S3, "list_page", counting)


async def test_a_plain_run_lists_each_key_about_once(
    moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    make_bucket(client, "hex-folders")
    keys = SMALL_LAYOUTS["hex folders"]
    put_objects("hex-folders", ((k, fake_jpeg(i)) for i, k in enumerate(keys)))
    extra = f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{moto_endpoint}"\n\n'
    cfg = make_config(
        tmp_path, ["s3://hex-folders/"], ops='[[operations]]\ntype = "detect_labels"\n', extra=extra
    )
    cfg = cfg.model_copy(
        update={"source": cfg.source.model_copy(update={"sniff": False, "list_concurrency": 16})}
    )
    counter = ListingCounter(monkeypatch)
    out = tmp_path / "out"
    async with asyncio.timeout(120):
        outcome = await Job(cfg, RunOptions(output_dir=out), backend=FakeBackend()).run()
    assert outcome.exit_code == 0
    assert_exactly_once(out, {("s3://hex-folders/", k, "detect_labels") for k in keys})
    # Issue 26 measured 18,701 keys (7.8 times the bucket) in 39 pages here.
    assert counter.keys <= 1.1 * len(keys), counter.keys
