"""Where objects come from: S3 prefixes and local folders, listed in key order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rekbatch.config import parse_s3_uri
from rekbatch.records import ObjectRef
from rekbatch.sources.local import list_local
from rekbatch.sources.s3 import list_s3


def open_listing(
    uri: str, index: int, s3: Any, start_after: str | None = None
) -> AsyncIterator[ObjectRef]:
    """The objects of one configured source, after ``start_after``, in key order."""
    parsed = parse_s3_uri(uri)
    if parsed is None:
        root = Path(uri).expanduser().resolve()
        return list_local(root, start_after=start_after, source_index=index)
    bucket, prefix = parsed
    return list_s3(s3, bucket, prefix, start_after=start_after, source_index=index)
