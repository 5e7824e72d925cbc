"""The rekbatch exception tree.

Every error rekbatch raises on purpose derives from ``RekbatchError`` and carries the process
exit code the CLI turns it into:

- ``ConfigError`` (2): the config file or a flag is wrong; the message names file and field.
- ``SetupError`` (2): the environment is wrong before any work: credentials, bucket, endpoint,
  a reference image without a face, a job directory holding another job or locked by a run.
- ``BackendError``: one Rekognition (or local backend) call failed. ``kind`` says whether the
  pipeline retries it (``throttle``, ``transient``) or records it at once (``permanent``).
  It never reaches the CLI: the pipeline records it against the image.
"""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal["throttle", "transient", "permanent"]


class RekbatchError(Exception):
    exit_code = 1


class ConfigError(RekbatchError):
    exit_code = 2


class SetupError(RekbatchError):
    exit_code = 2


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
