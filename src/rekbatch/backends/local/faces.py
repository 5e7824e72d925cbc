"""Offline face detection and comparison that answers like Rekognition's face operations.

Pure, synchronous, CPU-only functions meant to run in worker processes (``LocalBackend`` runs
them in a process pool). The models come from PyPI packages, never from the network:

- ``dlib`` (wheel ``dlib-bin``): the HOG frontal face detector built into dlib, and the runtime
  for the networks below.
- ``face_recognition_models``: ``shape_predictor_68_face_landmarks.dat`` (landmarks, pose),
  ``dlib_face_recognition_resnet_model_v1.dat`` (128-d face embedding, 99.38% on LFW) and
  ``mmod_human_face_detector.dat`` (the CNN detector, used only to double-check weak HOG
  candidates on small crops). The package is located with ``importlib.util.find_spec`` and
  never imported: its ``__init__`` imports ``pkg_resources``, which warns.

Detection strategy (see ``_detect``), tuned to stay under 1.5 s per 8 MP photo on one core:

- The image is decoded (JPEG DCT-domain downscaling when it is much larger than needed),
  EXIF orientation applied, and resampled to a *canvas* whose short side is 1800 px (at most
  4.5 MP; small images are upsampled up to 2x). The HOG window is 80 px, so the smallest face
  found is 4.4% of the short side (48 px in a 1920x1080 photo, 154 px in a 16 MP one), close to
  Rekognition's documented minimum (40 px at 1920x1080, proportionally more above), with one
  pass and no tiling.
- HOG runs on the grey canvas (it copes with about +-15 degrees of roll and +-45 of yaw), and
  again on a copy 720 px on its short side rotated by -25 and +25 degrees, which finds heads
  tilted 15-45 degrees, as in group selfies (the rotated passes cost less than the upright one).
  Hits are mapped back to the canvas and merged.
- Hits with a weak HOG score are kept only if dlib's CNN face detector (MMOD) agrees on an
  upright 130 px crop around them (about 0.09 s each, at most 8 per image). The CNN is far
  more robust than HOG but costs several seconds per photo when run over a whole image on a
  CPU; as a verifier it removes HOG's false positives and lets low HOG scores through.
- Landmarks come from the 68-point predictor on an upright crop of the face (cropped again,
  turned by the measured eye-line angle, when the face is tilted more than the pass assumed),
  mapped back to the image: Rekognition's five landmarks, a real Roll (the eye line), and Yaw
  and Pitch estimated from the landmark geometry.
- The embedding is dlib's ResNet descriptor of the aligned 150x150 face chip (0.08 s a face).

Similarity: see ``similarity_from_distance``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from rekbatch.errors import BackendError

__all__ = [
    "FACE_MODEL_VERSION",
    "MODEL_FILES",
    "compare_faces",
    "detect_faces",
    "face_embeddings",
    "largest_face_embedding",
    "models_dir",
    "run_task",
    "similarity_from_distance",
    "warm_up",
]

FACE_MODEL_VERSION = "local-dlib-resnet-v1"

MODEL_FILES = (
    "shape_predictor_68_face_landmarks.dat",
    "dlib_face_recognition_resnet_model_v1.dat",
    "mmod_human_face_detector.dat",
)

# Rekognition: at most 100 faces per image (the largest ones) for DetectFaces, CompareFaces
# targets and IndexFaces.
MAX_FACES = 100
# Refuse images whose decoded size would exhaust a worker (Rekognition has similar limits).
MAX_IMAGE_PIXELS = 100_000_000

# Canvas: short side CANVAS_SHORT, at most CANVAS_MAX_UPSCALE times the image and
# CANVAS_MAX_PIXELS; HOG's 80 px window is then the smallest face (4.4% of the short side).
CANVAS_SHORT = 1800
CANVAS_MAX_UPSCALE = 2.0
CANVAS_MAX_PIXELS = 4_500_000
# Rotated HOG passes: angles (degrees, counter-clockwise) and the size of their image.
ROTATED_ANGLES = (-25.0, 25.0)
ROTATED_SHORT = 720
ROTATED_MAX_PIXELS = 1_200_000
# HOG scores: candidates down to HOG_FLOOR; from HOG_ACCEPT up they are faces outright, below
# the CNN detector must agree. Hits on one face from several passes merge above NMS_IOU.
HOG_FLOOR = -0.35
HOG_ACCEPT = 0.35
NMS_IOU = 0.35
# CNN check: the HOG box scaled to CNN_FACE_PX (the CNN's boxes are about 0.85 of HOG's and its
# smallest is 80 px) in a crop CNN_CROP_FACTOR times as wide; at most CNN_MAX_CHECKS per image.
CNN_FACE_PX = 100
CNN_CROP_FACTOR = 1.3
CNN_ACCEPT = 0.3
CNN_MAX_CHECKS = 8
# Landmark/embedding crops: re-crop upright when the eye line is tilted more than this.
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
    hog: Any
    cnn: Any
    landmarks: Any
    encoder: Any


_MODELS: _Models | None = None


def models_dir() -> Path | None:
    """The directory holding the model files of ``face_recognition_models``, without importing
    that package (its ``__init__`` imports ``pkg_resources``); None when it is missing."""
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


def _models() -> _Models:
    """Load the models once per process."""
    global _MODELS
    if _MODELS is None:
        try:
            import dlib
        except ImportError as exc:
            raise BackendError(
                "LocalBackendUnavailable",
                "dlib is not installed; install the extra: pip install 'rekbatch[local]'",
                "permanent",
            ) from exc
        directory = models_dir()
        if directory is None:
            raise BackendError(
                "LocalBackendUnavailable",
                "face_recognition_models is not installed; "
                "install the extra: pip install 'rekbatch[local]'",
                "permanent",
            )
        _MODELS = _Models(
            dlib=dlib,
            hog=dlib.get_frontal_face_detector(),
            cnn=dlib.cnn_face_detection_model_v1(str(directory / "mmod_human_face_detector.dat")),
            landmarks=dlib.shape_predictor(
                str(directory / "shape_predictor_68_face_landmarks.dat")
            ),
            encoder=dlib.face_recognition_model_v1(
                str(directory / "dlib_face_recognition_resnet_model_v1.dat")
            ),
        )
    return _MODELS


def warm_up() -> None:
    """Load the models now (process-pool initializer), so the first task does not pay for it."""
    _models()


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass
class _Canvas:
    """The orientation-corrected image resampled for detection; coordinates of every face are
    canvas pixels until they are turned into ratios (which do not depend on the scale)."""

    rgb: Image.Image
    gray: Image.Image
    levels: dict[int, Image.Image]

    def level(self, factor: int) -> Image.Image:
        """The RGB canvas reduced ``factor`` times (1, 2, 4, 8), computed once."""
        if factor not in self.levels:
            self.levels[factor] = self.level(factor // 2).reduce(2)
        return self.levels[factor]

    @property
    def width(self) -> int:
        return self.rgb.width

    @property
    def height(self) -> int:
        return self.rgb.height


def _invalid_format(message: str) -> BackendError:
    return BackendError("InvalidImageFormatException", message, "permanent")


def _canvas_scale(width: int, height: int) -> float:
    short = min(width, height)
    scale = min(CANVAS_MAX_UPSCALE, CANVAS_SHORT / short)
    return min(scale, math.sqrt(CANVAS_MAX_PIXELS / (width * height)))


def _decode(data: bytes) -> _Canvas:
    """Decode JPEG/PNG bytes into a detection canvas, honouring EXIF orientation."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _invalid_format("image data must be bytes")
    data = bytes(data)
    if not (data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC)):
        raise _invalid_format("Request has unsupported image format (JPEG and PNG are supported)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            image: Image.Image = opened
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
            scale = _canvas_scale(width, height)
            if image.format in ("JPEG", "MPO") and scale < 0.55:
                # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 size, at least 90% of the
                # canvas size (the last few percent are made up by resampling).
                wanted = (math.ceil(width * scale * 0.9), math.ceil(height * scale * 0.9))
                image.draft(None, wanted)
            image.load()
            drafted = image.size
            # Unreadable EXIF: keep the stored orientation.
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, SyntaxError):
                image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except BackendError:
        raise
    except Image.DecompressionBombError as exc:
        raise BackendError("ImageTooLargeException", str(exc), "permanent") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise _invalid_format(f"image could not be decoded: {exc}") from exc

    # Canvas size from the full-resolution, orientation-corrected dimensions.
    if rgb.size != drafted:  # EXIF orientation swapped width and height
        width, height = height, width
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return _Canvas(rgb=rgb, gray=rgb.convert("L"), levels={1: rgb})


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
# Detection


