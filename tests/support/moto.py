"""Filling moto's S3 without HTTP: the server runs in the test process, so its backend is
at hand, and thousands of objects take a fraction of a second instead of a minute. What a
test is about (listing, reading) still goes over HTTP."""

from __future__ import annotations

from collections.abc import Iterable

from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends


def put_objects(bucket: str, objects: Iterable[tuple[str, bytes]]) -> None:
    """Put each (key, body) into ``bucket`` (which must exist) of the in-process moto."""
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key, body in objects:
        backend.put_object(bucket, key, body)
