"""S3: the run's one S3 client, and prefixes of buckets as sources.

``S3`` opens the client once for the whole run (listing, sniffing, downloads, references and
uploads share its connection pool). ``S3Source`` lists one ``s3://bucket/prefix`` page by
page, in key order, resuming after a watermark; pages are fetched as the consumer pulls, so
memory stays at one page whatever the size of the bucket.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC
from types import TracebackType
from typing import Any

from aiobotocore.config import AioConfig

from rekbatch.errors import setup_error_from
from rekbatch.records import ObjectRef


def _iso(value: Any) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else ""


class S3:
    """The run's S3 client, opened once and closed with the run."""

    def __init__(self, session: Any, *, endpoint_url: str | None, pool: int) -> None:
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

    async def __aenter__(self) -> S3:
        self.client = await self._stack.enter_async_context(
            self._session.client("s3", endpoint_url=self._endpoint, config=self._config)
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def check_bucket(self, bucket: str) -> None:
        """Fail early, with one clear line, when a source bucket cannot be listed."""
        try:
            await self.client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        except Exception as exc:  # translated below, or re-raised untouched
            setup = setup_error_from(exc, f"s3://{bucket}")
            if setup is None:
                raise
            raise setup from None

    async def read_head(self, bucket: str, key: str, nbytes: int) -> bytes:
        response = await self.client.get_object(
            Bucket=bucket, Key=key, Range=f"bytes=0-{nbytes - 1}"
        )
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    async def read(self, bucket: str, key: str) -> bytes:
        response = await self.client.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data


class S3Source:
    """One configured ``s3://bucket/prefix``."""

    def __init__(self, uri: str, index: int, s3: S3, bucket: str, prefix: str) -> None:
        self.uri = uri
        self.index = index
        self.bucket = bucket
        self.prefix = prefix
        self._s3 = s3

    async def list(
        self, start_after: str | None, page_size: int = 1000
    ) -> AsyncIterator[ObjectRef]:
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix,
            "PaginationConfig": {"PageSize": page_size},
        }
        if start_after:
            kwargs["StartAfter"] = start_after
        bucket, index = self.bucket, self.index
        paginator = self._s3.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(**kwargs):
            for item in page.get("Contents", ()):
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
        return await self._s3.read_head(self.bucket, obj.key, nbytes)

    async def read(self, obj: ObjectRef) -> bytes:
        return await self._s3.read(self.bucket, obj.key)
