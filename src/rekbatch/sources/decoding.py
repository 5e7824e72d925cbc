"""Decoded-image memory: what decoding an image holds, one budget for all decodes at once,
and decoding at a reduced size.

A file's size says nothing about its pixels: an 11 KB 1-bit TIFF holds 144 MP, a 150 KB PNG
as many. Before an image is decoded, its header gives a ``Plan``: the mode Pillow decodes it
in, the reduction the format allows while decoding (JPEG's DCT scaling, down to 1/8), the
size it is resized to, and ``peak``, the bytes the steps of ``decode_fitted`` hold at once:

- the decoded image, at Pillow's bytes per pixel (``pixel_bytes``: a 3-band image takes 4,
  mode "1" a whole byte), plus what the decoder itself holds (a progressive JPEG's
  coefficients at full size; a TIFF strip; libwebp's, libheif's and libavif's own copy);
- the way to the size sent, strip by strip: each strip of rows normalised to L or RGB (a
  palette expanded, "1" and 16-bit greys as L, transparency laid over white), reduced by an
  integer factor and resized across into a frame of the target's width, which is then
  resized down; so neither a normalised copy of the whole image nor Pillow's own
  intermediate of a 2-D resize sits beside the decoded one;
- turning it upright, encoding it, and (over 5 MB) a smaller frame beside it.

``MemoryBudget`` admits decodes by that figure (plus the encoded bytes they read) against
``source.convert_memory_mb``, first come first served, so all conversions at once (and the
offline backend's decodes) stay within it; an image whose plan alone does not fit is not
decoded at all. ``tests/test_bombs.py`` holds plans against the peak resident size of
converting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from rekbatch.malloc import M_MMAP_THRESHOLD, mallopt

MB = 1024 * 1024

# Bytes per pixel as Pillow stores a mode: every mode of 3 or 4 bands (and LA, I, F) takes
# 4, the 1-byte modes 1 ("1" is not packed in memory), 16-bit greys 2.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}

# Decoders that decode into a buffer of their own before Pillow copies it: bytes per pixel
# of that buffer (up to 16 bits a sample with alpha).
_OWN_BUFFER = {"webp": 4, "heif": 8, "avif": 8}

# Encoded JPEG bytes per pixel and band at quality 90, with room: noise takes about 0.3.
_JPEG_BYTES_PER_SAMPLE = 0.5

# Modes kept through resizing; all others are converted first.
_KEPT = frozenset({"L", "RGB"})
_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # EXIF orientation -> Image.Transpose
# Pixels of a strip normalised and reduced at a time on the way to the target size.
_STRIP_PIXELS = 4_000_000


def pixel_bytes(mode: str) -> int:
    return _PIXEL_BYTES.get(mode, 4)


def megabytes(nbytes: int) -> str:
    return f"{math.ceil(nbytes / MB):,} MB"


class TooMuchMemory(Exception):
    """Decoding ``plan`` would hold more than ``limit`` bytes."""

    def __init__(self, plan: Plan, limit: int) -> None:
        super().__init__(f"{plan.describe()}: needs about {megabytes(plan.peak)}")
        self.plan = plan
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Plan:
    """How an image is decoded and what that holds at most (``peak`` bytes)."""

    format: str  # as Pillow names it, lower case
    mode: str  # as decoded
    stored: tuple[int, int]  # the file's width and height
    scale: int  # JPEG's DCT reduction: 1, 2, 4 or 8
    decoded: tuple[int, int]
    target: tuple[int, int]  # after resizing, before the EXIF orientation is applied
    peak: int

    def describe(self) -> str:
        width, height = self.stored
        return f"{width}x{height} {self.format.upper()} ({self.mode})"


def fit_within(width: int, height: int, side: int) -> tuple[int, int]:
    """``width`` x ``height`` scaled down (never up) to at most ``side`` a side, rounded as
    Pillow's ``thumbnail`` rounds."""
    if width <= side and height <= side:
        return width, height
    aspect = width / height
    if aspect <= 1:
        w = max(
            min(
                math.floor(side * aspect),
                math.ceil(side * aspect),
                key=lambda n: abs(aspect - n / side),
            ),
            1,
        )
        return w, side
    h = max(
        min(
            math.floor(side / aspect),
            math.ceil(side / aspect),
            key=lambda n: 0 if n == 0 else abs(aspect - side / n),
        ),
        1,
    )
    return side, h


