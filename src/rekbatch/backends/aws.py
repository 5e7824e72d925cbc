"""Amazon Rekognition over HTTP: the ``Backend`` that calls the service, and nothing else.

One client for the whole run. botocore's own retries are off, so every throttle reaches the
run's rate limiter and nothing is retried twice. Every failure of a call becomes a
``BackendError`` (``rekbatch.calls.classify``): AWS errors by code, network failures as
transient, and an answer that cannot be read (a malformed response) as transient too: it is
a property of one call.

Two call paths (``aws.call_path``), logged once per API as it is first used:

- ``"direct"`` (the default). Rekognition speaks a plain protocol (AWS JSON 1.1: ``POST``
  with an ``X-Amz-Target`` header naming the operation, a JSON body each way), and the
  answers of the operations the engine sends carry no timestamps or binary members, so
  their JSON is already the parsed answer. botocore's generic request path (serialising
  against the model, resolving the endpoint rules, rebuilding the user agent, emitting a
  dozen events, walking the answer's shape) cost about as much client CPU per call as the
  HTTP exchange itself, and a large run is bound by that CPU. So each call is made
  directly: the body is JSON-encoded once, signed with botocore's own ``SigV4Auth`` and the
  client's credentials (refreshed as botocore refreshes them), and sent through the
  client's own HTTP session (its connection pool, TLS, proxies and timeouts, and botocore's
  exceptions for a failed connection). What botocore would add is kept: the request goes to
  the URL botocore builds from the endpoint (a path or query of
  ``aws.rekognition_endpoint_url`` included), the User-Agent is the one the client's
  configuration gives (``app/`` from ``AWS_SDK_UA_APP_ID`` or ``sdk_ua_app_id``,
  ``user_agent_extra``; only botocore's per-request ``m/`` metrics are left out), an error
  answer is read as botocore's JSON parser reads it (``__type`` after the last ``#``,
  ``message`` or ``Message``), and an answer keeps only what botocore's parser keeps: the
  members of the operation's output shape, without JSON nulls. So a record holds the same
  whichever path made it. Only the failures a request can meet (``classify.TABLE``) are
  failures of a call; any other exception (a changed aiobotocore, say) is
  ``CallPathFailed``, which stops the run in one line naming ``aws.call_path = "client"``.
- ``"client"``: the aiobotocore client's own methods. Operations whose input or output has
  a member JSON cannot carry as it is (a timestamp, or binary data in an answer) always go
  this way, as do all calls when the client lacks what the direct path needs.

``refresh_credentials`` opens a new client on credentials resolved anew (the caller asks
for it once when the service refuses the credentials in use).
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import re
from collections.abc import Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from aiobotocore.config import AioConfig
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.useragent import UserAgentString

from rekbatch import __version__
from rekbatch.backends.base import ImageInput
from rekbatch.calls.classify import UNREADABLE_ANSWER, classify, failure_of
from rekbatch.errors import BackendError, CallPathFailed

log = structlog.get_logger("rekbatch")

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

Prune = Callable[[Any], Any]


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


def _keep(value: Any) -> Any:
    return value


def pruner(shape: Any, made: dict[str, Prune] | None = None) -> Prune:
    """A function that keeps of a parsed JSON value what botocore's JSON parser keeps for
    ``shape``: a structure's modelled members that are not null (by their JSON names),
    lists and maps member by member, scalars as they are. Built once per output shape; it
    changes the value in place (fresh from ``json.loads``) and leaves alone what needs no
    change, which is nearly everything: an answer costs a set comparison per structure."""
    made = {} if made is None else made
    done = made.get(shape.name)
    if done is not None:
        return done
    kind = shape.type_name
    if kind == "structure":
        members: list[tuple[str, str, Prune]] = []  # (name, JSON name, pruner)
        nested: list[tuple[str, Prune]] = []  # the members with something inside to prune
        wire_names: set[str] = set()
        renamed = False

        def structure(value: Any) -> Any:
            if not isinstance(value, dict):
                return value  # read_answer has checked the member it relies on
            if not renamed and value.keys() <= wire_names and None not in value.values():
                for name, inner in nested:
                    item = value.get(name)
                    if item is not None:
                        value[name] = inner(item)
                return value
            out = {}
            for name, wire, inner in members:
                item = value.get(wire)
                if item is not None:
                    out[name] = inner(item)
            return out

        made[shape.name] = structure  # before the members: shapes may nest themselves
        for name, member in shape.members.items():
            wire = member.serialization.get("name", name)
            inner = pruner(member, made)
            members.append((name, wire, inner))
            wire_names.add(wire)
            renamed = renamed or wire != name
            if inner is not _keep:
                nested.append((name, inner))
        return structure
    if kind in ("list", "map"):
        each: Prune = _keep

        def listed(value: Any) -> Any:
            if isinstance(value, list):
                for i, item in enumerate(value):
                    value[i] = each(item)
            return value

        def mapped(value: Any) -> Any:
            if isinstance(value, dict):
                for key, item in value.items():
                    value[key] = each(item)
            return value

        walk = made[shape.name] = listed if kind == "list" else mapped  # shapes may nest
        each = pruner(shape.member if kind == "list" else shape.value, made)
        if each is _keep:  # only scalars inside: nothing to walk
            made[shape.name] = _keep
            return _keep
        return walk
    return _keep


def request_url(endpoint_url: str) -> str:
    """Where botocore sends a JSON-protocol request (its ``requestUri`` is ``/``): the
    endpoint URL with ``/`` as its path when it has none, its own path and query else."""
    parts = urlsplit(endpoint_url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, parts.fragment))


def _image_request(image: ImageInput) -> dict[str, Any]:
    # Bytes travel base64-encoded in JSON, as botocore's serialiser sends a blob.
    if image.data is not None:
        return {"Bytes": base64.b64encode(image.data).decode("ascii")}
    return {"S3Object": {"Bucket": image.bucket, "Name": image.key}}


def _malformed(detail: str) -> BackendError:
    return BackendError(UNREADABLE_ANSWER, detail, "transient")


def read_answer(api: str, body: bytes, prune: Prune = _keep) -> dict[str, Any]:
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
    pruned: dict[str, Any] = prune(answer)
    return pruned


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


def _versions() -> str:
    import aiobotocore
    import botocore

    return f"aiobotocore {aiobotocore.__version__}, botocore {botocore.__version__}"


class AwsBackend:
    """Rekognition through one aiobotocore client; use as an async context manager.

    ``new_session`` makes the session a credential reload resolves credentials with (a new
    one reads the environment, files and instance role again); without it, the first."""

    network = True  # calls cross a network: the caller gives each a deadline
    endpoint_name = "the Rekognition endpoint"
    ways_out = (
        "check the network, aws.region or aws.rekognition_endpoint_url, and the credentials; "
        'for local folders, --offline (backend.kind = "local") analyses them without AWS'
    )

    def __init__(
        self,
        session: Any,
        *,
        endpoint_url: str | None,
        pool: int,
        call_path: str = "direct",
        new_session: Callable[[], Any] | None = None,
        region: str | None = None,
    ) -> None:
        # ``region``: the Region to call and sign for (None: the session's); with
        # ``endpoint_url`` every Region's client goes to that URL, signed for its own Region.
        self._session = session
        self._new_session = new_session
        self._endpoint = endpoint_url
        self.call_path = call_path
        self._region_name = region
        self._config = AioConfig(
            max_pool_connections=pool,
            retries={"total_max_attempts": 1},
            connect_timeout=10,
            read_timeout=60,
            # The engine builds every request itself from a validated config.
            parameter_validation=False,
            user_agent_extra=f"rekbatch/{__version__}",
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._methods: dict[str, Any] = {}
        self._direct: dict[str, bool] = {}
        self._prune: dict[str, Prune] = {}
        self._http: Any = None  # the client's HTTP session, when the direct path is open
        self._credentials: Any = None
        self._url = ""
        self._region = ""
        self._user_agent = ""

    async def __aenter__(self) -> AwsBackend:
        await self._open(self._session)
        return self

    async def _open(self, session: Any) -> None:
        """A client on ``session``, and the direct path on it."""
        client = await self._stack.enter_async_context(
            session.client(
                "rekognition",
                endpoint_url=self._endpoint,
                region_name=self._region_name,
                config=self._config,
            )
        )
        self._client = client
        self._methods = {}
        self.endpoint_name = f"the Rekognition endpoint {client.meta.endpoint_url}"
        await self._open_direct(session)
        if self._http is None:
            self._direct.clear()  # a reopened client without the direct path

    async def refresh_credentials(self) -> bool:
        """Resolve the credentials again and make the next calls with them."""
        if self._new_session is not None:
            self._session = self._new_session()
        await self._open(self._session)  # the previous client closes with the backend
        return True

    async def _open_direct(self, session: Any) -> None:
        """What the direct path takes from the client: its HTTP session, credentials,
        endpoint, region and User-Agent. Without any of them every call goes through the
        client."""
        client = self._client
        self._http = None
        endpoint = getattr(client, "_endpoint", None)
        http = getattr(endpoint, "http_session", None)
        credentials = session.get_credentials()
        if inspect.isawaitable(credentials):
            credentials = await credentials
        if http is None or credentials is None or not hasattr(http, "send"):
            return  # no credentials: the client's own call says so, as botocore words it
        self._http = http
        self._credentials = credentials
        self._url = request_url(client.meta.endpoint_url)
        self._region = client.meta.region_name
        self._user_agent = self._client_user_agent(session)

    def _client_user_agent(self, session: Any) -> str:
        """The User-Agent the client sends, from its session's and its own configuration,
        without botocore's per-request metrics (``m/``)."""
        import aiobotocore
        import botocore

        core = getattr(session, "_session", session)
        agent = UserAgentString.from_environment().set_session_config(
            session_user_agent_name=getattr(core, "user_agent_name", "aiobotocore"),
            session_user_agent_version=getattr(core, "user_agent_version", aiobotocore.__version__),
            session_user_agent_extra=getattr(
                core, "user_agent_extra", f"botocore/{botocore.__version__}"
            ),
        )
        text: str = agent.with_client_config(self._client.meta.config).to_string()
        return text

    def _goes_direct(self, api: str) -> bool:
        direct = self._direct.get(api)
        if direct is None:
            if self.call_path == "direct":
                direct, why = self._direct_possible(api)
            else:
                direct, why = False, 'aws.call_path = "client"'
            self._direct[api] = direct
            log.info("call_path", api=api, path="direct" if direct else "client", why=why)
        return direct

    def _direct_possible(self, api: str) -> tuple[bool, str]:
        """Whether ``api`` can go the direct way, and why (or why not)."""
        if self._http is None:
            return False, "the client lacks what the direct path needs"
        model = self._client.meta.service_model
        if model.protocol != "json" or api not in model.operation_names:
            return False, "not a JSON operation of the service model"
        op = model.operation_model(api)
        if _has_type(op.input_shape, frozenset({"timestamp"})) or _has_type(
            op.output_shape, _NOT_PLAIN
        ):
            return False, "timestamps or binary members"
        self._prune[api] = pruner(op.output_shape)
        return True, 'aws.call_path = "direct"'

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
            status: int = response.status_code
        except Exception as exc:
            failure = failure_of(exc)
            if failure is None:
                raise CallPathFailed(api, exc, _versions()) from exc
            raise failure from None
        if status >= 300:
            raise read_error(status, content)
        return read_answer(api, content, self._prune.get(api, _keep))

    async def aclose(self) -> None:
        await self._stack.aclose()


def _classified(exc: Exception) -> BackendError:
    classified = failure_of(exc)
    if classified is None:
        # botocore's parser raises whatever the malformed answer provokes (a bare
        # AttributeError for a member of the wrong type): this call's problem, worth
        # another attempt.
        return _malformed(f"{type(exc).__name__}: {exc}")
    return classified
