"""A key list as a source: ``keys:s3://bucket/list.csv`` or ``keys:/path/list.jsonl``.

Each line names one S3 object. A list whose name ends ``.jsonl``, ``.ndjson`` or ``.json``
is JSON Lines: ``{"bucket": ..., "key": ..., "size": ..., "etag": ...}`` or
``{"uri": "s3://...", ...}``. Any other list is CSV (RFC 4180, UTF-8, a BOM allowed):
``bucket,key[,size[,etag]]`` or ``s3://bucket/key[,size[,etag]]``, so a plain list of
``s3://`` URIs, one a line, is CSV too; a header line starting ``bucket`` or ``uri`` is
allowed. Keys are taken exactly as written, spaces included, quoted or not (a key holding a
comma or a quote is quoted, CSV-style); only the bucket, size and ETag fields are trimmed.

Size and ETag are optional: where one is missing, a HeadObject fills it in, for those lines
only. An object listed more than once is one object (its first line). A line that names no
object is handed out as a skip (``malformed_entry``, the line number as its key), an object
that does not exist as ``not_found``: recorded, never a crash. The list is one part,
resumed after the last finished key.
"""

from __future__ import annotations

import asyncio
import builtins
import csv
import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from rekbatch.calls.classify import failure_of
from rekbatch.config import parse_s3_uri
from rekbatch.errors import SetupError
from rekbatch.records import ObjectRef
from rekbatch.sources.inventory import after_mark, read_location
from rekbatch.sources.ranges import KeyRange
from rekbatch.sources.s3 import S3, _iso

HEADS = 16  # HeadObject calls at once for lines without size or ETag


def _bad(line: int, why: str, index: int) -> ObjectRef:
    return ObjectRef(None, f"line:{line}", 0, "", "", None, index, "malformed_entry", why)


def _entry(line: int, fields: list[Any], index: int) -> ObjectRef:
    """One line's fields (uri or bucket, key, then size and ETag) as an object to list. The
    key is taken as written; spaces around the other fields are not theirs."""
    first = fields[0].lstrip() if fields and isinstance(fields[0], str) else None
    if first is not None and first.startswith("s3://"):
        parsed = parse_s3_uri(first)
        if parsed is None or not parsed[1]:
            return _bad(line, f"not an s3://bucket/key URI: {first!r}", index)
        (bucket, key), rest = parsed, _trimmed(fields[1:])
    elif len(fields) >= 2 and first and isinstance(fields[1], str) and fields[1]:
        bucket, key, rest = first.rstrip(), fields[1], _trimmed(fields[2:])
        if parse_s3_uri(f"s3://{bucket}") is None:
            return _bad(line, f"not a bucket name: {bucket!r}", index)
    else:
        return _bad(line, "expected bucket,key or an s3:// URI", index)
    size = rest[0] if rest and rest[0] not in ("", None) else None
    etag = rest[1] if len(rest) > 1 and rest[1] not in ("", None) else None
    try:
        size_value = -1 if size is None else int(size)
    except (TypeError, ValueError):
        return _bad(line, f"size is not a number: {size!r}", index)
    if size_value < -1:
        return _bad(line, f"size is negative: {size!r}", index)
    return ObjectRef(bucket, key, size_value, str(etag or "").strip('"'), "", None, index)


def _trimmed(fields: list[Any]) -> list[Any]:
    return [f.strip() if isinstance(f, str) else f for f in fields]


def parse_lines(data: bytes, jsonl: bool, index: int) -> Iterator[ObjectRef]:
    """Every object of a key list once, in the order of their first lines (size -1 and/or
    ETag "" where not given)."""
    seen: set[tuple[str | None, str]] = set()
    for obj in _parse_lines(data, jsonl, index):
        if obj.skip is None:
            if (obj.bucket, obj.key) in seen:
                continue
            seen.add((obj.bucket, obj.key))
        yield obj


