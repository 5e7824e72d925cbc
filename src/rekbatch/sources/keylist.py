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
resumed after the last finished key. The shards of a job divide it into runs of lines
(``LinePart``: byte offsets at line starts, found by reading a little after each cut), each
read by itself, of the very version of the list that was divided. The number of a part's
first line is counted (reading the list up to the part) only when a line of it has to be
named as malformed. An object listed more than once in one run of lines is one object; one
listed in two shards' runs is processed by both, and belongs to the shard of its first line
(a shard sees only its own run).
"""

from __future__ import annotations

import asyncio
import builtins
import csv
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
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


def _entry(line_of: Callable[[int], int], offset: int, fields: list[Any], index: int) -> ObjectRef:
    """One line's fields (uri or bucket, key, then size and ETag) as an object to list. The
    key is taken as written; spaces around the other fields are not theirs.
    ``line_of(offset)`` is its line number, asked only to name a malformed line."""
    first = fields[0].lstrip() if fields and isinstance(fields[0], str) else None
    if first is not None and first.startswith("s3://"):
        parsed = parse_s3_uri(first)
        if parsed is None or not parsed[1]:
            return _bad(line_of(offset), f"not an s3://bucket/key URI: {first!r}", index)
        (bucket, key), rest = parsed, _trimmed(fields[1:])
    elif len(fields) >= 2 and first and isinstance(fields[1], str) and fields[1]:
        bucket, key, rest = first.rstrip(), fields[1], _trimmed(fields[2:])
        if parse_s3_uri(f"s3://{bucket}") is None:
            return _bad(line_of(offset), f"not a bucket name: {bucket!r}", index)
    else:
        return _bad(line_of(offset), "expected bucket,key or an s3:// URI", index)
    size = rest[0] if rest and rest[0] not in ("", None) else None
    etag = rest[1] if len(rest) > 1 and rest[1] not in ("", None) else None
    try:
        size_value = -1 if size is None else int(size)
    except (TypeError, ValueError):
        return _bad(line_of(offset), f"size is not a number: {size!r}", index)
    if size_value < -1:
        return _bad(line_of(offset), f"size is negative: {size!r}", index)
    return ObjectRef(bucket, key, size_value, str(etag or "").strip('"'), "", None, index)


def _trimmed(fields: list[Any]) -> list[Any]:
    return [f.strip() if isinstance(f, str) else f for f in fields]


def first_line_is_one(offset: int) -> int:
    return offset + 1


def parse_lines(
    data: bytes,
    jsonl: bool,
    index: int,
    line_of: Callable[[int], int] = first_line_is_one,
    *,
    header: bool = True,
) -> Iterator[ObjectRef]:
    """Every object of a key list (or of a run of its lines: ``line_of`` numbers its lines
    from their offset in it; ``header``: whether its first line may be a header) once, in
    the order of their first lines (size -1 and/or ETag "" where not given)."""
    seen: set[tuple[str | None, str]] = set()
    for obj in _parse_lines(data, jsonl, index, line_of, header):
        if obj.skip is None:
            if (obj.bucket, obj.key) in seen:
                continue
            seen.add((obj.bucket, obj.key))
        yield obj


def _parse_lines(
    data: bytes, jsonl: bool, index: int, line_of: Callable[[int], int], header: bool
) -> Iterator[ObjectRef]:
    text = data.decode("utf-8-sig", errors="replace")
    if jsonl:
        for offset, raw in enumerate(text.splitlines()):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                yield _bad(line_of(offset), f"not a JSON object ({exc})", index)
                continue
            head = [row["uri"]] if "uri" in row else [row.get("bucket"), row.get("key")]
            yield _entry(line_of, offset, [*head, row.get("size"), row.get("etag")], index)
        return
    for offset, fields in enumerate(csv.reader(io.StringIO(text))):
        if not fields or not any(f.strip() for f in fields):
            continue
        if header and offset == 0 and fields[0].strip().lower() in ("bucket", "uri", "url"):
            continue  # a header
        yield _entry(line_of, offset, fields, index)


@dataclass(frozen=True)
class LinePart:
    """Lines of a key list: bytes ``start`` to ``end`` (exclusive, at line starts) of the
    list's version ``version`` (its ETag on S3, size and mtime locally). Kept as a range's
    ``part``, in JSON."""

    location: str
    start: int
    end: int
    version: str

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, part: str | None) -> LinePart | None:
        if not part or not part.startswith("{"):
            return None  # the whole list
        return cls(**json.loads(part))


WINDOW = 256  # bytes read after a cut to find where a line starts (doubled while none)
# Runs of lines per shard: each is resumed by itself, so a shard stopped half way through
# reads about half its lines again, not all of them.
RUNS_PER_SHARD = 4
COUNT_CHUNK = 1024 * 1024  # bytes read at a time to count the lines before a part


async def line_starts(
    size: int, parts: int, read: Callable[[int, int], Awaitable[bytes]]
) -> list[int]:
    """Byte offsets where each of about ``parts`` runs of lines of about the same size
    starts (the first at 0; fewer where lines are long or few), reading only a window after
    each cut (``read(start, end)``). (A quoted CSV field holding a line break is not kept
    whole across a cut.)"""
    starts = [0]
    for k in range(1, parts):
        at = max(size * k // parts, starts[-1] + 1) - 1
        width = WINDOW
        while at < size:
            window = await read(at, min(at + width, size))
            newline = window.find(b"\n")
            if newline >= 0:
                at += newline + 1
                break
            at += len(window)
            width *= 2
        if at >= size:
            break
        starts.append(at)
    return starts


def _local_version(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


class PartLines:
    """Numbers the lines of a part: its first line's number is counted, by reading the
    list up to the part, the first time a line of it is named (a malformed line), from the
    thread that parses it."""

    def __init__(self, part: LinePart, read: Callable[[int, int], Awaitable[bytes]]) -> None:
        self._part = part
        self._read = read
        self._loop = asyncio.get_running_loop()
        self._first: int | None = 1 if part.start == 0 else None

    async def _count(self) -> int:
        before = 0
        for start in range(0, self._part.start, COUNT_CHUNK):
            chunk = await self._read(start, min(start + COUNT_CHUNK, self._part.start))
            before += chunk.count(b"\n")
        return before + 1

    def __call__(self, offset: int) -> int:
        if self._first is None:
            self._first = asyncio.run_coroutine_threadsafe(self._count(), self._loop).result()
        return self._first + offset


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

    async def divide(
        self, shards: int, concurrency: int, own: int = 0
    ) -> builtins.list[builtins.list[KeyRange]]:
        """Runs of lines of about the same size, ``RUNS_PER_SHARD`` one after the other for
        each shard (fewer where the list has fewer lines), found by reading a little after
        each cut, not the whole list."""
        size, version = await self._size_and_version()

        async def read(start: int, end: int) -> bytes:
            return await self._read_part(LinePart(self.location, start, end, version))

        starts = await line_starts(size, shards * RUNS_PER_SHARD, read)
        runs = [
            KeyRange(None, None, LinePart(self.location, start, end, version).encode())
            for start, end in zip(starts, [*starts[1:], size], strict=True)
        ]
        cuts = [len(runs) * k // shards for k in range(shards + 1)]
        return [runs[cuts[k] : cuts[k + 1]] for k in range(shards)]

    async def _size_and_version(self) -> tuple[int, str]:
        parsed = parse_s3_uri(self.location)
        if parsed is None:
            path = Path(self.location).expanduser()
            stat = await asyncio.to_thread(path.stat)
            return stat.st_size, f"{stat.st_size}-{stat.st_mtime_ns}"
        head = await self._s3.head(*parsed)
        return int(head.get("ContentLength", 0)), str(head.get("ETag", ""))

    async def _read_part(self, part: LinePart) -> bytes:
        changed = SetupError(
            f"source.uris: {self.uri}: the key list changed after the job's shards divided it; "
            "run the job again with a new output (or remove its split.json to divide it again)"
        )
        parsed = parse_s3_uri(part.location)
        if parsed is None:
            path = Path(part.location).expanduser()
            if await asyncio.to_thread(_local_version, path) != part.version:
                raise changed

            def read() -> bytes:
                with path.open("rb") as handle:
                    handle.seek(part.start)
                    return handle.read(part.end - part.start)

            return await asyncio.to_thread(read)
        try:
            return await self._s3.read_part(*parsed, part.start, part.end, part.version)
        except Exception as exc:
            error = failure_of(exc)
            if error is not None and error.code in ("412", "PreconditionFailed"):
                raise changed from None
            raise

    def list(self, start_after: str | None) -> AsyncIterator[ObjectRef]:
        return self.list_range(KeyRange(None, None, self.location), start_after)

    async def list_range(self, rng: KeyRange, start_after: str | None) -> AsyncIterator[ObjectRef]:
        part = LinePart.decode(rng.part)
        try:
            if part is None:
                data = await read_location(self.location, self._s3)
            else:
                data = await self._read_part(part)
        except OSError as exc:
            raise SetupError(f"source.uris: {self.uri}: {exc}") from None
        index, jsonl = self.index, self.jsonl
        line_of: Callable[[int], int] = first_line_is_one
        header = True
        if part is not None:
            version, location = part.version, part.location

            async def read(start: int, end: int) -> bytes:
                return await self._read_part(LinePart(location, start, end, version))

            line_of, header = PartLines(part, read), part.start == 0
        self._lines = max(1, data.count(b"\n") + (0 if data.endswith(b"\n") else 1))
        pending: builtins.list[ObjectRef] = []

        def rows() -> Iterator[ObjectRef]:
            return parse_lines(data, jsonl, index, line_of, header=header)

        async for obj in after_mark(rows, start_after):
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
