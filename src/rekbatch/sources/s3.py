"""List S3 objects page by page, in key order, resuming after a watermark."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

from rekbatch.records import ObjectRef


def _iso(value: Any) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else ""


async def list_s3(
    s3: Any,
    bucket: str,
    prefix: str,
    *,
    start_after: str | None = None,
    source_index: int = 0,
    page_size: int = 1000,
    on_page: Any = None,
) -> AsyncIterator[ObjectRef]:
    """Yield the objects under ``bucket/prefix`` in S3's key order (UTF-8 binary), after
    ``start_after`` when given. Pages are fetched as the consumer pulls, so memory stays
    at one page whatever the size of the bucket."""
    kwargs: dict[str, Any] = {
        "Bucket": bucket,
        "Prefix": prefix,
        "PaginationConfig": {"PageSize": page_size},
    }
    if start_after:
        kwargs["StartAfter"] = start_after
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(**kwargs):
        contents = page.get("Contents", [])
        if on_page is not None:
            on_page(len(contents))
        for item in contents:
            key = item["Key"]
            if key.endswith("/") and item.get("Size", 0) == 0:
                continue  # a "folder" placeholder, not an object anyone uploaded as data
            yield ObjectRef(
                bucket=bucket,
                key=key,
                size=int(item.get("Size", 0)),
                etag=str(item.get("ETag", "")).strip('"'),
                last_modified=_iso(item.get("LastModified")),
                source_index=source_index,
            )