def _parse_lines(data: bytes, jsonl: bool, index: int) -> Iterator[ObjectRef]:
    text = data.decode("utf-8-sig", errors="replace")
    if jsonl:
        for number, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                yield _bad(number, f"not a JSON object ({exc})", index)
                continue
            head = [row["uri"]] if "uri" in row else [row.get("bucket"), row.get("key")]
            yield _entry(number, [*head, row.get("size"), row.get("etag")], index)
        return
    for number, fields in enumerate(csv.reader(io.StringIO(text)), 1):
        if not fields or not any(f.strip() for f in fields):
            continue
        if number == 1 and fields[0].strip().lower() in ("bucket", "uri", "url"):
            continue  # a header
        yield _entry(number, fields, index)


class KeyListSource:
    """One configured ``keys:...`` list."""

    def __init__(self, uri: str, index: int, s3: S3) -> None:
        self.uri = uri
        self.index = index
        self.location = uri[len("keys:") :]
        self.jsonl = self.location.lower().endswith((".jsonl", ".ndjson", ".json"))
        self._s3 = s3
        self.heads = 0  # HeadObject calls made
        self._lines: int | None = None
        self._read = 0

    async def check(self) -> None:
        if parse_s3_uri(self.location) is None:
            from pathlib import Path

            if not Path(self.location).expanduser().is_file():
                raise SetupError(f"source.uris: {self.uri}: no such key list file")

    async def split(self, concurrency: int) -> builtins.list[KeyRange]:
        return [KeyRange(None, None, self.location)]

    def list(self, start_after: str | None) -> AsyncIterator[ObjectRef]:
        return self.list_range(KeyRange(None, None, self.location), start_after)

    async def list_range(self, rng: KeyRange, start_after: str | None) -> AsyncIterator[ObjectRef]:
        try:
            data = await read_location(self.location, self._s3)
        except OSError as exc:
            raise SetupError(f"source.uris: {self.uri}: {exc}") from None
        index, jsonl = self.index, self.jsonl
        self._lines = max(1, data.count(b"\n") + (0 if data.endswith(b"\n") else 1))
        pending: builtins.list[ObjectRef] = []
        async for obj in after_mark(lambda: parse_lines(data, jsonl, index), start_after):
            self._read += 1
            pending.append(obj)
            if len(pending) >= 500:
                for done in await self._complete(pending):
                    yield done
                pending = []
        for done in await self._complete(pending):
            yield done

    def progress(self) -> tuple[int, int] | None:
        """(entries read, lines in the list), once the list is read."""
        if self._lines is None:
            return None
        return self._read, max(self._lines, self._read)

    async def _complete(self, objs: builtins.list[ObjectRef]) -> builtins.list[ObjectRef]:
        """``objs`` with missing sizes and ETags filled in by HeadObject."""
        sem = asyncio.Semaphore(HEADS)

        async def one(obj: ObjectRef) -> ObjectRef:
            if obj.skip is not None or (obj.size >= 0 and obj.etag):
                return obj
            assert obj.bucket is not None
            async with sem:
                self.heads += 1
                try:
                    head = await self._s3.head(obj.bucket, obj.key)
                except Exception as exc:
                    error = failure_of(exc)
                    if error is not None and error.code in ("404", "NoSuchKey", "NotFound"):
                        return ObjectRef(
                            obj.bucket,
                            obj.key,
                            0,
                            "",
                            "",
                            None,
                            obj.source_index,
                            "not_found",
                            f"s3://{obj.bucket}/{obj.key} does not exist",
                        )
                    raise
            return ObjectRef(
                obj.bucket,
                obj.key,
                obj.size if obj.size >= 0 else int(head.get("ContentLength", 0)),
                obj.etag or str(head.get("ETag", "")).strip('"'),
                _iso(head.get("LastModified")),
                None,
                obj.source_index,
            )

        return list(await asyncio.gather(*(one(o) for o in objs)))

    async def read_head(self, obj: ObjectRef, nbytes: int) -> bytes:
        assert obj.bucket is not None
        return await self._s3.read_head(obj.bucket, obj.key, nbytes, etag=obj.etag)

    async def read(self, obj: ObjectRef) -> bytes:
        assert obj.bucket is not None
        return await self._s3.read(obj.bucket, obj.key, size=obj.size, etag=obj.etag)
