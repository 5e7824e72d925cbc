"""What a source is: something that lists objects in key order and reads them.

A source lists its objects in S3's key order (UTF-8 binary), after a watermark when resuming,
or splits itself into disjoint key ranges listed at once, each after its own watermark,
divides its listing among the shards of a sharded job, and reads an object's first bytes
(to sniff it) or all of it (to send it as bytes). S3 prefixes, inventories, key lists and
local folders implement it; the engine knows nothing else about where objects come from.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from typing import Protocol

from rekbatch.records import ObjectRef
from rekbatch.sources.ranges import KeyRange


class ObjectChanged(Exception):
    """The object read is not the one listed: another ETag or size, a FIFO or device in a
    file's place, a link where there was none. Its records fail with this code."""


class Source(Protocol):
    uri: str
    index: int

    def list(self, start_after: str | None) -> AsyncIterator[ObjectRef]:
        """The source's objects after ``start_after`` (all when None), in key order."""
        ...

    async def split(self, concurrency: int) -> builtins.list[KeyRange]:
        """Disjoint key ranges covering the source, to list ``concurrency`` at a time (one
        range where the source cannot be listed in parallel)."""
        ...

    async def divide(
        self, shards: int, concurrency: int, own: int = 0
    ) -> builtins.list[builtins.list[KeyRange]]:
        """The source's listing divided among ``shards`` shards: per shard its ranges (some
        maybe none), every object of the source in exactly one of them. ``own``: the shard
        dividing (what it has read while dividing is best listed by it)."""
        ...

    def list_range(self, rng: KeyRange, start_after: str | None) -> AsyncIterator[ObjectRef]:
        """The objects of ``rng`` after ``start_after``, in key order."""
        ...

    async def read_head(self, obj: ObjectRef, nbytes: int) -> bytes:
        """The first ``nbytes`` of ``obj`` (fewer when it is shorter)."""
        ...

    async def read(self, obj: ObjectRef) -> bytes:
        """All of ``obj``, and no more than its listed size; ``ObjectChanged`` when it is
        not the object listed."""
        ...
