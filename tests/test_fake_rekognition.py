"""The fake Rekognition server, driven by real aioboto3/boto3 clients and raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gc
import io
import json
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable
from functools import cache
from pathlib import Path
from typing import Any

import aioboto3
import aiohttp
import boto3
import botocore.parsers
import botocore.session
import pytest
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from tests.conftest import REGION, SAMPLES, make_bucket
from tests.support.fake_rekognition import (
    CALL_FAULTS,
    JPEG_MAGIC,
    MAX_BYTES_IMAGE,
    MAX_S3_IMAGE,
    FakeConfig,
    FakeRekognition,
    _malformed,
    _TokenBucket,
    config_from_args,
    image_digest,
)
from tests.support.servers import StartFake

pytestmark = pytest.mark.timeout(30)

CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
IMAGES = (
    "ric.jpg",
    "ric_harvey.jpeg",
    "ric_crowd0.jpg",
    "ric_crowd1.jpg",
    "sample-image0.jpeg",
    "sample-image1.jpeg",
    "demo0.png",
)


@cache
def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def people() -> dict[str, list[str]]:
    return {
        image_digest(sample("ric_harvey.jpeg")): ["ric"],
        image_digest(sample("ric.jpg")): ["ric"],
        image_digest(sample("ric_crowd1.jpg")): ["p1", "ric", "p3", "p4", "p5"],
        image_digest(sample("ric_crowd0.jpg")): ["q1", "q2", "q3", "q4"],
        image_digest(sample("sample-image0.jpeg")): ["celeb:Jane Doe"],
        image_digest(sample("sample-image1.jpeg")): [],
        image_digest(sample("demo0.png")): ["someone"],
    }


def s3_image(bucket: str, key: str) -> dict[str, Any]:
    return {"S3Object": {"Bucket": bucket, "Name": key}}


def code_of(exc: BaseException) -> str:
    assert isinstance(exc, ClientError), repr(exc)
    return str(exc.response["Error"]["Code"])


@pytest.fixture
def bucket(s3: Any) -> str:
    name = make_bucket(s3, f"fake-rek-{uuid.uuid4().hex[:12]}")
    for key in (*IMAGES, "notes.txt", "broken.jpg"):
        s3.put_object(Bucket=name, Key=key, Body=sample(key))
    return name


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(people=people())


class Pauses:
    """The fake's ``sleep``: records each wait and returns at once."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


