"""Listing a source's ranges, and what a listed object still needs: one helper for the run's
producer and for ``plan``.

``list_ranges`` runs up to ``listers`` tasks; each takes the next range not yet taken,
lists it in key order after its mark, and hands its objects on in chunks. The caller says
what a range's start, a chunk and a range's end mean (the producer: a writer lane, ledger
lookups and the queue; plan: counting). ``ListingRules`` is what the listing entry alone
decides (globs, empty, too large for the way the image goes), ``still_to_do`` which
operations an object still needs after what a ledger holds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from rekbatch.config import Config
from rekbatch.engine.delivery import Delivery
from rekbatch.operations import Operation
from rekbatch.records import ObjectRef, SkipReason
from rekbatch.sources import Source
from rekbatch.sources.filters import listing_reason
from rekbatch.sources.ranges import KeyRange

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RangeTodo:
    """A range of a source still to list: its number in the source's split, its bounds and
    the key to list after (its watermark; None: from its start)."""

    index: int
    rng: KeyRange
    mark: str | None = None


async def list_ranges(
    source: Source,
    todo: Sequence[RangeTodo],
    *,
    listers: int,
    chunk: int,
    start: Callable[[RangeTodo], T],
    take: Callable[[T, list[ObjectRef]], Awaitable[None]],
    finish: Callable[[T], None] = lambda _: None,
    stopping: asyncio.Event | None = None,
) -> None:
    """List ``todo`` with up to ``listers`` tasks: per range ``start(range)`` gives the
    state handed to ``take(state, objects)`` for each chunk of at most ``chunk`` objects
    and to ``finish(state)`` once the range is listed to its end. Once ``stopping`` is set
    no range is started or finished (its rest stays above its mark)."""
    left = deque(todo)

    def stopped() -> bool:
        return stopping is not None and stopping.is_set()

    async def lister() -> None:
        while left and not stopped():
            item = left.popleft()
            state = start(item)
            objects: list[ObjectRef] = []
            async for obj in source.list_range(item.rng, item.mark):
                objects.append(obj)
                if len(objects) >= chunk:
                    await take(state, objects)
                    objects = []
                    if stopped():
                        return
            if objects:
                await take(state, objects)
            if not stopped():
                finish(state)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(listers, len(left))):
            group.create_task(lister())


@dataclass(frozen=True, slots=True)
class ListingRules:
    """What a listing entry alone decides, per source (``max_bytes``: the largest object a
    worker takes on, by how its images reach Rekognition)."""

    include: Sequence[str]
    exclude: Sequence[str]
    sniff: bool
    max_bytes: Sequence[int]

    @classmethod
    def of(cls, cfg: Config, delivery: Delivery) -> ListingRules:
        src = cfg.source
        limits = [delivery.listing_limit(uri) for uri in src.uris]
        return cls(src.include, src.exclude, src.sniff, limits)

    def skip_reason(self, obj: ObjectRef) -> SkipReason | None:
        """Why ``obj`` is skipped from its listing entry (or its source's note on it), or
        None when it goes on to a worker."""
        return listing_reason(
            obj,
            list(self.include),
            list(self.exclude),
            self.max_bytes[obj.source_index],
            sniff=self.sniff,
        )


def still_to_do(
    operations: Sequence[Operation], obj: ObjectRef, done: Mapping[str, str] | None
) -> list[Operation]:
    """The operations ``obj`` still needs, given ``done`` (operation type: the ETag it was
    done for): all but those done for its current content."""
    if not done:
        return list(operations)
    return [op for op in operations if done.get(op.type) != obj.etag]


__all__ = ["ListingRules", "RangeTodo", "list_ranges", "still_to_do"]
