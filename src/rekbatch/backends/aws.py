"""Amazon Rekognition over HTTP: the ``Backend`` that calls the service, and nothing else.

One client for the whole run. botocore's own retries are off, so every throttle reaches the
run's rate limiter and nothing is retried twice. Every failure of a call becomes a
``BackendError``: AWS errors by code, network failures as transient, and an answer that
cannot be read (a malformed response) as transient too: it is a property of one call.

Rekognition speaks a plain protocol (AWS JSON 1.1: ``POST /`` with an ``X-Amz-Target``
header naming the operation, a JSON body each way), and the answers of the operations the
engine sends carry no timestamps or binary members, so their JSON is already the parsed
answer. botocore's generic request path (serialising against the model, resolving the
endpoint rules, rebuilding the user agent, emitting a dozen events, walking the answer's
shape) cost about as much client CPU per call as the HTTP exchange itself, and a large run
is bound by that CPU. So each call is made directly: the body is JSON-encoded once, signed
with botocore's own ``SigV4Auth`` and the client's credentials (refreshed as botocore
refreshes them), and sent through the client's own HTTP session (its connection pool,
TLS, proxies and timeouts, and botocore's exceptions for a failed connection). Endpoint
and region are the client's, resolved once. An error answer is read the way botocore's JSON
parser reads it (``__type`` after the last ``#``, ``message`` or ``Message``). An operation
whose input or output has a member JSON cannot carry as it is (a timestamp, or binary data
in an answer) goes through the client's method instead, as do all calls when the client
lacks what the direct path needs.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import re
import sys
import warnings
from types import TracebackType
from typing import Any

from aiobotocore.config import AioConfig
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest

from rekbatch import __version__
from rekbatch.backends.base import ImageInput
from rekbatch.calls.retry import classify
from rekbatch.errors import BackendError, call_error_from

# The member every real answer of these APIs carries: a list of structures (empty when
# nothing was found). An answer without it, or with something else there, is malformed.
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

SIGNING_NAME = "rekognition"
CONTENT_TYPE = "application/x-amz-json-1.1"
# Shapes JSON does not carry as they are: botocore turns them into datetimes and bytes.
_NOT_PLAIN = frozenset({"timestamp", "blob"})


def _snake(api: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", api).lower()


def _has_type(shape: Any, types: frozenset[str], seen: set[str] | None = None) -> bool:
    """Whether ``shape`` (a botocore model shape) holds a member of one of ``types``."""
    if shape is None:
        return False
    seen = set() if seen is None else seen
    if shape.name in seen:
        return False
    seen.add(shape.name)
    if shape.type_name in types:
        return True
    if shape.type_name == "structure":
        return any(_has_type(m, types, seen) for m in shape.members.values())
    if shape.type_name == "list":
        return _has_type(shape.member, types, seen)
    if shape.type_name == "map":
        return _has_type(shape.key, types, seen) or _has_type(shape.value, types, seen)
    return False


def _image_request(image: ImageInput) -> dict[str, Any]:
    # Bytes travel base64-encoded in JSON, as botocore's serialiser sends a blob.
    if image.data is not None:
        return {"Bytes": base64.b64encode(image.data).decode("ascii")}
    return {"S3Object": {"Bucket": image.bucket, "Name": image.key}}


def _malformed(detail: str) -> BackendError:
    return BackendError("InvalidResponse", detail, "transient")


def read_answer(api: str, body: bytes) -> dict[str, Any]:
    """A 200 answer's body as the parsed response; ``InvalidResponse`` when it is not one."""
    try:
        answer = json.loads(body)
    except ValueError as exc:  # cut short, or not JSON at all
        raise _malformed(f"the answer is not JSON ({exc}): {body[:200]!r}") from None
    if not isinstance(answer, dict):
        raise _malformed(f"the answer is not a JSON object: {body[:200]!r}")
    expected = EXPECTED_MEMBER.get(api)
    if expected is not None:
        member = answer.get(expected)
        if not isinstance(member, list) or not all(isinstance(x, dict) for x in member):
            raise _malformed(f"the answer has no list of {expected}: {body[:200]!r}")
    return answer


def read_error(status: int, body: bytes) -> BackendError:
    """An error answer as botocore's JSON parser reads it, classified."""
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {"message": body.decode("utf-8", "replace")}
    if not isinstance(parsed, dict):
        parsed = {}
    code = str(parsed.get("__type") or status)
    code = code.split(":", 1)[0].rsplit("#", 1)[-1]
    message = str(parsed.get("message", parsed.get("Message", "")))
    return BackendError(code, message, classify(code, status))


