"""S3: the run's one S3 client, and prefixes of buckets as sources.

``S3`` opens the client once for the whole run (listing, sniffing, downloads, references and
uploads share its connection pool). Every request goes through ``S3.call``: a failure of the
connection itself is retried (after botocore's own retries) for as long as S3 is not down
(``Reachability``), so a network problem that lasts seconds costs no object. ``S3Source``
lists one ``s3://bucket/prefix`` page by page, in key order, resuming after a watermark;
pages are fetched as the consumer pulls, so memory stays at one page whatever the size of
the bucket. It splits itself into disjoint key ranges (``sources/ranges.py``) so that
several paginators list it at once; each range is listed by prefixes that end inside it,
so that a key is read about once whatever the number of ranges.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

import structlog
from aiobotocore.config import AioConfig
from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

from rekbatch.calls.classify import failure_of
from rekbatch.calls.retry import Reachability, RetryPolicy, while_reachable
from rekbatch.clock import MONOTONIC, Clock
from rekbatch.errors import setup_error_from
from rekbatch.records import ObjectRef
from rekbatch.sources.base import ObjectChanged
from rekbatch.sources.ranges import (
    Head,
    KeyRange,
    Splitter,
    estimate_keys,
    list_keys,
    ranges_from_boundaries,
)

T = TypeVar("T")
log = structlog.get_logger("rekbatch")

# The splitter's first page when a job is divided among shards: only the shard that splits
# can hand it out, so it stays within that shard's share of a small bucket.
SHARD_SAMPLE = 500


def fast_timestamp(value: Any) -> Any:
    """botocore's timestamp parser, with ISO 8601 read by ``datetime.fromisoformat``: the
    default (dateutil) took two thirds of the client's time listing pages of 1,000 keys."""
    if isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    return DEFAULT_TIMESTAMP_PARSER(value)


def use_fast_timestamps(session: Any) -> None:
    """Make the clients ``session`` creates from now on parse timestamps fast."""
    core = getattr(session, "_session", None)
    get = getattr(core, "get_component", None)
    if callable(get):
        get("response_parser_factory").set_parser_defaults(timestamp_parser=fast_timestamp)


def _iso(value: Any) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else ""


