"""Amazon Rekognition over HTTP: the ``Backend`` that calls the service, and nothing else.

One client for the whole run. botocore's own retries are off, so every throttle reaches the
run's rate limiter and nothing is retried twice. Every failure of a call becomes a
``BackendError``: AWS errors by code, network failures as transient, and an answer botocore
cannot parse (a malformed response) as transient too: it is a property of one call.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from types import TracebackType
from typing import Any

from aiobotocore.config import AioConfig

from rekbatch.backends.base import ImageInput
from rekbatch.errors import BackendError, call_error_from

# The member every real answer of these APIs carries (an empty list when nothing was
# found). botocore turns a body it cannot parse into a dict without it, and says nothing.
EXPECTED_MEMBER = {
    "DetectFaces": "FaceDetails",
    "DetectLabels": "Labels",
    "CompareFaces": "FaceMatches",
    "DetectText": "TextDetections",
    "DetectModerationLabels": "ModerationLabels",
    "RecognizeCelebrities": "CelebrityFaces",
    "DetectProtectiveEquipment": "Persons",
    "IndexFaces": "FaceRecords",
    "SearchFacesByImage": "FaceMatches",
}


def _snake(api: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", api).lower()


class AwsBackend:
    """Rekognition through one aiobotocore client; use as an async context manager."""

    network = True  # calls cross a network: the caller gives each a deadline
    endpoint_name = "the Rekognition endpoint"

    def __init__(self, session: Any, *, endpoint_url: str | None, pool: int) -> None:
        self._session = session
        self._endpoint = endpoint_url
        self._config = AioConfig(
            max_pool_connections=pool,
            retries={"total_max_attempts": 1},
            connect_timeout=10,
            read_timeout=60,
            # The engine builds every request itself from a validated config.
            parameter_validation=False,
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._methods: dict[str, Any] = {}

    async def __aenter__(self) -> AwsBackend:
        # aiohttp warns about any body over 1 MiB passed as bytes; images sent as bytes
        # (up to 5 MB, 6.7 MB as base64 JSON) are such bodies by design, written in one go.
        warnings.filterwarnings(
            "ignore", message="Sending a large body directly", category=ResourceWarning
        )
        self._client = await self._stack.enter_async_context(
            self._session.client("rekognition", endpoint_url=self._endpoint, config=self._config)
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        method = self._methods.get(api)
        if method is None:
            method = self._methods[api] = getattr(self._client, _snake(api))
        request = dict(params)
        for name, image in images.items():
            request[name] = image.as_request()
        try:
            response: dict[str, Any] = await method(**request)
        except Exception as exc:
            classified = call_error_from(exc)
            if classified is None:
                # botocore could not make sense of the answer (members of the wrong type,
                # a body cut short): this call's problem, worth another attempt.
                raise BackendError(
                    "InvalidResponse", f"{type(exc).__name__}: {exc}", "transient"
                ) from None
            raise classified from None
        response.pop("ResponseMetadata", None)
        expected = EXPECTED_MEMBER.get(api)
        if expected is not None and expected not in response:
            raise BackendError(
                "InvalidResponse",
                f"the answer has no {expected}: {str(response)[:200]}",
                "transient",
            )
        return response

    async def aclose(self) -> None:
        await self._stack.aclose()
