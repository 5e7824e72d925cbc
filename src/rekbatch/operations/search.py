"""search_faces: which of several people appear in which images, by the cheaper strategy.

For R reference images over M images:

- ``compare``: one CompareFaces per image and reference (stopping at a person's first
  matching reference): up to M x R calls.
- ``collection``: one IndexFaces per image into a face collection, then one
  SearchFacesByImage per reference: M + R calls, plus creating and deleting the collection.

``auto`` picks the one with fewer calls: compare for a single reference, the collection as
soon as there are two (M x R > M + R + 2 for every M > 4 when R >= 2).
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rekbatch.backends.base import ImageInput
from rekbatch.config import SearchFacesOp
from rekbatch.errors import BackendError

Strategy = Literal["compare", "collection"]
Invoke = Callable[
    [str, dict[str, Any], dict[str, ImageInput]],
    Awaitable[tuple[dict[str, Any] | BackendError, int]],
]

_SAFE = frozenset(string.ascii_letters + string.digits + "_.-")
MAX_EXTERNAL_ID = 255
# SearchFacesByImage returns at most this many faces per call.
MAX_SEARCH_FACES = 4096


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


@dataclass
class PersonMatch:
    person: str
    similarity: float
    box: dict[str, float] | None
    reference: str


@dataclass
class PeopleSearch:
    """The search_faces operation of one run."""

    op: SearchFacesOp
    references: dict[str, list[tuple[str, bytes]]]  # person -> [(uri, image bytes)]
    strategy: Strategy = field(init=False)

    def __post_init__(self) -> None:
        self.strategy = choose_strategy(self.op)

    async def prepare(self, invoke: Invoke) -> None:
        if self.strategy == "collection":
            outcome, _ = await invoke(
                "CreateCollection", {"CollectionId": self.op.collection_id}, {}
            )
            if (
                isinstance(outcome, BackendError)
                and outcome.code != "ResourceAlreadyExistsException"
            ):
                raise outcome

    async def process(
        self, invoke: Invoke, bucket: str | None, key: str, image: ImageInput
    ) -> tuple[dict[str, Any] | BackendError, int, dict[str, Any]]:
        """One image: the record's result (or error), attempts, and its summary columns.
        ``summary["detail"]`` is what the ledger keeps to answer the search later."""
        if self.strategy == "collection":
            external_id = external_image_id(bucket, key)
            params = {
                "CollectionId": self.op.collection_id,
                "ExternalImageId": external_id,
                "MaxFaces": 100,
                "QualityFilter": "AUTO",
            }
            outcome, attempts = await invoke("IndexFaces", params, {"Image": image})
            if isinstance(outcome, BackendError):
                return outcome, attempts, {}
            faces = len(outcome.get("FaceRecords", []))
            return outcome, attempts, {"face_count": faces, "detail": external_id}
        return await self._compare(invoke, image)

    async def _compare(
        self, invoke: Invoke, image: ImageInput
    ) -> tuple[dict[str, Any] | BackendError, int, dict[str, Any]]:
        attempts = 0
        people: dict[str, Any] = {}
        matches: dict[str, PersonMatch] = {}
        face_count = 0
        for person, refs in self.references.items():
            for uri, data in refs:
                outcome, tries = await invoke(
                    "CompareFaces",
                    {"SimilarityThreshold": self.op.similarity_threshold},
                    {"SourceImage": ImageInput(data=data), "TargetImage": image},
                )
                attempts += tries
                if isinstance(outcome, BackendError):
                    return outcome, attempts, {}
                face_count = len(outcome.get("FaceMatches", [])) + len(
                    outcome.get("UnmatchedFaces", [])
                )
                best = max(
                    outcome.get("FaceMatches", []),
                    key=lambda m: float(m.get("Similarity", 0.0)),
                    default=None,
                )
                if best is not None:
                    box = best.get("Face", {}).get("BoundingBox")
                    matches[person] = PersonMatch(person, float(best["Similarity"]), box, uri)
                    break
            found = matches.get(person)
            people[person] = {
                "Matched": found is not None,
                "Similarity": None if found is None else round(found.similarity, 3),
                "BoundingBox": None if found is None else found.box,
                "Reference": None if found is None else found.reference,
            }
        result = {"Strategy": "compare", "People": people, "FaceCount": face_count}
        summary = {
            "face_count": face_count,
            "people": ";".join(sorted(matches)),
            "matched": bool(matches),
            "best_similarity": max((m.similarity for m in matches.values()), default=None),
            "detail": json.dumps(
                {p: [m.similarity, m.box] for p, m in matches.items()}, separators=(",", ":")
            ),
        }
        return result, attempts, summary

    async def search(self, invoke: Invoke) -> list[tuple[str, str, float, dict[str, float] | None]]:
        """Collection strategy, after indexing: (person, external id, similarity, box) for
        every indexed face that matches one of the person's references."""
        found: list[tuple[str, str, float, dict[str, float] | None]] = []
        for person, refs in self.references.items():
            for _uri, data in refs:
                params = {
                    "CollectionId": self.op.collection_id,
                    "FaceMatchThreshold": self.op.similarity_threshold,
                    "MaxFaces": MAX_SEARCH_FACES,
                    "QualityFilter": "NONE",
                }
                outcome, _ = await invoke(
                    "SearchFacesByImage", params, {"Image": ImageInput(data=data)}
                )
                if isinstance(outcome, BackendError):
                    raise outcome
                for match in outcome.get("FaceMatches", []):
                    face = match.get("Face", {})
                    external_id = face.get("ExternalImageId")
                    if external_id:
                        similarity = float(match.get("Similarity", 0.0))
                        found.append((person, external_id, similarity, face.get("BoundingBox")))
        return found

    async def cleanup(self, invoke: Invoke) -> None:
        if self.strategy == "collection" and not self.op.keep_collection:
            outcome, _ = await invoke(
                "DeleteCollection", {"CollectionId": self.op.collection_id}, {}
            )
            if isinstance(outcome, BackendError) and outcome.code != "ResourceNotFoundException":
                raise outcome
