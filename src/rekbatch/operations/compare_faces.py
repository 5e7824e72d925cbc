"""compare_faces: is the reference person in this image? The "Where's Ric" answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rekbatch.backends.base import ImageInput
from rekbatch.calls.caller import CallOutcome
from rekbatch.config import CompareFacesOp
from rekbatch.operations.base import Operation, OperationContext, Reference, load_reference
from rekbatch.operations.summaries import box_dict
from rekbatch.records import ObjectRef

if TYPE_CHECKING:
    from rekbatch.calls.caller import Caller
    from rekbatch.store.ledger import LedgerDB


class CompareFacesOperation(Operation):
    """One CompareFaces per image against the reference, read once per run and sent as
    bytes with every call."""

    type = "compare_faces"
    api = "CompareFaces"

    def __init__(self, op: CompareFacesOp) -> None:
        self.op = op
        self.params = {"SimilarityThreshold": op.similarity_threshold}
        self.prefilter = op.prefilter == "faces"
        self.reference: Reference | None = None
        self._source: ImageInput | None = None

    def setup_calls(self) -> dict[str, int]:
        return {"DetectFaces": 1}

    async def prepare(self, ctx: OperationContext) -> None:
        self.reference = await load_reference(
            ctx, "operations.compare_faces.reference", self.op.reference
        )
        self._source = ImageInput(data=self.reference.data)

    async def process(self, image: ImageInput, obj: ObjectRef, caller: Caller) -> CallOutcome:
        assert self._source is not None, "prepare() first"
        return await caller.call(
            self.api, self.params, {"SourceImage": self._source, "TargetImage": image}
        )

    def answer(self, db: LedgerDB) -> dict[str, Any]:
        compared, matched = db.operation_totals(self.type)
        no_face = db.skipped_count(self.type, "no_face_local")
        matches = [
            {
                "bucket": row["bucket"],
                "key": row["key"],
                "similarity": row["similarity"],
                "bounding_box": box_dict(row["match_box"]),
            }
            for row in db.matched_rows(self.type)
        ]
        answer: dict[str, Any] = {
            "reference": self.op.reference,
            "similarity_threshold": self.op.similarity_threshold,
            "images_compared": compared,
            "images_matched": matched,
            "images_no_face_local": no_face,
            "matched_keys": [m["key"] for m in matches],
            "matches": matches,
        }
        if self.reference is not None:
            answer["faces"] = self.reference.faces
            answer["face_used"] = self.reference.face_used
        return answer
