"""The AWS backend's direct request path against botocore's own, on the same HTTP seam.

Both paths end in the client's HTTP session (``http_session.send``); a stub there records
what each sends and answers what the test says. The direct path must send what botocore
would (URL, target, content type, the same JSON body), signed correctly, and read every
answer (data, errors, malformed bodies) the way botocore's client does.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aioboto3
import pytest

from rekbatch.backends.aws import AwsBackend
from rekbatch.backends.base import ImageInput
from rekbatch.errors import BackendError, CallPathFailed

REGION = "eu-west-1"
KEY_ID = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
ENDPOINT = "http://127.0.0.1:9"  # never reached: the stub answers


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Answer:
    """What botocore's HTTP session returns, as far as both paths read it."""

    def __init__(self, url: str, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.url = url
        self.status_code = status
        self.headers = {"x-amzn-requestid": "req-1", **headers}
        self.raw = None
        self._body = body

    @property
    def content(self) -> Any:
        async def read() -> bytes:
            return self._body

        return read()


class _Stub:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.status = 200
        self.body = b"{}"
        self.headers: dict[str, str] = {}

    async def send(self, request: Any) -> _Answer:
        self.sent.append(request)
        return _Answer(request.url, self.status, self.body, self.headers)


def _session(region: str = REGION) -> Any:
    return aioboto3.Session(
        aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name=region
    )


async def _open(
    session: Any | None = None, endpoint_url: str | None = ENDPOINT, region: str = REGION
) -> tuple[AwsBackend, _Stub]:
    session = session or _session(region)
    backend = AwsBackend(session, endpoint_url=endpoint_url, pool=4)
    await backend.__aenter__()
    stub = _Stub()
    # One stub behind both paths: the client's HTTP session, which the direct path uses too.
    http = backend._client._endpoint.http_session
    assert backend._http is http
    http.send = stub.send
    return backend, stub


async def _both(
    backend: AwsBackend, api: str, params: dict[str, Any], images: dict[str, ImageInput]
) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """The request each path sends and the answer each returns."""
    stub: _Stub = backend._http.send.__self__
    direct_answer = await backend.call(api, params, images)
    direct = stub.sent[-1]
    backend._direct[api] = False  # the client's own method from here
    try:
        client_answer = await backend.call(api, params, images)
    finally:
        del backend._direct[api]
    return direct, stub.sent[-1], direct_answer, client_answer


LABELS_IMAGE = {"Image": ImageInput("b", "k")}


def _both_detect_labels(
    body: bytes = b'{"Labels": []}', **open_args: Any
) -> tuple[Any, Any, Any, Any]:
    """``_both`` for one DetectLabels answered with ``body``, on a backend opened and closed."""

    async def main() -> tuple[Any, Any, Any, Any]:
        backend, stub = await _open(**open_args)
        try:
            stub.body = body
            return await _both(backend, "DetectLabels", {}, LABELS_IMAGE)
        finally:
            await backend.aclose()

    return asyncio.run(main())


ErrorT = TypeVar("ErrorT", bound=BaseException)


def _detect_labels_error(
    expected: type[ErrorT],
    *,
    body: bytes | None = None,
    send: Callable[[Any], Awaitable[Any]] | None = None,
) -> ErrorT:
    """The error one DetectLabels call raises when the stub answers ``body`` or ``send``
    replaces the HTTP session's."""

    async def main() -> ErrorT:
        backend, stub = await _open()
        if body is not None:
            stub.body = body
        if send is not None:
            backend._http.send = send
        try:
            with pytest.raises(expected) as caught:
                await backend.call("DetectLabels", {}, LABELS_IMAGE)
            return caught.value
        finally:
            await backend.aclose()

    return asyncio.run(main())


CASES = [
    (
        "DetectLabels",
        {"MaxLabels": 10, "MinConfidence": 55.0},
        {"Image": ImageInput(bucket="photos", key="a/b c+é.jpg")},
        {
            "Labels": [{"Name": "Person", "Confidence": 99.1, "Instances": [], "Parents": []}],
            "LabelModelVersion": "3.0",
        },
    ),
    (
        "DetectFaces",
        {"Attributes": ["DEFAULT"]},
        {"Image": ImageInput(data=b"\xff\xd8\xff\xe0 not really a jpeg \x00\x01")},
        {
            "FaceDetails": [
                {
                    "BoundingBox": {"Width": 0.5, "Height": 0.4, "Left": 0.1, "Top": 0.2},
                    "Confidence": 99.9,
                }
            ]
        },
    ),
    (
        "CompareFaces",
        {"SimilarityThreshold": 80.0, "QualityFilter": "AUTO"},
        {
            "SourceImage": ImageInput(data=b"reference bytes"),
            "TargetImage": ImageInput(bucket="photos", key="crowd.jpg"),
        },
        {
            "FaceMatches": [{"Similarity": 99.5, "Face": {"Confidence": 99.0}}],
            "UnmatchedFaces": [],
            "SourceImageFace": {"Confidence": 99.9},
        },
    ),
    (
        "SearchFacesByImage",
        {"CollectionId": "rekbatch-job-0001", "FaceMatchThreshold": 80.0, "MaxFaces": 4096},
        {"Image": ImageInput(bucket="photos", key="x.png")},
        {
            "FaceMatches": [{"Similarity": 92.0, "Face": {"FaceId": "f1", "ExternalImageId": "r"}}],
            "FaceModelVersion": "6.0",
        },
    ),
]


@pytest.mark.parametrize(("api", "params", "images", "answer"), CASES, ids=[c[0] for c in CASES])
def test_direct_request_and_answer_match_botocore(
    api: str, params: dict[str, Any], images: dict[str, ImageInput], answer: dict[str, Any]
) -> None:
    async def main() -> None:
        backend, stub = await _open()
        try:
            assert backend._goes_direct(api)
            stub.body = json.dumps(answer).encode()
            direct, client, direct_answer, client_answer = await _both(backend, api, params, images)
        finally:
            await backend.aclose()
        assert direct.method == client.method == "POST"
        assert direct.url.rstrip("/") == client.url.rstrip("/") == ENDPOINT
        for header in ("X-Amz-Target", "Content-Type"):
            assert _text(direct.headers[header]) == _text(client.headers[header])
        assert json.loads(direct.body) == json.loads(client.body)
        assert direct_answer == client_answer == answer

    asyncio.run(main())


@pytest.mark.parametrize(
    ("region", "fips", "host"),
    [
        ("eu-west-1", False, "rekognition.eu-west-1.amazonaws.com"),
        ("us-east-1", True, "rekognition-fips.us-east-1.amazonaws.com"),
        ("ap-southeast-2", False, "rekognition.ap-southeast-2.amazonaws.com"),
    ],
)
def test_direct_request_goes_to_the_endpoint_botocore_resolves(
    region: str, fips: bool, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fips:
        monkeypatch.setenv("AWS_USE_FIPS_ENDPOINT", "true")

    direct, client, _, _ = _both_detect_labels(endpoint_url=None, region=region)
    assert urlsplit(direct.url).netloc == urlsplit(client.url).netloc == host
    assert f"/{region}/rekognition/aws4_request" in direct.headers["Authorization"]


def _expected_signature(request: Any, secret: str, region: str) -> str:
    """SigV4 written out from the specification, to check the signature independently."""
    auth = request.headers["Authorization"]
    signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    amz_date = request.headers["X-Amz-Date"]
    day = amz_date[:8]
    url = urlsplit(request.url)
    headers = {k.lower(): str(v).strip() for k, v in request.headers.items()}
    headers.setdefault("host", url.netloc)
    canonical = "\n".join(
        [
            request.method,
            url.path or "/",
            url.query,
            "".join(f"{name}:{headers[name]}\n" for name in signed),
            ";".join(signed),
            hashlib.sha256(request.body).hexdigest(),
        ]
    )
    scope = f"{day}/{region}/rekognition/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + secret).encode()
    for part in (day, region, "rekognition", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def test_direct_request_is_signed_by_the_specification() -> None:
    async def main() -> Any:
        backend, stub = await _open()
        try:
            stub.body = b'{"Labels": []}'
            await backend.call("DetectLabels", {"MaxLabels": 5}, LABELS_IMAGE)
        finally:
            await backend.aclose()
        return stub.sent[-1]

    request = asyncio.run(main())
    auth = request.headers["Authorization"]
    today = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    assert auth.startswith(f"AWS4-HMAC-SHA256 Credential={KEY_ID}/")
    assert f"/{REGION}/rekognition/aws4_request" in auth
    signed = set(auth.split("SignedHeaders=")[1].split(",")[0].split(";"))
    assert {"content-type", "host", "x-amz-date", "x-amz-target"} <= signed
    assert request.headers["X-Amz-Date"][:8] in {
        today,
        (datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)).strftime("%Y%m%d"),
    }
    assert auth.endswith("Signature=" + _expected_signature(request, SECRET, REGION))
    # A wrong secret gives another signature: the check above can fail.
    assert not auth.endswith("Signature=" + _expected_signature(request, SECRET + "x", REGION))


def test_refreshed_credentials_sign_the_next_call() -> None:
    from aiobotocore.credentials import AioRefreshableCredentials

    refreshed: list[str] = []

    async def refresh() -> dict[str, str]:
        key = f"AKIDREFRESHED{len(refreshed)}"
        refreshed.append(key)
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
        return {
            "access_key": key,
            "secret_key": SECRET,
            "token": "tok-" + key,
            "expiry_time": expiry.isoformat(),
        }

    async def main() -> list[Any]:
        creds = AioRefreshableCredentials.create_from_metadata(
            {
                "access_key": "AKIDOLD",
                "secret_key": SECRET,
                "token": "tok-old",
                "expiry_time": (
                    datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
                ).isoformat(),
            },
            refresh_using=refresh,
            method="test",
        )
        session = aioboto3.Session(region_name=REGION)
        session._session._credentials = creds  # the session's resolved credentials
        backend, stub = await _open(session)
        try:
            stub.body = b'{"Labels": []}'
            await backend.call("DetectLabels", {}, LABELS_IMAGE)
        finally:
            await backend.aclose()
        return stub.sent

    sent = asyncio.run(main())
    assert refreshed, "expired credentials were not refreshed"
    assert f"Credential={refreshed[-1]}/" in sent[-1].headers["Authorization"]
    assert sent[-1].headers["X-Amz-Security-Token"] == "tok-" + refreshed[-1]


ERRORS = [
    (
        400,
        b'{"__type":"com.amazonaws.rekognition#ThrottlingException","message":"slow"}',
        {},
        "ThrottlingException",
        "throttle",
    ),
    (
        400,
        b'{"__type":"ProvisionedThroughputExceededException","Message":"quota"}',
        {},
        "ProvisionedThroughputExceededException",
        "throttle",
    ),
    (
        400,
        b'{"__type":"InvalidImageFormatException","Message":"bad image"}',
        {},
        "InvalidImageFormatException",
        "permanent",
    ),
    (
        500,
        b'{"__type":"InternalServerError","Message":"oops"}',
        {},
        "InternalServerError",
        "transient",
    ),
    (503, b"<html>Service Unavailable</html>", {}, "503", "transient"),
    (400, b"", {}, "400", "permanent"),
]


@pytest.mark.parametrize(("status", "body", "headers", "code", "kind"), ERRORS)
def test_error_answers_read_as_botocore_reads_them(
    status: int, body: bytes, headers: dict[str, str], code: str | None, kind: str | None
) -> None:
    async def attempt(backend: AwsBackend) -> BackendError:
        with pytest.raises(BackendError) as caught:
            await backend.call("DetectLabels", {}, LABELS_IMAGE)
        return caught.value

    async def main() -> tuple[BackendError, BackendError]:
        backend, stub = await _open()
        try:
            stub.status, stub.body, stub.headers = status, body, headers
            direct = await attempt(backend)
            backend._direct["DetectLabels"] = False
            return direct, await attempt(backend)
        finally:
            await backend.aclose()

    direct, client = asyncio.run(main())
    assert (direct.code, direct.kind) == (client.code, client.kind)
    if code is not None:
        assert (direct.code, direct.kind) == (code, kind)


@pytest.mark.parametrize(
    "body",
    [
        b'{"Labels": [1, 2]}',  # members of the wrong type
        b'{"Labels": [{"Name": "Pers',  # cut short
        b"[1, 2]",  # not an object
        b'{"LabelModelVersion": "3.0"}',  # the answer's list missing
    ],
)
def test_malformed_answers_are_transient_invalid_response(body: bytes) -> None:
    error = _detect_labels_error(BackendError, body=body)
    assert (error.code, error.kind) == ("InvalidResponse", "transient")


def test_operations_with_timestamps_or_binary_answers_use_the_client() -> None:
    async def main() -> dict[str, bool]:
        backend, _ = await _open()
        try:
            names = ["DetectLabels", "IndexFaces", "DescribeCollection", "ListCollections"]
            return {name: backend._goes_direct(name) for name in names}
        finally:
            await backend.aclose()

    direct = asyncio.run(main())
    assert direct["DetectLabels"] and direct["IndexFaces"]
    assert not direct["DescribeCollection"]  # CreationTimestamp in its answer


def test_without_credentials_every_call_goes_through_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)

    async def main() -> BackendError:
        backend = AwsBackend(aioboto3.Session(region_name=REGION), endpoint_url=ENDPOINT, pool=2)
        async with backend:
            assert not backend._goes_direct("DetectLabels")
            with pytest.raises(BackendError) as caught:
                await backend.call("DetectLabels", {}, LABELS_IMAGE)
            return caught.value

    error = asyncio.run(main())
    assert (error.code, error.kind) == ("NoCredentials", "credentials")


def _without_metrics(agent: str | bytes) -> str:
    """A User-Agent without botocore's per-request metrics (``m/...``)."""
    return " ".join(part for part in _text(agent).split() if not part.startswith("m/"))


def test_opening_the_backend_leaves_the_warning_filters_alone() -> None:
    """Library code changes no process-wide setting (the command line quiets aiohttp's
    large-body warning for its own process)."""

    async def main() -> list[Any]:
        async with AwsBackend(_session(), endpoint_url=ENDPOINT, pool=2):
            return list(warnings.filters)

    with warnings.catch_warnings():
        warnings.resetwarnings()  # pytest's own filters hold the same one
        assert asyncio.run(main()) == []


def test_the_user_agent_is_the_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SDK_UA_APP_ID", "photo-audit")

    direct, client, _, _ = _both_detect_labels()
    agent = _text(direct.headers["User-Agent"])
    assert "app/photo-audit" in agent and "rekbatch/" in agent
    assert agent == _without_metrics(client.headers["User-Agent"])


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:9",
        "http://127.0.0.1:9/",
        "http://127.0.0.1:9/prefix",
        "http://127.0.0.1:9/prefix/",
        "http://127.0.0.1:9/prefix?stage=a&x=1",
        "http://127.0.0.1:9/?stage=a",
    ],
)
def test_an_endpoint_with_a_path_or_query_gets_the_request_where_botocore_sends_it(
    endpoint: str,
) -> None:
    direct, client, _, _ = _both_detect_labels(endpoint_url=endpoint)
    assert direct.url == client.url
    assert direct.headers["Authorization"].endswith(
        "Signature=" + _expected_signature(direct, SECRET, REGION)
    )