@dataclass
class _Candidate:
    cx: float  # canvas pixels
    cy: float
    size: float
    score: float
    angle: float  # degrees CCW that make the face upright (the pass it was found in)
    cnn: float | None = None


@dataclass
class _Face:
    cx: float
    cy: float
    size: float
    confidence: float
    points: FloatArray  # 68 x 2, canvas pixels
    roll: float
    yaw: float
    pitch: float
    brightness: float
    sharpness: float
    embedding: FloatArray | None = None
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # left, top, right, bottom


@dataclass
class _Analysis:
    width: int
    height: int
    faces: list[_Face] = field(default_factory=list)


def _rotate_offset(dx: float, dy: float, degrees: float) -> tuple[float, float]:
    """Offset (image coordinates, y down) in an image rotated ``degrees`` CCW by Pillow,
    mapped back to the unrotated image."""
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    return dx * cos - dy * sin, dx * sin + dy * cos


def _hog_pass(models: _Models, gray: Image.Image, scale: float, angle: float) -> list[_Candidate]:
    """Run HOG on ``gray`` resized by ``scale`` and rotated ``angle`` degrees CCW; return the
    hits in canvas coordinates."""
    image = gray
    if scale != 1.0:
        size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        image = gray.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    small_w, small_h = image.size
    if angle:
        image = image.rotate(angle, Image.Resampling.BILINEAR, expand=True)
    array = np.asarray(image)
    rects, scores, _ = models.hog.run(array, 0, HOG_FLOOR)
    found = []
    for rect, score in zip(rects, scores, strict=True):
        x = (rect.left() + rect.right() + 1) / 2.0
        y = (rect.top() + rect.bottom() + 1) / 2.0
        dx, dy = _rotate_offset(x - image.width / 2.0, y - image.height / 2.0, angle)
        found.append(
            _Candidate(
                cx=(small_w / 2.0 + dx) / scale,
                cy=(small_h / 2.0 + dy) / scale,
                size=rect.width() / scale,
                score=float(score),
                angle=angle,
            )
        )
    return found


