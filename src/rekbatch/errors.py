"""The rekbatch exception tree, the process exit codes, and one map from AWS errors into it.

Every error rekbatch raises on purpose derives from ``RekbatchError`` and carries the exit
code the CLI turns it into:

- ``ConfigError`` (2): the config file or a flag is wrong; the message names file and field.
- ``SetupError`` (2): the environment is wrong before any work: credentials, bucket, endpoint,
  a reference image without a face, a job directory holding another job or locked by a run.
- ``TaskFailed`` (1): a task of a run (producer, worker, writer, heartbeat, upload) failed
  unexpectedly; the run stopped, what was finished is kept, and the job resumes.
- ``EndpointUnreachable`` (1): an endpoint (Rekognition, S3) that answered before could not
  be reached for the stated time; the run stops, resumable, rather than fail the rest
  record by record.
- ``EndpointNeverReached`` (2): an endpoint no call of this run has reached could not be
  reached for the stated time: most likely the network, the region or the endpoint URL.
- ``TooManyFailures`` (1): the failure breaker stopped the run: too many records failed,
  or many in a row with the same code; ``resume --retry-failed`` takes them up.
- ``CredentialsRefused`` (1): the service refused the credentials, also once reloaded; the
  run stopped without failing a record.
- ``CallPathFailed`` (1): the direct call path met an exception it does not expect (a
  changed library); ``aws.call_path = "client"`` avoids it.
- ``Interrupted`` (130): a call was not started or retried because the run is stopping.
- ``BackendError``: one Rekognition (or offline backend) call failed. ``kind`` says whether
  it is retried (``throttle``, ``transient``), recorded at once (``permanent``), or calls
  for fresh credentials (``credentials``); ``connection`` says whether a failed connection
  never reached the service (``connect``) or may have (``exchange``). It never reaches the
  CLI: the engine records it against the image.

``setup_error_from`` turns botocore exceptions met before any work into ``SetupError``;
``rekbatch.calls.classify`` turns those of a call into ``BackendError``.
"""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal["throttle", "transient", "permanent", "credentials"]
Connection = Literal["connect", "exchange"]

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_FAILED_RECORDS = 3
EXIT_BUDGET = 4
EXIT_INTERRUPTED = 130
# A run that went through every record (some may have failed): a shard ready to merge.
EXIT_DONE = frozenset({EXIT_OK, EXIT_FAILED_RECORDS})


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


class EndpointNeverReached(RekbatchError):
    """No call of this run has reached an endpoint, and it could not be reached for the
    stated time: a setup problem rather than an outage."""

    exit_code = EXIT_USAGE

    def __init__(self, endpoint: str, seconds: float, last_error: str, ways_out: str) -> None:
        super().__init__(
            f"cannot reach {endpoint}: no call to it got through in {seconds:.0f} s "
            f"(last: {last_error}); {ways_out}"
        )
        self.endpoint = endpoint


class RunHalted(RekbatchError):
    """The run stopped itself; what is finished is kept. ``resume_args``: what to add to
    ``rekbatch resume DIR`` to take the job up again."""

    exit_code = EXIT_UNEXPECTED
    resume_args = ""


class TooManyFailures(RunHalted):
    """The failure breaker tripped (see ``rekbatch.calls.breaker``)."""

    resume_args = " --retry-failed"

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.code = code


class CredentialsRefused(RunHalted):
    """The service refused the credentials, also once reloaded. No record was failed for
    it: the objects stay to do."""

    def __init__(self, endpoint: str, code: str, message: str) -> None:
        super().__init__(
            f"{endpoint} refused the credentials ({code}: {message}), also once reloaded; "
            "the run stopped without failing a record: renew the credentials"
        )
        self.code = code


class CallPathFailed(RekbatchError):
    """The direct call path met an exception it does not expect: a bug, or a library that
    changed under it. Not a property of one image, so the run stops."""

    exit_code = EXIT_UNEXPECTED

    def __init__(self, api: str, cause: BaseException, versions: str) -> None:
        super().__init__(
            f"the direct call path failed on {api} with {type(cause).__name__}: {cause} "
            f'({versions}); set aws.call_path = "client" (REKBATCH_AWS__CALL_PATH=client) '
            "to call through the aiobotocore client"
        )
        self.api = api


class Interrupted(RekbatchError):
    """The run is stopping: a call is not started, or not retried. The object it was for
    stays to do."""

    exit_code = EXIT_INTERRUPTED


class BackendError(RekbatchError):
    """A classified failure of one call."""

    def __init__(
        self,
        code: str,
        message: str,
        kind: ErrorKind,
        *,
        connection: Connection | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.kind = kind
        self.connection = connection

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
