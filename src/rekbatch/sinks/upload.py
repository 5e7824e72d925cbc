"""Upload a job's result files to S3, laid out for Athena.

Athena (like Glue, Spark and DuckDB's globbing) reads a table from every file under one
prefix, and every file there must have the table's format and schema. So each result file gets
a folder of its own, and the final upload of ``s3://bucket/prefix/`` looks like::

    prefix/results/results.parquet       table: one row per (object, operation)
    prefix/faces/faces.parquet           table: one row per face
    prefix/labels/labels.parquet         table: one row per label
    prefix/results_jsonl/results.jsonl   table (JSON SerDe): the raw records
    prefix/results_csv/results.csv       table (CSV, one header line)
    prefix/summary.json                  the run's summary (not a table)
    prefix/job.json                      a shard's identity and job config (shards only)

A checkpoint upload (``part=N``) is a snapshot of the files as they stand, written under
``prefix/parts/part-00000N/`` with the same folders inside. Snapshots repeat the rows of the
ones before, so they stay out of the table folders (a table over ``prefix/results/`` never
counts a row twice); the highest part is the latest state, and the final upload replaces
them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rekbatch.config import parse_s3_uri
from rekbatch.errors import ConfigError

# file name -> (folder under the prefix, or "" for the prefix itself; Content-Type)
LAYOUT: dict[str, tuple[str, str]] = {
    "results.parquet": ("results", "application/vnd.apache.parquet"),
    "faces.parquet": ("faces", "application/vnd.apache.parquet"),
    "labels.parquet": ("labels", "application/vnd.apache.parquet"),
    "results.jsonl": ("results_jsonl", "application/x-ndjson"),
    "results.csv": ("results_csv", "text/csv; charset=utf-8"),
    "summary.json": ("", "application/json"),
    "job.json": ("", "application/json"),  # a shard's: which shard, the job's config
}
# Appended to while a job runs: a snapshot stops at the last whole line.
_LINE_FILES = frozenset({"results.jsonl", "results.csv"})

_MIB = 1024 * 1024
_MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload


def object_key(prefix: str, name: str, part: int | None = None) -> str:
    """The S3 key of result file ``name`` under ``prefix`` (checkpoint ``part``, if any)."""
    folder, _ = LAYOUT[name]
    base = prefix.strip("/")
    if part is not None:
        if part < 0:
            raise ValueError(f"part must not be negative: {part}")
        base = "/".join(p for p in (base, "parts", f"part-{part:06d}") if p)
    return "/".join(p for p in (base, folder, name) if p)


def _whole_lines_size(path: Path) -> int:
    """The size of ``path`` up to and including its last newline (0 when it has none)."""
    with path.open("rb") as handle:
        end = handle.seek(0, 2)
        position = end
        while position > 0:
            step = min(position, 64 * 1024)
            position -= step
            handle.seek(position)
            chunk = handle.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                return position + newline + 1
    return 0


@dataclass(frozen=True, slots=True)
class TransferSettings:
    """When and how big files go up in parts.

    S3 wants parts of at least 5 MiB (the last excepted) and at most 10,000 of them; part
    bodies are sent from memory, at most ``max_concurrency`` parts of one file at a time.
    """

    multipart_threshold: int = 16 * _MIB
    multipart_chunksize: int = 16 * _MIB
    max_concurrency: int = 4

    def chunk_for(self, size: int) -> int:
        return max(self.multipart_chunksize, -(-size // _MAX_PARTS))


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(length)


async def _read(path: Path, offset: int, length: int) -> io.BytesIO:
    # BytesIO, not bytes: aiohttp streams it instead of warning about a large raw body.
    return io.BytesIO(await asyncio.to_thread(_read_range, path, offset, length))


async def _put(
    s3: Any,
    path: Path,
    size: int,
    bucket: str,
    key: str,
    content_type: str,
    settings: TransferSettings,
) -> None:
    """Upload the first ``size`` bytes of ``path``: one PUT, or a multipart upload."""
    if size < settings.multipart_threshold:
        body = await _read(path, 0, size)
        await s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        return
    chunk = settings.chunk_for(size)
    created = await s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type)
    upload_id = created["UploadId"]
    gate = asyncio.Semaphore(settings.max_concurrency)

    async def send(number: int, offset: int) -> dict[str, Any]:
        async with gate:
            body = await _read(path, offset, min(chunk, size - offset))
            response = await s3.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
        return {"PartNumber": number, "ETag": response["ETag"]}

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(send(number, offset))
                for number, offset in enumerate(range(0, size, chunk), start=1)
            ]
        await s3.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [task.result() for task in tasks]},
        )
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        if isinstance(exc, ExceptionGroup):
            raise exc.exceptions[0] from None  # the first failed part, as a plain error
        raise


async def upload_results(
    s3: Any,
    output_dir: Path,
    upload_uri: str,
    *,
    part: int | None = None,
    transfer: TransferSettings | None = None,
) -> list[str]:
    """Upload the result files present in ``output_dir``; the ``s3://`` URIs written.

    ``s3`` is an aioboto3 S3 client. Files from 16 MiB up (``transfer`` may say otherwise)
    go up as multipart uploads. With ``part=N`` the files go under ``parts/part-00000N/`` as
    a checkpoint snapshot (see the module doc). results.jsonl and results.csv are cut at
    their last whole line, so a snapshot taken while the job appends never holds half a
    record. Raises ``ConfigError`` for a URI that is not ``s3://...`` and ``SetupError`` when
    S3 refuses (no bucket, access denied, bad credentials).
    """
    parsed = parse_s3_uri(upload_uri)
    if parsed is None:
        raise ConfigError(f"output.upload_uri: not an s3://bucket/prefix URI: {upload_uri!r}")
    bucket, prefix = parsed
    settings = transfer or TransferSettings()
    written: list[str] = []
    for name, (_, content_type) in LAYOUT.items():
        path = output_dir / name
        if not path.is_file():
            continue
        key = object_key(prefix, name, part)
        size = _whole_lines_size(path) if name in _LINE_FILES else path.stat().st_size
        try:
            await _put(s3, path, size, bucket, key, content_type, settings)
        except Exception as exc:
            from rekbatch.errors import setup_error_from  # botocore-heavy; on failure

            setup = setup_error_from(exc, f"upload to s3://{bucket}/{key}")
            if setup is None:
                raise
            raise setup from exc
        written.append(f"s3://{bucket}/{key}")
    return written
