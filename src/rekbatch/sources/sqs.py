"""An SQS queue of S3 event notifications as a source: ``sqs://QUEUE``.

``QUEUE`` is a queue's name (looked up in ``aws.region``) or its URL. The queue lists no
objects; what its messages say is read by ``engine/follow.py`` once the listing sources are
done. ``SqsSource`` is the source in the run's list (it reads the objects the events name,
through the run's S3 client); ``SqsQueue`` owns the SQS client and makes the calls, each
batched the way SQS allows (10 messages a call) and retried on connection failures until
``limits.unreachable_seconds`` (as ``sources/s3.py`` does for S3).

The parsing of message bodies is ``sources/s3_events.py``.
"""

from __future__ import annotations

import builtins
import contextlib
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import structlog
from aiobotocore.config import AioConfig

from rekbatch.calls.retry import Reachability, RetryPolicy, while_reachable
from rekbatch.clock import MONOTONIC, Clock
from rekbatch.errors import setup_error_from
from rekbatch.records import ObjectRef
from rekbatch.sources.ranges import KeyRange
from rekbatch.sources.s3 import S3

T = TypeVar("T")
log = structlog.get_logger("rekbatch")

PREFIX = "sqs://"
BATCH = 10  # SQS's most messages per ReceiveMessage, DeleteMessageBatch and friends
MAX_WAIT_SECONDS = 20  # SQS's longest long poll
# Queue attributes rekbatch reads; the age of the oldest message is a CloudWatch metric
# (ApproximateAgeOfOldestMessage), not an attribute.
BACKLOG_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


def queue_name_or_url(uri: str) -> str:
    """What follows ``sqs://``: a queue name, or a queue URL."""
    return uri[len(PREFIX) :] if uri.startswith(PREFIX) else uri


def is_queue_uri(uri: str) -> bool:
    return uri.startswith(PREFIX)


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    receipt: str
    body: str
    sent_at: float | None  # epoch seconds (SentTimestamp)
    receive_count: int  # ApproximateReceiveCount: this delivery's number, from 1


class SqsSource:
    """One configured ``sqs://QUEUE``: a source that lists nothing and reads the objects its
    events name (any bucket) through the run's S3 client."""

    def __init__(self, uri: str, index: int, s3: S3 | None) -> None:
        self.uri = uri
        self.index = index
        self._s3 = s3

    async def split(self, concurrency: int) -> builtins.list[KeyRange]:
        return [KeyRange(None, None)]

    async def divide(
        self, shards: int, concurrency: int, own: int = 0
    ) -> builtins.list[builtins.list[KeyRange]]:
        # A queue is not sharded (the run refuses it); nothing here to list anyway.
        return [[KeyRange(None, None)]] + [[] for _ in range(shards - 1)]

    def list(self, start_after: str | None) -> AsyncIterator[ObjectRef]:
        return self.list_range(KeyRange(None, None), start_after)

    async def list_range(self, rng: KeyRange, start_after: str | None) -> AsyncIterator[ObjectRef]:
        return
        yield  # an async generator that yields nothing: a queue is not listed

    async def read_head(self, obj: ObjectRef, nbytes: int) -> bytes:
        assert obj.bucket is not None and self._s3 is not None
        return await self._s3.read_head(obj.bucket, obj.key, nbytes)

    async def read(self, obj: ObjectRef) -> bytes:
        assert obj.bucket is not None and self._s3 is not None
        return await self._s3.read(obj.bucket, obj.key)