class ManualClock:
    """The fake's ``clock``: time moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def rek(fake: FakeRekognition) -> AsyncIterator[Any]:
    async with aioboto3.Session().client(
        "rekognition",
        endpoint_url=fake.url,
        region_name=REGION,
        config=AioConfig(retries={"total_max_attempts": 1}),
        **CREDS,
    ) as client:
        yield client


async def raw_call(
    url: str, op: str | None, body: dict[str, Any] | bytes
) -> tuple[int, dict[str, Any], Any]:
    headers = {"Content-Type": "application/x-amz-json-1.1"}
    if op is not None:
        headers["X-Amz-Target"] = f"RekognitionService.{op}"
    # BytesIO: aiohttp warns (ResourceWarning) about raw bytes bodies over 1 MiB
    data = io.BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/", data=data, headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None), resp.headers


# ---------------------------------------------------------------- wire format vs botocore model

_MODEL = botocore.session.get_session().get_service_model("rekognition")


def check_shape(shape: Any, value: Any, path: str) -> None:
    """The raw JSON uses only members, types and enum values of the real service model."""
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(value, dict), path
        for key, item in value.items():
            assert key in shape.members, f"{path}.{key} is not in {shape.name}"
            check_shape(shape.members[key], item, f"{path}.{key}")
    elif kind == "list":
        assert isinstance(value, list), path
        for i, item in enumerate(value):
            check_shape(shape.member, item, f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), path
        if shape.enum:
            assert value in shape.enum, f"{path}={value!r}"
    elif kind in ("integer", "long"):
        assert isinstance(value, int) and not isinstance(value, bool), path
        assert value >= shape.metadata.get("min", value), path
    elif kind in ("float", "double"):
        assert isinstance(value, int | float) and not isinstance(value, bool), path
        assert shape.metadata.get("min", value) <= value <= shape.metadata.get("max", value), path
    elif kind == "boolean":
        assert isinstance(value, bool), path
    elif kind == "timestamp":
        assert isinstance(value, int | float), path
    else:  # pragma: no cover
        raise AssertionError(f"{path}: unexpected shape type {kind}")


async def test_raw_wire_format_matches_service_model(fake: FakeRekognition) -> None:
    async def ok(op: str, body: dict[str, Any]) -> dict[str, Any]:
        status, answer, headers = await raw_call(fake.url, op, body)
        assert status == 200, (op, answer)
        assert headers["Content-Type"] == "application/x-amz-json-1.1"
        assert headers["x-amzn-RequestId"]
        check_shape(_MODEL.operation_model(op).output_shape, answer, op)
        return answer

    for name in IMAGES:
        img = {"Bytes": base64.b64encode(sample(name)).decode()}
        await ok("DetectFaces", {"Image": img, "Attributes": ["ALL"]})
        await ok("DetectFaces", {"Image": img})
        await ok("DetectLabels", {"Image": img, "MinConfidence": 0})
        await ok("DetectText", {"Image": img})
        await ok("DetectModerationLabels", {"Image": img, "MinConfidence": 0})
        await ok("RecognizeCelebrities", {"Image": img})
        summary = {"MinConfidence": 50, "RequiredEquipmentTypes": ["FACE_COVER"]}
        await ok("DetectProtectiveEquipment", {"Image": img, "SummarizationAttributes": summary})
        source = {"Bytes": base64.b64encode(sample("ric.jpg")).decode()}
        await ok("CompareFaces", {"SourceImage": source, "TargetImage": img})
    crowd = {"Bytes": base64.b64encode(sample("ric_crowd1.jpg")).decode()}
    await ok("CreateCollection", {"CollectionId": "c1"})
    indexed = await ok(
        "IndexFaces",
        {"CollectionId": "c1", "Image": crowd, "ExternalImageId": "x", "MaxFaces": 3},
    )
    await ok("ListFaces", {"CollectionId": "c1"})
    face_id = indexed["FaceRecords"][0]["Face"]["FaceId"]
    await ok("SearchFaces", {"CollectionId": "c1", "FaceId": face_id, "FaceMatchThreshold": 0})
    await ok("SearchFacesByImage", {"CollectionId": "c1", "Image": crowd})
    await ok("DescribeCollection", {"CollectionId": "c1"})
    await ok("ListCollections", {})
    await ok("DeleteFaces", {"CollectionId": "c1", "FaceIds": [face_id]})
    await ok("DeleteCollection", {"CollectionId": "c1"})


async def test_every_operation_through_aioboto3(rek: Any, bucket: str) -> None:
    crowd = s3_image(bucket, "ric_crowd1.jpg")
    faces = await rek.detect_faces(Image=crowd, Attributes=["ALL"])
    assert len(faces["FaceDetails"]) == 5
    first = faces["FaceDetails"][0]
    assert {"AgeRange", "Smile", "Eyeglasses", "Gender", "Emotions", "Pose", "Quality"} <= set(
        first
    )
    assert len(first["Landmarks"]) == 30
    labels = await rek.detect_labels(Image=crowd, MaxLabels=50, MinConfidence=50)
    assert labels["Labels"][0]["Confidence"] >= labels["Labels"][-1]["Confidence"]
    person = next(lab for lab in labels["Labels"] if lab["Name"] == "Person")
    assert len(person["Instances"]) == 5
    assert "TextDetections" in await rek.detect_text(Image=crowd)
    assert "ModerationLabels" in await rek.detect_moderation_labels(Image=crowd)
    celebs = await rek.recognize_celebrities(Image=s3_image(bucket, "sample-image0.jpeg"))
    assert [c["Name"] for c in celebs["CelebrityFaces"]] == ["Jane Doe"]
    ppe = await rek.detect_protective_equipment(Image=crowd)
    assert len(ppe["Persons"]) == 5
    compared = await rek.compare_faces(
        SourceImage=s3_image(bucket, "ric_harvey.jpeg"), TargetImage=crowd
    )
    assert len(compared["FaceMatches"]) == 1


async def test_defaults_and_parameters(rek: Any, bucket: str) -> None:
    crowd = s3_image(bucket, "ric_crowd1.jpg")
    default = (await rek.detect_faces(Image=crowd))["FaceDetails"][0]
    assert set(default) == {"BoundingBox", "Landmarks", "Pose", "Quality", "Confidence"}
    assert [m["Type"] for m in default["Landmarks"]] == [
        "eyeLeft",
        "eyeRight",
        "mouthLeft",
        "mouthRight",
        "nose",
    ]
    box = default["BoundingBox"]
    assert 0 <= box["Left"] <= box["Left"] + box["Width"] <= 1
    assert 0 <= box["Top"] <= box["Top"] + box["Height"] <= 1
    some = (await rek.detect_faces(Image=crowd, Attributes=["GENDER"]))["FaceDetails"][0]
    assert "Gender" in some and "AgeRange" not in some
    assert len((await rek.detect_labels(Image=crowd, MaxLabels=2))["Labels"]) <= 2
    high = (await rek.detect_labels(Image=crowd, MinConfidence=99))["Labels"]
    assert all(lab["Confidence"] >= 99 for lab in high)


# ---------------------------------------------------------------- images: S3 vs Bytes, errors


async def test_s3_and_bytes_agree_and_billing_is_per_identity(
    fake: FakeRekognition, rek: Any, bucket: str
) -> None:
    via_s3 = await rek.detect_faces(Image=s3_image(bucket, "ric_crowd0.jpg"))
    via_bytes = await rek.detect_faces(Image={"Bytes": sample("ric_crowd0.jpg")})
    assert via_s3["FaceDetails"] == via_bytes["FaceDetails"]
    assert len(via_s3["FaceDetails"]) == 4
    await rek.detect_faces(Image=s3_image(bucket, "ric_crowd0.jpg"))
    digest = image_digest(sample("ric_crowd0.jpg"))
    assert fake.stats()["billed"] == {
        ("DetectFaces", f"s3://{bucket}/ric_crowd0.jpg"): 2,
        ("DetectFaces", f"sha256:{digest}"): 1,
    }
    assert fake.stats()["ok"] == {"DetectFaces": 3}


async def test_anonymous_images_are_deterministic(rek: Any) -> None:
    for i in range(12):
        data = JPEG_MAGIC + f"synthetic image {i}".encode()
        digest = image_digest(data)
        first = await rek.detect_faces(Image={"Bytes": data}, Attributes=["ALL"])
        again = await rek.detect_faces(Image={"Bytes": data}, Attributes=["ALL"])
        assert first["FaceDetails"] == again["FaceDetails"]
        assert len(first["FaceDetails"]) == int(digest[:2], 16) % 4


# aiohttp (inside aiobotocore) warns about any raw request body over 1 MiB
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_image_errors(fake: FakeRekognition, rek: Any, bucket: str, s3: Any) -> None:
    s3.put_object(Bucket=bucket, Key="huge.jpg", Body=JPEG_MAGIC + bytes(MAX_S3_IMAGE))
    cases: list[tuple[dict[str, Any], str]] = [
        (s3_image(bucket, "notes.txt"), "InvalidImageFormatException"),
        ({"Bytes": sample("broken.jpg")}, "InvalidImageFormatException"),
        (s3_image(bucket, "missing.jpg"), "InvalidS3ObjectException"),
        (s3_image("no-such-bucket-here", "ric.jpg"), "InvalidS3ObjectException"),
        ({"Bytes": JPEG_MAGIC + bytes(MAX_BYTES_IMAGE)}, "ImageTooLargeException"),
        (s3_image(bucket, "huge.jpg"), "ImageTooLargeException"),
    ]
    for image, expected in cases:
        with pytest.raises(ClientError) as info:
            await rek.detect_labels(Image=image)
        assert code_of(info.value) == expected
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert info.value.response["Error"]["Message"]
    stats = fake.stats()
    assert stats["errors"] == {"DetectLabels": len(cases)}
    assert stats["billed"] == {}
    assert stats["error_codes"]["DetectLabels"] == Counter(code for _, code in cases)


async def test_malformed_requests(fake: FakeRekognition) -> None:
    cases: list[tuple[str | None, dict[str, Any] | bytes, str]] = [
        ("DetectFaces", {}, "InvalidParameterException"),
        ("DetectFaces", {"Image": {}}, "InvalidParameterException"),
        (
            "DetectFaces",
            {"Image": {"Bytes": "/9j/", "S3Object": {"Bucket": "b", "Name": "k"}}},
            "InvalidParameterException",
        ),
        ("DetectFaces", {"Image": {"Bytes": "%%% not base64"}}, "InvalidParameterException"),
        ("DetectFaces", b"{not json", "SerializationException"),
        (
            "DetectLabels",
            {"Image": {"Bytes": "/9j/"}, "MaxLabels": -1},
            "InvalidParameterException",
        ),
        ("DetectFaces", {"Image": {"Bytes": "/9j/"}, "Attributes": ["NOPE"]}, "InvalidParameter"),
        ("StartFaceSearch", {}, "UnknownOperationException"),
        (None, {}, "UnknownOperationException"),
    ]
    for op, body, expected in cases:
        status, answer, headers = await raw_call(fake.url, op, body)
        assert status == 400, (op, body, answer)
        assert answer["__type"].startswith(expected), (op, body, answer)
        assert answer["Message"]
        assert headers["x-amzn-RequestId"]


# ---------------------------------------------------------------- quota, injected failures


async def test_quota_rejects_a_burst_and_counts_agree(start_fake: StartFake) -> None:
    clock = ManualClock()
    fake = start_fake(s3_endpoint_url=None, clock=clock)
    fake.set_quota("DetectLabels", 10)
    image = {"Bytes": sample("ric.jpg")}
    async with client(fake.url) as rek:
        results = await asyncio.gather(
            *(rek.detect_labels(Image=image) for _ in range(40)), return_exceptions=True
        )
        ok = [r for r in results if isinstance(r, dict)]
        rejected = [r for r in results if not isinstance(r, dict)]
        # the full bucket of 10, and nothing refilled: the clock stood still
        assert (len(ok), len(rejected)) == (10, 30)
        for exc in rejected:
            assert code_of(exc) == "ProvisionedThroughputExceededException"
            assert isinstance(exc, ClientError)
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        stats = fake.stats()
        assert stats["calls"] == {"DetectLabels": 40}
        assert stats["ok"] == {"DetectLabels": 10}
        assert stats["throttled"] == {"DetectLabels": 30}
        assert stats["errors"] == {}
        assert sum(stats["billed"].values()) == 10
        assert stats["max_in_flight"] >= 2

        clock.now += 0.5  # half a second at 10/s refills five tokens
        again = await asyncio.gather(
            *(rek.detect_labels(Image=image) for _ in range(8)), return_exceptions=True
        )
        assert sum(isinstance(r, dict) for r in again) == 5

        fake.set_quota("DetectLabels", None)  # unlimited again, at once
        fake.reset_stats()
        await asyncio.gather(*(rek.detect_labels(Image=image) for _ in range(20)))
        assert fake.stats()["ok"] == {"DetectLabels": 20}


def test_quota_change_takes_effect_at_once() -> None:
    bucket = _TokenBucket(20, 1.0, now=0.0)
    bucket.reconfigure(5, 1.0, now=0.0)  # halved twice: the stored burst shrinks too
    assert sum(bucket.try_take(0.0) for _ in range(20)) == 5
    assert not bucket.try_take(0.1)
    assert bucket.try_take(0.2)  # refills at the new rate
    bucket.reconfigure(0, 1.0, now=10.0)
    assert not bucket.try_take(100.0)


async def test_runtime_quota_zero_and_injected_failures(fake: FakeRekognition, rek: Any) -> None:
    image = {"Bytes": sample("ric.jpg")}
    fake.set_quota("DetectFaces", 0)
    with pytest.raises(ClientError) as info:
        await rek.detect_faces(Image=image)
    assert code_of(info.value) == "ProvisionedThroughputExceededException"
    await rek.detect_labels(Image=image)  # other APIs are not affected
    fake.set_quota("DetectFaces", None)

    fake.configure(error_rate=1.0)
    with pytest.raises(ClientError) as info:
        await rek.detect_faces(Image=image)
    assert code_of(info.value) == "InternalServerError"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500

    fake.configure(error_rate=0.0, throttle_rate=1.0)
    with pytest.raises(ClientError) as info:
        await rek.detect_faces(Image=image)
    assert code_of(info.value) == "ThrottlingException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500

    fake.configure(throttle_rate=0.0)
    await rek.detect_faces(Image=image)
    stats = fake.stats()
    assert stats["calls"] == {"DetectFaces": 4, "DetectLabels": 1}
    assert stats["ok"] == {"DetectFaces": 1, "DetectLabels": 1}
    assert stats["throttled"] == {"DetectFaces": 2}
    assert stats["errors"] == {"DetectFaces": 1}
    assert stats["error_codes"]["DetectFaces"] == {
        "ProvisionedThroughputExceededException": 1,
        "InternalServerError": 1,
        "ThrottlingException": 1,
    }


async def test_latency_and_fast_throttles(start_fake: StartFake) -> None:
    pauses = Pauses()
    fake = start_fake(s3_endpoint_url=None, sleep=pauses)
    image = {"Bytes": sample("ric.jpg")}
    async with client(fake.url) as rek:
        await rek.detect_faces(Image=image)
        assert pauses.seconds == []  # no latency configured: no wait
        fake.configure(latency_median_ms=150, latency_sigma=0.0)
        await rek.detect_faces(Image=image)
        assert pauses.seconds == [pytest.approx(0.150)]
        fake.set_quota("DetectFaces", 0)
        with pytest.raises(ClientError):
            await rek.detect_faces(Image=image)
    # a throttle answers after throttle_latency_ms, never after the answers' latency
    assert pauses.seconds == [pytest.approx(0.150), pytest.approx(0.002)]


# ---------------------------------------------------------------- faults: what a client sees

FAULT_IMAGE = {"Bytes": JPEG_MAGIC + b" a small image for fault tests"}
FAULT_IDENTITY = f"sha256:{image_digest(FAULT_IMAGE['Bytes'])}"
#: the calls that end in exactly one of these, once none is in flight (FakeRekognition.stats)
OUTCOMES = ("ok", "throttled", "errors", "dropped", "reset", "malformed", "garbage", "abandoned")


@contextlib.asynccontextmanager
async def client(url: str, read_timeout: float = 5.0) -> AsyncIterator[Any]:
    """A real aioboto3 client with one attempt per call, so every fault reaches the test."""
    config = AioConfig(
        retries={"total_max_attempts": 1}, read_timeout=read_timeout, connect_timeout=2
    )
    async with aioboto3.Session().client(
        "rekognition", endpoint_url=url, region_name=REGION, config=config, **CREDS
    ) as rek:
        yield rek


async def wait_until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def outcome_total(stats: dict[str, Any], api: str) -> int:
    return sum(stats[name].get(api, 0) for name in OUTCOMES)


def raw_exchange(url: str, op: str, *, close: bool = False) -> bytes:
    """One request on a plain socket; everything the server sent until it closed."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"Image": {"Bytes": base64.b64encode(FAULT_IMAGE["Bytes"]).decode()}})
    head = (
        f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-amz-json-1.1\r\n"
        f"X-Amz-Target: RekognitionService.{op}\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode() + body.encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.fixture
def bare(start_fake: StartFake) -> FakeRekognition:
    """A fake without S3: the fault tests send image bytes."""
    return start_fake(s3_endpoint_url=None)


#: long enough for any machine, however loaded: it catches a hang, it times nothing
HANG = 60.0


def test_raw_socket_drop_and_reset_send_nothing(bare: FakeRekognition) -> None:
    assert raw_exchange(bare.url, "DetectLabels", close=True).startswith(b"HTTP/1.1 200 ")
    bare.configure(fail_calls={2: "drop", 3: "reset"})
    assert raw_exchange(bare.url, "DetectLabels") == b""  # a clean close, not a byte of HTTP
    with pytest.raises(ConnectionResetError):
        raw_exchange(bare.url, "DetectLabels")
    stats = bare.stats()
    assert stats["dropped"] == {"DetectLabels": 1} and stats["reset"] == {"DetectLabels": 1}


@pytest.mark.parametrize("op", ["detect_labels", "detect_faces"])
@pytest.mark.parametrize("kind", ["drop", "reset", "malformed", "garbage"])
async def test_fault_as_aiobotocore_sees_it(bare: FakeRekognition, kind: str, op: str) -> None:
    api = {"detect_labels": "DetectLabels", "detect_faces": "DetectFaces"}[op]
    bare.configure(fail_calls={1: kind})
    async with client(bare.url) as rek:
        call = getattr(rek, op)
        if kind == "drop":
            with pytest.raises(ConnectionClosedError) as closed:
                await call(Image=FAULT_IMAGE)
            assert isinstance(closed.value.kwargs["error"], aiohttp.ServerDisconnectedError)
        elif kind == "reset":
            with pytest.raises(EndpointConnectionError) as refused:
                await call(Image=FAULT_IMAGE)
            cause = refused.value.kwargs["error"]
            assert isinstance(cause, aiohttp.ClientOSError) and cause.errno == errno.ECONNRESET
        elif kind == "malformed":
            with pytest.raises(AttributeError, match="'int' object has no attribute 'get'"):
                await call(Image=FAULT_IMAGE)
        else:  # botocore swallows a body it cannot parse: the answer lacks every member
            answer = await call(Image=FAULT_IMAGE)
            assert set(answer) == {"ResponseMetadata"}
            assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert "ResponseMetadata" in await call(Image=FAULT_IMAGE)  # the next call is fine
    counter = {"drop": "dropped"}.get(kind, kind)
    stats = bare.stats()
    assert stats["calls"] == {api: 2} and stats["ok"] == {api: 1}
    assert stats[counter] == {api: 1}
    assert outcome_total(stats, api) == 2
    # billed: delivered valid answers only; undelivered: what AWS may have billed on top
    assert stats["billed"] == {(api, FAULT_IDENTITY): 1}
    assert stats["undelivered"] == {(api, FAULT_IDENTITY): 1}


async def test_stall_times_out_the_client_and_is_abandoned(bare: FakeRekognition) -> None:
    bare.configure(fail_calls={1: "stall"}, stall_seconds=0)  # held until the client leaves
    async with client(bare.url, read_timeout=0.3) as rek:
        # held for good: only the client's own timeout ends the call
        with pytest.raises(ReadTimeoutError):
            await asyncio.wait_for(rek.detect_labels(Image=FAULT_IMAGE), HANG)
        # the client closed its connection on the timeout; the held answer notices
        await wait_until(lambda: bare.stats()["in_flight"] == 0)
        await rek.detect_labels(Image=FAULT_IMAGE)
    stats = bare.stats()
    assert stats["stalled"] == {"DetectLabels": 1}
    assert stats["abandoned"] == {"DetectLabels": 1}
    assert stats["billed"] == {("DetectLabels", FAULT_IDENTITY): 1}
    assert stats["undelivered"] == {("DetectLabels", FAULT_IDENTITY): 1}
    assert outcome_total(stats, "DetectLabels") == stats["calls"]["DetectLabels"] == 2


async def test_a_stall_that_ends_is_answered_and_billed(start_fake: StartFake) -> None:
    clock = ManualClock()
    bare = start_fake(s3_endpoint_url=None, clock=clock, stall_rate=1.0, stall_seconds=0.3)
    async with client(bare.url, read_timeout=HANG) as rek:
        call = asyncio.create_task(rek.detect_labels(Image=FAULT_IMAGE))
        await wait_until(lambda: bare.stats()["stalled"] == {"DetectLabels": 1}, within=HANG)
        clock.now += 0.2
        await asyncio.sleep(0.2)  # a few of the hold's polls: still held
        assert not call.done() and bare.stats()["in_flight"] == 1
        clock.now += 0.1  # the stall's 0.3 s are up
        answer = await asyncio.wait_for(call, HANG)
    assert "Labels" in answer
    stats = bare.stats()
    assert stats["stalled"] == {"DetectLabels": 1} and stats["ok"] == {"DetectLabels": 1}
    assert stats["abandoned"] == {} and stats["undelivered"] == {}
    assert stats["billed"] == {("DetectLabels", FAULT_IDENTITY): 1}


async def test_stop_is_prompt_while_a_stall_is_pending() -> None:
    fake = FakeRekognition(FakeConfig(stall_rate=1.0, stall_seconds=0))
    fake.start()
    try:
        async with client(fake.url, read_timeout=30) as rek:
            pending = asyncio.create_task(rek.detect_labels(Image=FAULT_IMAGE))
            await wait_until(lambda: fake.stats()["stalled"] == {"DetectLabels": 1})
            # the stall has no end of its own (stall_seconds = 0): stop ends it
            await asyncio.wait_for(asyncio.to_thread(fake.stop), HANG)
            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(pending, 5)
    finally:
        fake.stop()
    stats = fake.stats()
    assert stats["abandoned"] == {"DetectLabels": 1} and stats["in_flight"] == 0


async def test_drop_rate_is_exact_for_a_seed() -> None:
    with FakeRekognition(FakeConfig(drop_rate=0.5, seed=7)) as fake:
        async with client(fake.url) as rek:
            results = await asyncio.gather(
                *(rek.detect_labels(Image=FAULT_IMAGE) for _ in range(100)),
                return_exceptions=True,
            )
        stats = fake.stats()
    dropped = sum(isinstance(r, ConnectionClosedError) for r in results)
    ok = sum(isinstance(r, dict) and "Labels" in r for r in results)
    assert dropped + ok == 100
    # drawn from (seed, call number), so the same at any concurrency; about half
    assert dropped == 57
    assert 35 <= dropped <= 65  # what any seed should give: within 3 sigma of 50
    assert stats["dropped"] == {"DetectLabels": dropped}
    assert stats["ok"] == {"DetectLabels": ok}
    assert stats["billed"] == {("DetectLabels", FAULT_IDENTITY): ok}


async def test_a_mix_of_faults_client_and_counters_agree() -> None:
    config = FakeConfig(seed=3, drop_rate=0.1, reset_rate=0.1, malformed_rate=0.1, garbage_rate=0.1)
    with FakeRekognition(config) as fake:
        async with client(fake.url) as rek:
            results = await asyncio.gather(
                *(rek.detect_faces(Image=FAULT_IMAGE) for _ in range(100)),
                return_exceptions=True,
            )
        stats = fake.stats()

    def seen(result: object) -> str:
        if isinstance(result, dict):
            return "ok" if "FaceDetails" in result else "garbage"
        return {
            ConnectionClosedError: "dropped",
            EndpointConnectionError: "reset",
            AttributeError: "malformed",
        }[type(result)]

    by_client = Counter(seen(r) for r in results)
    assert by_client == {"ok": 54, "dropped": 14, "reset": 14, "malformed": 7, "garbage": 11}
    for outcome, n in by_client.items():
        assert stats[outcome] == {"DetectFaces": n}, outcome
    assert outcome_total(stats, "DetectFaces") == stats["calls"]["DetectFaces"] == 100
    assert sum(stats["undelivered"].values()) == 100 - by_client["ok"]


async def test_call_schedule_and_its_admin_form(bare: FakeRekognition) -> None:
    async with aiohttp.ClientSession() as http:
        schedule = {"2": "throttle", "3": "error", "4": "quota", "6": "malformed"}
        async with http.post(bare.url + "/_fake/config", json={"fail_calls": schedule}) as resp:
            assert resp.status == 200
            assert (await resp.json())["fail_calls"] == schedule  # JSON keys are strings
        for bad in (
            {"fail_calls": {"2": "explode"}},
            {"fail_calls": {"0": "drop"}},
            {"drop_rate": 0.6, "stall_rate": 0.6},  # shares of one draw: at most 1 in all
            {"stall_seconds": -1},
            {"garbage_rate": 2},
        ):
            async with http.post(bare.url + "/_fake/config", json=bad) as resp:
                assert resp.status == 400, bad
    assert bare.config.fail_calls == {2: "throttle", 3: "error", 4: "quota", 6: "malformed"}
    assert bare.config.drop_rate == bare.config.stall_rate == 0.0  # nothing half-applied

    codes: list[str] = []
    async with client(bare.url) as rek:
        for _ in range(7):
            try:
                await rek.detect_labels(Image=FAULT_IMAGE)
                codes.append("ok")
            except ClientError as exc:
                codes.append(code_of(exc))
            except AttributeError:
                codes.append("malformed")
    assert codes == [
        "ok",
        "ThrottlingException",
        "InternalServerError",
        "ProvisionedThroughputExceededException",
        "ok",
        "malformed",
        "ok",
    ]
    stats = bare.stats()
    assert stats["call_number"] == 7
    bare.reset_stats()  # call numbers start again: the schedule applies anew
    bare.configure(fail_calls={1: "error"})
    async with client(bare.url) as rek:
        with pytest.raises(ClientError) as info:
            await rek.detect_labels(Image=FAULT_IMAGE)
    assert code_of(info.value) == "InternalServerError"
    assert set(CALL_FAULTS) == {
        "drop", "reset", "stall", "malformed", "garbage", "throttle", "error", "quota"
    }  # fmt: skip


async def test_down_window_refuses_connections_then_comes_back(bare: FakeRekognition) -> None:
    host, port = bare.url.removeprefix("http://").split(":")
    async with client(bare.url) as rek:
        await rek.detect_labels(Image=FAULT_IMAGE)  # leaves a pooled connection open
        bare.configure(down_for_seconds=0.6)
        await asyncio.sleep(0.05)  # the client sees its pooled connection closed
        with pytest.raises(EndpointConnectionError) as info:
            await rek.detect_labels(Image=FAULT_IMAGE)
        cause = info.value.kwargs["error"]
        assert isinstance(cause, aiohttp.ClientConnectorError)
        assert isinstance(cause.os_error, ConnectionRefusedError)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=2).close()
        stats = bare.stats()
        assert not stats["listening"] and stats["down_seconds_left"] <= 0.6
        await wait_until(lambda: bare.stats()["listening"], within=3)
        assert bare.stats()["down_seconds_left"] == 0
        assert "Labels" in await rek.detect_labels(Image=FAULT_IMAGE)  # same URL, same port
    assert bare.config.down_for_seconds == 0

    async with aiohttp.ClientSession() as http:
        # asked over HTTP: the answer still gets out, then the endpoint is down
        async with http.post(bare.url + "/_fake/config", json={"down_for_seconds": 30}) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(bare.url + "/_fake/stats")
    bare.configure(down_for_seconds=0)  # back at once
    async with client(bare.url) as rek:
        await rek.detect_labels(Image=FAULT_IMAGE)
    bare.configure(down_for_seconds=3600)
    # while down: stop does not wait for the endpoint to come back
    await asyncio.wait_for(asyncio.to_thread(bare.stop), HANG)
    stats = bare.stats()
    assert stats["ok"] == {"DetectLabels": 3} and stats["calls"] == {"DetectLabels": 3}


