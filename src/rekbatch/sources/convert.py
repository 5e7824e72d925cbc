"""Conversion of what Rekognition refuses into what it takes.

HEIC/HEIF, AVIF, WebP, TIFF, BMP and GIF (its first frame), and JPEG or PNG beyond
Rekognition's limits, are decoded, turned upright by their EXIF orientation, downscaled only
as far as needed (at most ``max_side`` pixels a side and 5 MB as bytes) and encoded as JPEG
(grey images as grey JPEGs, the others as RGB). Bounding boxes in Rekognition's answers are
ratios of the image's width and height, so they fit the original too.

Decoding is CPU work: ``Converter`` runs it on a thread pool sized to the cores (Pillow
releases the GIL while it decodes, resizes and encodes), and bounds memory three times: a
header declaring more than ``max_pixels`` is refused before any pixel is decoded (a
decompression bomb); each conversion is admitted by its plan (``decoding.py``: the bytes its
steps hold at once, known from the header) against one ``MemoryBudget`` for all of them
(``source.convert_memory_mb``), and an image whose plan alone exceeds it is not decoded; and
at most ``slots`` images are downloaded-and-decoded at once.

Pillow decodes everything but HEIC; pillow-heif adds HEIC/HEIF when installed (the extra
``rekbatch[heif]``).
"""

from __future__ import annotations

import asyncio
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rekbatch.sources.decoding import (
    MB,
    MemoryBudget,
    Plan,
    TooManyPixels,
    TooMuchMemory,
    decode_fitted,
    plan_header,
    return_freed_memory,
    worst_plan,
)
from rekbatch.sources.filters import DEFAULT_MAX_PIXELS, MAX_IMAGE_BYTES
from rekbatch.sources.sniff import ImageInfo

__all__ = [
    "DEFAULT_MEMORY_MB",
    "ConversionError",
    "Converted",
    "Converter",
    "TooManyPixels",
    "TooMuchMemory",
    "convert_image",
]

JPEG_QUALITY = 90
HEIF_HINT = "pip install 'rekbatch[heif]'"
DEFAULT_MEMORY_MB = 1024  # source.convert_memory_mb


class ConversionError(Exception):
    """An image could not be converted: a failed record with ``code`` and the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Converted:
    data: bytes
    converted_from: str  # the original format, as Pillow names it, lower case
    width: int  # of the original, as stored
    height: int
    sent_width: int
    sent_height: int
    orientation: int | None  # the EXIF orientation applied


_HEIF: bool | None = None  # pillow-heif registered with Pillow; found on first use


def heif_available() -> bool:
    global _HEIF
    if _HEIF is None:
        try:
            import pillow_heif
        except ImportError:
            _HEIF = False
        else:
            pillow_heif.register_heif_opener()
            _HEIF = True
    return _HEIF


def convert_image(
    data: bytes,
    max_side: int,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    memory_limit: int | None = None,
) -> Converted:
    """``data`` as a JPEG within ``max_side`` and ``max_bytes``; raises ``ConversionError``
    when it cannot be decoded, ``TooManyPixels`` for a decompression bomb and
    ``TooMuchMemory`` when decoding would hold more than ``memory_limit`` bytes."""
    from PIL import Image, UnidentifiedImageError

    heif = heif_available()
    try:
        frame, plan, orientation = decode_fitted(
            data, max_side, limit=memory_limit, max_pixels=max_pixels
        )
    except (TooManyPixels, TooMuchMemory):
        raise
    except UnidentifiedImageError:
        if not heif and data[4:8] == b"ftyp":
            raise ConversionError(
                "ConverterMissing", f"HEIC/HEIF needs pillow-heif: {HEIF_HINT}"
            ) from None
        raise ConversionError("ImageDecodeError", "not an image Pillow can decode") from None
    except Exception as exc:  # truncated, corrupt, unsupported mode: the decoder says why
        raise ConversionError("ImageDecodeError", f"{type(exc).__name__}: {exc}") from None
    try:
        return _encode_within(frame, plan, orientation, max_bytes, Image)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError("ImageDecodeError", f"{type(exc).__name__}: {exc}") from None


def _encode_within(
    frame: Any, plan: Plan, orientation: int | None, max_bytes: int, Image: Any
) -> Converted:
    out = _jpeg(frame)
    for _ in range(6):
        if len(out) <= max_bytes:
            break
        # Bytes grow with the pixel count: shrink by the square root of the excess, a margin.
        shrink = math.sqrt(max_bytes / len(out)) * 0.9
        size = (max(1, int(frame.width * shrink)), max(1, int(frame.height * shrink)))
        out = b""
        frame = frame.resize(size, Image.Resampling.BICUBIC)
        out = _jpeg(frame)
    else:
        if len(out) > max_bytes:
            raise ConversionError("ImageTooLarge", "could not encode within 5 MB")
    width, height = plan.stored
    return Converted(out, plan.format, width, height, frame.width, frame.height, orientation)


def _jpeg(img: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=False)
    return buffer.getvalue()


def conversion_plan(
    head: bytes, info: ImageInfo | None, max_side: int, limit: int | None = None
) -> Plan | None:
    """What converting the image that starts with ``head`` holds, from its header (Pillow's
    reading of it, else the worst case for the sniffed size); None when neither tells.
    ``limit``: a JPEG is planned at a coarser scale rather than above it."""
    heif_available()
    plan = plan_header(head, max_side, limit=limit)
    if plan is None and info is not None and info.width and info.height:
        plan = worst_plan(info.format, info.width, info.height, max_side)
    return plan


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Converter:
    """Runs ``convert_image`` off the event loop, a bounded number at a time and within the
    memory budget (``memory``, shared with whatever else decodes images in the run)."""

    def __init__(
        self,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int | None = None,
        memory: MemoryBudget | None = None,
    ):
        self.max_pixels = max_pixels
        self.workers = workers or default_workers()
        self.memory = memory or MemoryBudget(DEFAULT_MEMORY_MB * MB)
        # Downloaded-and-decoding images at once: enough to keep every core busy while the
        # next ones download, few enough that memory stays at a few images.
        self.slots = asyncio.Semaphore(self.workers * 2)
        self._pool: ThreadPoolExecutor | None = None
        self.converted = 0

    async def __aenter__(self) -> Converter:
        return_freed_memory()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rekbatch-convert")
        return self._pool

    async def plan(
        self, head: bytes, info: ImageInfo | None, max_side: int, limit: int | None = None
    ) -> Plan | None:
        """``conversion_plan`` on the converter's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor(), conversion_plan, head, info, max_side, limit
        )

    async def convert(
        self, data: bytes, max_side: int, memory_limit: int | None = None
    ) -> Converted:
        """``data`` converted; ``memory_limit``: the bytes its decoding may hold (what the
        caller holds of the budget for it, the encoded bytes excluded)."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._executor(),
            lambda: convert_image(
                data, max_side, max_pixels=self.max_pixels, memory_limit=memory_limit
            ),
        )
        self.converted += 1
        return result
