"""List the files of a local folder as objects, in the same order S3 lists keys, and read
them no further than they were listed.

Symbolic links are not followed unless ``source.follow_symlinks`` is true (rclone's habit):
a link is listed as an entry skipped with reason ``symlink``, so nothing outside the folder
is read through one. Reads open the path one component at a time below the folder, never
through a link (unless links are followed), without blocking (a FIFO put in a file's place
after listing would block a plain open), check that what they opened is still the regular
file that was listed (its size and modification time, which make a local file's ETag), and
read at most its listed size; anything else is ``ObjectChanged``. Reads run on aiofiles'
executor, open to close in one call, off the event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import os
import stat as stat_kind
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiofiles.os

from rekbatch.records import ObjectRef
from rekbatch.sources.base import ObjectChanged
from rekbatch.sources.ranges import KeyRange, ranges_from_boundaries

SYMLINK_HINT = "set source.follow_symlinks = true to follow links"


def _walk_sorted(
    root: Path,
    prefix: str = "",
    *,
    follow: bool = False,
    seen: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[tuple[str, os.stat_result, str | None]]:
    """Relative paths with ``/`` separators in UTF-8 binary order of the whole path, as S3
    would list them (a directory sorts as its name followed by ``/``), with their stat and,
    for a link that is not followed, its target. ``follow``: links are followed (a folder
    already on the way down is not entered again)."""
    entries: list[tuple[bytes, str, os.DirEntry[str]]] = []
    with os.scandir(root) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            is_dir = entry.is_dir(follow_symlinks=follow)
            name = entry.name + ("/" if is_dir else "")
            entries.append(((prefix + name).encode("utf-8", "surrogateescape"), name, entry))
    entries.sort(key=lambda item: item[0])
    for _, name, entry in entries:
        if name.endswith("/"):
            where = entry.stat(follow_symlinks=follow)
            ident = (where.st_dev, where.st_ino)
            if ident not in seen:  # a link back up the tree is entered once
                yield from _walk_sorted(
                    Path(entry.path), prefix + name, follow=follow, seen=seen | {ident}
                )
        elif not follow and entry.is_symlink():
            with contextlib.suppress(OSError):
                yield prefix + name, entry.stat(follow_symlinks=False), os.readlink(entry.path)
        elif entry.is_file(follow_symlinks=follow):
            yield prefix + name, entry.stat(follow_symlinks=follow), None


def _order(key: str) -> bytes:
    """A key as S3 orders it (UTF-8 bytes; names that are not UTF-8 kept as they are)."""
    return key.encode("utf-8", "surrogateescape")


def _etag(stat: os.stat_result) -> str:
    # Local files have no ETag; size and modification time change when the content does.
    return f"{stat.st_size:x}-{stat.st_mtime_ns:x}"


def _ref(
    root: Path, key: str, stat: os.stat_result, source_index: int, link: str | None = None
) -> ObjectRef:
    modified = datetime.fromtimestamp(stat.st_mtime, tz=UTC)
    return ObjectRef(
        bucket=None,
        key=key,
        size=stat.st_size,
        etag=_etag(stat),
        last_modified=modified.isoformat().replace("+00:00", "Z"),
        root=str(root),
        source_index=source_index,
        skip=None if link is None else "symlink",
        note=None if link is None else f"a symbolic link to {link}; {SYMLINK_HINT}",
    )


async def list_local(
    root: Path,
    *,
    start_after: str | None = None,
    source_index: int = 0,
    chunk: int = 500,
    only: str | None = None,
    follow_symlinks: bool = False,
) -> AsyncIterator[ObjectRef]:
    """Yield the files under ``root`` after ``start_after``, walking in a worker thread a
    chunk at a time so a large folder never blocks the event loop. ``only``: the one file
    of ``root`` a single-file source stands for (named by the user: followed if a link)."""
    if only is not None:
        walker: Iterator[tuple[str, os.stat_result, str | None]] = iter(
            [(only, (root / only).stat(), None)]
        )
    else:
        top = root.stat()
        walker = _walk_sorted(
            root, follow=follow_symlinks, seen=frozenset({(top.st_dev, top.st_ino)})
        )
    after = start_after.encode("utf-8", "surrogateescape") if start_after else None

    def next_chunk() -> list[ObjectRef]:
        out: list[ObjectRef] = []
        for key, stat, link in walker:
            if after is not None and key.encode("utf-8", "surrogateescape") <= after:
                continue
            out.append(_ref(root, key, stat, source_index, link))
            if len(out) >= chunk:
                break
        return out

    while True:
        refs = await asyncio.to_thread(next_chunk)
        if not refs:
            return
        for ref in refs:
            yield ref


def open_beneath(root: Path, key: str, follow_symlinks: bool) -> int:
    """A read-only, non-blocking descriptor of ``root/key``. Unless ``follow_symlinks``,
    each component is opened relative to the one before with ``O_NOFOLLOW``, so no link
    (put there after listing, too) leads the read out of ``root``."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if follow_symlinks or os.open not in os.supports_dir_fd:
        return os.open(root / key, flags)
    parts = key.split("/")
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    directory = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | nofollow | os.O_DIRECTORY, dir_fd=directory)
            os.close(directory)
            directory = inner
        return os.open(parts[-1], flags | nofollow, dir_fd=directory)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ObjectChanged(f"{key} is now reached through a symbolic link") from None
        raise
    finally:
        os.close(directory)


