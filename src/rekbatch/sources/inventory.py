"""An S3 Inventory report as a source: ``inventory:s3://bucket/path/manifest.json``.

The manifest names the report's data files (``files[].key`` in ``destinationBucket``), their
format (``fileFormat``: CSV gzip, Parquet or ORC) and, for CSV, the columns (``fileSchema``).
Each data file is one part of the source, listed by its own lister and resumed by its own
watermark (the last finished key of that file). Rows are parsed a batch at a time in a
worker thread, so a data file of millions of rows does not hold up the event loop, and only
the current version of each object is handed out: delete markers and older versions are
left out. Keys in CSV reports are URL-encoded; Parquet and ORC hold them as they are.
"""

from __future__ import annotations

import asyncio
import builtins
import csv
import gzip
import io
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

from rekbatch.config import parse_s3_uri
from rekbatch.errors import SetupError
from rekbatch.records import ObjectRef
from rekbatch.sources.ranges import KeyRange
from rekbatch.sources.s3 import S3

BATCH = 5000
# CSV fileSchema names -> the Parquet/ORC column names.
COLUMNS = {
    "Bucket": "bucket",
    "Key": "key",
    "VersionId": "version_id",
    "IsLatest": "is_latest",
    "IsDeleteMarker": "is_delete_marker",
    "Size": "size",
    "LastModifiedDate": "last_modified_date",
    "ETag": "e_tag",
}


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=UTC)
        return stamp.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value or "")


def _false(value: Any) -> bool:
    return value is False or str(value).lower() == "false"