class AwsBackend:
    """Rekognition through one aiobotocore client; use as an async context manager."""

    network = True  # calls cross a network: the caller gives each a deadline
    endpoint_name = "the Rekognition endpoint"

    def __init__(
        self, session: Any, *, endpoint_url: str | None, pool: int, region: str | None = None
    ) -> None:
        # ``region``: the Region to call and sign for (None: the session's); with
        # ``endpoint_url`` every Region's client goes to that URL, signed for its own Region.
        self._session = session
        self._endpoint = endpoint_url
        self._region_name = region
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
        self._direct: dict[str, bool] = {}
        self._http: Any = None  # the client's HTTP session, when the direct path is open
        self._credentials: Any = None
        self._url = ""
        self._region = ""
        self._user_agent = ""

    async def __aenter__(self) -> AwsBackend:
        # aiohttp warns about any body over 1 MiB passed as bytes; images sent as bytes
        # (up to 5 MB, 6.7 MB as base64 JSON) are such bodies by design, written in one go.
        warnings.filterwarnings(
            "ignore", message="Sending a large body directly", category=ResourceWarning
        )
        self._client = await self._stack.enter_async_context(
            self._session.client(
                "rekognition",
                endpoint_url=self._endpoint,
                region_name=self._region_name,
                config=self._config,
            )
        )
        await self._open_direct()
        return self

    async def _open_direct(self) -> None:
        """What the direct path takes from the client: its HTTP session, credentials,
        endpoint and region. Without any of them every call goes through the client."""
        client = self._client
        endpoint = getattr(client, "_endpoint", None)
        http = getattr(endpoint, "http_session", None)
        credentials = self._session.get_credentials()
        if inspect.isawaitable(credentials):
            credentials = await credentials
        if http is None or credentials is None or not hasattr(http, "send"):
            return  # no credentials: the client's own call says so, as botocore words it
        import aiobotocore
        import botocore

        self._http = http
        self._credentials = credentials
        self._url = client.meta.endpoint_url.rstrip("/") + "/"
        self._region = client.meta.region_name
        python = ".".join(map(str, sys.version_info[:3]))
        self._user_agent = (
            f"rekbatch/{__version__} aiobotocore/{aiobotocore.__version__} "
            f"botocore/{botocore.__version__} Python/{python}"
        )

    def _goes_direct(self, api: str) -> bool:
        direct = self._direct.get(api)
        if direct is None:
            direct = False
            if self._http is not None:
                model = self._client.meta.service_model
                if model.protocol == "json" and api in model.operation_names:
                    op = model.operation_model(api)
                    direct = not _has_type(op.input_shape, frozenset({"timestamp"})) and not (
                        _has_type(op.output_shape, _NOT_PLAIN)
                    )
            self._direct[api] = direct
        return direct

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
        if self._goes_direct(api):
            return await self._call_direct(api, params, images)
        method = self._methods.get(api)
        if method is None:
            method = self._methods[api] = getattr(self._client, _snake(api))
        request = dict(params)
        for name, image in images.items():
            request[name] = image.as_request()
        try:
            response: dict[str, Any] = await method(**request)
        except Exception as exc:
            raise _classified(exc) from None
        response.pop("ResponseMetadata", None)
        expected = EXPECTED_MEMBER.get(api)
        if expected is not None and expected not in response:
            raise _malformed(f"the answer has no {expected}: {str(response)[:200]}")
        return response

    def signed_request(self, api: str, body: bytes, credentials: Any) -> Any:
        """The prepared, signed HTTP request of one call (``AWSPreparedRequest``)."""
        request = AWSRequest(
            method="POST",
            url=self._url,
            data=body,
            headers={
                "Content-Type": CONTENT_TYPE,
                "X-Amz-Target": f"RekognitionService.{api}",
                "User-Agent": self._user_agent,
            },
        )
        SigV4Auth(credentials, SIGNING_NAME, self._region).add_auth(request)
        return request.prepare()

    async def _call_direct(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        request = dict(params)
        for name, image in images.items():
            request[name] = _image_request(image)
        body = json.dumps(request, separators=(",", ":")).encode()
        try:
            frozen = self._credentials.get_frozen_credentials()
            if inspect.isawaitable(frozen):  # refreshable credentials refresh here
                frozen = await frozen
            response = await self._http.send(self.signed_request(api, body, frozen))
            content: bytes = await response.content
        except Exception as exc:
            raise _classified(exc) from None
        if response.status_code >= 300:
            raise read_error(response.status_code, content)
        return read_answer(api, content)

    async def aclose(self) -> None:
        await self._stack.aclose()


def _classified(exc: Exception) -> BackendError:
    classified = call_error_from(exc)
    if classified is None:
        # An answer that could not be made sense of (members of the wrong type, a body cut
        # short): this call's problem, worth another attempt.
        return _malformed(f"{type(exc).__name__}: {exc}")
    return classified
