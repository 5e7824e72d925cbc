"""The one seam between the pipeline and whatever answers Rekognition calls.

A backend is asked to run one Rekognition operation (by its API name, for example
``DetectFaces``) with the request parameters already built, except for the image fields,
which the backend fills from ``ImageInput``: an S3Object reference or bytes. It returns the
response without ``ResponseMetadata`` or raises ``rekbatch.errors.BackendError``.
AWS, the offline backend and test fakes plug in the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class ObjectBytes:
    """An S3 object's bytes for a Region that cannot read its bucket: read at most once (when
    first asked for), then shared by the object's operations and their retries. ``size`` is
    the listed size; ``data``, bytes already read (a small object's whole head)."""

    def __init__(
        self, size: int, read: Callable[[], Awaitable[bytes]], data: bytes | None = None
    ) -> None:
        self.size = size
        self._read = read
        self._task: asyncio.Future[bytes] | None = None
        if data is not None:
            self._task = asyncio.get_running_loop().create_future()
            self._task.set_result(data)

    async def get(self, on_read: Callable[[], None] | None = None) -> bytes:
        """The bytes; ``on_read`` is called when this call starts the read. A read that
        failed is tried again by the next call; one whose caller gave up goes on for the
        next."""
        task = self._task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._task = asyncio.ensure_future(self._read())
            if on_read is not None:
                on_read()
        return await asyncio.shield(task)


@dataclass(frozen=True, slots=True)
class ImageInput:
    """An image as a Rekognition request carries it: by S3 reference or by bytes.

    ``fetch``: for an S3 reference, its bytes for a Region other than the bucket's."""

    bucket: str | None = None
    key: str | None = None
    data: bytes | None = None
    fetch: ObjectBytes | None = field(default=None, compare=False, repr=False)

    def as_request(self) -> dict[str, Any]:
        if self.data is not None:
            return {"Bytes": self.data}
        return {"S3Object": {"Bucket": self.bucket, "Name": self.key}}


class Backend(Protocol):
    @property
    def network(self) -> bool:
        """Calls cross a network: the caller gives each a deadline (and an upload's time)."""
        ...

    @property
    def endpoint_name(self) -> str:
        """The endpoint as errors name it ("the Rekognition endpoint https://...")."""
        ...

    @property
    def ways_out(self) -> str:
        """What to check when the endpoint is never reached (the end of that line)."""
        ...

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


class InProcessBackend:
    """The protocol's defaults for a backend that answers in this process: no network, no
    credentials."""

    network = False
    endpoint_name = "the backend"
    ways_out = ""

    async def refresh_credentials(self) -> bool:
        return False
