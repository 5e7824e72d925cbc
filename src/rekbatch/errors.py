"""The rekbatch exception tree, the process exit codes, and one map from AWS errors into it.

Every error rekbatch raises on purpose derives from ``RekbatchError`` and carries the exit
code the CLI turns it into:

- ``ConfigError`` (2): the config file or a flag is wrong; the message names file and field.
- ``SetupError`` (2): the environment is wrong before any work: credentials, bucket, endpoint,
  a reference image without a face, a job directory holding another job or locked by a run.
- ``TaskFailed`` (1): a task of a run (producer, worker, writer, heartbeat, upload) failed
  unexpectedly; the run stopped, what was finished is kept, and the job resumes.
- ``EndpointUnreachable`` (1): an endpoint (Rekognition, S3) has answered nothing for the
  stated time; the run stops, resumable, rather than fail the rest record by record.
- ``BackendError``: one Rekognition (or offline backend) call failed. ``kind`` says whether
  it is retried (``throttle``, ``transient``) or recorded at once (``permanent``). It never
  reaches the CLI: the engine records it against the image.

``setup_error_from`` and ``call_error_from`` turn botocore/aiohttp exceptions into these.
"""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal["throttle", "transient", "permanent"]

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_FAILED_RECORDS = 3
EXIT_BUDGET = 4
EXIT_INTERRUPTED = 130


class RekbatchError(Exception):
    exit_code = EXIT_UNEXPECTED


class ConfigError(RekbatchError):
    exit_code = EXIT_USAGE


class ConfigErrors(ConfigError):
    """Several problems of one config, each a line naming the file (or variable) and field."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class SetupError(RekbatchError):
    exit_code = EXIT_USAGE


class TaskFailed(RekbatchError):
    """A task of the run failed: ``task`` names it, the cause is chained."""

    exit_code = EXIT_UNEXPECTED

    def __init__(self, task: str, cause: BaseException) -> None:
        super().__init__(f"{task} failed: {type(cause).__name__}: {cause}")
        self.task = task
        self.cause = cause


class EndpointUnreachable(RekbatchError):
    """No call to an endpoint succeeded for the stated time: the run stops (resumable)
    instead of failing the rest of the bucket record by record."""

    exit_code = EXIT_UNEXPECTED

    def __init__(self, endpoint: str, seconds: float, last_error: str) -> None:
        super().__init__(
            f"{endpoint} unreachable for {seconds:.0f} s (last: {last_error}); the run "
            "stopped, resume it when the endpoint answers again"
        )
        self.endpoint = endpoint


class BackendError(RekbatchError):
    """A classified failure of one call."""

    def __init__(self, code: str, message: str, kind: ErrorKind) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.kind = kind

    @property
    def retryable(self) -> bool:
        return self.kind != "permanent"


_NOT_FOUND = frozenset({"NoSuchBucket", "NoSuchKey", "404", "NotFound"})
_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})
_BAD_CREDENTIALS = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
    }
)


def setup_error_from(exc: BaseException, what: str) -> SetupError | None:
    """One clear line for an environment problem met before any work, or None."""
    import botocore.exceptions as bexc

    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return SetupError(
            f"{what}: no AWS credentials found (set a profile, AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, or run where an instance role is available)"
        )
    if isinstance(exc, bexc.ProfileNotFound):
        return SetupError(f"{what}: {exc}")
    if isinstance(exc, bexc.EndpointConnectionError):
        return SetupError(f"{what}: cannot reach the endpoint: {exc}")
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        message = error.get("Message", "") or code
        if code in _NOT_FOUND:
            return SetupError(f"{what}: bucket or object not found ({code})")
        if code in _DENIED:
            return SetupError(f"{what}: access denied ({message})")
        if code in _BAD_CREDENTIALS:
            return SetupError(f"{what}: the AWS credentials were refused ({code})")
        return SetupError(f"{what}: {code}: {message}")
    return None


def call_error_from(exc: BaseException) -> BackendError | None:
    """Classify a botocore/aiohttp failure of one call; None if it is not a call failure."""
    import botocore.exceptions as bexc

    from rekbatch.calls.retry import classify

    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "UnknownError")
        message = str(error.get("Message") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return BackendError(code, message, classify(code, status))
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return BackendError("NoCredentials", str(exc), "permanent")
    # Network failures say nothing about the request itself: worth another attempt.
    network = (
        bexc.EndpointConnectionError,
        bexc.ConnectionClosedError,
        bexc.ConnectTimeoutError,
        bexc.ReadTimeoutError,
        bexc.HTTPClientError,
        bexc.ResponseStreamingError,
        bexc.IncompleteReadError,
        TimeoutError,
        ConnectionError,
    )
    if isinstance(exc, network):
        return BackendError(type(exc).__name__, str(exc) or type(exc).__name__, "transient")
    return None
