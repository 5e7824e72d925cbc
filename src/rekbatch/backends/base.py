"""The one seam between the pipeline and whatever answers Rekognition calls.

A backend is asked to run one Rekognition operation (by its API name, for example
``DetectFaces``) with the request parameters already built, except for the image fields,
which the backend fills from ``ImageInput``: an S3Object reference or bytes. It returns the
response without ``ResponseMetadata`` or raises ``rekbatch.errors.BackendError``.
AWS, the offline backend and test fakes plug in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


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
    # Calls cross a network: the caller gives each a deadline (and an upload's time).
    network: bool
    # The endpoint as errors name it ("the Rekognition endpoint https://...").
    endpoint_name: str
    # What to check when the endpoint is never reached (the end of that error's line).
    ways_out: str

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        """Run ``api`` with ``params`` plus each image under its request field name
        (``Image``, ``SourceImage``, ``TargetImage``)."""
        ...

    async def refresh_credentials(self) -> bool:
        """Resolve the credentials again after the service refused them; False when there
        is nothing to reload (the refusal stands)."""
        ...

    async def aclose(self) -> None: ...


class InProcessBackend:
    """The protocol's defaults for a backend that answers in this process: no network, no
    credentials."""

    network = False
    endpoint_name = "the backend"
    ways_out = ""

    async def refresh_credentials(self) -> bool:
        return False