def test_answers_keep_only_what_botocore_keeps() -> None:
    """Members outside the output shape and JSON nulls, at the top and nested."""
    answer = {
        "Labels": [
            {
                "Name": "Person",
                "Confidence": 99.1,
                "Instances": [{"BoundingBox": None, "Confidence": 90.0, "NewThing": 1}],
                "Parents": [],
                "FutureMember": {"a": 1},
                "Aliases": None,
            }
        ],
        "LabelModelVersion": None,
        "ImageProperties": {"Quality": {"Brightness": 50.0, "Unknown": "x"}},
        "SomethingNew": [1, 2],
    }

    _, _, direct, client = _both_detect_labels(json.dumps(answer).encode())
    assert direct == client
    assert direct["Labels"][0]["Instances"] == [{"Confidence": 90.0}]
    assert "SomethingNew" not in direct and "LabelModelVersion" not in direct


@pytest.mark.parametrize("error", [TypeError("send() got an unexpected keyword"), KeyError("x")])
def test_an_exception_the_direct_path_does_not_expect_fails_the_run(error: Exception) -> None:
    async def broken(request: Any) -> Any:
        raise error

    failed = _detect_labels_error(CallPathFailed, send=broken)
    assert 'aws.call_path = "client"' in str(failed) and type(error).__name__ in str(failed)
    assert "\n" not in str(failed)


def test_a_connection_failure_on_the_direct_path_is_a_failure_of_the_call() -> None:
    import botocore.exceptions as bexc

    async def closed(request: Any) -> Any:
        raise bexc.ConnectionClosedError(endpoint_url=request.url)

    error = _detect_labels_error(BackendError, send=closed)
    assert (error.code, error.kind, error.connection) == (
        "ConnectionClosedError",
        "transient",
        "exchange",
    )


def test_call_path_client_sends_every_call_through_the_client() -> None:
    async def main() -> dict[str, bool]:
        backend = AwsBackend(_session(), endpoint_url=ENDPOINT, pool=2, call_path="client")
        async with backend:
            return {api: backend._goes_direct(api) for api in ("DetectLabels", "DetectFaces")}

    assert asyncio.run(main()) == {"DetectLabels": False, "DetectFaces": False}
