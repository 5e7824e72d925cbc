"""Small files that decode into a lot of memory, for tests and the bombs benchmark.

Each is built here (nothing is downloaded): a 1-bit TIFF of 12000 x 12000 in a few KB, two
144 MP PNGs of about 150 KB (grey and palette), a GIF of thousands of frames on a large
screen, a large noisy JPEG, a truncated JPEG declaring 81 MP, and a PNG declaring
100k x 100k. ``scale`` below 1 shrinks the sides of the costly ones for quick tests.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

# ``python -c CONVERT_PEAK FILE SIDE``: one conversion of FILE (to at most SIDE pixels a side)
# in a fresh process; prints the growth of its peak resident size (VmHWM, reset just before)
# in KiB, then exits 1 naming the exception if the conversion raised.
CONVERT_PEAK = """
import gc, io, sys
from pathlib import Path
from PIL import Image
from rekbatch.sources.convert import convert_image

def resident(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))

data = Path(sys.argv[1]).read_bytes()
tiny = io.BytesIO()
Image.new("RGB", (90, 90)).save(tiny, "PNG")
convert_image(tiny.getvalue(), 100)  # Pillow's plugins and pillow-heif loaded first
gc.collect()
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak resident size starts again from here
before = resident("VmRSS:")
failed = None
try:
    convert_image(data, int(sys.argv[2]))
except Exception as exc:
    failed = type(exc).__name__
print(resident("VmHWM:") - before)
if failed:
    sys.exit(f"convert_image raised {failed}")
"""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB, holding a few rows."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (3 * min(width, 100_000) + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", rows)
        + _chunk(b"IEND", b"")
    )


def _encode(img: Any, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _page(width: int, height: int, mode: str) -> Any:
    """A mostly blank page with a few dark blocks: compresses to almost nothing."""
    from PIL import Image, ImageDraw

    img = Image.new(mode, (width, height), 255 if mode in ("1", "L") else 7)
    draw = ImageDraw.Draw(img)
    sx, sy = max(1, width // 12), max(1, height // 12)
    for k in range(1, 11):
        fill = 0 if mode in ("1", "L") else k % 4
        draw.rectangle((k * sx, k * sy, k * sx + sx // 3, k * sy + sy // 2), fill=fill)
    return img


def tiff_1bit(side: int = 12_000) -> bytes:
    """A bilevel page, CCITT group 4: a few KB for 144 MP at 12000 x 12000."""
    return _encode(_page(side, side, "1"), "TIFF", compression="group4")


def png_grey(side: int = 12_000) -> bytes:
    return _encode(_page(side, side, "L"), "PNG", optimize=True)


def png_palette(side: int = 12_000) -> bytes:
    img = _page(side, side, "P")
    img.putpalette([v for k in range(256) for v in (k, 255 - k, (k * 7) % 256)])
    return _encode(img, "PNG", optimize=True)


def gif_frames(frames: int = 5_000, screen: int = 8_000) -> bytes:
    """``frames`` frames of 8 x 8 on a ``screen`` x ``screen`` canvas, each at another
    place, written by hand (Pillow merges identical frames): about 70 bytes a frame."""
    palette = bytes(v for k in range(4) for v in (k * 80, 255 - k * 60, 40))
    head = b"GIF89a" + struct.pack("<HHBBB", screen, screen, 0xF1, 0, 0) + palette
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    # LZW with a minimum code size of 2: clear (4), 256 pixels of index (k % 4), end (5).
    # Codes start 3 bits wide; growing the table needs care, so each pixel is a literal
    # after a clear code, which keeps every code 3 bits wide.
    body = bytearray()
    for k in range(frames):
        x = (k * 37) % max(1, screen - 8)
        y = (k * 101) % max(1, screen - 8)
        control = b"\x21\xf9\x04\x00\x02\x00\x00\x00"
        descriptor = b"\x2c" + struct.pack("<HHHHB", x, y, 8, 8, 0)
        body += control + descriptor + b"\x02" + _lzw_literals(k % 4, 64) + b"\x00"
    return head + loop + bytes(body) + b"\x3b"


def _lzw_literals(index: int, count: int) -> bytes:
    """GIF sub-blocks coding ``count`` pixels of ``index`` at code size 2 (3-bit codes):
    a clear code before every pixel keeps the code table, and so the code width, fixed."""
    bits = 0
    nbits = 0
    out = bytearray()
    codes = []
    for _ in range(count):
        codes += [4, index]
    codes.append(5)
    for code in codes:
        bits |= code << nbits
        nbits += 3
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8
    if nbits:
        out.append(bits & 0xFF)
    blocks = bytearray()
    for start in range(0, len(out), 255):
        part = out[start : start + 255]
        blocks += bytes([len(part)]) + part
    return bytes(blocks)


def noisy_jpeg(width: int, height: int, quality: int = 95) -> bytes:
    """Noise: about 1.2 bytes a pixel at quality 95, worse than any camera's."""
    from PIL import Image

    noise = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    return _encode(noise, "JPEG", quality=quality)


def truncated_jpeg(width: int = 9_000, height: int | None = None) -> bytes:
    """The first half of a JPEG (of a page, in RGB) declaring ``width`` x ``height``."""
    page = _page(width, height or width, "L").convert("RGB")
    whole = _encode(page, "JPEG", quality=80)
    return whole[: len(whole) // 2]


def bomb_files(scale: float = 1.0, *, jpeg_mb: float = 60.0) -> dict[str, bytes]:
    """The bomb folder: name -> bytes. ``scale`` multiplies the sides of the large ones;
    ``jpeg_mb`` is about the size of the noisy JPEG (0: none)."""

    def side(n: int) -> int:
        return max(200, int(n * scale))

    files = {
        "bombs/page-1bit.tif": tiff_1bit(side(12_000)),
        "bombs/grey-144mp.png": png_grey(side(12_000)),
        "bombs/palette-144mp.png": png_palette(side(12_000)),
        "bombs/frames.gif": gif_frames(5_000, side(8_000)),
        "bombs/truncated.jpg": truncated_jpeg(side(9_000)),
        "bombs/declares-100k.png": png_declaring(100_000, 100_000),
    }
    if jpeg_mb > 0:
        # About 1.2 bytes a pixel, at 4:3.
        pixels = jpeg_mb * 1e6 / 1.18
        width = int((pixels * 4 / 3) ** 0.5)
        files["bombs/huge.jpg"] = noisy_jpeg(width, int(width * 3 / 4))
    return files


def write_bombs(folder: Path, scale: float = 1.0, *, jpeg_mb: float = 60.0) -> dict[str, int]:
    """The bomb folder written under ``folder``; name -> size in bytes."""
    sizes: dict[str, int] = {}
    for name, data in bomb_files(scale, jpeg_mb=jpeg_mb).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        sizes[name] = len(data)
    return sizes
