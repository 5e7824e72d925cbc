"""Synthetic face scenes built from the samples, for the offline backend's tests and benchmark.

The reference portrait's face (``ric_harvey.jpeg``) is cut out with its hair and neck, scaled
so the face (its box, about 2.3 eye distances wide) is ``face_px`` pixels wide, turned by
``angle`` degrees and pasted into a large host photo without the reference person: the crowd
``ric_crowd0.jpg`` enlarged to 8 MP, so the scene also holds dozens of other people's faces.
Everything is deterministic (no randomness), so tests built on it are too.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "wheres-ric"
REFERENCE = SAMPLES / "ric_harvey.jpeg"
HOST = SAMPLES / "ric_crowd0.jpg"

# The reference face in ric_harvey.jpeg (2022x3034), measured once with the detector: its box
# centre and width in pixels.
REF_CENTRE = (1022.0, 1040.0)
REF_FACE_WIDTH = 700.0
# What is cut out around the face: this many face widths on each side of the centre.
CUT_HALF = 0.95

# Where faces are pasted in the 8 MP host (fractions of its size): on the wall and the
# balcony glass between the two floors of people, clear of the crowd's own faces.
SPOTS = ((0.18, 0.33), (0.50, 0.33), (0.80, 0.36), (0.33, 0.30), (0.65, 0.30))

HOST_SIZE = (3264, 2448)


@dataclass(frozen=True)
class Pasted:
    """A pasted face: its centre and width in the scene's pixels, and its roll."""

    cx: float
    cy: float
    width: float
    angle: float


@lru_cache(maxsize=1)
def _reference() -> Image.Image:
    with Image.open(REFERENCE) as image:
        return image.convert("RGB")


@lru_cache(maxsize=2)
def host(size: tuple[int, int] = HOST_SIZE) -> Image.Image:
    """The crowd photo enlarged to ``size``."""
    with Image.open(HOST) as image:
        return image.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def face_patch(face_px: float, angle: float = 0.0) -> tuple[Image.Image, Image.Image]:
    """The reference face scaled to ``face_px`` and turned ``angle`` degrees counter-clockwise,
    as an RGB patch and its soft-edged mask (same size; the face at the centre)."""
    ref = _reference()
    half = CUT_HALF * REF_FACE_WIDTH
    cx, cy = REF_CENTRE
    cut = ref.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    side = max(4, round(2 * CUT_HALF * face_px))
    patch = cut.resize((side, side), Image.Resampling.LANCZOS)
    mask = Image.new("L", (side, side), 0)
    inset = max(1, side // 12)
    ImageDraw.Draw(mask).ellipse((inset, inset, side - inset, side - inset), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(max(1.0, side / 24)))
    if angle:
        patch = patch.rotate(angle, Image.Resampling.BICUBIC, expand=True)
        mask = mask.rotate(angle, Image.Resampling.BICUBIC, expand=True)
    return patch, mask


def scene(
    faces: list[tuple[float, float]], size: tuple[int, int] = HOST_SIZE
) -> tuple[Image.Image, list[Pasted]]:
    """The host with the reference face pasted once per (face_px, angle), at SPOTS in turn."""
    if len(faces) > len(SPOTS):
        raise ValueError(f"at most {len(SPOTS)} faces per scene")
    image = host(size).copy()
    pasted = []
    for (face_px, angle), (fx, fy) in zip(faces, SPOTS, strict=False):
        patch, mask = face_patch(face_px, angle)
        cx, cy = fx * size[0], fy * size[1]
        image.paste(patch, (round(cx - patch.width / 2), round(cy - patch.height / 2)), mask)
        pasted.append(Pasted(cx=cx, cy=cy, width=face_px, angle=angle))
    return image, pasted


def crop_of_reference(face_px: float, angle: float = 0.0, margin: float = 1.6) -> Image.Image:
    """Just the reference face at ``face_px`` (a scaled crop), ``margin`` face widths around
    its centre, on a grey background when turned."""
    patch, mask = face_patch(face_px, angle)
    side = max(patch.width, round(2 * margin * face_px))
    out = Image.new("RGB", (side, side), (128, 128, 128))
    out.paste(patch, ((side - patch.width) // 2, (side - patch.height) // 2), mask)
    return out


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def found(pasted: Pasted, box: dict[str, float], size: tuple[int, int]) -> bool:
    """Whether a Rekognition BoundingBox (ratios) is on the pasted face: its centre within
    half a face width of the face's centre and its width within a factor 2."""
    width = box["Width"] * size[0]
    cx = (box["Left"] + box["Width"] / 2) * size[0]
    cy = (box["Top"] + box["Height"] / 2) * size[1]
    near = math.hypot(cx - pasted.cx, cy - pasted.cy) < 0.5 * pasted.width
    return near and 0.5 * pasted.width < width < 2.0 * pasted.width
