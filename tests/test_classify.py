"""Error classification: one table from exception type to (code, kind, connection), checked
against the exceptions aiobotocore really raises, and the package's import graph around it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import aioboto3
import botocore.exceptions as bexc
import pytest
from aiobotocore.config import AioConfig

from rekbatch.calls.classify import failure_of
from tests.support.fake_rekognition import FakeConfig, FakeRekognition
from tests.support.import_graph import import_graph

# --------------------------------------------------------------------------- import graph


def test_errors_imports_nothing_of_the_calls_package() -> None:
    # the exception tree sits below the classification (tests/test_layout.py: no cycle at all)
    graph = import_graph()
    assert not any(dep.startswith("rekbatch.calls") for dep in graph["rekbatch.errors"])


# --------------------------------------------------------------------------- the table


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there now: connections are refused


async def _raised(endpoint: str, read_timeout: float = 5.0) -> BaseException:
    """What one DetectLabels call through a plain aiobotocore client raises."""
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="eu-west-1"
    )
    config = AioConfig(
        retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=read_timeout
    )
    async with session.client("rekognition", endpoint_url=endpoint, config=config) as client:
        try:
            await client.detect_labels(Image={"S3Object": {"Bucket": "bucket", "Name": "k"}})
        except Exception as exc:
            return exc
    raise AssertionError("the call did not fail")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeRekognition]:
    with FakeRekognition(FakeConfig()) as server:
        yield server


@pytest.mark.parametrize(
    ("fault", "code", "connection"),
    [
        ("refused", "EndpointConnectionError", "connect"),
        ("drop", "ConnectionClosedError", "exchange"),
        ("reset", "EndpointConnectionError", "exchange"),  # the request was sent
        ("stall", "ReadTimeoutError", "exchange"),
    ],
)
def test_real_connection_failures_are_classified_by_their_stage(
    fake: FakeRekognition, fault: str, code: str, connection: str
) -> None:
    if fault == "refused":
        raised = asyncio.run(_raised(f"http://127.0.0.1:{_closed_port()}"))
    else:
        fake.configure(fail_calls={1: fault}, stall_seconds=0)
        fake.reset_stats()
        raised = asyncio.run(_raised(fake.url, read_timeout=0.5))
    failure = failure_of(raised)
    assert failure is not None, raised
    assert (failure.code, failure.kind, failure.connection) == (code, "transient", connection)


def _client_error(code: str, status: int) -> bexc.ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return bexc.ClientError(response, "DetectLabels")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_client_error("ExpiredTokenException", 400), ("ExpiredTokenException", "credentials")),
        (
            _client_error("UnrecognizedClientException", 400),
            ("UnrecognizedClientException", "credentials"),
        ),
        (_client_error("ThrottlingException", 500), ("ThrottlingException", "throttle")),
        (
            _client_error("InvalidImageFormatException", 400),
            ("InvalidImageFormatException", "permanent"),
        ),
        (bexc.NoCredentialsError(), ("NoCredentials", "credentials")),
        (bexc.ConnectTimeoutError(endpoint_url="http://x"), ("ConnectTimeoutError", "transient")),
        (TimeoutError(), ("TimeoutError", "transient")),
    ],
)
def test_answers_and_library_errors_map_to_code_and_kind(
    exc: BaseException, expected: tuple[str, str]
) -> None:
    failure = failure_of(exc)
    assert failure is not None
    assert (failure.code, failure.kind) == expected
    answered = isinstance(exc, bexc.ClientError | bexc.NoCredentialsError)
    assert (failure.connection is None) == answered


@pytest.mark.parametrize("exc", [TypeError("changed signature"), AttributeError("x"), KeyError()])
def test_an_exception_the_table_does_not_know_is_not_a_call_failure(exc: BaseException) -> None:
    assert failure_of(exc) is None
