"""What goes on to Rekognition and what is skipped, and why. Pure functions, no I/O."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Literal

from rekbatch.records import ObjectRef, SkipReason

# Rekognition's image limits: 15 MB for an image passed as an S3Object, 5 MB as bytes.
MAX_S3_OBJECT_BYTES = 15 * 1024 * 1024
MAX_IMAGE_BYTES = 5 * 1024 * 1024
# The smallest valid JPEG or PNG is well above this; anything smaller cannot hold a picture.
MIN_IMAGE_BYTES = 67
SNIFF_BYTES = 16

ImageKind = Literal["jpeg", "png"]


def _matches(key: str, patterns: list[str]) -> bool:
    """Globs match the whole key or its last path segment, case-insensitively, so
    ``*.jpg`` selects ``photos/2024/A.JPG``."""
    name = key.rsplit("/", 1)[-1].lower()
    lowered = key.lower()
    return any(fnmatchcase(name, p.lower()) or fnmatchcase(lowered, p.lower()) for p in patterns)


def classify_listing(
    obj: ObjectRef, include: list[str], exclude: list[str], max_bytes: int, *, sniff: bool = False
) -> SkipReason | None:
    """The reason ``obj`` is skipped from its listing entry alone, or None to go on.

    With ``sniff`` a tiny object goes on to be sniffed, so that text named ``.jpg`` is
    reported as ``not_image`` rather than ``too_small``; see ``classify_head``."""
    if include and not _matches(obj.key, include):
        return "excluded"
    if exclude and _matches(obj.key, exclude):
        return "excluded"
    if obj.size == 0:
        return "empty"
    if obj.size < MIN_IMAGE_BYTES and not sniff:
        return "too_small"
    if obj.size > max_bytes:
        return "too_large"
    return None


def sniff_kind(head: bytes) -> ImageKind | None:
    """JPEG or PNG from the first bytes of a file; None for anything else."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


def classify_head(obj: ObjectRef, head: bytes) -> SkipReason | None:
    """The reason a sniffed object is skipped, or None to go on."""
    if sniff_kind(head) is None:
        return "not_image"
    if obj.size < MIN_IMAGE_BYTES:
        return "too_small"
    return None
