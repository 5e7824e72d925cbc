"""Error classification: one table from exception type to (code, kind, connection), checked
against the exceptions aiobotocore really raises, and the package's import graph around it."""

from __future__ import annotations

import ast
import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioboto3
import botocore.exceptions as bexc
import pytest
from aiobotocore.config import AioConfig

from rekbatch.calls.classify import failure_of
from tests.support.fake_rekognition import FakeConfig, FakeRekognition

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "rekbatch"


# --------------------------------------------------------------------------- import graph


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module ``module`` imports, at any depth (functions included), leaving out
    blocks under ``if TYPE_CHECKING``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = _imports(tree, name, path.name == "__init__.py")
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def test_the_import_graph_helper_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _reaches(graph, "a", "c") and _reaches(graph, "c", "a")
    assert not _reaches(graph, "a", "d")


def test_errors_and_the_calls_package_are_in_no_import_cycle() -> None:
    graph = import_graph()
    # imports at the top and inside functions are both read
    assert "rekbatch.calls.retry" in graph["rekbatch.calls.caller"]
    assert "rekbatch.backends.aws" in graph["rekbatch.engine.run"]
    involved = ["rekbatch.errors", *(m for m in graph if m.startswith("rekbatch.calls"))]
    for module in involved:
        cycle = [dep for dep in graph[module] if _reaches(graph, dep, module)]
        assert not cycle, f"{module} is in an import cycle through {cycle}"
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