def _true(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


class RowCount:
    """Rows read, for the listing's progress (a plain counter shared with parse threads)."""

    def __init__(self) -> None:
        self.rows = 0


def current_objects(
    rows: Iterator[dict[str, Any]], index: int, count: RowCount | None = None
) -> Iterator[ObjectRef]:
    """The objects of inventory rows (by Parquet column names) that are current versions."""
    for row in rows:
        if count is not None:
            count.rows += 1
        if _true(row.get("is_delete_marker")) or _false(row.get("is_latest", True)):
            continue
        size = row.get("size")
        yield ObjectRef(
            str(row["bucket"]),
            str(row["key"]),
            int(size) if size not in (None, "") else 0,
            str(row.get("e_tag") or "").strip('"'),
            _iso(row.get("last_modified_date")),
            None,
            index,
        )


def csv_rows(data: bytes, schema: str) -> Iterator[dict[str, Any]]:
    names = [COLUMNS.get(name.strip(), name.strip()) for name in schema.split(",")]
    text = io.TextIOWrapper(gzip.GzipFile(fileobj=io.BytesIO(data)), encoding="utf-8")
    for fields in csv.reader(text):
        if not fields:
            continue
        row: dict[str, Any] = dict(zip(names, fields, strict=False))
        row["key"] = unquote_plus(row.get("key", ""))
        yield row


def columnar_rows(data: bytes, kind: str) -> Iterator[dict[str, Any]]:
    """Rows of a Parquet or ORC data file (pyarrow, the ``parquet`` extra)."""
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - depends on the installation
        raise SetupError(
            f"reading {kind} inventory reports needs pyarrow: pip install 'rekbatch[parquet]'"
        ) from None
    batches: Iterator[Any]
    if kind == "Parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=BATCH)
    else:
        import pyarrow.orc as orc

        batches = iter(orc.ORCFile(pa.BufferReader(data)).read().to_batches(BATCH))
    for batch in batches:
        yield from batch.to_pylist()


async def read_location(location: str, s3: S3 | None) -> bytes:
    from pathlib import Path

    parsed = parse_s3_uri(location)
    if parsed is None:
        return await asyncio.to_thread(Path(location).expanduser().read_bytes)
    if s3 is None:
        raise SetupError(f"{location}: reading S3 needs the run's S3 client")
    return await s3.read(*parsed)


async def stream_batches(rows: Iterator[ObjectRef]) -> AsyncIterator[builtins.list[ObjectRef]]:
    """``rows`` advanced in a worker thread, a batch at a time."""

    def take() -> builtins.list[ObjectRef]:
        return [row for _, row in zip(range(BATCH), rows, strict=False)]

    while batch := await asyncio.to_thread(take):
        yield batch


async def after_mark(make_rows: Any, start_after: str | None) -> AsyncIterator[ObjectRef]:
    """The objects of ``make_rows()`` after the one whose key is ``start_after``; all of
    them when that key is not there (the ledger then finds the finished ones)."""
    skipping = start_after is not None
    async for batch in stream_batches(make_rows()):
        for obj in batch:
            if skipping:
                skipping = obj.key != start_after
                continue
            yield obj
    if skipping:
        async for batch in stream_batches(make_rows()):
            for obj in batch:
                yield obj


def _data_location(bucket: str, key: Any) -> str:
    """A data file's ``s3://`` URI. Never anything else: a bucket that is not a bucket name
    would make the location a local path, read from this machine's disk."""
    location = f"s3://{bucket}/{key}"
    parsed = parse_s3_uri(location)
    if not isinstance(key, str) or parsed is None or not parsed[1]:
        raise ValueError(
            f"destinationBucket {bucket!r} and files[].key {key!r} do not name an S3 object"
        )
    return location


class InventorySource:
    """One configured ``inventory:s3://bucket/.../manifest.json``."""

    def __init__(self, uri: str, index: int, s3: S3) -> None:
        self.uri = uri
        self.index = index
        self.manifest_uri = uri[len("inventory:") :]
        self._s3 = s3
        self._manifest: dict[str, Any] | None = None
        self.total_bytes = 0
        self.count = RowCount()
        self._finished_rows = 0
        self._finished_bytes = 0

    async def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            raw = await read_location(self.manifest_uri, self._s3)
            try:
                manifest = json.loads(raw)
                files = manifest["files"]
                kind = manifest.get("fileFormat", "CSV")
                if kind not in ("CSV", "Parquet", "ORC"):
                    raise ValueError(f"fileFormat {kind!r} is not CSV, Parquet or ORC")
                if kind == "CSV" and "fileSchema" not in manifest:
                    raise ValueError("a CSV report without fileSchema")
                if not all(isinstance(f, dict) and "key" in f for f in files):
                    raise ValueError("files[] without key")
                bucket = self._data_bucket(manifest)
                for file in files:
                    _data_location(bucket, file["key"])
            except (ValueError, KeyError, TypeError) as exc:
                raise SetupError(
                    f"source.uris: {self.uri} is not an S3 Inventory manifest ({exc})"
                ) from None
            self.total_bytes = sum(int(f.get("size", 0)) for f in files)
            self._manifest = manifest
        return self._manifest

    async def check(self) -> None:
        try:
            await self.manifest()
        except SetupError:
            raise
        except Exception as exc:
            raise SetupError(f"source.uris: {self.uri}: cannot read the manifest ({exc})") from None

    def _data_bucket(self, manifest: dict[str, Any]) -> str:
        dest = str(manifest.get("destinationBucket") or "")
        if dest.startswith("arn:aws:s3:::"):
            return dest[len("arn:aws:s3:::") :]
        parsed = parse_s3_uri(self.manifest_uri)
        return dest or (parsed[0] if parsed else "")

    async def split(self, concurrency: int) -> builtins.list[KeyRange]:
        manifest = await self.manifest()
        bucket = self._data_bucket(manifest)
        return [KeyRange(None, None, _data_location(bucket, f["key"])) for f in manifest["files"]]

    async def divide(
        self, shards: int, concurrency: int, own: int = 0
    ) -> builtins.list[builtins.list[KeyRange]]:
        """The data files dealt out to ``shards`` shards, each next to the lightest so far
        by size, largest first; each shard's in the manifest's order."""
        manifest = await self.manifest()
        files = await self.split(concurrency)
        sizes = [int(f.get("size", 0)) for f in manifest["files"]]
        loads = [0] * shards
        chosen: builtins.list[builtins.list[int]] = [[] for _ in range(shards)]
        for i in sorted(range(len(files)), key=lambda i: -sizes[i]):
            lightest = min(range(shards), key=lambda k: (loads[k], k))
            chosen[lightest].append(i)
            loads[lightest] += max(sizes[i], 1)
        return [[files[i] for i in sorted(part)] for part in chosen]

    def list(self, start_after: str | None) -> AsyncIterator[ObjectRef]:
        return self._all(start_after)

    async def _all(self, start_after: str | None) -> AsyncIterator[ObjectRef]:
        for rng in await self.split(1):
            async for obj in self.list_range(rng, None):
                yield obj

    async def list_range(self, rng: KeyRange, start_after: str | None) -> AsyncIterator[ObjectRef]:
        manifest = await self.manifest()
        assert rng.part is not None, "an inventory's ranges are its data files"
        parsed = parse_s3_uri(rng.part)
        if parsed is None or not parsed[1]:  # a range saved by a run before this check
            raise SetupError(f"source.uris: {self.uri}: data file {rng.part!r} is not on S3")
        data = await self._s3.read(*parsed)
        kind = str(manifest.get("fileFormat", "CSV"))
        schema = str(manifest.get("fileSchema", ""))
        index = self.index

        count = RowCount()
        before = self.count.rows

        def make_rows() -> Iterator[ObjectRef]:
            count.rows = 0
            rows = csv_rows(data, schema) if kind == "CSV" else columnar_rows(data, kind)
            return current_objects(rows, index, self.count)

        async for obj in after_mark(make_rows, start_after):
            yield obj
        self._finished_rows += self.count.rows - before
        self._finished_bytes += len(data)

    def progress(self) -> tuple[int, int] | None:
        """(rows read, rows expected): the rows of the data files read so far, extrapolated
        to all by their sizes; None until one file is read."""
        if not self._finished_bytes or not self.total_bytes:
            return None
        expected = round(self._finished_rows / self._finished_bytes * self.total_bytes)
        return self.count.rows, max(expected, self.count.rows)

    async def read_head(self, obj: ObjectRef, nbytes: int) -> bytes:
        assert obj.bucket is not None
        return await self._s3.read_head(obj.bucket, obj.key, nbytes, etag=obj.etag)

    async def read(self, obj: ObjectRef) -> bytes:
        assert obj.bucket is not None
        return await self._s3.read(obj.bucket, obj.key, size=obj.size, etag=obj.etag)
