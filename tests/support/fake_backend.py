"""An in-process fake of the ``Backend`` seam, for engine tests that are not about HTTP.

``FakeBackend`` answers Rekognition's image APIs deterministically from the image's identity
(``s3://bucket/key`` for an S3Object, ``sha256:<hex>`` for bytes) and a ``people`` map from
identity to the people in it. It counts calls and billed answers per (API, identity), and
faults can be scheduled by call number (``fail_on``) or decided per call (``hook``), so a
test can say "the 7th call raises" or "every call on this key is throttled".
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rekbatch.backends.base import ImageInput, InProcessBackend
from rekbatch.errors import BackendError

Hook = Callable[[int, str, str], BaseException | None]


def identity(image: ImageInput) -> str:
    if image.data is not None:
        return "sha256:" + hashlib.sha256(image.data).hexdigest()
    return f"s3://{image.bucket}/{image.key}"


def _box(i: int) -> dict[str, float]:
    return {"Left": 0.1 + 0.2 * (i % 4), "Top": 0.2, "Width": 0.15, "Height": 0.2}


@dataclass
class FakeBackend(InProcessBackend):
    people: Mapping[str, list[str]] = field(default_factory=dict)
    latency: float = 0.0
    #: call number (1-based, over all APIs) -> exception to raise on that call
    fail_on: dict[int, BaseException] = field(default_factory=dict)
    #: (call number, api, identity) -> an exception to raise, or None to answer
    hook: Hook | None = None
    calls: Counter[str] = field(default_factory=Counter)
    billed: Counter[tuple[str, str]] = field(default_factory=Counter)
    collections: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    closed: bool = False
    _n: int = 0

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        self._n += 1
        number = self._n
        self.calls[api] += 1
        target = images.get("Image") or images.get("TargetImage")
        ident = identity(target) if target is not None else ""
        if self.latency:
            await asyncio.sleep(self.latency)
        fault = self.fail_on.get(number)
        if fault is None and self.hook is not None:
            fault = self.hook(number, api, ident)
        if fault is not None:
            raise fault
        answer = self._answer(api, params, images, ident)
        if ident:
            self.billed[(api, ident)] += 1
        return answer

    async def aclose(self) -> None:
        self.closed = True

    def _faces(self, ident: str) -> list[str]:
        return list(self.people.get(ident, []))

    def _answer(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput], ident: str
    ) -> dict[str, Any]:
        faces = self._faces(ident)
        if api == "DetectFaces":
            details = [{"BoundingBox": _box(i), "Confidence": 99.0} for i, _ in enumerate(faces)]
            if not details and ident.startswith("s3://"):
                details = [{"BoundingBox": _box(0), "Confidence": 90.0}]
            return {"FaceDetails": details}
        if api == "DetectLabels":
            return {"Labels": [{"Name": "Thing", "Confidence": 90.0}], "LabelModelVersion": "3.0"}
        if api == "DetectText":
            return {"TextDetections": []}
        if api == "DetectProtectiveEquipment":
            return {"ProtectiveEquipmentModelVersion": "1.0", "Persons": []}
        if api == "CompareFaces":
            wanted = self._faces(identity(images["SourceImage"]))[:1]
            matches = [
                {"Similarity": 99.0, "Face": {"BoundingBox": _box(i), "Confidence": 99.0}}
                for i, who in enumerate(faces)
                if who in wanted
            ]
            unmatched = [
                {"BoundingBox": _box(i)} for i, who in enumerate(faces) if who not in wanted
            ]
            return {"FaceMatches": matches, "UnmatchedFaces": unmatched}
        if api == "CreateCollection":
            collection = params["CollectionId"]
            if collection in self.collections:
                raise BackendError("ResourceAlreadyExistsException", collection, "permanent")
            self.collections[collection] = []
            return {"StatusCode": 200}
        if api == "DeleteCollection":
            if self.collections.pop(params["CollectionId"], None) is None:
                raise BackendError("ResourceNotFoundException", "no such collection", "permanent")
            return {"StatusCode": 200}
        if api == "IndexFaces":
            stored = self._collection(params["CollectionId"])
            records = []
            for i, who in enumerate(faces):
                face_id = f"face-{len(stored):06d}"
                stored.append((face_id, params["ExternalImageId"], who))
                face = {
                    "FaceId": face_id,
                    "ExternalImageId": params["ExternalImageId"],
                    "BoundingBox": _box(i),
                }
                records.append({"Face": face})
            return {"FaceRecords": records, "UnindexedFaces": []}
        if api == "SearchFacesByImage":
            stored = self._collection(params["CollectionId"])
            wanted = faces[:1]
            matches = [
                {
                    "Similarity": 98.0,
                    "Face": {"FaceId": fid, "ExternalImageId": ext, "BoundingBox": _box(0)},
                }
                for fid, ext, who in stored
                if who in wanted
            ][: int(params.get("MaxFaces", 4096))]
            return {"FaceMatches": matches}
        raise BackendError("UnknownOperationException", api, "permanent")

    def _collection(self, collection: str) -> list[tuple[str, str, str]]:
        stored = self.collections.get(collection)
        if stored is None:
            raise BackendError("ResourceNotFoundException", collection, "permanent")
        return stored