def _check(fd: int, obj: ObjectRef) -> None:
    """The open file is the one listed: a regular file of the same size and time."""
    found = os.fstat(fd)
    if not stat_kind.S_ISREG(found.st_mode):
        kind = "a FIFO" if stat_kind.S_ISFIFO(found.st_mode) else "not a regular file"
        raise ObjectChanged(f"{obj.key} is now {kind}")
    if _etag(found) != obj.etag:
        raise ObjectChanged(
            f"{obj.key} changed since it was listed ({obj.size:,} bytes, now {found.st_size:,})"
        )


def _read_listed_sync(root: Path, obj: ObjectRef, nbytes: int, follow: bool) -> bytes:
    """Open, check, read at most ``nbytes`` and close, in one call: a read whose caller is
    cancelled still closes its file (its thread finishes the call)."""
    fd = open_beneath(root, obj.key, follow)
    try:
        _check(fd, obj)  # before a file object exists: a directory would not even make one
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb", buffering=0) as handle:
        parts: list[bytes] = []
        got = 0
        while got < nbytes:
            part = handle.read(nbytes - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# On aiofiles' executor, off the event loop.
_read_listed = aiofiles.os.wrap(_read_listed_sync)


class LocalSource:
    """A configured local folder, or a single image file (listed as its one object)."""

    def __init__(self, uri: str, index: int, *, follow_symlinks: bool = False) -> None:
        self.uri = uri
        self.index = index
        self.follow_symlinks = follow_symlinks
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
            self.root,
            start_after=start_after,
            source_index=self.index,
            only=self._only,
            follow_symlinks=self.follow_symlinks,
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
            follow = self.follow_symlinks
            total = sum(1 for _ in _walk_sorted(self.root, follow=follow))
            ends = {total * k // shards for k in range(1, shards)} - {0}
            walk = enumerate(_walk_sorted(self.root, follow=follow), 1)
            return [key for i, (key, _, _) in walk if i in ends]

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

    async def _read(self, obj: ObjectRef, nbytes: int) -> bytes:
        # The single file a source names is the user's choice: followed like the folder.
        follow = self.follow_symlinks or self._only is not None
        return await _read_listed(self.root, obj, nbytes, follow)

    async def read_head(self, obj: ObjectRef, nbytes: int) -> bytes:
        return await self._read(obj, min(nbytes, obj.size))

    async def read(self, obj: ObjectRef) -> bytes:
        # One byte past the listed size tells a file that grew since from one that did not.
        data = await self._read(obj, obj.size + 1)
        if len(data) != obj.size:
            raise ObjectChanged(
                f"{obj.key} changed since it was listed ({obj.size:,} bytes, read {len(data):,})"
            )
        return data