def _iou(a: _Candidate, b: _Candidate) -> float:
    """Intersection over union of the two (axis-aligned, square) boxes."""
    iw = min(a.cx + a.size / 2, b.cx + b.size / 2) - max(a.cx - a.size / 2, b.cx - b.size / 2)
    ih = min(a.cy + a.size / 2, b.cy + b.size / 2) - max(a.cy - a.size / 2, b.cy - b.size / 2)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a.size * a.size + b.size * b.size - inter)


def _same_face(a: _Candidate, b: _Candidate) -> bool:
    """Two hits on one face: overlapping boxes, or centres close for boxes of similar size
    (the passes at other angles and scales shift and resize the box)."""
    if _iou(a, b) > NMS_IOU:
        return True
    small, large = sorted((a.size, b.size))
    distance = math.hypot(a.cx - b.cx, a.cy - b.cy)
    return large < 2.0 * small and distance < 0.4 * large


def _upright_crop(
    canvas: _Canvas,
    cx: float,
    cy: float,
    size: float,
    angle: float,
    out_face: float,
    crop_factor: float = 2.4,
) -> tuple[Image.Image, float]:
    """A square crop centred on (cx, cy), rotated ``angle`` degrees CCW and scaled so the face
    (``size`` canvas pixels) is ``out_face`` pixels wide; returns it and the scale used.

    Large reductions start from a pre-reduced copy of the canvas, so the bilinear affine
    resampling never shrinks by more than 2x (no aliasing)."""
    k = out_face / size
    factor = 1
    while factor < 8 and k * factor * 2 <= 1.0:
        factor *= 2
    source = canvas.level(factor)
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