def keep_alive_request(sock: socket.socket, host: str) -> bytes:
    """One DetectLabels on ``sock``, read to the end of its answer; the connection stays open."""
    body = json.dumps({"Image": {"Bytes": base64.b64encode(FAULT_IMAGE["Bytes"]).decode()}})
    sock.sendall(
        (
            f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-amz-json-1.1\r\n"
            f"X-Amz-Target: RekognitionService.DetectLabels\r\nContent-Length: {len(body)}\r\n"
            f"\r\n{body}"
        ).encode()
    )
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, rest = received.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    assert length is not None, head
    while len(rest) < int(length[1]):
        rest += sock.recv(65536)
    return head


def test_down_windows_leave_no_connection_open_after_stop() -> None:
    """Keep-alive connections, and connections arriving as the listener closes: each is
    closed by the window (ended early or by time) or by ``stop()``, none left to the GC.

    asyncio's own Server lost the connections it had accepted but not yet set up when it was
    closed: their transports never closed, a ResourceWarning at some later collection.
    """
    fake = FakeRekognition(FakeConfig())
    fake.start()
    host, port = fake.url.removeprefix("http://").split(":")
    address = (host, int(port))
    held: list[socket.socket] = []
    lock = threading.Lock()
    stop = threading.Event()

    def connect_all_the_time() -> None:
        mine: list[socket.socket] = []
        try:
            while not stop.is_set():
                try:
                    mine.append(socket.create_connection(address, timeout=2))
                except OSError:  # refused while down
                    time.sleep(0.001)
                if len(mine) > 25:  # a bounded number of descriptors
                    mine.pop(0).close()
        finally:
            with lock:
                held.extend(mine)

    def wait_for(check: Callable[[], bool], within: float = 3.0) -> None:
        deadline = time.monotonic() + within
        while not check():
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.01)

    try:
        keep_alive = [socket.create_connection(address, timeout=2) for _ in range(4)]
        held.extend(keep_alive)
        for sock in keep_alive:
            assert keep_alive_request(sock, host).startswith(b"HTTP/1.1 200 ")
        assert fake.stats()["connections"] == 4
        threads = [threading.Thread(target=connect_all_the_time) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(20):  # windows ended early, connections coming in all along
                time.sleep(0.01)
                fake.configure(down_for_seconds=30)
                fake.configure(down_for_seconds=0)
            fake.configure(down_for_seconds=0.2)  # and one ended by time
            wait_for(lambda: fake.stats()["listening"])
            time.sleep(0.02)
            fake.configure(down_for_seconds=30)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=5)
        for sock in keep_alive:  # the server closed them: EOF, not an answer
            assert sock.recv(65536) == b""
        # all that the fake accepted before the window, set up before it or after, are closed
        wait_for(lambda: fake.stats()["connections"] == 0)
        fake.configure(down_for_seconds=0)
        late = socket.create_connection(address, timeout=2)
        held.append(late)
        assert keep_alive_request(late, host).startswith(b"HTTP/1.1 200 ")
        wait_for(lambda: fake.stats()["connections"] == 1)
        fake.configure(down_for_seconds=30)
        fake.stop()  # while down, with the last connection being closed by the window
    finally:
        stop.set()
        fake.stop()
        for sock in held:
            sock.close()
    assert fake.stats()["connections"] == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)] == []


