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
object (and to its copies, recorded from the original's result) when ``find`` matches a face.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rekbatch.backends.base import ImageInput
from rekbatch.calls.caller import CallOutcome
from rekbatch.config import IndexFacesOp
from rekbatch.operations.base import Operation, OperationContext
from rekbatch.operations.collection_shards import SHARD_FACES, CollectionShards
from rekbatch.operations.search_faces import external_image_id
from rekbatch.records import ObjectRef

if TYPE_CHECKING:
    from rekbatch.calls.caller import Caller
    from rekbatch.store.ledger import LedgerDB


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

    async def prepare(self, ctx: OperationContext) -> None:
        await self.collections.open(ctx)

    async def process(self, image: ImageInput, obj: ObjectRef, caller: Caller) -> CallOutcome:
        collection = await self.collections.current(caller)
        params = {
            "CollectionId": collection,
            "ExternalImageId": external_image_id(obj.bucket, obj.key),
            "MaxFaces": self.op.max_faces,
            "QualityFilter": self.op.quality_filter,
        }
        outcome = await caller.call("IndexFaces", params, {"Image": image})
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
