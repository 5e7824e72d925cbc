"""What an object is, from its first bytes: the format, the dimensions, the EXIF orientation.

Names lie, so the format comes from the magic bytes; the dimensions come from the header
(JPEG's SOF segment, PNG's IHDR, GIF's screen descriptor, BMP's DIB header, WebP's VP8/VP8L/
VP8X chunk, TIFF's first IFD, HEIF/AVIF's ``ispe`` property), all within the first
``HEAD_BYTES`` of the file (``MAX_HEAD_BYTES`` for the few whose header is longer), so an
image is judged from one small ranged read and not a download. Pure functions of bytes, no
I/O and no decoder.

A header that is cut off or malformed before the dimensions gives ``width = height = None``:
the format is known, the size is decided later (by the decoder, or by Rekognition).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# The first read: a phone's EXIF (with its thumbnail) puts JPEG's SOF about 16 KiB in.
HEAD_BYTES = 32 * 1024
# A second read, only when the first held the format but not the size (large APP
# segments: maker notes, ICC profiles; a HEIF's metadata for many tiles).
MAX_HEAD_BYTES = 256 * 1024

# Formats Rekognition takes as they are; the others are converted.
NATIVE_FORMATS = frozenset({"jpeg", "png"})

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """A sniffed image: its format and, when the header holds them, its stored dimensions
    and EXIF orientation (1-8; None when the file has none)."""

    format: str  # jpeg, png, gif, bmp, webp, tiff, heic, avif
    width: int | None = None
    height: int | None = None
    orientation: int | None = None

    @property
    def native(self) -> bool:
        return self.format in NATIVE_FORMATS

    @property
    def pixels(self) -> int | None:
        if self.width is None or self.height is None:
            return None
        return self.width * self.height


def needs_more(info: ImageInfo | None, head: bytes, size: int) -> bool:
    """Whether a longer head may hold the dimensions ``head`` did not."""
    return info is not None and info.width is None and len(head) < min(size, MAX_HEAD_BYTES)


def sniff(head: bytes) -> ImageInfo | None:
    """The image ``head`` starts, or None when it is no image format rekbatch knows."""
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(head)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(head) >= 24 and head[12:16] == b"IHDR":
            width, height = struct.unpack_from(">II", head, 16)
            return ImageInfo("png", width, height)
        return ImageInfo("png")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        if len(head) >= 10:
            width, height = struct.unpack_from("<HH", head, 6)
            return ImageInfo("gif", width, height)
        return ImageInfo("gif")
    if head.startswith(b"BM") and len(head) >= 18:
        return _bmp(head)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(head)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        width, height, orientation = _tiff(head, 0)
        return ImageInfo("tiff", width, height, orientation)
    if head[4:8] == b"ftyp":
        return _isobmff(head)
    return None


def _jpeg(head: bytes) -> ImageInfo:
    orientation: int | None = None
    i = 2
    n = len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            break  # not a marker where one must be: malformed
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no SOF before it
            break
        (length,) = struct.unpack_from(">H", head, i + 2)
        if length < 2:
            break
        if marker in _SOF:
            if i + 9 > n:
                break
            height, width = struct.unpack_from(">HH", head, i + 5)
            return ImageInfo("jpeg", width, height, orientation)
        if marker == 0xE1 and head[i + 4 : i + 10] == b"Exif\x00\x00" and orientation is None:
            segment = head[i + 10 : i + 2 + length]
            orientation = _tiff(segment, 0)[2]
        i += 2 + length
    return ImageInfo("jpeg", None, None, orientation)


def _tiff(data: bytes, base: int) -> tuple[int | None, int | None, int | None]:
    """Width, height and orientation from a TIFF header's first IFD (also EXIF's)."""
    if len(data) < base + 8:
        return None, None, None
    order = data[base : base + 2]
    if order == b"II":
        end = "<"
    elif order == b"MM":
        end = ">"
    else:
        return None, None, None
    (ifd,) = struct.unpack_from(end + "I", data, base + 4)
    start = base + ifd
    if start + 2 > len(data):
        return None, None, None
    (count,) = struct.unpack_from(end + "H", data, start)
    found: dict[int, int] = {}
    for k in range(min(count, 512)):
        at = start + 2 + 12 * k
        if at + 12 > len(data):
            break
        tag, kind = struct.unpack_from(end + "HH", data, at)
        if tag not in (256, 257, 274):
            continue
        if kind == 3:  # SHORT
            (value,) = struct.unpack_from(end + "H", data, at + 8)
        elif kind == 4:  # LONG
            (value,) = struct.unpack_from(end + "I", data, at + 8)
        else:
            continue
        found[tag] = value
    orientation = found.get(274)
    if orientation is not None and not 1 <= orientation <= 8:
        orientation = None
    return found.get(256), found.get(257), orientation


def _bmp(head: bytes) -> ImageInfo:
    (header_size,) = struct.unpack_from("<I", head, 14)
    if header_size == 12 and len(head) >= 22:
        width, height = struct.unpack_from("<HH", head, 18)
        return ImageInfo("bmp", width, height)
    if header_size >= 40 and len(head) >= 26:
        width, height = struct.unpack_from("<ii", head, 18)
        return ImageInfo("bmp", abs(width), abs(height))  # negative height: top-down rows
    return ImageInfo("bmp")


def _webp(head: bytes) -> ImageInfo:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", head, 26)
        return ImageInfo("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", head, 21)
        return ImageInfo("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X" and len(head) >= 30:
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return ImageInfo("webp", width, height)
    return ImageInfo("webp")


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """The ISO BMFF boxes in ``data[start:end]``: (type, payload start, payload end)."""
    found: list[tuple[bytes, int, int]] = []
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, i)
        header = 8
        if size == 1:
            if i + 16 > end:
                break
            (size,) = struct.unpack_from(">Q", data, i + 8)
            header = 16
        elif size == 0:
            size = end - i
        if size < header:
            break
        found.append((kind, i + header, min(i + size, end)))
        i += size
    return found


def _isobmff(head: bytes) -> ImageInfo | None:
    """HEIF and AVIF: the brand from ``ftyp``; the size from the largest ``ispe`` (the
    primary image; the others are thumbnails and grid tiles), cropped by its ``clap`` and
    turned by ``irot``."""
    boxes = _boxes(head, 0, len(head))
    if not boxes or boxes[0][0] != b"ftyp":
        return None
    _, start, end = boxes[0]
    brands = {head[start : start + 4]} | {head[j : j + 4] for j in range(start + 8, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        fmt = "avif"
    elif brands & _HEIF_BRANDS:
        fmt = "heic"
    else:
        return None  # an MP4 or another ISO BMFF file
    best: tuple[int, int] | None = None
    crops: list[tuple[int, int]] = []
    turned = False
    for kind, s, e in boxes[1:]:
        if kind != b"meta":
            continue
        for kind2, s2, e2 in _boxes(head, s + 4, e):  # meta is a full box
            if kind2 != b"iprp":
                continue
            for kind3, s3, e3 in _boxes(head, s2, e2):
                if kind3 != b"ipco":
                    continue
                for prop, s4, e4 in _boxes(head, s3, e3):
                    if prop == b"ispe" and e4 - s4 >= 12:
                        width, height = struct.unpack_from(">II", head, s4 + 4)
                        if best is None or width * height > best[0] * best[1]:
                            best = (width, height)
                    elif prop == b"clap" and e4 - s4 >= 16:
                        wn, wd, hn, hd = struct.unpack_from(">IIII", head, s4)
                        if wd and hd:
                            crops.append((wn // wd, hn // hd))
                    elif prop == b"irot" and e4 > s4:
                        turned = turned or bool(head[s4] & 1)
    if best is None:
        return ImageInfo(fmt)
    # The clean aperture crops the coded size (even, for chroma subsampling) to the picture.
    inside = [c for c in crops if 0 < c[0] <= best[0] and 0 < c[1] <= best[1]]
    width, height = max(inside, key=lambda c: c[0] * c[1]) if inside else best
    return ImageInfo(fmt, height, width) if turned else ImageInfo(fmt, width, height)