def test_malformed_and_garbage_bodies_against_botocores_parser() -> None:
    """For every operation the fake serves, not only the two the client tests call."""
    parser = botocore.parsers.create_parser("json")
    for op in FakeRekognition()._handlers:
        shape = _MODEL.operation_model(op).output_shape
        malformed = json.dumps(_malformed(op, {})).encode()
        with pytest.raises(AttributeError):
            parser.parse({"body": malformed, "headers": {}, "status_code": 200}, shape)
        whole = json.dumps({"FaceModelVersion": "7.0"})
        half = whole[: len(whole) // 2].encode()
        parsed = parser.parse({"body": half, "headers": {}, "status_code": 200}, shape)
        assert set(parsed) <= {"ResponseMetadata"}, op


def test_cli_fault_flags(capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = config_from_args(
        [
            *("--drop-rate", "0.1", "--reset-rate", "0.05", "--stall-rate", "0.02"),
            *("--stall-seconds", "0", "--malformed-rate", "0.01", "--garbage-rate", "0.03"),
            *("--fail-call", "5=drop", "--fail-call", "9=stall", "--down-for-seconds", "2"),
        ]
    )
    assert (config.drop_rate, config.reset_rate, config.stall_rate) == (0.1, 0.05, 0.02)
    assert (config.stall_seconds, config.malformed_rate, config.garbage_rate) == (0, 0.01, 0.03)
    assert config.fail_calls == {5: "drop", 9: "stall"}
    assert config.down_for_seconds == 2
    default, _ = config_from_args([])
    assert default.stall_seconds == 30 and default.fail_calls == {} and default.drop_rate == 0
    for bad in (
        ["--fail-call", "5=explode"],
        ["--fail-call", "five=drop"],
        ["--drop-rate", "0.7", "--stall-rate", "0.7"],
        ["--stall-seconds", "-1"],
    ):
        with pytest.raises(SystemExit) as info:
            config_from_args(bad)
        assert info.value.code == 2, bad
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------- faces: compare, collections


async def test_compare_faces_with_people(fake: FakeRekognition, rek: Any, bucket: str) -> None:
    source = {"Bytes": sample("ric_harvey.jpeg")}
    crowd = s3_image(bucket, "ric_crowd1.jpg")
    answer = await rek.compare_faces(SourceImage=source, TargetImage=crowd)
    assert len(answer["FaceMatches"]) == 1 and len(answer["UnmatchedFaces"]) == 4
    match = answer["FaceMatches"][0]
    assert match["Similarity"] >= 95
    crowd_faces = (await rek.detect_faces(Image=crowd))["FaceDetails"]
    assert match["Face"]["BoundingBox"] == crowd_faces[1]["BoundingBox"]  # "ric" is 2nd
    assert {"BoundingBox", "Confidence"} <= set(answer["SourceImageFace"])

    everyone = await rek.compare_faces(SourceImage=source, TargetImage=crowd, SimilarityThreshold=0)
    sims = sorted(m["Similarity"] for m in everyone["FaceMatches"])
    assert len(sims) == 5 and all(s < 40 for s in sims[:4]) and sims[4] >= 95
    nobody = await rek.compare_faces(SourceImage=source, TargetImage=crowd, SimilarityThreshold=100)
    assert nobody["FaceMatches"] == [] and len(nobody["UnmatchedFaces"]) == 5

    other = await rek.compare_faces(
        SourceImage=source, TargetImage=s3_image(bucket, "ric_crowd0.jpg")
    )
    assert other["FaceMatches"] == [] and len(other["UnmatchedFaces"]) == 4
    same = await rek.compare_faces(SourceImage=source, TargetImage=s3_image(bucket, "ric.jpg"))
    assert len(same["FaceMatches"]) == 1

    with pytest.raises(ClientError) as info:
        await rek.compare_faces(
            SourceImage=s3_image(bucket, "sample-image1.jpeg"), TargetImage=crowd
        )
    assert code_of(info.value) == "InvalidParameterException"
    assert "no faces" in info.value.response["Error"]["Message"]
    billed = fake.stats()["billed"]
    assert billed[("CompareFaces", f"s3://{bucket}/ric_crowd1.jpg")] == 3


async def test_collections_round_trip(rek: Any, bucket: str) -> None:
    created = await rek.create_collection(CollectionId="people")
    assert created["StatusCode"] == 200
    with pytest.raises(ClientError) as info:
        await rek.create_collection(CollectionId="people")
    assert code_of(info.value) == "ResourceAlreadyExistsException"

    with pytest.raises(ClientError) as info:
        await rek.index_faces(
            CollectionId="people", Image=s3_image(bucket, "ric.jpg"), ExternalImageId="a b"
        )
    assert code_of(info.value) == "InvalidParameterException"

    indexed = await rek.index_faces(
        CollectionId="people",
        Image=s3_image(bucket, "ric_crowd1.jpg"),
        ExternalImageId="crowd1.jpg",
        MaxFaces=4,
    )
    assert len(indexed["FaceRecords"]) == 4
    assert indexed["UnindexedFaces"][0]["Reasons"] == ["EXCEEDS_MAX_FACES"]
    again = await rek.index_faces(
        CollectionId="people",
        Image=s3_image(bucket, "ric_crowd1.jpg"),
        ExternalImageId="crowd1.jpg",
        MaxFaces=4,
    )
    face_ids = [r["Face"]["FaceId"] for r in indexed["FaceRecords"]]
    # As Rekognition does: the image indexed again adds new faces beside the first ones.
    twins = [r["Face"]["FaceId"] for r in again["FaceRecords"]]
    assert len(twins) == 4 and not set(twins) & set(face_ids)
    assert (await rek.describe_collection(CollectionId="people"))["FaceCount"] == 8
    deleted = await rek.delete_faces(CollectionId="people", FaceIds=[*twins, "not-a-face"])
    assert sorted(deleted["DeletedFaces"]) == sorted(twins)
    await rek.index_faces(
        CollectionId="people", Image=s3_image(bucket, "ric.jpg"), ExternalImageId="ric.jpg"
    )

    listed = await rek.list_faces(CollectionId="people", MaxResults=3)
    assert len(listed["Faces"]) == 3 and listed["NextToken"]
    rest = await rek.list_faces(CollectionId="people", NextToken=listed["NextToken"])
    assert len(listed["Faces"]) + len(rest["Faces"]) == 5
    described = await rek.describe_collection(CollectionId="people")
    assert described["FaceCount"] == 5

    found = await rek.search_faces_by_image(
        CollectionId="people", Image=s3_image(bucket, "ric_harvey.jpeg")
    )
    externals = sorted(m["Face"].get("ExternalImageId") for m in found["FaceMatches"])
    assert externals == ["crowd1.jpg", "ric.jpg"]
    assert all(m["Similarity"] >= 95 for m in found["FaceMatches"])
    top = await rek.search_faces_by_image(
        CollectionId="people", Image=s3_image(bucket, "ric.jpg"), MaxFaces=1
    )
    assert len(top["FaceMatches"]) == 1
    loose = await rek.search_faces_by_image(
        CollectionId="people", Image=s3_image(bucket, "ric.jpg"), FaceMatchThreshold=0
    )
    assert len(loose["FaceMatches"]) == 5

    ric_in_crowd = face_ids[1]
    by_id = await rek.search_faces(CollectionId="people", FaceId=ric_in_crowd)
    assert by_id["SearchedFaceId"] == ric_in_crowd
    assert [m["Face"]["ExternalImageId"] for m in by_id["FaceMatches"]] == ["ric.jpg"]

    with pytest.raises(ClientError) as info:
        await rek.search_faces_by_image(
            CollectionId="people", Image=s3_image(bucket, "sample-image1.jpeg")
        )
    assert code_of(info.value) == "InvalidParameterException"

    assert "people" in (await rek.list_collections())["CollectionIds"]
    assert (await rek.delete_collection(CollectionId="people"))["StatusCode"] == 200
    for call in (
        rek.describe_collection(CollectionId="people"),
        rek.index_faces(CollectionId="people", Image=s3_image(bucket, "ric.jpg")),
        rek.search_faces_by_image(CollectionId="people", Image=s3_image(bucket, "ric.jpg")),
    ):
        with pytest.raises(ClientError) as info:
            await call
        assert code_of(info.value) == "ResourceNotFoundException"


# ---------------------------------------------------------------- admin endpoints, CLI


async def test_admin_endpoints(fake: FakeRekognition, rek: Any) -> None:
    data = sample("ric.jpg")
    await rek.detect_faces(Image={"Bytes": data})
    async with aiohttp.ClientSession() as http:
        async with http.get(fake.url + "/_fake/stats") as resp:
            stats = await resp.json()
        assert stats["ok"] == {"DetectFaces": 1}
        assert stats["billed"] == {f"DetectFaces sha256:{image_digest(data)}": 1}
        assert stats["call_number"] == 1 and stats["listening"] is True
        fake.configure(fail_calls={2: "malformed"})
        with pytest.raises(AttributeError):
            await rek.detect_faces(Image={"Bytes": data})
        async with http.get(fake.url + "/_fake/stats") as resp:
            stats = await resp.json()
        assert stats["malformed"] == {"DetectFaces": 1}
        assert stats["undelivered"] == {f"DetectFaces sha256:{image_digest(data)}": 1}

        async with http.post(
            fake.url + "/_fake/config", json={"quotas": {"DetectFaces": 0}, "latency_sigma": 0.2}
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["quotas"] == {"DetectFaces": 0.0}
        with pytest.raises(ClientError) as info:
            await rek.detect_faces(Image={"Bytes": data})
        assert code_of(info.value) == "ProvisionedThroughputExceededException"

        async with http.post(fake.url + "/_fake/config", json={"nope": 1}) as resp:
            assert resp.status == 400
        async with http.post(fake.url + "/_fake/reset") as resp:
            assert resp.status == 200
        async with http.get(fake.url + "/_fake/stats") as resp:
            assert (await resp.json())["calls"] == {}
    assert fake.config.latency_sigma == 0.2


def test_cli_serves_and_stops_on_sigterm(moto_endpoint: str, tmp_path: Path) -> None:
    people_file = tmp_path / "people.json"
    people_file.write_text(json.dumps({image_digest(sample("ric.jpg")): ["ric", "friend"]}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.fake_rekognition",
            "--port",
            "0",
            "--s3-endpoint-url",
            moto_endpoint,
            "--quota",
            "DetectFaces=50",
            "--people",
            str(people_file),
            *("--stall-seconds", "7", "--fail-call", "99=drop", "--garbage-rate", "0"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=15), "the CLI printed no URL"
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        client = boto3.client("rekognition", endpoint_url=url, region_name=REGION, **CREDS)
        try:
            answer = client.detect_faces(Image={"Bytes": sample("ric.jpg")})
        finally:
            client.close()
        assert len(answer["FaceDetails"]) == 2
        with urllib.request.urlopen(url + "/_fake/stats", timeout=5) as resp:
            assert json.load(resp)["ok"] == {"DetectFaces": 1}
        with urllib.request.urlopen(url + "/_fake/config", data=b"{}", timeout=5) as resp:
            config = json.load(resp)
        assert config["stall_seconds"] == 7 and config["fail_calls"] == {"99": "drop"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=10)
    assert "Traceback" not in stderr
