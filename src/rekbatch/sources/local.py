"""List the files of a local folder as objects, in the same order S3 lists keys."""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

from rekbatch.records import ObjectRef
from rekbatch.sources.ranges import KeyRange, ranges_from_boundaries


def _walk_sorted(root: Path, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """Relative paths with ``/`` separators in UTF-8 binary order of the whole path, as S3
    would list them: a directory sorts as its name followed by ``/``."""
    entries: list[tuple[bytes, str, os.DirEntry[str]]] = []
    with os.scandir(root) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            name = entry.name + ("/" if is_dir else "")
            entries.append(((prefix + name).encode("utf-8", "surrogateescape"), name, entry))
    entries.sort(key=lambda item: item[0])
    for _, name, entry in entries:
        if name.endswith("/"):
            yield from _walk_sorted(Path(entry.path), prefix + name)
        elif entry.is_file(follow_symlinks=True):
            yield prefix + name, entry.stat(follow_symlinks=True)


def _order(key: str) -> bytes:
    """A key as S3 orders it (UTF-8 bytes; names that are not UTF-8 kept as they are)."""
    return key.encode("utf-8", "surrogateescape")


def _ref(root: Path, key: str, stat: os.stat_result, source_index: int) -> ObjectRef:
    modified = datetime.fromtimestamp(stat.st_mtime, tz=UTC)
    return ObjectRef(
        bucket=None,
        key=key,
        size=stat.st_size,
        # Local files have no ETag; size and modification time change when the content does.
        etag=f"{stat.st_size:x}-{stat.st_mtime_ns:x}",
        last_modified=modified.isoformat().replace("+00:00", "Z"),
        root=str(root),
        source_index=source_index,
    )


async def list_local(
    root: Path,
    *,
    start_after: str | None = None,
    source_index: int = 0,
    chunk: int = 500,
    only: str | None = None,
) -> AsyncIterator[ObjectRef]:
    """Yield the files under ``root`` after ``start_after``, walking in a worker thread a
    chunk at a time so a large folder never blocks the event loop. ``only``: the one file
    of ``root`` a single-file source stands for."""
    if only is not None:
        walker: Iterator[tuple[str, os.stat_result]] = iter([(only, (root / only).stat())])
    else:
        walker = _walk_sorted(root)
    after = start_after.encode("utf-8", "surrogateescape") if start_after else None

    def next_chunk() -> list[ObjectRef]:
        out: list[ObjectRef] = []
        for key, stat in walker:
            if after is not None and key.encode("utf-8", "surrogateescape") <= after:
                continue
            out.append(_ref(root, key, stat, source_index))
            if len(out) >= chunk:
                break
        return out

    while True:
        refs = await asyncio.to_thread(next_chunk)
        if not refs:
            return
        for ref in refs:
            yield ref


def _read_prefix(path: Path, nbytes: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(nbytes)


class LocalSource:
    """A configured local folder, or a single image file (listed as its one object)."""

    def __init__(self, uri: str, index: int) -> None:
        self.uri = uri
        self.index = index
        path = Path(uri).expanduser().resolve()
        self._only: str | None
        if path.is_file():
            self.root, self._only = path.parent, path.name
        else:
            self.root, self._only = path, None

    def check(self) -> None:
        """A clear one-line error when the path is neither a folder nor a file."""
        from rekbatch.errors import SetupError

        only = self._only
        if not self.root.is_dir() or (only is not None and not (self.root / only).is_file()):
            raise SetupError(f"source.uris: {self.uri} is not a directory or a file")

    def list(self, start_after: str | None) -> AsyncIterator[ObjectRef]:
        return list_local(
            self.root, start_after=start_after, source_index=self.index, only=self._only
        )

    async def split(self, concurrency: int) -> builtins.list[KeyRange]:
        return [KeyRange(None, None)]  # a folder is walked by one thread

    async def divide(
        self, shards: int, concurrency: int, own: int = 0
    ) -> builtins.list[builtins.list[KeyRange]]:
        """Key ranges with about as many files each, one for each of ``shards`` shards."""
        if self._only is not None:
            return [[KeyRange(None, None)]] + [[] for _ in range(shards - 1)]

        def boundaries() -> builtins.list[str]:
            total = sum(1 for _ in _walk_sorted(self.root))
            ends = {total * k // shards for k in range(1, shards)} - {0}
            return [key for i, (key, _) in enumerate(_walk_sorted(self.root), 1) if i in ends]

        ranges = ranges_from_boundaries(await asyncio.to_thread(boundaries))
        return [ranges[k : k + 1] for k in range(shards)]

    async def list_range(self, rng: KeyRange, start_after: str | None) -> AsyncIterator[ObjectRef]:
        marks = [k for k in (rng.after, start_after) if k is not None]
        after = max(marks, key=_order) if marks else None
        upto = None if rng.upto is None else _order(rng.upto)
        async for obj in self.list(after):
            if upto is not None and _order(obj.key) > upto:
                return
            yield obj

    async def read_head(self, obj: ObjectRef, nbytes: int) -> bytes:
        return await asyncio.to_thread(_read_prefix, self.root / obj.key, nbytes)

    async def read(self, obj: ObjectRef) -> bytes:
        return await asyncio.to_thread((self.root / obj.key).read_bytes)