class SqsQueue:
    """One queue and the run's SQS client for it."""

    def __init__(
        self,
        session: Any,
        uri: str,
        index: int,
        *,
        endpoint_url: str | None,
        unreachable_seconds: float = 120.0,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.uri = uri
        self.index = index  # the source's place in source.uris
        self._session = session
        self._endpoint = endpoint_url
        # A long poll holds the connection for up to 20 s: the read timeout is above it.
        self._config = AioConfig(
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=MAX_WAIT_SECONDS + 40,
            max_pool_connections=8,
        )
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None
        self.url = ""
        self.visibility_seconds = 30.0
        self.redrive_policy: str | None = None
        self.reach = Reachability(
            f"the SQS queue {uri}",
            unreachable_seconds,
            clock,
            ways_out="check the network, aws.region or aws.sqs_endpoint_url, and the credentials",
        )
        self._clock = clock
        self._retry = RetryPolicy()
        self._rng = random.Random()

    async def __aenter__(self) -> SqsQueue:
        self.client = await self._stack.enter_async_context(
            self._session.client("sqs", endpoint_url=self._endpoint, config=self._config)
        )
        try:
            await self._resolve()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _resolve(self) -> None:
        """The queue's URL and its visibility timeout; one clear line when it is missing or
        not ours to read."""
        target = queue_name_or_url(self.uri)
        # Not through ``call``: a queue that cannot be reached at the start is a setup
        # problem, said at once, as for a source bucket.
        try:
            if target.startswith(("https://", "http://")):
                self.url = target
            else:
                answer = await self.client.get_queue_url(QueueName=target)
                self.url = str(answer["QueueUrl"])
            answer = await self.client.get_queue_attributes(
                QueueUrl=self.url, AttributeNames=["VisibilityTimeout", "RedrivePolicy"]
            )
            attributes = {str(k): str(v) for k, v in answer.get("Attributes", {}).items()}
        except Exception as exc:
            setup = setup_error_from(exc, f"source.uris: {self.uri}")
            if setup is None:
                raise
            raise setup from None
        self.visibility_seconds = float(attributes.get("VisibilityTimeout", 30) or 30)
        self.redrive_policy = attributes.get("RedrivePolicy")
        if self.redrive_policy is None:
            log.warning(
                "queue_without_redrive_policy",
                queue=self.uri,
                hint="a message that keeps failing comes back for ever; give the queue a "
                "dead-letter queue (README: Keeping results current)",
            )

    async def call(self, request: Callable[[], Awaitable[T]]) -> T:
        """``request()``, again after a failure of the connection until SQS is down
        (everything asked of it here is free to repeat)."""
        return await while_reachable(request, self.reach, self._clock, self._retry, self._rng)

    async def attributes(self, *names: str) -> dict[str, str]:
        answer = await self.call(
            lambda: self.client.get_queue_attributes(QueueUrl=self.url, AttributeNames=list(names))
        )
        return {str(k): str(v) for k, v in answer.get("Attributes", {}).items()}

    async def receive(self, wait_seconds: float) -> list[Message]:
        """Up to 10 messages, waiting up to ``wait_seconds`` (whole seconds, at most 20)
        for the first (long polling)."""
        wait = max(0, min(MAX_WAIT_SECONDS, math.ceil(wait_seconds)))
        answer = await self.call(
            lambda: self.client.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=BATCH,
                WaitTimeSeconds=wait,
                MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
            )
        )
        messages = []
        for raw in answer.get("Messages", ()):
            attributes = raw.get("Attributes", {})
            sent = attributes.get("SentTimestamp")
            messages.append(
                Message(
                    str(raw["MessageId"]),
                    str(raw["ReceiptHandle"]),
                    str(raw.get("Body", "")),
                    int(sent) / 1000.0 if sent else None,
                    int(attributes.get("ApproximateReceiveCount", 1)),
                )
            )
        return messages

    async def delete(self, receipts: Sequence[tuple[str, str]]) -> list[str]:
        """Delete (message id, receipt handle) pairs, 10 a call; the ids SQS refused."""
        return await self._batched("delete_message_batch", receipts, {})

    async def extend(self, receipts: Sequence[tuple[str, str]], seconds: float) -> list[str]:
        """Keep the messages invisible for ``seconds`` more from now; the ids refused."""
        extra = {"VisibilityTimeout": max(0, min(43_200, math.ceil(seconds)))}
        return await self._batched("change_message_visibility_batch", receipts, extra)

    def _request(
        self, method: str, entries: list[dict[str, Any]]
    ) -> Callable[[], Awaitable[dict[str, Any]]]:
        call = getattr(self.client, method)
        return lambda: call(QueueUrl=self.url, Entries=entries)

    async def _batched(
        self, method: str, receipts: Sequence[tuple[str, str]], extra: dict[str, Any]
    ) -> list[str]:
        refused: list[str] = []
        for start in range(0, len(receipts), BATCH):
            part = receipts[start : start + BATCH]
            # Batch entry ids are the message's place in the call: message ids may be longer
            # than the 80 characters an entry id may have.
            entries = [
                {"Id": str(n), "ReceiptHandle": receipt, **extra}
                for n, (_, receipt) in enumerate(part)
            ]
            answer = await self.call(self._request(method, entries))
            for failure in answer.get("Failed", ()):
                message_id = part[int(failure["Id"])][0]
                refused.append(message_id)
                log.warning(
                    "queue_call_refused",
                    queue=self.uri,
                    call=method,
                    message_id=message_id,
                    code=failure.get("Code"),
                    error=failure.get("Message"),
                )
        return refused


async def open_queues(
    stack: contextlib.AsyncExitStack,
    session: Any,
    uris: Sequence[str],
    *,
    endpoint_url: str | None,
    unreachable_seconds: float,
    clock: Clock = MONOTONIC,
) -> list[SqsQueue]:
    """The queues among the configured sources, opened for the run (closed with ``stack``)."""
    queues = []
    for index, uri in enumerate(uris):
        if not is_queue_uri(uri):
            continue
        queue = SqsQueue(
            session,
            uri,
            index,
            endpoint_url=endpoint_url,
            unreachable_seconds=unreachable_seconds,
            clock=clock,
        )
        queues.append(await stack.enter_async_context(queue))
    return queues


__all__ = [
    "BACKLOG_ATTRIBUTES",
    "Message",
    "SqsQueue",
    "SqsSource",
    "is_queue_uri",
    "open_queues",
    "queue_name_or_url",
]
