"""The report's thumbnails: each image read once (from S3, a local source folder or a path)
and drawn with its boxes, decoded as the run's conversions are (``sources/decoding.py``):
reduced while decoding where the format allows, within the job's ``source.max_pixels`` and
``source.convert_memory_mb``; an image beyond them gets the reason in place of a thumbnail."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath

from rekbatch.commands.report.model import Location, Thumb, Thumbs, View, Wanted
from rekbatch.config import Config, parse_s3_uri
from rekbatch.errors import EndpointNeverReached, EndpointUnreachable, SetupError
from rekbatch.sources.decoding import (
    MB,
    MemoryBudget,
    Plan,
    TooManyPixels,
    TooMuchMemory,
    megabytes,
    plan_header,
    return_freed_memory,
)

THUMB_PX = 320  # the longest side of a thumbnail
MAX_FETCH_CONCURRENCY = 16
_BOX_COLOUR = (255, 212, 0)
_BOX_SHADOW = (0, 0, 0)
_ERROR_CHARS = 300


def require_pillow() -> None:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        raise SetupError(
            "rekbatch report needs Pillow to draw thumbnails: pip install 'rekbatch[report]'"
        ) from None


def _local_roots(cfg: Config) -> list[Path]:
    roots = [Path(uri).expanduser() for uri in cfg.source.uris if parse_s3_uri(uri) is None]
    # A single-file source lists its file by name, under the file's folder.
    return [root.parent if root.is_file() else root for root in roots]


def _read_path(path: str) -> bytes:
    return Path(path).expanduser().read_bytes()


def _read_under_roots(roots: list[Path], key: str) -> bytes:
    rel = PurePosixPath(key)
    if not key or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"not a key inside a source folder: {key!r}")
    if not roots:
        raise FileNotFoundError("no local folder among source.uris")
    for root in roots:
        path = root.joinpath(*rel.parts)
        if path.is_file():
            return path.read_bytes()
    where = ", ".join(str(r) for r in roots)
    raise FileNotFoundError(f"not found under {where}")


def _describe(exc: BaseException) -> str:
    import botocore.exceptions as bexc

    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "ClientError")
        message = str(error.get("Message") or "")
        text = f"{code}: {message}" if message and message != code else code
    elif isinstance(exc, FileNotFoundError):
        text = f"file not found: {exc.filename}" if exc.filename else str(exc) or "not found"
    elif type(exc).__name__ == "UnidentifiedImageError":
        text = "not an image Pillow can read"
    elif isinstance(exc, TooMuchMemory):
        text = (
            f"too large to draw: {exc.plan.describe()} needs about {megabytes(exc.plan.peak)}"
            f" to decode, more than source.convert_memory_mb ({exc.limit // MB:,} MB)"
        )
    elif isinstance(exc, TooManyPixels):
        text = f"too large to draw: {exc}, more than source.max_pixels"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 1] + "…"


def _render(
    data: bytes, views: list[View], limit: int | None = None, max_pixels: int | None = None
) -> list[Thumb]:
    """One thumbnail per view (its boxes drawn), drawn on the orientation-corrected image (the frame
    Rekognition's bounding boxes refer to); decoding holds at most ``limit`` bytes."""
    from PIL import Image, ImageDraw

    from rekbatch.sources.convert import heif_available
    from rekbatch.sources.decoding import decode_fitted

    heif_available()
    image, _, _ = decode_fitted(
        data, THUMB_PX, limit=limit, max_pixels=max_pixels, resample=Image.Resampling.LANCZOS
    )
    image = image.convert("RGB")
    width, height = image.size
    thumbs: list[Thumb] = []
    for view in views:
        canvas = image.copy()
        for box in view:
            left, top, box_w, box_h = box
            x0 = min(max(round(left * width), 0), width - 1)
            y0 = min(max(round(top * height), 0), height - 1)
            x1 = min(max(round((left + box_w) * width), x0 + 1), width - 1)
            y1 = min(max(round((top + box_h) * height), y0 + 1), height - 1)
            draw = ImageDraw.Draw(canvas)
            # A dark rim under a bright line stays visible on light and dark faces alike.
            draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=_BOX_SHADOW, width=5)
            draw.rectangle((x0, y0, x1, y1), outline=_BOX_COLOUR, width=3)
        out = io.BytesIO()
        canvas.save(out, "JPEG", quality=85, optimize=True)
        thumbs.append(Thumb(out.getvalue(), width, height))
    return thumbs


def _plan(data: bytes) -> Plan | None:
    from rekbatch.sources.convert import heif_available

    heif_available()
    return plan_header(data, THUMB_PX)


class Fetcher:
    """Reads each image once (bounded concurrency) and renders all thumbnails asked of it."""

    def __init__(self, cfg: Config, read_s3: Callable[[str, str], Awaitable[bytes]] | None) -> None:
        self._roots = _local_roots(cfg)
        self._read_s3 = read_s3
        limit = max(1, min(cfg.limits.concurrency, MAX_FETCH_CONCURRENCY))
        self._sem = asyncio.Semaphore(limit)
        self._memory = MemoryBudget(cfg.source.convert_memory_mb * MB)
        return_freed_memory()
        self._max_pixels = cfg.source.max_pixels

    async def _read(self, where: Location) -> bytes:
        if where.kind == "s3":
            if self._read_s3 is None or where.bucket is None:
                raise RuntimeError("no S3 client")
            return await self._read_s3(where.bucket, where.key)
        if where.kind == "path":
            return await asyncio.to_thread(_read_path, where.key)
        return await asyncio.to_thread(_read_under_roots, self._roots, where.key)

    async def thumbs(self, where: Location, views: list[View]) -> list[Thumb]:
        async with self._sem:
            try:
                data = await self._read(where)
                return await self._draw(data, views)
            except (EndpointUnreachable, EndpointNeverReached):
                raise  # no page whose every image says so: the report stops
            except Exception as exc:  # shown on the page in place of the image
                message = _describe(exc)
                return [Thumb(error=message) for _ in views]

    async def _draw(self, data: bytes, views: list[View]) -> list[Thumb]:
        """The thumbnails, decoded within the job's memory budget: planned from the header,
        then drawn holding the plan's bytes (an image needing more than the whole budget
        is not decoded; its frame says so)."""
        plan = await asyncio.to_thread(_plan, data)
        memory = self._memory
        # Without a plan (a header Pillow cannot read) it decodes alone, if at all.
        need = memory.total if plan is None else plan.peak + len(data)
        if plan is not None and not memory.fits(need):
            raise TooMuchMemory(plan, memory.total)
        async with memory.hold(need):
            limit = max(0, need - len(data))
            return await asyncio.to_thread(_render, data, views, limit, self._max_pixels)

    async def all(self, wanted: dict[Location, Wanted]) -> Thumbs:
        items = list(wanted.items())
        tasks = [asyncio.ensure_future(self.thumbs(where, w.views)) for where, w in items]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        out: Thumbs = {}
        for (where, w), thumbs in zip(items, results, strict=True):
            for view, thumb in zip(w.views, thumbs, strict=True):
                out[(where, view)] = thumb
        return out
