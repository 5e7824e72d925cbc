"""AWS access: one session and one client per service for the whole run.

``AwsClients`` opens the S3 and Rekognition clients once; ``AwsBackend`` is the Rekognition
side of the ``Backend`` seam. botocore's own retries are off for Rekognition, so every
throttle reaches rekbatch's limiter and nothing is retried twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from types import TracebackType
from typing import Any

import aioboto3
import botocore.exceptions as bexc
from aiobotocore.config import AioConfig

from rekbatch.backends.base import ImageInput
from rekbatch.calls.retry import classify
from rekbatch.errors import BackendError, SetupError

# Network failures that say nothing about the request itself: worth another attempt.
_TRANSIENT_NETWORK = (
    bexc.EndpointConnectionError,
    bexc.ConnectionClosedError,
    bexc.ConnectTimeoutError,
    bexc.ReadTimeoutError,
    bexc.HTTPClientError,
    asyncio.TimeoutError,
    ConnectionError,
)


def _snake(api: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", api).lower()


def describe_setup_error(exc: BaseException, what: str) -> SetupError | None:
    """One clear line for an environment problem met before any work, or None."""
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return SetupError(
            f"{what}: no AWS credentials found (set a profile, AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, or run where an instance role is available)"
        )
    if isinstance(exc, bexc.ProfileNotFound):
        return SetupError(f"{what}: {exc}")
    if isinstance(exc, bexc.EndpointConnectionError):
        return SetupError(f"{what}: cannot reach the endpoint: {exc}")
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        message = error.get("Message", "") or code
        if code in {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}:
            return SetupError(f"{what}: bucket or object not found ({code})")
        if code in {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}:
            return SetupError(f"{what}: access denied ({message})")
        if code in {
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
            "UnrecognizedClientException",
            "InvalidClientTokenId",
        }:
            return SetupError(f"{what}: the AWS credentials were refused ({code})")
        return SetupError(f"{what}: {code}: {message}")
    return None


class AwsClients:
    """The run's S3 and Rekognition clients, opened once and closed together."""

    def __init__(
        self,
        *,
        region: str,
        profile: str | None,
        s3_endpoint_url: str | None,
        rekognition_endpoint_url: str | None,
        concurrency: int,
        with_rekognition: bool = True,
    ) -> None:
        try:
            self._session = aioboto3.Session(profile_name=profile, region_name=region)
        except bexc.ProfileNotFound as exc:
            raise SetupError(f"aws.profile: {exc}") from None
        pool = concurrency + 16  # the listing, sniffing and downloads share the S3 pool
        self._s3_cfg = AioConfig(
            max_pool_connections=pool,
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=60,
        )
        self._rek_cfg = AioConfig(
            max_pool_connections=pool,
            retries={"total_max_attempts": 1},
            connect_timeout=10,
            read_timeout=60,
        )
        self._s3_endpoint = s3_endpoint_url
        self._rek_endpoint = rekognition_endpoint_url
        self._with_rek = with_rekognition
        self._stack = contextlib.AsyncExitStack()
        self.s3: Any = None
        self.rekognition: Any = None

    async def __aenter__(self) -> AwsClients:
        self.s3 = await self._stack.enter_async_context(
            self._session.client("s3", endpoint_url=self._s3_endpoint, config=self._s3_cfg)
        )
        if self._with_rek:
            self.rekognition = await self._stack.enter_async_context(
                self._session.client(
                    "rekognition", endpoint_url=self._rek_endpoint, config=self._rek_cfg
                )
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def check_bucket(self, bucket: str) -> None:
        """Fail early, with one clear line, when a source bucket cannot be listed."""
        try:
            await self.s3.list_objects_v2(Bucket=bucket, MaxKeys=1)
        except Exception as exc:  # translated below, or re-raised untouched
            setup = describe_setup_error(exc, f"s3://{bucket}")
            if setup is None:
                raise
            raise setup from None

    async def read_head(self, bucket: str, key: str, nbytes: int) -> bytes:
        response = await self.s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{nbytes - 1}")
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    async def read_object(self, bucket: str, key: str) -> bytes:
        response = await self.s3.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data


def backend_error_from(exc: BaseException) -> BackendError | None:
    """Classify a botocore/aiohttp failure of one call; None if it is not a call failure."""
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "UnknownError")
        message = str(error.get("Message") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return BackendError(code, message, classify(code, status))
    if isinstance(exc, _TRANSIENT_NETWORK):
        return BackendError(type(exc).__name__, str(exc) or type(exc).__name__, "transient")
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return BackendError("NoCredentials", str(exc), "permanent")
    return None


class AwsBackend:
    """Rekognition over HTTP through the run's single client."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        request = dict(params)
        for field, image in images.items():
            request[field] = image.as_request()
        method = getattr(self._client, _snake(api))
        try:
            response: dict[str, Any] = await method(**request)
        except Exception as exc:
            classified = backend_error_from(exc)
            if classified is None:
                raise
            raise classified from None
        response.pop("ResponseMetadata", None)
        return response

    async def aclose(self) -> None:
        return None