class S3:
    """The run's S3 client, opened once and closed with the run."""

    def __init__(
        self,
        session: Any,
        *,
        endpoint_url: str | None,
        pool: int,
        unreachable_seconds: float = 120.0,
        clock: Clock = MONOTONIC,
    ) -> None:
        self._session = session
        self._endpoint = endpoint_url
        self._config = AioConfig(
            max_pool_connections=pool,
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=60,
        )
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None
        self.reach = Reachability(
            "the S3 endpoint",
            unreachable_seconds,
            clock,
            ways_out="check the network, aws.region or aws.s3_endpoint_url, and the credentials",
        )
        self.reach_clock = clock
        self._retry = RetryPolicy()
        self._rng = random.Random()

    async def __aenter__(self) -> S3:
        use_fast_timestamps(self._session)
        self.client = await self._stack.enter_async_context(
            self._session.client("s3", endpoint_url=self._endpoint, config=self._config)
        )
        self.reach.name = f"the S3 endpoint {self.client.meta.endpoint_url}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def call(self, request: Callable[[], Awaitable[T]]) -> T:
        """``request()``, again after a failure of the connection until S3 is down
        (everything asked of it here is free to repeat)."""
        return await while_reachable(request, self.reach, self.reach_clock, self._retry, self._rng)

    async def check_bucket(self, bucket: str) -> None:
        """Fail early, with one clear line, when a source bucket cannot be listed."""
        try:
            await self.client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        except Exception as exc:  # translated below, or re-raised untouched
            setup = setup_error_from(exc, f"s3://{bucket}")
            if setup is None:
                raise
            raise setup from None

    async def bucket_region(self, bucket: str) -> str | None:
        """The region ``bucket`` lives in (GetBucketLocation, else HeadBucket's
        ``x-amz-bucket-region`` header); None when neither says."""
        try:
            answer = await self.call(lambda: self.client.get_bucket_location(Bucket=bucket))
            # An empty constraint is us-east-1; "EU" is the old name of eu-west-1.
            constraint = answer.get("LocationConstraint") or "us-east-1"
            return "eu-west-1" if constraint == "EU" else str(constraint)
        except Exception as exc:
            if failure_of(exc) is None:
                raise
        try:
            head = await self.call(lambda: self.client.head_bucket(Bucket=bucket))
        except Exception as exc:
            if failure_of(exc) is None:
                raise
            return None
        headers = head.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        region = headers.get("x-amz-bucket-region") or head.get("BucketRegion")
        return str(region) if region else None

    async def _get(self, **kwargs: Any) -> bytes:
        response = await self.client.get_object(**kwargs)
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    async def read_head(
        self, bucket: str, key: str, nbytes: int, *, etag: str | None = None
    ) -> bytes:
        """The first ``nbytes``; with ``etag``, of that version only (else ``ObjectChanged``)."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes=0-{nbytes - 1}"}
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'
        return await self.call(lambda: self._get_checked(kwargs, None, etag))

    async def read(
        self, bucket: str, key: str, *, size: int | None = None, etag: str | None = None
    ) -> bytes:
        """The object; with ``size`` (and ``etag``) as listed: no more than that is read, and
        an object of another size or ETag is ``ObjectChanged``."""
        if size is None:
            return await self.call(lambda: self._get(Bucket=bucket, Key=key))
        # One byte past the listed size: an object that grew shows it without being read.
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes=0-{size}"}
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'
        return await self.call(lambda: self._get_checked(kwargs, size, etag))

    async def _get_checked(
        self, kwargs: dict[str, Any], size: int | None, etag: str | None
    ) -> bytes:
        where = f"s3://{kwargs['Bucket']}/{kwargs['Key']}"
        try:
            response = await self.client.get_object(**kwargs)
        except Exception as exc:
            classified = failure_of(exc)
            if classified is not None and classified.code in _CHANGED_CODES:
                raise ObjectChanged(
                    f"{where} changed since it was listed ({classified.code})"
                ) from None
            raise
        found = str(response.get("ETag", "")).strip('"')
        if etag and found and found != etag:
            raise ObjectChanged(f"{where} changed since it was listed (ETag {etag}, now {found})")
        limit = None if size is None else size + 1
        stream = response["Body"]
        async with stream:  # closes the connection when the body is not read to its end
            data = await _read_at_most(stream, limit)
        if size is not None:
            total = _total_size(response)
            if len(data) != size or (total is not None and total != size):
                now = total if total is not None else len(data)
                raise ObjectChanged(
                    f"{where} changed since it was listed ({size:,} bytes, now {now:,})"
                )
        return data

    async def read_part(self, bucket: str, key: str, start: int, end: int, etag: str) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the version ``etag`` of an object; S3
        refuses (412) when the object has changed since."""
        if end <= start:
            return b""
        span = f"bytes={start}-{end - 1}"
        return await self.call(lambda: self._get(Bucket=bucket, Key=key, Range=span, IfMatch=etag))

    async def head(self, bucket: str, key: str) -> dict[str, Any]:
        response: dict[str, Any] = await self.call(
            lambda: self.client.head_object(Bucket=bucket, Key=key)
        )
        return response

    async def list_page(self, **kwargs: Any) -> dict[str, Any]:
        page: dict[str, Any] = await self.call(lambda: self.client.list_objects_v2(**kwargs))
        return page


# A read on a listed object's ETag fails with these when the object is another now.
_CHANGED_CODES = frozenset({"PreconditionFailed", "412", "InvalidRange", "416"})


