"""The values that flow through a run: listed objects and result records."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

# "removed": the object was deleted (an S3 event said so); one row per operation, so
# analytics can leave it out.
Status = Literal["ok", "failed", "skipped", "removed"]
SkipReason = Literal[
    "excluded",
    "not_image",
    "too_large",
    "too_small",
    "empty",
    "no_face_local",
    "malformed_entry",  # a line of a key list that names no object
    "not_found",  # a key list names an object that does not exist
    "malformed_event",  # a queue message that is not an S3 event notification
    "symlink",  # a symbolic link in a local folder, not followed (source.follow_symlinks)
]

# What a record says about its image once sniffed: the original's stored dimensions, the
# format it was converted from (None when sent unchanged), the dimensions sent, and its EXIF
# orientation (1-8, None without EXIF), so boxes can be mapped onto the original.
IMAGE_FIELDS: tuple[str, ...] = (
    "width",
    "height",
    "converted_from",
    "sent_width",
    "sent_height",
    "exif_orientation",
)


def utc_now() -> str:
    """Now as ISO 8601 UTC with milliseconds, the form of ``processed_at``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One listed object: an S3 object (``bucket`` set) or a file of a local folder.

    For a local folder ``bucket`` is None, ``key`` is the path relative to the folder with
    ``/`` separators and ``root`` is the folder.
    """

    bucket: str | None
    key: str
    size: int
    etag: str
    last_modified: str  # ISO 8601 UTC
    root: str | None = None
    source_index: int = 0  # which configured source listed it
    # Set by a source for an entry it cannot hand out (a malformed line of a key list):
    # recorded as skipped with this reason, ``note`` saying why.
    skip: SkipReason | None = None
    note: str | None = None
    # The S3 event's ``sequencer`` for an object that came from a queue: orders the events
    # of one key (``sources/s3_events.py``). None for listed objects.
    sequencer: str | None = None

    @property
    def uri(self) -> str:
        if self.bucket is not None:
            return f"s3://{self.bucket}/{self.key}"
        return f"{self.root}/{self.key}"


@dataclass(slots=True)
class Record:
    """One (object, operation) outcome: a row of results.jsonl and results.csv."""

    obj: ObjectRef
    operation: str
    status: Status
    reason: SkipReason | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    latency_ms: float | None = None
    processed_at: str = ""
    result: dict[str, Any] | None = None
    dedup_of: str | None = None
    # Fields an image's preparation adds to its records (dimensions, conversion).
    extra: dict[str, Any] | None = None