def _cnn_confirms(models: _Models, canvas: _Canvas, cand: _Candidate) -> float | None:
    """The CNN detector's confidence for a face at the candidate's place, or None."""
    crop, _ = _upright_crop(
        canvas, cand.cx, cand.cy, cand.size, cand.angle, CNN_FACE_PX, CNN_CROP_FACTOR
    )
    array = np.asarray(crop)
    half = crop.width / 2.0
    best: float | None = None
    for det in models.cnn(array, 0):
        r = det.rect
        x = (r.left() + r.right()) / 2.0
        y = (r.top() + r.bottom()) / 2.0
        if (
            abs(x - half) < 0.45 * CNN_FACE_PX
            and abs(y - half) < 0.45 * CNN_FACE_PX
            and 0.5 * CNN_FACE_PX < r.width() < 2.0 * CNN_FACE_PX
        ):
            confidence = float(det.confidence)
            best = confidence if best is None else max(best, confidence)
    return best


def _detect(models: _Models, canvas: _Canvas) -> list[_Candidate]:
    """Face candidates on the canvas: HOG upright and on rotated copies, merged, and the weak
    ones confirmed by the CNN detector."""
    candidates = _hog_pass(models, canvas.gray, 1.0, 0.0)
    short = min(canvas.width, canvas.height)
    rot_scale = min(
        1.0, ROTATED_SHORT / short, math.sqrt(ROTATED_MAX_PIXELS / (canvas.width * canvas.height))
    )
    for angle in ROTATED_ANGLES:
        candidates.extend(_hog_pass(models, canvas.gray, rot_scale, angle))
    candidates.sort(key=lambda c: c.score, reverse=True)
    kept: list[_Candidate] = []
    for cand in candidates:
        if any(_same_face(cand, other) for other in kept):
            continue
        kept.append(cand)
    confirmed = []
    checks = 0
    for cand in kept:
        if cand.score < HOG_ACCEPT:
            if checks >= CNN_MAX_CHECKS:
                break
            checks += 1
            cand.cnn = _cnn_confirms(models, canvas, cand)
            if cand.cnn is None or cand.cnn < CNN_ACCEPT:
                continue
        confirmed.append(cand)
    return confirmed


# ---------------------------------------------------------------------------------------------
# Landmarks, pose, quality, embedding

_LANDMARK_FACE_PX = 160.0


def _shape_points(shape: Any) -> FloatArray:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def _to_canvas(
    points: FloatArray, cx: float, cy: float, angle: float, k: float, side: int
) -> FloatArray:
    half = side / 2.0
    t = math.radians(angle)
    cos, sin = math.cos(t), math.sin(t)
    du = (points[:, 0] + 0.5 - half) / k
    dv = (points[:, 1] + 0.5 - half) / k
    out = np.empty_like(points)
    out[:, 0] = cx + du * cos - dv * sin
    out[:, 1] = cy + du * sin + dv * cos
    return out


def _eye_line_degrees(points: FloatArray) -> float:
    left = points[36:42].mean(axis=0)
    right = points[42:48].mean(axis=0)
    return math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))


def _face_from_candidate(models: _Models, canvas: _Canvas, cand: _Candidate, embed: bool) -> _Face:
    angle = cand.angle
    crop, points, shape, k = _landmarks(models, canvas, cand.cx, cand.cy, cand.size, angle)
    canvas_points = _to_canvas(points, cand.cx, cand.cy, angle, k, crop.width)
    roll = _eye_line_degrees(canvas_points)
    if abs(roll - angle) > RECROP_DEGREES:
        # Tilted more than the pass assumed: look again with the face made upright.
        angle = roll
        crop, points, shape, k = _landmarks(models, canvas, cand.cx, cand.cy, cand.size, angle)
        canvas_points = _to_canvas(points, cand.cx, cand.cy, angle, k, crop.width)
        roll = _eye_line_degrees(canvas_points)
    yaw, pitch = _yaw_pitch(points)
    brightness, sharpness = _quality(crop, crop.width / 2.0, _LANDMARK_FACE_PX)
    embedding = None
    if embed:
        array = np.asarray(crop)
        embedding = np.array(models.encoder.compute_face_descriptor(array, shape, 0))
    confidence = _confidence(cand)
    return _Face(
        cx=cand.cx,
        cy=cand.cy,
        size=cand.size,
        confidence=confidence,
        points=canvas_points,
        roll=roll,
        yaw=yaw,
        pitch=pitch,
        brightness=brightness,
        sharpness=sharpness,
        embedding=embedding,
    )