async def _read_at_most(body: Any, limit: int | None) -> bytes:
    """The body, but never more than ``limit`` bytes of it (a server may ignore Range)."""
    if limit is None:
        data: bytes = await body.read()
        return data
    parts: list[bytes] = []
    got = 0
    while got < limit:
        part: bytes = await body.read(min(1 << 20, limit - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _total_size(response: dict[str, Any]) -> int | None:
    """The object's whole size from a ranged answer's Content-Range (``bytes 0-9/1234``)."""
    content_range = str(response.get("ContentRange") or "")
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else None


async def buckets_elsewhere(s3: S3, buckets: list[str], region: str) -> dict[str, str]:
    """The buckets among ``buckets`` that live outside ``region``, with their region (a
    bucket whose region cannot be found is taken to be in ``region``)."""
    found: dict[str, str] = {}
    for bucket in sorted(set(buckets)):
        where = await s3.bucket_region(bucket)
        if where is not None and where != region:
            found[bucket] = where
    return found


def region_error(bucket: str, where: str, region: str) -> str:
    """The one line for ``image_mode = "s3"`` with a bucket outside Rekognition's region."""
    return (
        f"aws.image_mode: bucket {bucket} is in {where} but Rekognition is called in {region}; "
        f'set aws.image_mode = "auto" to send its images as bytes, or aws.region = "{where}"'
    )


class S3Source:
    """One configured ``s3://bucket/prefix``."""

    def __init__(self, uri: str, index: int, s3: S3, bucket: str, prefix: str) -> None:
        self.uri = uri
        self.index = index
        self.bucket = bucket
        self.prefix = prefix
        self._s3 = s3
        self._head: Head | None = None  # the splitter's first page, handed out, not re-read

    async def split(self, concurrency: int) -> list[KeyRange]:
        if concurrency <= 1:
            return [KeyRange(None, None)]
        # Twice as many ranges as paginators: one that finishes early takes the next range.
        return await self._split(concurrency * 2, concurrency, 1000)

    async def divide(self, shards: int, concurrency: int, own: int = 0) -> list[list[KeyRange]]:
        """Key ranges for ``shards`` shards, each about as many as a run splits itself into.
        The splitter's first page is known here only: the ranges it holds go to this shard
        (``own``), which hands them out without listing them again; the rest go in key
        order to the shard least loaded so far (``estimate_keys``)."""
        ranges = await self._split(shards * max(2, concurrency * 2), concurrency, SHARD_SAMPLE)
        head = self._head
        if head is None or not head.items:
            return [ranges] + [[] for _ in range(shards - 1)]
        keys = [str(item["Key"]) for item in head.items]
        if not head.truncated:
            # A prefix of one page: its keys are known, cut them evenly.
            ends = (len(keys) * k // shards for k in range(1, shards))
            cut = ranges_from_boundaries(keys[end - 1] for end in ends if end > 0)
            return [cut[k : k + 1] for k in range(shards)]
        loads = [0.0] * shards
        parts: list[list[KeyRange]] = [[] for _ in range(shards)]
        for rng, estimate in zip(ranges, estimate_keys(ranges, keys), strict=True):
            read = rng.upto is not None and rng.upto <= keys[-1]  # all its keys in the page
            chosen = own if read else min(range(shards), key=lambda k: (loads[k], k))
            parts[chosen].append(rng)
            loads[chosen] += estimate
        return parts

    async def _split(self, want: int, concurrency: int, sample: int) -> list[KeyRange]:
        splitter = Splitter(
            self._s3.list_page,
            self.bucket,
            self.prefix,
            want=want,
            concurrency=concurrency,
            sample=sample,
        )
        try:
            ranges = await splitter.split()
            self._head = splitter.head
            return ranges
        except Exception as exc:
            if failure_of(exc) is None:
                raise
            # An S3-compatible store that refuses a probe (a Delimiter, say) is listed by
            # one paginator: slower, and still every key once.
            log.warning("split_failed", source=self.uri, error=str(exc), hint="one paginator")
            return [KeyRange(None, None)]

    def list(self, start_after: str | None, page_size: int = 1000) -> AsyncIterator[ObjectRef]:
        return self.list_range(KeyRange(None, None), start_after, page_size)

    async def list_range(
        self, rng: KeyRange, start_after: str | None, page_size: int = 1000
    ) -> AsyncIterator[ObjectRef]:
        bucket, index = self.bucket, self.index
        items = list_keys(
            self._s3.list_page,
            bucket,
            self.prefix,
            rng,
            start_after,
            page_size=page_size,
            head=self._head,
        )
        async for item in items:
            key = item["Key"]
            size = int(item.get("Size", 0))
            if size == 0 and key.endswith("/"):
                continue  # a "folder" placeholder, not an object anyone uploaded as data
            yield ObjectRef(
                bucket,
                key,
                size,
                str(item.get("ETag", "")).strip('"'),
                _iso(item.get("LastModified")),
                None,
                index,
            )

    async def read_head(self, obj: ObjectRef, nbytes: int) -> bytes:
        return await self._s3.read_head(self.bucket, obj.key, nbytes, etag=obj.etag)

    async def read(self, obj: ObjectRef) -> bytes:
        return await self._s3.read(self.bucket, obj.key, size=obj.size, etag=obj.etag)
