"""The one seam between the pipeline and whatever answers Rekognition calls.

A backend is asked to run one Rekognition operation (by its API name, for example
``DetectFaces``) with the request parameters already built, except for the image fields,
which the backend fills from ``ImageInput``: an S3Object reference or bytes. It returns the
response without ``ResponseMetadata`` or raises ``rekbatch.errors.BackendError``.
AWS, the offline backend and test fakes plug in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ImageInput:
    """An image as a Rekognition request carries it: by S3 reference or by bytes."""

    bucket: str | None = None
    key: str | None = None
    data: bytes | None = None

    def as_request(self) -> dict[str, Any]:
        if self.data is not None:
            return {"Bytes": self.data}
        return {"S3Object": {"Bucket": self.bucket, "Name": self.key}}


class Backend(Protocol):
    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        """Run ``api`` with ``params`` plus each image under its request field name
        (``Image``, ``SourceImage``, ``TargetImage``)."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class FaceLookup(Protocol):
    """A backend that finds a collection's faces by ExternalImageId without listing the
    collection (Rekognition has no such call; the offline store answers with one scan of its
    row table)."""

    async def faces_of_images(
        self, collection_id: str, external_ids: set[str]
    ) -> list[dict[str, Any]]:
        """ListFaces' ``Faces`` entries of the faces carrying one of ``external_ids``."""
        ...
