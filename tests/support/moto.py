"""Filling moto's S3 without HTTP: the server runs in the test process, so its backend is
at hand, and thousands of objects take a fraction of a second instead of a minute. What a
test is about (listing, reading) still goes over HTTP."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends


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
