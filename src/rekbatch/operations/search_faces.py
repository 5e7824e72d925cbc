"""search_faces: which of several people appear in which images, by the cheaper strategy.

For R reference images over M images:

- ``compare``: one CompareFaces per image and reference (stopping at a person's first
  matching reference): up to M x R calls.
- ``collection``: one IndexFaces per image into a face collection, then one
  SearchFacesByImage per reference: M + R calls, plus creating and deleting the collection.

``auto`` picks the one with fewer calls: compare for a single reference, the collection as
soon as there are two (M x R > M + R + 2 for every M > 4 when R >= 2).

The collection is split into shards (``collection_shards.py``): every reference is searched
in every shard. The IndexFaces result recorded for an image carries the ``CollectionId`` its
faces went into.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import TYPE_CHECKING, Any, Literal

import structlog

from rekbatch.backends.base import ImageInput
from rekbatch.calls.caller import CallOutcome
from rekbatch.config import SearchFacesOp
from rekbatch.operations.base import Operation, OperationContext, Reference, load_reference
from rekbatch.operations.collection_shards import (
    MAX_SEARCH_FACES,
    SHARD_FACES,
    CollectionShards,
    shard_name,
)
from rekbatch.operations.summaries import box_dict, box_text
from rekbatch.records import ObjectRef

if TYPE_CHECKING:
    from rekbatch.calls.caller import Caller
    from rekbatch.store.ledger import LedgerDB

log = structlog.get_logger("rekbatch")

Strategy = Literal["compare", "collection"]

_SAFE = frozenset(string.ascii_letters + string.digits + "_.-")
MAX_EXTERNAL_ID = 255
MAX_FACES_PER_IMAGE = 100
__all__ = [
    "MAX_SEARCH_FACES",
    "SHARD_FACES",
    "SearchFacesOperation",
    "decode_external_image_id",
    "external_image_id",
    "shard_name",
]


def external_image_id(bucket: str | None, key: str) -> str:
    """A valid ExternalImageId (``[a-zA-Z0-9_.\\-:]+``) for an object, reversible: every other
    byte is written ``:XX``. Ids too long for Rekognition become a hash; the ledger keeps
    the mapping either way."""
    raw = f"{bucket or ''}/{key}"
    parts = [ch if ch in _SAFE else "".join(f":{b:02X}" for b in ch.encode()) for ch in raw]
    encoded = "".join(parts)
    if len(encoded) <= MAX_EXTERNAL_ID:
        return encoded
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


def decode_external_image_id(external_id: str) -> tuple[str | None, str] | None:
    """The (bucket, key) an encoded id stands for; None for a hashed id."""
    if external_id.startswith("sha256:") and ":2F" not in external_id:
        return None
    data = bytearray()
    i = 0
    while i < len(external_id):
        if external_id[i] == ":":
            data.append(int(external_id[i + 1 : i + 3], 16))
            i += 3
        else:
            data += external_id[i].encode()
            i += 1
    bucket, _, key = data.decode().partition("/")
    return (bucket or None), key


def choose_strategy(op: SearchFacesOp) -> Strategy:
    if op.strategy != "auto":
        return op.strategy
    references = sum(len(refs) for refs in op.people.values())
    return "compare" if references == 1 else "collection"


def strategy_calls(images: int, references: int) -> dict[Strategy, int]:
    return {"compare": images * references, "collection": images + references + 2}


class SearchFacesOperation(Operation):
    type = "search_faces"

    def __init__(self, op: SearchFacesOp) -> None:
        self.op = op
        self.prefilter = op.prefilter == "faces"
        self.strategy = choose_strategy(op)
        self.api = "IndexFaces" if self.strategy == "collection" else "CompareFaces"
        self.references: dict[str, list[Reference]] = {}
        self._refs = sum(len(refs) for refs in op.people.values())
        self.collections = CollectionShards(op.collection_id, self.type, shard_faces=SHARD_FACES)

    def calls_per_image(self) -> dict[str, int]:
        if self.strategy == "collection":
            return {"IndexFaces": 1}
        return {"CompareFaces": self._refs}

    def setup_calls(self) -> dict[str, int]:
        calls = {"DetectFaces": self._refs}
        if self.strategy == "collection":
            calls["SearchFacesByImage"] = self._refs
        return calls

    # -- prepare ----------------------------------------------------------------------------

    async def prepare(self, ctx: OperationContext) -> None:
        for person, locations in self.op.people.items():
            field_name = f"operations.search_faces.people.{person}"
            self.references[person] = [
                await load_reference(ctx, field_name, location) for location in locations
            ]
        if self.strategy == "collection":
            await self.collections.open(ctx)

    # -- process ----------------------------------------------------------------------------

    async def process(self, image: ImageInput, obj: ObjectRef, caller: Caller) -> CallOutcome:
        if self.strategy == "collection":
            return await self._index(image, obj, caller)
        return await self._compare(image, caller)

    async def _index(self, image: ImageInput, obj: ObjectRef, caller: Caller) -> CallOutcome:
        collection = await self.collections.current(caller)
        params = {
            "CollectionId": collection,
            "ExternalImageId": external_image_id(obj.bucket, obj.key),
            "MaxFaces": MAX_FACES_PER_IMAGE,
            "QualityFilter": "AUTO",
        }
        outcome = await caller.call("IndexFaces", params, {"Image": image})
        if outcome.result is not None:
            outcome.result["CollectionId"] = collection
            self.collections.indexed(collection, len(outcome.result.get("FaceRecords", [])))
        return outcome

    async def _compare(self, image: ImageInput, caller: Caller) -> CallOutcome:
        attempts = 0
        calls = 0
        seconds = 0.0
        people: dict[str, Any] = {}
        face_count = 0
        for person, refs in self.references.items():
            found: tuple[float, Any, str] | None = None
            for ref in refs:
                outcome = await caller.call(
                    "CompareFaces",
                    {"SimilarityThreshold": self.op.similarity_threshold},
                    {"SourceImage": ImageInput(data=ref.data), "TargetImage": image},
                )
                attempts += outcome.attempts
                calls += 1
                seconds += outcome.seconds
                if outcome.error is not None:
                    return CallOutcome(None, outcome.error, attempts, seconds)
                result = outcome.result or {}
                matches = result.get("FaceMatches", [])
                face_count = len(matches) + len(result.get("UnmatchedFaces", []))
                best = max(matches, key=lambda m: float(m.get("Similarity", 0.0)), default=None)
                if best is not None:
                    box = best.get("Face", {}).get("BoundingBox")
                    found = (float(best["Similarity"]), box, ref.location)
                    break
            people[person] = {
                "Matched": found is not None,
                "Similarity": None if found is None else round(found[0], 3),
                "BoundingBox": None if found is None else found[1],
                "Reference": None if found is None else found[2],
            }
        # Calls: the CompareFaces calls this image was billed for (one per reference tried).
        result = {
            "Strategy": "compare",
            "People": people,
            "FaceCount": face_count,
            "Calls": calls,
        }
        return CallOutcome(result, None, attempts, seconds)

    # -- finish -----------------------------------------------------------------------------

    async def finish(self, ctx: OperationContext) -> None:
        from rekbatch.store.ledger import LedgerDB

        if self.strategy == "compare":
            await ctx.ledger.write(_save_compare_matches, self.type)
            return
        for person, refs in self.references.items():
            rows: list[tuple[str, int, str, str | None, float, str | None]] = []
            for ref in refs:
                for collection in self.collections.names:
                    for external_id, similarity, box in await self._search(
                        ctx.caller, collection, ref
                    ):
                        detail = f"{collection}/{external_id}"
                        for obj in await ctx.ledger.read(
                            LedgerDB.objects_with_detail, self.type, detail
                        ):
                            rows.append(
                                (
                                    person,
                                    obj["source"],
                                    obj["key"],
                                    obj["bucket"],
                                    similarity,
                                    box_text(box),
                                )
                            )
            # Saved person by person: a later failure keeps the answers found so far.
            await ctx.ledger.write(LedgerDB.save_person_matches, rows)
        if not self.op.keep_collection:
            for collection in self.collections.names:
                outcome = await ctx.caller.call(
                    "DeleteCollection", {"CollectionId": collection}, {}
                )
                error = outcome.error
                if error is not None and error.code != "ResourceNotFoundException":
                    raise error

    async def _search(
        self, caller: Caller, collection: str, ref: Reference
    ) -> list[tuple[str, float, dict[str, Any] | None]]:
        params = {
            "CollectionId": collection,
            "FaceMatchThreshold": self.op.similarity_threshold,
            "MaxFaces": MAX_SEARCH_FACES,
            "QualityFilter": "NONE",
        }
        outcome = await caller.call(
            "SearchFacesByImage", params, {"Image": ImageInput(data=ref.data)}
        )
        if outcome.error is not None:
            if outcome.error.code == "ResourceNotFoundException":
                return []  # a shard an earlier run deleted: its matches are saved already
            raise outcome.error
        matches = (outcome.result or {}).get("FaceMatches", [])
        if len(matches) >= MAX_SEARCH_FACES:
            log.warning(
                "search_may_be_cut",
                collection=collection,
                reference=ref.location,
                matches=len(matches),
            )
        found = []
        for match in matches:
            face = match.get("Face", {})
            external_id = face.get("ExternalImageId")
            if external_id:
                found.append(
                    (external_id, float(match.get("Similarity", 0.0)), face.get("BoundingBox"))
                )
        return found

    # -- answer -----------------------------------------------------------------------------

    def answer(self, db: LedgerDB) -> dict[str, Any]:
        searched, _ = db.operation_totals(self.type)
        by_person: dict[str, list[dict[str, Any]]] = {person: [] for person in self.op.people}
        for row in db.person_matches():
            if row["person"] in by_person:
                by_person[row["person"]].append(
                    {
                        "bucket": row["bucket"],
                        "key": row["key"],
                        "similarity": round(row["similarity"], 3),
                        "bounding_box": box_dict(row["box"]),
                    }
                )
        return {
            "strategy": self.strategy,
            "collection_id": self.op.collection_id if self.strategy == "collection" else None,
            "collections": list(self.collections.names) if self.strategy == "collection" else None,
            "similarity_threshold": self.op.similarity_threshold,
            "images_searched": searched,
            "images_no_face_local": db.skipped_count(self.type, "no_face_local"),
            "calls_by_strategy": strategy_calls(searched, self._refs),
            "people": {
                person: {
                    "references": self.op.people[person],
                    "images_matched": len(matches),
                    "matched_keys": [m["key"] for m in matches],
                    "matches": matches,
                }
                for person, matches in by_person.items()
            },
        }


def _save_compare_matches(db: LedgerDB, operation: str) -> None:
    """The compare strategy's matches, from each record's ``detail``, into person_matches."""
    rows: list[tuple[str, int, str, str | None, float, str | None]] = []
    for row in db.compare_rows(operation):
        for person, (similarity, box) in json.loads(row["detail"] or "{}").items():
            rows.append(
                (person, row["source"], row["key"], row["bucket"], similarity, box_text(box))
            )
    db.save_person_matches(rows)