def _landmarks(
    models: _Models, canvas: _Canvas, cx: float, cy: float, size: float, angle: float
) -> tuple[Image.Image, FloatArray, Any, float]:
    out_face = _LANDMARK_FACE_PX
    crop, k = _upright_crop(canvas, cx, cy, size, angle, out_face)
    low = round(crop.width / 2.0 - out_face / 2.0)
    high = low + round(out_face) - 1
    rect = models.dlib.rectangle(low, low, high, high)
    array = np.asarray(crop)
    shape = models.landmarks(array, rect)
    return crop, _shape_points(shape), shape, k


def _yaw_pitch(points: FloatArray) -> tuple[float, float]:
    """Approximate yaw and pitch (degrees) from upright 68-point landmarks.

    Yaw: where the nose tip sits between the two sides of the jaw (positive when it is nearer
    the image's right, the face turned towards the image's right). Pitch: where the nose tip
    sits between the eye line and the mouth (positive when the face looks up). Both are
    geometric estimates, good to roughly 10-15 degrees."""
    nose = points[30]
    left_jaw, right_jaw = points[0:4].mean(axis=0), points[13:17].mean(axis=0)
    width = float(right_jaw[0] - left_jaw[0])
    yaw = 0.0
    if width > 1e-6:
        ratio = (2.0 * float(nose[0] - left_jaw[0]) - width) / width
        yaw = math.degrees(math.asin(max(-1.0, min(1.0, ratio / 0.85))))
    eyes_y = float((points[36:42].mean(axis=0)[1] + points[42:48].mean(axis=0)[1]) / 2.0)
    mouth_y = float((points[48][1] + points[54][1]) / 2.0)
    span = mouth_y - eyes_y
    pitch = 0.0
    if span > 1e-6:
        ratio = (float(nose[1]) - eyes_y) / span
        pitch = math.degrees(math.asin(max(-1.0, min(1.0, (0.5 - ratio) / 0.5))))
    return yaw, pitch


def _quality(crop: Image.Image, centre: float, face: float) -> tuple[float, float]:
    """Rekognition-style Brightness and Sharpness (0-100) of the face region."""
    half = face / 2.0
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


def _confidence(cand: _Candidate) -> float:
    """0-100: logistic in the HOG score (0 -> 95, 1 -> 99.7); CNN-confirmed faces at least 90."""
    value = 100.0 / (1.0 + math.exp(-(2.944 + 2.86 * cand.score)))
    if cand.cnn is not None:
        value = max(value, 100.0 / (1.0 + math.exp(-(2.2 + 2.0 * cand.cnn))))
    return value


def _finish_boxes(faces: list[_Face], width: int, height: int) -> None:
    """The face box (canvas pixels, axis aligned, clipped to the image) from the detection
    square and the landmarks: brows to chin, jaw side to jaw side."""
    for face in faces:
        xs, ys = face.points[:, 0], face.points[:, 1]
        left = min(face.cx - face.size / 2.0, float(xs.min()))
        right = max(face.cx + face.size / 2.0, float(xs.max()))
        top = min(face.cy - face.size / 2.0, float(ys.min()))
        bottom = max(face.cy + face.size / 2.0, float(ys.max()))
        face.box = (
            max(0.0, left),
            max(0.0, top),
            min(float(width), right),
            min(float(height), bottom),
        )


def _analyse(data: bytes, embed_limit: int) -> _Analysis:
    """Detect faces (the MAX_FACES largest), with embeddings for the ``embed_limit`` largest."""
    canvas = _decode(data)  # refuse a bad image before loading any model
    models = _models()
    candidates = _detect(models, canvas)
    candidates.sort(key=lambda c: c.size, reverse=True)
    candidates = candidates[:MAX_FACES]
    faces = [
        _face_from_candidate(models, canvas, cand, embed=index < embed_limit)
        for index, cand in enumerate(candidates)
    ]
    _finish_boxes(faces, canvas.width, canvas.height)
    faces = [f for f in faces if f.box[2] > f.box[0] and f.box[3] > f.box[1]]
    return _Analysis(width=canvas.width, height=canvas.height, faces=faces)


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
    p = face.points
    named = (
        ("eyeLeft", p[36:42].mean(axis=0)),
        ("eyeRight", p[42:48].mean(axis=0)),
        ("nose", p[30]),
        ("mouthLeft", p[48]),
        ("mouthRight", p[54]),
    )
    return [
        {"Type": name, "X": _ratio(float(xy[0]) / width), "Y": _ratio(float(xy[1]) / height)}
        for name, xy in named
    ]


