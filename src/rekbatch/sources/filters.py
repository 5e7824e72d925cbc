"""What goes on to Rekognition and what is skipped, and why. Pure functions, no I/O.

Two steps: the listing entry alone rules out what the globs exclude and what is empty or
too large even to convert (``classify_listing``); then the sniffed header says, per
operation, whether the image goes as it is, is converted first, or is skipped with its
reason (``decide``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from rekbatch.records import ObjectRef, SkipReason
from rekbatch.sources.sniff import ImageInfo, sniff

# Rekognition's image limits: 15 MB for an image passed as an S3Object, 5 MB as bytes.
MAX_S3_OBJECT_BYTES = 15 * 1024 * 1024
MAX_IMAGE_BYTES = 5 * 1024 * 1024
# The largest object downloaded to be converted; a bigger one is skipped as too_large.
MAX_CONVERT_BYTES = 200 * 1024 * 1024
# The smallest valid JPEG or PNG is well above this; anything smaller cannot hold a picture.
MIN_IMAGE_BYTES = 67
SNIFF_BYTES = 16

# Rekognition's dimension limits, per operation: at least 80 px a side (64 for PPE), at
# most 10,000 px (4,096 for PPE).
MIN_SIDE = 80
MAX_SIDE = 10_000
_SIDES: dict[str, tuple[int, int]] = {"detect_protective_equipment": (64, 4096)}

# A header declaring more pixels than this is refused, not decoded (a decompression bomb);
# ``source.max_pixels`` changes it.
DEFAULT_MAX_PIXELS = 150_000_000

ImageKind = Literal["jpeg", "png"]


def side_limits(operation: str) -> tuple[int, int]:
    """The smallest and largest side in pixels Rekognition takes for ``operation``."""
    return _SIDES.get(operation, (MIN_SIDE, MAX_SIDE))


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
    reported as ``not_image`` rather than ``too_small``; see ``decide``."""
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


def listing_reason(
    obj: ObjectRef, include: list[str], exclude: list[str], max_bytes: int, *, sniff: bool = False
) -> SkipReason | None:
    """Why ``obj`` is skipped from its listing: the reason its source gave (a malformed line,
    a symbolic link), else ``classify_listing``'s; a link the globs exclude is ``excluded``,
    as its name would be."""
    reason = classify_listing(obj, include, exclude, max_bytes, sniff=sniff)
    if obj.skip is None or (obj.skip == "symlink" and reason == "excluded"):
        return reason
    return obj.skip


def sniff_kind(head: bytes) -> ImageKind | None:
    """JPEG or PNG from the first bytes of a file; None for anything else."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


def classify_head(obj: ObjectRef, head: bytes) -> SkipReason | None:
    """The reason a sniffed object is skipped without conversion, or None to go on."""
    info = sniff(head)
    if info is None or not info.native:
        return "not_image"
    if obj.size < MIN_IMAGE_BYTES:
        return "too_small"
    return None


@dataclass(frozen=True, slots=True)
class Convert:
    """Decode, orient, downscale to at most ``max_side`` pixels and 5 MB, send as JPEG."""

    max_side: int


AS_IS: Literal["as_is"] = "as_is"
Decision = SkipReason | Convert | Literal["as_is"]


def decide(
    obj: ObjectRef,
    info: ImageInfo | None,
    operation: str,
    *,
    max_bytes: int,
    convert: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decision:
    """What happens to a sniffed object for ``operation``: a skip reason, ``AS_IS`` (sent
    unchanged), or ``Convert``. ``max_bytes`` is what Rekognition takes unchanged (15 MB
    by S3 reference, 5 MB as bytes); unknown dimensions are left to the decoder."""
    if info is None:
        return "not_image"
    if obj.size < MIN_IMAGE_BYTES:
        return "too_small"
    min_side, max_side = side_limits(operation)
    width, height = info.width, info.height
    if width is not None and height is not None:
        if width == 0 or height == 0:
            return "not_image"  # a header declaring no pixels holds no picture
        if min(width, height) < min_side:
            return "too_small"
        if width * height > max_pixels:
            return "too_large"
    too_wide = width is not None and height is not None and max(width, height) > max_side
    if info.native and obj.size <= max_bytes and not too_wide:
        return AS_IS
    if not convert:
        return "too_large" if info.native else "not_image"
    if obj.size > MAX_CONVERT_BYTES:
        return "too_large"
    return Convert(max_side)
