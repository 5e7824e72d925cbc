"""Filling moto's S3 without HTTP: the server runs in the test process, so its backend is
at hand, and thousands of objects take a fraction of a second instead of a minute. What a
test is about (listing, reading) still goes over HTTP; ``Served`` counts what the server
gave out, to whichever process asked."""

from __future__ import annotations

import gzip
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import FakeKey, S3Backend, s3_backends
from moto.s3.responses import S3Response


def put_objects(bucket: str, objects: Iterable[tuple[str, bytes]]) -> None:
    """Put each (key, body) into ``bucket`` (which must exist) of the in-process moto."""
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key, body in objects:
        backend.put_object(bucket, key, body)


def send_messages(queue: str, bodies: Iterable[str], region: str = "eu-west-1") -> None:
    """Send each body to ``queue`` of the in-process moto, in order."""
    from moto.sqs.models import sqs_backends

    backend = sqs_backends[DEFAULT_ACCOUNT_ID][region]
    for body in bodies:
        backend.send_message(queue, body)


def lean_sqs_receives() -> Iterator[None]:
    """moto's ReceiveMessage checks each message's retention by working out every attribute
    of the queue, each of which scans all its messages: a few hundred messages then take
    half a second a receive. The same check, from the one attribute it needs."""
    import pytest
    from moto.core.utils import unix_time
    from moto.sqs.models import Message, SQSBackend

    def retained(self: SQSBackend, queue_name: str, message: Message) -> bool:
        period = float(self.get_queue(queue_name).message_retention_period)  # type: ignore[attr-defined]
        return period + (message.sent_timestamp or 0) / 1000 > unix_time()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SQSBackend, "is_message_valid_based_on_retention_period", retained)
        yield


class Served:
    """What the in-process moto server served: keys ListObjectsV2 returned and its requests,
    per bucket, and line breaks in the bytes of each GET, per ``/bucket/key`` (gzip unpacked:
    the rows of an inventory's data file)."""

    def __init__(self) -> None:
        self.listed: Counter[str] = Counter()
        self.pages: Counter[str] = Counter()
        self.lines: Counter[str] = Counter()
        self._lock = threading.Lock()

    def lines_under(self, bucket: str) -> int:
        return sum(n for path, n in self.lines.items() if path.startswith(f"/{bucket}/"))

    def clear(self) -> None:
        with self._lock:
            self.listed.clear()
            self.pages.clear()
            self.lines.clear()

    @contextmanager
    def counting(self) -> Iterator[Served]:
        """Count while inside (the server's methods wrapped, then put back)."""
        listing, serving = S3Backend.list_objects_v2, S3Response.key_response
        served = self

        def list_objects_v2(self: Any, bucket: Any, *args: Any, **kwargs: Any) -> Any:
            result = listing(self, bucket, *args, **kwargs)
            with served._lock:
                served.listed[bucket.name] += sum(isinstance(k, FakeKey) for k in result[0])
                served.pages[bucket.name] += 1
            return result

        def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
            status, response_headers, body = serving(self, request, full_url, headers)
            if request.method == "GET" and status in (200, 206) and isinstance(body, bytes):
                data = gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body
                with served._lock:
                    served.lines[urlparse(full_url).path] += data.count(b"\n")
            return status, response_headers, body

        S3Backend.list_objects_v2 = list_objects_v2  # type: ignore[method-assign]
        S3Response.key_response = key_response  # type: ignore[method-assign]
        try:
            yield self
        finally:
            S3Backend.list_objects_v2 = listing  # type: ignore[method-assign]
            S3Response.key_response = serving  # type: ignore[method-assign]
