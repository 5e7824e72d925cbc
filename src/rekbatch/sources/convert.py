"""Conversion of what Rekognition refuses into what it takes.

HEIC/HEIF, AVIF, WebP, TIFF, BMP and GIF (its first frame), and JPEG or PNG beyond
Rekognition's limits, are decoded, turned upright by their EXIF orientation, downscaled only
as far as needed (at most ``max_side`` pixels a side and 5 MB as bytes) and encoded as JPEG.
Bounding boxes in Rekognition's answers are ratios of the image's width and height, so they
fit the original too.

Decoding is CPU work: ``Converter`` runs it on a thread pool sized to the cores (Pillow
releases the GIL while it decodes, resizes and encodes), and bounds memory twice: a header
declaring more than ``max_pixels`` is refused before any pixel is decoded (a decompression
bomb), and at most ``slots`` images are downloaded-and-decoded at once.

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

from rekbatch.sources.filters import DEFAULT_MAX_PIXELS, MAX_IMAGE_BYTES

JPEG_QUALITY = 90
HEIF_HINT = "pip install 'rekbatch[heif]'"


class ConversionError(Exception):
    """An image could not be converted: a failed record with ``code`` and the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TooManyPixels(Exception):
    """The decoder's header declares more pixels than allowed: skipped as too_large."""

    def __init__(self, width: int, height: int) -> None:
        super().__init__(f"{width}x{height} px")
        self.width = width
        self.height = height


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
) -> Converted:
    """``data`` as a JPEG within ``max_side`` and ``max_bytes``; raises ``ConversionError``
    when it cannot be decoded and ``TooManyPixels`` for a decompression bomb."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    # Our own limit (``max_pixels``) is checked after the header is read and before any
    # pixel is decoded; Pillow's fixed 89 MP warning would only duplicate it.
    Image.MAX_IMAGE_PIXELS = None
    heif = heif_available()
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if not heif and data[4:8] == b"ftyp":
            raise ConversionError(
                "ConverterMissing", f"HEIC/HEIF needs pillow-heif: {HEIF_HINT}"
            ) from None
        raise ConversionError("ImageDecodeError", "not an image Pillow can decode") from None
    except Exception as exc:
        raise ConversionError("ImageDecodeError", f"{type(exc).__name__}: {exc}") from None
    try:
        return _convert(img, Image, ImageOps, max_side, max_bytes, max_pixels)
    except (TooManyPixels, ConversionError):
        raise
    except Exception as exc:  # truncated, corrupt, unsupported mode: the decoder says why
        raise ConversionError("ImageDecodeError", f"{type(exc).__name__}: {exc}") from None
    finally:
        img.close()


def _convert(
    img: Any, Image: Any, ImageOps: Any, max_side: int, max_bytes: int, max_pixels: int
) -> Converted:
    width, height = img.size
    if width * height > max_pixels:
        raise TooManyPixels(width, height)
    fmt = str(img.format or "unknown").lower()
    orientation = img.getexif().get(0x0112)
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else None
    scale = min(1.0, max_side / max(width, height))
    if fmt == "jpeg" and scale < 1.0:
        # Decode at 1/2, 1/4 or 1/8 straight from the DCT: a fraction of the time and memory.
        img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    img.seek(0)  # an animation's first frame
    img.load()
    upright = ImageOps.exif_transpose(img)
    frame = _rgb(upright, Image)
    # Bicubic: for detection as good as Lanczos at about 2/3 of its time on a 36 MP panorama.
    frame.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)
    out = _jpeg(frame)
    for _ in range(6):
        if len(out) <= max_bytes:
            break
        # Bytes grow with the pixel count: shrink by the square root of the excess, a margin.
        shrink = math.sqrt(max_bytes / len(out)) * 0.9
        size = (max(1, int(frame.width * shrink)), max(1, int(frame.height * shrink)))
        frame = frame.resize(size, Image.Resampling.BICUBIC)
        out = _jpeg(frame)
    else:
        if len(out) > max_bytes:
            raise ConversionError("ImageTooLarge", "could not encode within 5 MB")
    return Converted(out, fmt, width, height, frame.width, frame.height, orientation)


def _rgb(img: Any, Image: Any) -> Any:
    """RGB for JPEG; transparency over white, as a viewer shows it."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        back = Image.new("RGB", rgba.size, (255, 255, 255))
        back.paste(rgba, mask=rgba.getchannel("A"))
        return back
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")  # 16-bit scans: keep the top byte
    return img.convert("RGB")


def _jpeg(img: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=False)
    return buffer.getvalue()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Converter:
    """Runs ``convert_image`` off the event loop, a bounded number at a time."""

    def __init__(self, *, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None):
        self.max_pixels = max_pixels
        self.workers = workers or default_workers()
        # Downloaded-and-decoding images at once: enough to keep every core busy while the
        # next ones download, few enough that memory stays at a few images.
        self.slots = asyncio.Semaphore(self.workers * 2)
        self._pool: ThreadPoolExecutor | None = None
        self.converted = 0

    async def __aenter__(self) -> Converter:
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

    async def convert(self, data: bytes, max_side: int) -> Converted:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rekbatch-convert")
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._pool,
            lambda: convert_image(data, max_side, max_pixels=self.max_pixels),
        )
        self.converted += 1
        return result
