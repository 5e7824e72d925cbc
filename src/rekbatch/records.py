"""The values that flow through the pipeline: listed objects and result records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "failed", "skipped"]
SkipReason = Literal["excluded", "not_image", "too_large", "too_small", "empty"]


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
    source_index: int = 0  # which configured source URI listed it

    @property
    def uri(self) -> str:
        if self.bucket is not None:
            return f"s3://{self.bucket}/{self.key}"
        return f"{self.root}/{self.key}"


@dataclass(slots=True)
class Record:
    """One (object, operation) outcome: a row of results.jsonl and results.csv."""

    run_id: str
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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "run_id": self.run_id,
            "bucket": self.obj.bucket,
            "key": self.obj.key,
            "etag": self.obj.etag,
            "size": self.obj.size,
            "last_modified": self.obj.last_modified,
            "operation": self.operation,
            "status": self.status,
            "reason": self.reason,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "attempts": self.attempts,
            "latency_ms": self.latency_ms,
            "processed_at": self.processed_at,
            "result": self.result,
        }
        row.update(self.extra)
        return row