def _reduce_factors(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The integer reduction before the final resize, as Pillow's ``reducing_gap=2.0``
    chooses it: the last step shrinks by at least 2 (unless nothing needs reducing)."""
    return (int(size[0] / target[0] / 2.0) or 1, int(size[1] / target[1] / 2.0) or 1)


def _orientation(img: Any) -> int | None:
    """The EXIF orientation (1-8) from the header alone; None without one. A PNG's EXIF may
    follow its pixels and Pillow would decode them to find it: it is read again once
    decoded, and planned for as if present (``_may_turn``)."""
    if str(img.format).upper() == "PNG" and "exif" not in img.info:
        return None
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # unreadable EXIF: as stored
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def _may_turn(img: Any, orientation: int | None) -> bool:
    return orientation in _TRANSPOSE or (
        str(img.format).upper() == "PNG" and "exif" not in img.info
    )


def decoder_bytes(img: Any, fmt: str, full: int) -> int:
    """What the decoder holds beside the image while it decodes (``full``: stored pixels)."""
    if fmt in ("jpeg", "mpo"):
        if not img.info.get("progressive"):
            return 0
        # A progressive JPEG keeps every DCT coefficient (2 bytes) of every component at
        # full size, whatever the DCT scaling.
        layers = getattr(img, "layer", None) or []
        try:
            hmax = max(h for _, h, _, _ in layers)
            vmax = max(v for _, _, v, _ in layers)
            samples = sum(h * v for _, h, v, _ in layers) / (hmax * vmax)
        except (TypeError, ValueError):
            samples = 3.0
        return int(full * samples * 2)
    if fmt == "tiff":
        tags = getattr(img, "tag_v2", {})
        width = img.size[0]
        tile = (int(tags.get(322) or 0), int(tags.get(323) or 0))
        rows = int(tags.get(278) or img.size[1])
        area = tile[0] * tile[1] if tile[0] and tile[1] else width * min(rows, img.size[1])
        # YCbCr in JPEG is read through libtiff's RGBA interface: 4 bytes a pixel of a strip.
        if tags.get(259) in (6, 7) and tags.get(262) == 6:
            return int(area * 4)
        bits = tags.get(258) or (8,)
        total_bits = sum(bits) if isinstance(bits, tuple) else int(bits)
        return math.ceil(area * max(total_bits, 1) / 8)
    own = _OWN_BUFFER.get(fmt)
    return full * own if own else 0


def _solid_mode(mode: str, keyed: bool) -> str:
    """The mode ``_normalised`` makes of ``mode`` (``keyed``: with a transparent colour)."""
    if mode == "1" or mode.startswith("I") or mode == "F":
        return "L"
    if keyed:
        return "RGB"
    return "L" if mode in ("L", "LA") else "RGB"


def _normalising_bytes(mode: str, keyed: bool) -> int:
    """Bytes a pixel that ``_normalised`` makes beside the decoded image."""
    if mode in _KEPT and not keyed:
        return 0
    if mode == "1":
        return 1  # its L copy
    if mode.startswith("I") or mode == "F":
        return pixel_bytes(mode) + 1  # scaled in its own mode, then L
    if mode in ("P", "PA") or keyed:
        return 8 if mode == "PA" or keyed else 4  # RGBA laid on a white RGB page, or RGB
    if mode == "LA":
        return 2  # an L copy, laid on a white L page
    return 4  # RGBA laid on a white RGB page; CMYK, YCbCr... as RGB


def _peak(
    img: Any, fmt: str, decoded: tuple[int, int], target: tuple[int, int], turns: bool
) -> int:
    """The most ``decode_fitted`` holds at once for ``img`` decoded at ``decoded``."""
    mode = img.mode
    keyed = "transparency" in img.info
    width, height = decoded
    pixels = width * height
    source = pixels * pixel_bytes(mode)
    peak = source + decoder_bytes(img, fmt, img.size[0] * img.size[1])
    px = pixel_bytes(_solid_mode(mode, keyed))
    normalising = _normalising_bytes(mode, keyed)
    if decoded == target:
        held = pixels * px if normalising else source
        peak = max(peak, source + pixels * normalising)
    else:
        # Strips of rows normalised, reduced and resized across into a frame of the
        # target's width, then that frame resized down.
        fy = _reduce_factors(decoded, target)[1]
        across = target[0] * math.ceil(height / fy) * px
        strip = min(pixels, _strip_rows(width, fy) * width)
        per_pixel = pixel_bytes(mode) + normalising + 2 * px
        peak = max(peak, source + across + strip * per_pixel)
        held = across
        if target[1] != math.ceil(height / fy) or height % fy:
            final = target[0] * target[1] * px
            peak = max(peak, held + final)
            held = final
    if turns:
        peak = max(peak, 2 * held)
    # Encoding beside the frame; over 5 MB, a smaller frame beside it (0.9 of each side,
    # across first).
    encoded = int(target[0] * target[1] * (1 if px == 1 else 3) * _JPEG_BYTES_PER_SAMPLE)
    return max(peak, held + max(encoded, int(0.9 * held)))


def _slack(nbytes: int) -> int:
    """Room for what the model leaves out: Python's objects, the allocator's rounding."""
    return nbytes + nbytes // 50 + 4 * MB


def _strip_rows(width: int, fy: int) -> int:
    """Rows of a strip: about ``_STRIP_PIXELS``, a multiple of the reduction's height."""
    rows = _STRIP_PIXELS // max(width, 1)
    return max(fy, rows // fy * fy)


def make_plan(img: Any, side: int, *, limit: int | None = None) -> Plan:
    """How to decode the opened (not yet loaded) ``img`` to at most ``side`` px a side: as
    large as ``side`` asks, or for a JPEG at a coarser DCT scale when that would hold more
    than ``limit`` bytes. The plan returned may still exceed ``limit``: the caller refuses it."""
    fmt = str(img.format or "unknown").lower()
    width, height = img.size
    turns = _may_turn(img, _orientation(img))
    wanted = fit_within(width, height, side)
    scales = [1]
    if fmt in ("jpeg", "mpo") and len(getattr(img, "tile", ())) == 1:
        # The coarsest DCT scale that still holds the size wanted, as Pillow's draft picks.
        fits = min(width // wanted[0], height // wanted[1])
        first = next(s for s in (8, 4, 2, 1) if fits >= s)
        scales = [s for s in (1, 2, 4, 8) if s >= first]
    plan: Plan | None = None
    for scale in scales:
        decoded = (math.ceil(width / scale), math.ceil(height / scale))
        target = fit_within(*decoded, side)
        plan = Plan(
            fmt,
            img.mode,
            (width, height),
            scale,
            decoded,
            target,
            _slack(_peak(img, fmt, decoded, target, turns)),
        )
        if limit is None or plan.peak <= limit:
            break
    assert plan is not None
    return plan


def open_image(data: bytes) -> Any:
    """``data`` opened by Pillow: the header read, no pixel decoded. Pillow's own
    decompression-bomb limit is off: the plans above replace it."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    return Image.open(io.BytesIO(data))


def plan_header(head: bytes, side: int, *, limit: int | None = None) -> Plan | None:
    """The plan of the image whose first bytes are ``head``; None when Pillow cannot read
    its header from them (a TIFF whose directory comes after the pixels, say)."""
    try:
        with open_image(head) as img:
            return make_plan(img, side, limit=limit)
    except Exception:  # a header Pillow cannot read from these bytes
        return None


def worst_plan(fmt: str, width: int, height: int, side: int) -> Plan:
    """A plan for an image whose header Pillow could not read: 4 bytes a pixel, twice (the
    decoder's own buffer, a conversion), and the resize."""
    pixels = width * height
    target = fit_within(width, height, side)
    final = target[0] * target[1] * 4
    own = max(_OWN_BUFFER.get(fmt, 4), 4)
    peak = max(pixels * (4 + own), pixels * 8 + final)
    return Plan(fmt, "RGBA", (width, height), 1, (width, height), target, peak)


def decode_fitted(
    data: bytes,
    side: int,
    *,
    limit: int | None = None,
    max_pixels: int | None = None,
    resample: Any = None,
) -> tuple[Any, Plan, int | None]:
    """``data`` decoded, upright, at most ``side`` px a side, in L or RGB (transparency over
    white), holding at most the plan's ``peak`` bytes on the way; returns the image, the plan
    and the EXIF orientation applied. Raises ``TooManyPixels`` above ``max_pixels``,
    ``TooMuchMemory`` when the plan exceeds ``limit``, and what Pillow raises on a broken
    file."""
    from PIL import Image

    resample = Image.Resampling.BICUBIC if resample is None else resample
    img = open_image(data)
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise TooManyPixels(width, height)
    plan = make_plan(img, side, limit=limit)
    if limit is not None and plan.peak > limit:
        img.close()
        raise TooMuchMemory(plan, limit)
    orientation = _orientation(img)
    if plan.scale > 1:
        img.draft(None, (width // plan.scale, height // plan.scale))
    img.load()
    if orientation is None:
        orientation = _orientation(img)  # a PNG's EXIF after its pixels, read by now
    target = plan.target if img.size == plan.decoded else fit_within(img.size[0], img.size[1], side)
    # Each step rebinds ``img``: the image before it is freed as soon as the step is done.
    if img.size == target:
        img = _normalised(img, Image)
    else:
        height = img.size[1]
        fy = _reduce_factors(img.size, target)[1]
        img = _across(img, target, resample, Image)
        if img.height != target[1] or height % fy:
            img = img.resize(target, resample, box=(0.0, 0.0, img.width, height / fy))
    if orientation in _TRANSPOSE:
        img = img.transpose(Image.Transpose(_TRANSPOSE[orientation]))
    return img, plan, orientation


def _across(img: Any, target: tuple[int, int], resample: Any, Image: Any) -> Any:
    """``img`` at the target's width and its height reduced by the integer factor, built
    strip by strip (normalised, reduced, resized across), so that neither a normalised copy
    of the whole image nor Pillow's own intermediate of a 2-D resize is held beside it."""
    width, height = img.size
    fx, fy = _reduce_factors(img.size, target)
    keyed = "transparency" in img.info
    frame = Image.new(_solid_mode(img.mode, keyed), (target[0], math.ceil(height / fy)))
    rows = _strip_rows(width, fy)
    for top in range(0, height, rows):
        strip = _normalised(img.crop((0, top, width, min(height, top + rows))), Image)
        if fx > 1 or fy > 1:
            strip = strip.reduce((fx, fy))
        box = (0.0, 0.0, width / fx, float(strip.height))
        strip = strip.resize((target[0], strip.height), resample, box=box)
        frame.paste(strip, (0, top // fy))
    return frame


def _normalised(img: Any, Image: Any) -> Any:
    """L or RGB: a palette expanded, "1" and 16/32-bit greys as L, transparency over white
    (as a viewer shows it), other modes (CMYK, YCbCr...) as RGB."""
    mode = img.mode
    if mode in _KEPT and "transparency" not in img.info:
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        # 16-bit scans: keep the top byte.
        return img.point(lambda v: v / 256).convert("L")
    if mode in ("P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
    if img.mode == "LA":
        back = Image.new("L", img.size, 255)
        back.paste(img, mask=img)
        return back
    if img.mode == "RGBA":
        back = Image.new("RGB", img.size, (255, 255, 255))
        back.paste(img, mask=img)
        return back
    return img.convert("RGB")


# How large a block glibc maps afresh, and unmaps when it is freed.
_IMAGE_BLOCKS_MAPPED = 4 * MB
_MAPPED = False


def return_freed_memory() -> bool:
    """Have glibc hand freed image buffers back to the system in this process.

    Pillow allocates an image in blocks of up to 16 MB. glibc serves the first from fresh
    mappings, then raises its mmap threshold above that size, and from then on keeps every
    freed block in the heap of the thread that freed it: over a run of conversions on
    several threads that kept memory adds up to far more than the budget holds at once (a
    quarter more over the folder of ``benchmarks/bench_bombs.py``). A fixed threshold of
    4 MB keeps every block mapped, so the process holds what its images hold; it costs a
    page fault per 4 KB touched, small beside decoding. Elsewhere than glibc nothing
    changes. Returns whether it applied."""
    global _MAPPED
    if not _MAPPED:
        _MAPPED = mallopt((M_MMAP_THRESHOLD, _IMAGE_BLOCKS_MAPPED))
    return _MAPPED


class TooManyPixels(Exception):
    """The header declares more pixels than allowed: skipped as too_large."""

    def __init__(self, width: int, height: int) -> None:
        super().__init__(f"{width}x{height} px")
        self.width = width
        self.height = height


class MemoryBudget:
    """Bytes that decodes may hold at once, shared by every task of a run and handed out
    first come, first served (a large request waits at the head of the line rather than be
    overtaken forever). Ask only for what ``fits``: a request above ``total`` would wait for
    ever."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a memory budget needs at least one byte")
        self.total = total
        self.free = total
        self.peak_held = 0  # the most held at once so far (tests and stats)
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.total

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        if not self.fits(nbytes):
            raise ValueError(f"{nbytes} bytes is more than the whole budget ({self.total})")
        nbytes = max(0, nbytes)
        await self._acquire(nbytes)
        try:
            yield
        finally:
            self._release(nbytes)

    async def _acquire(self, nbytes: int) -> None:
        if not self._waiting and self.free >= nbytes:
            self._take(nbytes)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, waiter)
        self._waiting.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(nbytes)  # granted just as it was cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self._wake()  # the head of the line may have changed
            raise

    def _take(self, nbytes: int) -> None:
        self.free -= nbytes
        self.peak_held = max(self.peak_held, self.total - self.free)

    def _release(self, nbytes: int) -> None:
        self.free += nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            nbytes, waiter = self._waiting.popleft()
            if waiter.done():
                continue
            self._take(nbytes)
            waiter.set_result(None)
