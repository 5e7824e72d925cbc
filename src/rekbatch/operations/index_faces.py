"""index_faces: every face of every image into the job's face index, for ``rekbatch find``.

One IndexFaces call per image. With AWS the faces go into the collection ``collection_id``,
split into shards of about 4,000 faces (``collection_shards.py``) so that no later search is
cut at the 4,096 faces SearchFacesByImage returns, and the collection is kept. Offline the
local backend stores each face's embedding in the job (``.rekbatch/collections/<id>/``, see
``backends/local/collections.py``), one collection however large: ``find`` scans it.

The recorded result is IndexFaces' own answer plus the ``CollectionId`` the faces went into:
``FaceRecords`` (FaceId, box, ExternalImageId) and ``UnindexedFaces`` with their reasons
(faces too small or blurred to recognise), so faces.parquet names every face. An image's
``ExternalImageId`` is its bucket and key, reversibly encoded; the ledger maps it back to the
object (and to its copies, recorded from the original's result) when ``find`` matches a face,
and ``find`` answers a face only if the object's current row names it.

The index follows the rows (``index_upkeep.py``): the faces of a replaced row (the photo
changed or was removed) and the faces of calls whose row never came (a kill, an answer lost
and retried; named by write-ahead notes, ``store/index_notes.py``) are deleted when a run
starts and when it ends. A run with nothing of the sort makes no call for it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from rekbatch.backends.base import ImageInput
from rekbatch.calls.caller import CallOutcome
from rekbatch.config import IndexFacesOp
from rekbatch.errors import BackendError
from rekbatch.operations.base import Operation, OperationContext
from rekbatch.operations.collection_shards import SHARD_FACES, CollectionShards
from rekbatch.operations.index_upkeep import FaceUpkeep
from rekbatch.operations.search_faces import external_image_id
from rekbatch.records import ObjectRef
from rekbatch.store import jobdir
from rekbatch.store.index_notes import IndexNotes

if TYPE_CHECKING:
    from rekbatch.calls.caller import Caller
    from rekbatch.store.ledger import LedgerDB

log = structlog.get_logger("rekbatch")

NOTES_FILE = "index_faces.notes"


class IndexFacesOperation(Operation):
    type = "index_faces"
    api = "IndexFaces"

    def __init__(self, op: IndexFacesOp, *, sharded: bool = True, output_dir: str = "") -> None:
        self.op = op
        self.prefilter = op.prefilter == "faces"
        self.output_dir = output_dir
        self.collections = CollectionShards(
            op.collection_id, self.type, shard_faces=SHARD_FACES if sharded else None
        )
        self.notes: IndexNotes | None = None
        self.upkeep: FaceUpkeep | None = None

    async def prepare(self, ctx: OperationContext) -> None:
        await self.collections.open(ctx)
        if ctx.out is not None:
            self.notes = IndexNotes(jobdir.state_dir(ctx.out) / NOTES_FILE)
            self.upkeep = FaceUpkeep(self.type, ctx.out, ctx.ledger, ctx.caller)

    async def reconcile(self, ctx: OperationContext) -> None:
        await self._keep_up()

    async def finish(self, ctx: OperationContext) -> None:
        await self._keep_up()

    async def _keep_up(self) -> None:
        """Delete the faces no current row names; what fails stays noted for next time."""
        if self.notes is None or self.upkeep is None:
            return
        notes = await asyncio.to_thread(self.notes.left)
        try:
            await self.upkeep.run(notes)
        except BackendError as exc:
            log.warning(
                "face_index_upkeep_failed",
                error=f"{exc.code}: {exc.message}",
                hint="find is not affected; the next run tries again",
            )
            return
        await asyncio.to_thread(self.notes.settled, notes)

    async def process(self, image: ImageInput, obj: ObjectRef, caller: Caller) -> CallOutcome:
        collection = await self.collections.current(caller)
        external = external_image_id(obj.bucket, obj.key)
        params = {
            "CollectionId": collection,
            "ExternalImageId": external,
            "MaxFaces": self.op.max_faces,
            "QualityFilter": self.op.quality_filter,
        }
        notes = self.notes
        if notes is not None:
            notes.add((collection, external))
        outcome = await caller.call("IndexFaces", params, {"Image": image})
        if notes is not None and not outcome.unsure:
            notes.answered((collection, external))
        if outcome.result is not None:
            outcome.result["CollectionId"] = collection
            self.collections.indexed(collection, len(outcome.result.get("FaceRecords", [])))
        return outcome

    def answer(self, db: LedgerDB) -> dict[str, Any]:
        images, _ = db.operation_totals(self.type)
        by_collection = db.faces_by_detail_prefix(self.type)
        # Shard order; the ledger names the collections of every run (and of merged shards).
        names = sorted(by_collection, key=lambda name: (len(name), name))
        return {
            "collection_id": self.op.collection_id,
            "collection_shards": {name: by_collection[name] for name in names},
            "images_indexed": images,
            "faces_indexed": sum(by_collection.values()),
            "images_no_face_local": db.skipped_count(self.type, "no_face_local"),
            "output_dir": self.output_dir,
        }


__all__ = ["IndexFacesOperation"]
