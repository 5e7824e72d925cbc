"""A face collection split into shards, for the operations that index faces.

SearchFacesByImage returns at most 4,096 faces per call, so a collection is split into shards
of about ``SHARD_FACES`` faces (``collection_id``, then ``collection_id-0001``, ...) and every
search is made in every shard: no answer is cut at 4,096 matches. Which shards exist and how
many faces each holds is read back from the ledger (an indexing record's ``detail`` is
``collection/external image id``), so a resumed or repeated run goes on filling the last one.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from rekbatch.calls.caller import Caller
    from rekbatch.operations.base import OperationContext

log = structlog.get_logger("rekbatch")

MAX_SEARCH_FACES = 4096  # SearchFacesByImage's most faces per call
SHARD_FACES = 4000  # faces per collection shard before the next one opens


def shard_name(collection_id: str, shard: int) -> str:
    return collection_id if shard == 0 else f"{collection_id}-{shard:04d}"


class CollectionShards:
    """The shards of one collection that an operation indexes into. ``shard_faces`` None:
    one collection however large (the offline index, searched by a scan, has no cap)."""

    def __init__(
        self, collection_id: str, operation: str, *, shard_faces: int | None = SHARD_FACES
    ) -> None:
        self.collection_id = collection_id
        self.operation = operation
        self.shard_faces = shard_faces
        self.names: list[str] = []
        self.faces: dict[str, int] = {}
        self._opening = asyncio.Lock()

    async def open(self, ctx: OperationContext) -> None:
        """The shards earlier runs of the job filled, in shard order; the last one is
        created when it does not exist yet."""
        from rekbatch.store.ledger import LedgerDB

        indexed = await ctx.ledger.read(LedgerDB.faces_by_detail_prefix, self.operation)
        order = {shard_name(self.collection_id, i): i for i in range(len(indexed) + 1)}
        self.names = sorted((c for c in indexed if c in order), key=lambda c: order[c]) or [
            shard_name(self.collection_id, 0)
        ]
        self.faces = {c: indexed.get(c, 0) for c in self.names}
        await self._create(ctx.caller, self.names[-1])

    async def _create(self, caller: Caller, collection: str) -> None:
        outcome = await caller.call("CreateCollection", {"CollectionId": collection}, {})
        error = outcome.error
        if error is not None and error.code != "ResourceAlreadyExistsException":
            raise error

    async def current(self, caller: Caller) -> str:
        """The shard to index into: the last one, or a new one once it holds enough."""
        current = self.names[-1]
        if self.shard_faces is None or self.faces[current] < self.shard_faces:
            return current
        async with self._opening:
            current = self.names[-1]
            if self.faces[current] >= self.shard_faces:
                current = shard_name(self.collection_id, len(self.names))
                await self._create(caller, current)
                self.names.append(current)
                self.faces[current] = 0
                log.info("collection_shard_opened", collection=current)
        return current

    def indexed(self, collection: str, faces: int) -> None:
        self.faces[collection] = self.faces.get(collection, 0) + faces
