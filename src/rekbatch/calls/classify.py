"""What a failed call was: one table from exception type to (code, kind, connection), and the
service's error codes to kinds.

A failure has a ``kind`` (``ErrorKind``):

- ``throttle``: the service refused for rate (the rate limiter slows down, then retry).
  ``ProvisionedThroughputExceededException`` (over the account's TPS quota),
  ``ThrottlingException`` (the service is busy), the generic AWS throttling codes, and HTTP
  429. ``LimitExceededException`` is Rekognition's "too many concurrent jobs"; it clears
  when load drops, so it is a throttle too.
- ``transient``: worth retrying as is: ``InternalServerError``, ``ServiceUnavailable``, any
  5xx, and failures of the connection.
- ``credentials``: the service refused the credentials (expired, unknown, badly signed), or
  none could be found. Retrying with the same ones cannot help; the caller reloads them once.
- ``permanent``: the request itself is wrong and would fail again
  (``InvalidImageFormatException``, ``InvalidParameterException``, any other 4xx).

and, when no answer came, a ``connection`` stage:

- ``"connect"``: no connection was made (refused, DNS, connect timeout, proxy or TLS
  handshake): nothing reached the service, nothing can have been billed.
- ``"exchange"``: the connection failed after the request may have been sent (closed,
  reset, read timeout): the service may have processed and billed it.

``failure_of(exc)`` reads an exception through ``TABLE`` (by the exception's class, most
specific first); an exception the table does not know gives None: it is not a failure of a
call but a bug, and the caller lets it through.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from typing import Any

from rekbatch.errors import BackendError, Connection, ErrorKind

THROTTLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "ThrottlingError",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "BandwidthLimitExceeded",
        "SlowDown",
        "LimitExceededException",
        "EC2ThrottledException",
        "PriorRequestNotComplete",
    }
)

TRANSIENT_CODES = frozenset(
    {
        "InternalServerError",
        "InternalServerErrorException",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "ServiceException",
        "RequestTimeout",
        "RequestTimeoutException",
        "HumanLoopQuotaExceededException",
    }
)

# Refused credentials, as Rekognition (JSON protocol) and the query/S3 protocols name them.
CREDENTIAL_CODES = frozenset(
    {
        "ExpiredTokenException",
        "ExpiredToken",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidAccessKeyId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "RequestExpired",
        "NoCredentials",
    }
)

PERMANENT_CODES = frozenset(
    {
        "InvalidImageFormatException",
        "ImageTooLargeException",
        "InvalidParameterException",
        "InvalidS3ObjectException",
        "AccessDeniedException",
        "ResourceNotFoundException",
        "ResourceAlreadyExistsException",
        "ResourceInUseException",
        "InvalidPaginationTokenException",
        "ValidationException",
        "SerializationException",
        "UnknownOperationException",
    }
)

_TRANSIENT_HINTS = ("timeout", "timedout", "connection", "reset", "disconnect", "broken pipe")


def classify(code: str | None, http_status: int | None) -> ErrorKind:
    """The kind of a failed call, from its error code and HTTP status (either may be None)."""
    name = (code or "").strip()
    if name in THROTTLE_CODES or http_status == 429:
        return "throttle"
    if name in TRANSIENT_CODES:
        return "transient"
    if name in CREDENTIAL_CODES:
        return "credentials"
    if name in PERMANENT_CODES:
        return "permanent"
    lowered = name.lower()
    if "throttl" in lowered or "toomanyrequests" in lowered:
        return "throttle"
    if any(hint in lowered for hint in _TRANSIENT_HINTS):
        return "transient"
    if http_status is None:
        # No HTTP answer at all: the connection failed, timed out or was reset.
        return "transient"
    if http_status >= 500 or http_status == 408:
        return "transient"
    return "permanent"


@dataclass(frozen=True, slots=True)
class Row:
    """One row of ``TABLE``: the code (None: the exception's class name), the kind, and the
    connection stage (None: an answer came)."""

    code: str | None
    kind: ErrorKind
    connection: Connection | None


@functools.cache
def table() -> dict[type[BaseException], Row]:
    """Exception type -> ``Row``. Built on first use: botocore and aiohttp are heavy to
    import, and a run of the offline backend never needs them."""
    import aiohttp
    import botocore.exceptions as bexc

    connect = Row(None, "transient", "connect")
    exchange = Row(None, "transient", "exchange")
    no_credentials = Row("NoCredentials", "credentials", None)
    return {
        # botocore's, as aiobotocore raises them for a failed request
        bexc.ConnectTimeoutError: connect,
        bexc.ProxyConnectionError: connect,
        bexc.SSLError: connect,  # the TLS handshake failed: nothing was sent
        # refused, DNS, or a reset mid-exchange: its cause tells (``_connected``)
        bexc.EndpointConnectionError: exchange,
        bexc.ConnectionError: exchange,
        bexc.ReadTimeoutError: exchange,
        bexc.ConnectionClosedError: exchange,
        bexc.ResponseStreamingError: exchange,
        bexc.IncompleteReadError: exchange,
        bexc.HTTPClientError: exchange,
        bexc.NoCredentialsError: no_credentials,
        bexc.PartialCredentialsError: no_credentials,
        bexc.CredentialRetrievalError: Row(None, "credentials", None),
        bexc.TokenRetrievalError: Row(None, "credentials", None),
        bexc.SSOError: Row(None, "credentials", None),
        # the causes botocore wraps, and what a raw socket raises
        aiohttp.ClientConnectorError: connect,  # refused, DNS, proxy, TLS
        socket.gaierror: connect,
        ConnectionRefusedError: connect,
        aiohttp.ClientConnectionError: exchange,
        aiohttp.ClientPayloadError: exchange,
        ConnectionError: exchange,
        TimeoutError: exchange,
    }


def row_of(exc: BaseException) -> Row | None:
    """The table's row for ``exc``'s class or its nearest base, None when it has none."""
    rows = table()
    for cls in type(exc).__mro__:
        row = rows.get(cls)
        if row is not None:
            return row
    return None


def _connected(exc: BaseException, row: Row) -> Connection | None:
    """The stage of a connection failure, refined by the cause botocore wraps (its
    ``error``): an ``EndpointConnectionError`` is a failure to connect only when the cause
    is one."""
    if row.connection != "exchange":
        return row.connection
    kwargs: Any = getattr(exc, "kwargs", None)
    cause = kwargs.get("error") if isinstance(kwargs, dict) else None
    if isinstance(cause, BaseException):
        inner = row_of(cause)
        if inner is not None and inner.connection == "connect":
            return "connect"
    return "exchange"


UNREADABLE_ANSWER = "InvalidResponse"  # the code of an answer that could not be read


def may_have_been_done(error: BackendError) -> bool:
    """Whether the service may have done what a failed request asked: no error answer says
    it did not (the connection failed after the request could have been sent, the deadline
    passed, or an answer came that could not be read)."""
    return error.connection == "exchange" or error.code == UNREADABLE_ANSWER


def failure_of(exc: BaseException) -> BackendError | None:
    """``exc`` as a classified failure of one call; None when it is not one (a bug)."""
    if isinstance(exc, BackendError):
        return exc
    import botocore.exceptions as bexc

    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "UnknownError")
        message = str(error.get("Message") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return BackendError(code, message, classify(code, status))
    row = row_of(exc)
    if row is None:
        return None
    code = row.code or type(exc).__name__
    return BackendError(code, str(exc) or code, row.kind, connection=_connected(exc, row))