def _pose(face: _Face) -> dict[str, float]:
    return {"Roll": round(face.roll, 3), "Yaw": round(face.yaw, 3), "Pitch": round(face.pitch, 3)}


def _face_detail(face: _Face, width: int, height: int) -> dict[str, Any]:
    return {
        "BoundingBox": _bounding_box(face, width, height),
        "Landmarks": _landmark_list(face, width, height),
        "Pose": _pose(face),
        "Quality": {"Brightness": face.brightness, "Sharpness": face.sharpness},
        "Confidence": face.confidence,
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


def detect_faces(data: bytes) -> dict[str, Any]:
    """DetectFaces: the faces in a JPEG/PNG image (up to the 100 largest)."""
    analysis = _analyse(data, embed_limit=0)
    return {
        "FaceDetails": [
            _face_detail(face, analysis.width, analysis.height) for face in analysis.faces
        ]
    }


def _no_face() -> BackendError:
    return BackendError(
        "InvalidParameterException",
        "There are no faces in the image. Should be at least 1.",
        "permanent",
    )


def compare_faces(
    source: bytes, target: bytes, similarity_threshold: float = 80.0
) -> dict[str, Any]:
    """CompareFaces: the largest face of ``source`` against every face of ``target``."""
    src = _analyse(source, embed_limit=1)
    if not src.faces:
        raise _no_face()
    reference = src.faces[0]
    assert reference.embedding is not None
    tgt = _analyse(target, embed_limit=MAX_FACES)
    matches: list[dict[str, Any]] = []
    unmatched: list[dict[str, Any]] = []
    for face in tgt.faces:
        assert face.embedding is not None
        distance = float(np.linalg.norm(face.embedding - reference.embedding))
        similarity = similarity_from_distance(distance)
        detail = _face_detail(face, tgt.width, tgt.height)
        if similarity >= similarity_threshold:
            matches.append({"Similarity": similarity, "Face": detail})
        else:
            unmatched.append(detail)
    matches.sort(key=lambda m: float(m["Similarity"]), reverse=True)
    return {
        "SourceImageFace": {
            "BoundingBox": _bounding_box(reference, src.width, src.height),
            "Confidence": reference.confidence,
        },
        "FaceMatches": matches,
        "UnmatchedFaces": unmatched,
    }


def face_embeddings(
    data: bytes, max_faces: int = MAX_FACES
) -> list[tuple[dict[str, Any], list[float]]]:
    """Every face (largest first, at most ``max_faces``) as (FaceDetail, 128-d embedding).

    The FaceDetail holds BoundingBox, Landmarks, Pose, Quality and Confidence, as DetectFaces
    returns them; embeddings compare with Euclidean distance and ``similarity_from_distance``.
    """
    analysis = _analyse(data, embed_limit=max_faces)
    out = []
    for face in analysis.faces[:max_faces]:
        assert face.embedding is not None
        out.append((_face_detail(face, analysis.width, analysis.height), face.embedding.tolist()))
    return out


def largest_face_embedding(data: bytes) -> tuple[dict[str, Any], list[float]]:
    """The largest face as (FaceDetail, embedding); no face -> InvalidParameterException."""
    faces = face_embeddings(data, max_faces=1)
    if not faces:
        raise _no_face()
    return faces[0]


_TASKS: dict[str, Callable[..., Any]] = {
    "detect_faces": detect_faces,
    "compare_faces": compare_faces,
    "face_embeddings": face_embeddings,
    "largest_face_embedding": largest_face_embedding,
}


def run_task(name: str, *args: Any) -> tuple[str, Any]:
    """Process-pool entry point: run a public function and return ``("ok", result)`` or
    ``("error", (code, message, kind))``. ``BackendError`` does not survive pickling (its
    constructor takes three arguments), so errors travel as plain tuples."""
    try:
        return "ok", _TASKS[name](*args)
    except BackendError as exc:
        return "error", (exc.code, exc.message, exc.kind)
    except MemoryError:
        return "error", ("ImageTooLargeException", "out of memory decoding the image", "permanent")
    except Exception as exc:  # a bug or a dlib failure on one image: record it, keep going
        return "error", ("InternalServerError", f"{type(exc).__name__}: {exc}", "permanent")
