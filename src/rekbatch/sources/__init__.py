"""Where objects come from: S3 prefixes, S3 Inventory reports, key lists, local folders (or
single files) and SQS queues of S3 event notifications."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from rekbatch.config import parse_s3_uri
from rekbatch.sources.base import ObjectChanged, Source
from rekbatch.sources.inventory import InventorySource
from rekbatch.sources.keylist import KeyListSource
from rekbatch.sources.local import LocalSource
from rekbatch.sources.s3 import S3, S3Source
from rekbatch.sources.sqs import SqsSource, is_queue_uri

__all__ = [
    "S3",
    "InventorySource",
    "KeyListSource",
    "LocalSource",
    "ObjectChanged",
    "S3Source",
    "Source",
    "SqsSource",
    "check_sources",
    "open_source",
    "read_location",
]


def open_source(uri: str, index: int, s3: S3 | None, *, follow_symlinks: bool = False) -> Source:
    """The source a configured URI stands for."""
    if is_queue_uri(uri):
        return SqsSource(uri, index, s3)
    if uri.startswith(("inventory:", "keys:")):
        if s3 is None:
            raise ValueError(f"{uri}: this source needs the run's S3 client")
        if uri.startswith("inventory:"):
            return InventorySource(uri, index, s3)
        return KeyListSource(uri, index, s3)
    parsed = parse_s3_uri(uri)
    if parsed is None:
        return LocalSource(uri, index, follow_symlinks=follow_symlinks)
    if s3 is None:
        raise ValueError(f"{uri}: an S3 source needs the run's S3 client")
    return S3Source(uri, index, s3, *parsed)


async def check_sources(sources: Sequence[Source], s3: S3 | None) -> None:
    """Fail early, with one clear line, when a source cannot be read: a missing folder, an
    unreadable manifest or key list, a bucket that cannot be listed."""
    for source in sources:
        if isinstance(source, LocalSource):
            await asyncio.to_thread(source.check)
        elif isinstance(source, InventorySource | KeyListSource):
            await source.check()
    if s3 is not None:
        for bucket in sorted({s.bucket for s in sources if isinstance(s, S3Source)}):
            await s3.check_bucket(bucket)


async def read_location(location: str, s3: S3 | None) -> bytes:
    """The bytes of an ``s3://bucket/key`` or a local path (a reference image)."""
    parsed = parse_s3_uri(location)
    if parsed is None:
        return await asyncio.to_thread(Path(location).expanduser().read_bytes)
    if s3 is None:
        raise ValueError(f"{location}: reading S3 needs the run's S3 client")
    return await s3.read(*parsed)
