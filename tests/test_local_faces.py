"""The offline face backend, with the real dlib models, on the "Where's Ric?" samples.

``ric_harvey.jpeg`` is the reference; he is in ``ric.jpg`` and in the group selfie
``ric_crowd1.jpg`` (5 faces, his head turned and tilted about 25 degrees) and in no other
sample. The image work goes through one module-wide ``LocalBackend`` (a process pool with one
worker per core), and the expensive answers are computed once, concurrently, and shared.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rekbatch.backends.base import ImageInput
from rekbatch.backends.local.backend import (
    FACE_MODEL_VERSION,
    LOCAL_SUPPORTED_OPERATIONS,
    LocalBackend,
    local_backend_available,
)
from rekbatch.errors import BackendError

# The test command installs the local extra: without it these tests fail, never skip.
_MISSING = local_backend_available()
if _MISSING is not None:
    raise RuntimeError(f"the offline face tests need the local extra: {_MISSING}")

from PIL import Image  # noqa: E402

from rekbatch.backends.local import faces as local_faces  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "wheres-ric"
REFERENCE = "ric_harvey.jpeg"
IMAGES = (
    "ric_harvey.jpeg",
    "ric.jpg",
    "ric_crowd1.jpg",
    "ric_crowd0.jpg",
    "sample-image0.jpeg",
    "sample-image1.jpeg",
    "demo0.png",
)
WITH_RIC = {"ric_harvey.jpeg", "ric.jpg", "ric_crowd1.jpg"}
NOT_IMAGES = ("notes.txt", "broken.jpg")


def _data(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def _img(data: bytes) -> dict[str, ImageInput]:
    return {"Image": ImageInput(data=data)}


def _jpeg(image: Any, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, **save)
    return buffer.getvalue()


def _centre(box: dict[str, float]) -> tuple[float, float]:
    return box["Left"] + box["Width"] / 2, box["Top"] + box["Height"] / 2


def _iou(a: dict[str, float], b: dict[str, float]) -> float:
    iw = min(a["Left"] + a["Width"], b["Left"] + b["Width"]) - max(a["Left"], b["Left"])
    ih = min(a["Top"] + a["Height"], b["Top"] + b["Height"]) - max(a["Top"], b["Top"])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a["Width"] * a["Height"] + b["Width"] * b["Height"] - inter)


# --------------------------------------------------------------------------- shared answers


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBackend]:
    """One backend and process pool for the whole module."""
    local = LocalBackend(tmp_path_factory.mktemp("collections"))
    yield local
    asyncio.run(local.aclose())


@pytest.fixture(scope="module")
def answers(backend: LocalBackend) -> dict[str, Any]:
    """CompareFaces of the reference against every sample and DetectFaces of every sample,
    all run concurrently on the pool."""

    async def run() -> dict[str, Any]:
        compare = [
            backend.call(
                "CompareFaces",
                {"SimilarityThreshold": 80.0},
                {
                    "SourceImage": ImageInput(data=_data(REFERENCE)),
                    "TargetImage": ImageInput(data=_data(name)),
                },
            )
            for name in IMAGES
        ]
        detect = [backend.call("DetectFaces", {}, _img(_data(name))) for name in IMAGES]
        results = await asyncio.gather(*compare, *detect)
        return {
            "compare": dict(zip(IMAGES, results[: len(IMAGES)], strict=True)),
            "detect": dict(zip(IMAGES, results[len(IMAGES) :], strict=True)),
        }

    return asyncio.run(run())


# --------------------------------------------------------------------------- matching


def test_reference_matches_exactly_the_photos_of_ric(answers: dict[str, Any]) -> None:
    similarities = {
        name: [round(m["Similarity"], 1) for m in result["FaceMatches"]]
        for name, result in answers["compare"].items()
    }
    matched = {name for name, found in similarities.items() if found}
    assert matched == WITH_RIC, similarities
    for name in WITH_RIC:
        assert len(similarities[name]) == 1, similarities
        assert similarities[name][0] >= 85.0, similarities
    assert similarities[REFERENCE][0] > 99.0


def test_ric_is_second_from_left_in_the_group_selfie(answers: dict[str, Any]) -> None:
    result = answers["compare"]["ric_crowd1.jpg"]
    faces = [m["Face"] for m in result["FaceMatches"]] + result["UnmatchedFaces"]
    assert len(faces) == 5
    by_left = sorted(faces, key=lambda f: _centre(f["BoundingBox"])[0])
    assert by_left[1] is result["FaceMatches"][0]["Face"]
    # His head is tilted about 25 degrees: the Roll comes from the eye line.
    assert abs(result["FaceMatches"][0]["Face"]["Pose"]["Roll"]) > 12.0


def test_compare_faces_response_shape(answers: dict[str, Any]) -> None:
    result = answers["compare"]["ric.jpg"]
    source = result["SourceImageFace"]
    assert set(source) == {"BoundingBox", "Confidence"}
    assert 0.0 < source["Confidence"] <= 100.0
    match = result["FaceMatches"][0]
    assert 0.0 <= match["Similarity"] <= 100.0
    assert {"BoundingBox", "Confidence", "Landmarks", "Pose"} <= set(match["Face"])
    unmatched = answers["compare"]["ric_crowd1.jpg"]["UnmatchedFaces"]
    assert len(unmatched) == 4
    assert all({"BoundingBox", "Confidence"} <= set(face) for face in unmatched)


def test_similarity_mapping_is_calibrated_like_rekognition() -> None:
    sim = local_faces.similarity_from_distance
    assert sim(0.6) == pytest.approx(80.0, abs=0.5)  # dlib's same-person boundary
    assert sim(0.5) > 90.0
    assert sim(0.4) > 95.0
    assert sim(0.0) > 99.9
    assert sim(0.75) < 50.0
    values = [sim(d / 100) for d in range(0, 150)]
    assert all(a > b for a, b in itertools.pairwise(values))


# --------------------------------------------------------------------------- detection


def test_group_selfie_has_five_faces(answers: dict[str, Any]) -> None:
    assert len(answers["detect"]["ric_crowd1.jpg"]["FaceDetails"]) == 5
    assert len(answers["detect"]["ric_harvey.jpeg"]["FaceDetails"]) == 1
    assert len(answers["detect"]["ric.jpg"]["FaceDetails"]) == 1


def test_small_faces_in_the_crowd_are_found(answers: dict[str, Any]) -> None:
    """The registration desk: dozens of people, faces 10-45 px wide in a 1200x899 photo."""
    faces = answers["detect"]["ric_crowd0.jpg"]["FaceDetails"]
    assert len(faces) >= 10, len(faces)
    widths = sorted(f["BoundingBox"]["Width"] * 1200 for f in faces)
    assert widths[len(widths) // 2] < 30  # most of them small
    # Faces of people, not of Ric: none is recognised as him.
    assert not answers["compare"]["ric_crowd0.jpg"]["FaceMatches"]


def test_the_face_in_the_console_screenshot_is_found(answers: dict[str, Any]) -> None:
    """demo0.png: a console screenshot (RGBA PNG) whose photo shows a guitarist at the back,
    head bowed, about 40 px wide (the singer in front hides his face behind the microphone
    and his hair); the same photo, smaller, is sample-image0.jpeg."""
    for name, size in (("demo0.png", (2284, 1304)), ("sample-image0.jpeg", (448, 336))):
        faces = answers["detect"][name]["FaceDetails"]
        assert len(faces) >= 1, name
        box = faces[0]["BoundingBox"]
        cx = (box["Left"] + box["Width"] / 2) * size[0]
        cy = (box["Top"] + box["Height"] / 2) * size[1]
        if name == "demo0.png":
            assert 990 < cx < 1100 and 560 < cy < 650, (cx, cy)
        else:
            assert 385 < cx < 430 and 170 < cy < 210, (cx, cy)


def test_no_face_in_the_fish(answers: dict[str, Any]) -> None:
    """sample-image1.jpeg is a clownfish: the first pass likes its face, the upright second
    look does not."""
    assert answers["detect"]["sample-image1.jpeg"]["FaceDetails"] == []


def test_detect_faces_answers_only_what_it_can_compute(answers: dict[str, Any]) -> None:
    """Rekognition's DEFAULT attributes and nothing it would have to make up."""
    details = [d for result in answers["detect"].values() for d in result["FaceDetails"]]
    for detail in details:
        assert set(detail) == {"BoundingBox", "Landmarks", "Pose", "Quality", "Confidence"}
        quality = detail["Quality"]
        assert set(quality) == {"Brightness", "Sharpness"}
        assert 0.0 <= quality["Brightness"] <= 100.0 and 0.0 <= quality["Sharpness"] <= 100.0
        assert 90.0 <= detail["Confidence"] <= 100.0
    portrait = answers["detect"]["ric_harvey.jpeg"]["FaceDetails"][0]
    small = answers["detect"]["ric_crowd0.jpg"]["FaceDetails"][-1]
    assert portrait["Quality"]["Sharpness"] > small["Quality"]["Sharpness"]
    assert abs(portrait["Pose"]["Roll"]) < 8 and abs(portrait["Pose"]["Yaw"]) < 20


def test_boxes_landmarks_and_pose_are_rekognition_shaped(answers: dict[str, Any]) -> None:
    details = [d for result in answers["detect"].values() for d in result["FaceDetails"]]
    details += [m["Face"] for result in answers["compare"].values() for m in result["FaceMatches"]]
    assert details
    for detail in details:
        box = detail["BoundingBox"]
        assert set(box) == {"Width", "Height", "Left", "Top"}
        assert all(0.0 <= v <= 1.0 for v in box.values()), box
        assert box["Width"] > 0 and box["Height"] > 0
        assert box["Left"] + box["Width"] <= 1.0 + 1e-9
        assert box["Top"] + box["Height"] <= 1.0 + 1e-9
        types = [lm["Type"] for lm in detail["Landmarks"]]
        assert types == ["eyeLeft", "eyeRight", "nose", "mouthLeft", "mouthRight"]
        for lm in detail["Landmarks"]:
            assert 0.0 <= lm["X"] <= 1.0 and 0.0 <= lm["Y"] <= 1.0, lm
        assert set(detail["Pose"]) == {"Roll", "Yaw", "Pitch"}
        assert 0.0 < detail["Confidence"] <= 100.0
        eyes = {lm["Type"]: lm for lm in detail["Landmarks"]}
        assert eyes["eyeLeft"]["X"] < eyes["eyeRight"]["X"] or abs(detail["Pose"]["Roll"]) > 60


def test_exif_orientation_is_honoured(backend: LocalBackend, tmp_path: Path) -> None:
    """A copy whose pixels are stored rotated, with the EXIF Orientation that undoes it, has
    its faces in the same places as the upright photo."""
    with Image.open(SAMPLES / "ric_crowd1.jpg") as original:
        upright = original.convert("RGB").resize((1600, 1200), Image.Resampling.BILINEAR)
    variants = {"upright": _jpeg(upright)}
    # Orientation 6 means "rotate 90 degrees clockwise to display"; 8 counter-clockwise.
    for tag, stored in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
        exif = Image.Exif()
        exif[0x0112] = tag
        path = tmp_path / f"orientation-{tag}.jpg"
        path.write_bytes(_jpeg(upright.transpose(stored), exif=exif.tobytes()))
        variants[f"orientation-{tag}"] = path.read_bytes()

    async def run() -> dict[str, Any]:
        names = list(variants)
        results = await asyncio.gather(
            *(backend.call("DetectFaces", {}, _img(variants[n])) for n in names)
        )
        return dict(zip(names, results, strict=True))

    found = asyncio.run(run())
    reference = [d["BoundingBox"] for d in found["upright"]["FaceDetails"]]
    assert len(reference) == 5
    for name in ("orientation-6", "orientation-8"):
        boxes = [d["BoundingBox"] for d in found[name]["FaceDetails"]]
        assert len(boxes) == len(reference), name
        for box in reference:
            best = max(boxes, key=lambda other, box=box: _iou(box, other))
            assert _iou(box, best) > 0.6, (name, box, best)
            assert _centre(best) == pytest.approx(_centre(box), abs=0.03)


def test_tilted_face_is_found_and_roll_follows_the_eye_line(backend: LocalBackend) -> None:
    """The portrait turned 30 degrees either way: found, and Roll is the eye-line angle
    (positive when the eye on the image's right is lower)."""
    with Image.open(SAMPLES / REFERENCE) as original:
        portrait = original.convert("RGB").resize((600, 900), Image.Resampling.BILINEAR)
    tilted = {
        angle: _jpeg(portrait.rotate(angle, Image.Resampling.BILINEAR, expand=True))
        for angle in (-30, 30)
    }

    async def run() -> dict[int, Any]:
        results = await asyncio.gather(
            *(backend.call("DetectFaces", {}, _img(tilted[a])) for a in tilted)
        )
        return dict(zip(tilted, results, strict=True))

    for angle, result in asyncio.run(run()).items():
        faces = result["FaceDetails"]
        assert len(faces) == 1, angle
        # Pillow turns counter-clockwise: the image-right eye goes up, Roll goes negative.
        assert faces[0]["Pose"]["Roll"] == pytest.approx(-angle, abs=8.0)


@pytest.mark.parametrize("name", NOT_IMAGES)
def test_not_an_image_is_an_invalid_format(name: str) -> None:
    with pytest.raises(BackendError) as info:
        local_faces.detect_faces(_data(name))
    assert info.value.code == "InvalidImageFormatException"
    assert info.value.kind == "permanent"


def test_no_face_in_the_source_image() -> None:
    blank = io.BytesIO()
    Image.new("RGB", (320, 240), (90, 140, 200)).save(blank, "PNG")
    with pytest.raises(BackendError) as info:
        local_faces.compare_faces(blank.getvalue(), _data("ric.jpg"), 80.0)
    assert info.value.code == "InvalidParameterException"
    assert info.value.message == "There are no faces in the image. Should be at least 1."
    assert info.value.kind == "permanent"


def test_models_come_from_the_package_without_importing_it() -> None:
    directory = local_faces.models_dir()
    assert directory is not None
    assert all((directory / name).is_file() for name in local_faces.MODEL_FILES)
    # Importing it is never needed (the original face_recognition_models imports
    # pkg_resources, which warns, and warnings are errors here).
    assert "face_recognition_models" not in sys.modules


# --------------------------------------------------------------------------- the backend


def test_backend_reports_errors_across_the_process_boundary(backend: LocalBackend) -> None:
    async def run() -> None:
        with pytest.raises(BackendError) as info:
            await backend.call("DetectFaces", {}, _img(_data("broken.jpg")))
        assert info.value.code == "InvalidImageFormatException"
        assert info.value.kind == "permanent"

        with pytest.raises(BackendError) as info:
            await backend.call("DetectLabels", {}, _img(_data("ric.jpg")))
        assert info.value.code == "UnsupportedOperation"
        assert info.value.kind == "permanent"

        with pytest.raises(BackendError) as info:
            await backend.call("DetectFaces", {}, {"Image": ImageInput(bucket="b", key="k.jpg")})
        assert info.value.code == "InvalidParameterException"
        assert "bytes" in info.value.message

    asyncio.run(run())


def test_availability_and_supported_operations() -> None:
    assert local_backend_available() is None
    assert set(LOCAL_SUPPORTED_OPERATIONS) == {
        "detect_faces",
        "compare_faces",
        "search_faces",
        "index_faces",
    }
    assert FACE_MODEL_VERSION == local_faces.FACE_MODEL_VERSION


def test_collection_round_trip(backend: LocalBackend, tmp_path: Path) -> None:
    indexed = [name for name in IMAGES if name != REFERENCE]

    async def run() -> None:
        created = await backend.call("CreateCollection", {"CollectionId": "wheres-ric"}, {})
        assert created["StatusCode"] == 200
        with pytest.raises(BackendError) as info:
            await backend.call("CreateCollection", {"CollectionId": "wheres-ric"}, {})
        assert info.value.code == "ResourceAlreadyExistsException"

        results = await asyncio.gather(
            *(
                backend.call(
                    "IndexFaces",
                    {"CollectionId": "wheres-ric", "ExternalImageId": name, "MaxFaces": 10},
                    _img(_data(name)),
                )
                for name in indexed
            )
        )
        records = {
            name: result["FaceRecords"] for name, result in zip(indexed, results, strict=True)
        }
        assert len(records["ric.jpg"]) == 1
        assert len(records["ric_crowd1.jpg"]) == 5
        # The crowd's faces are mostly too small or soft to recognise: left out with
        # Rekognition's quality-filter reasons, never indexed.
        crowd = dict(zip(indexed, results, strict=True))["ric_crowd0.jpg"]
        reasons = {r for face in crowd["UnindexedFaces"] for r in face["Reasons"]}
        assert "SMALL_BOUNDING_BOX" in reasons and reasons <= {
            "SMALL_BOUNDING_BOX",
            "LOW_SHARPNESS",
            "EXCEEDS_MAX_FACES",
        }
        assert len(records["ric_crowd0.jpg"]) <= 10
        face_ids = {r["Face"]["FaceId"] for rs in records.values() for r in rs}
        assert len(face_ids) == sum(len(rs) for rs in records.values())

        listed = await backend.call("ListFaces", {"CollectionId": "wheres-ric"}, {})
        assert {f["FaceId"] for f in listed["Faces"]} == face_ids

        search = await backend.call(
            "SearchFacesByImage",
            {"CollectionId": "wheres-ric", "FaceMatchThreshold": 80.0, "MaxFaces": 10},
            _img(_data(REFERENCE)),
        )
        found = {m["Face"]["ExternalImageId"] for m in search["FaceMatches"]}
        assert found == {"ric.jpg", "ric_crowd1.jpg"}
        assert all(m["Similarity"] >= 80.0 for m in search["FaceMatches"])
        assert 0.0 < search["SearchedFaceBoundingBox"]["Width"] <= 1.0

        ric_face = records["ric.jpg"][0]["Face"]["FaceId"]
        by_id = await backend.call(
            "SearchFaces", {"CollectionId": "wheres-ric", "FaceId": ric_face}, {}
        )
        assert by_id["SearchedFaceId"] == ric_face
        assert {m["Face"]["ExternalImageId"] for m in by_id["FaceMatches"]} == {"ric_crowd1.jpg"}

        # Persisted: a fresh backend on the same directory sees the same faces.
        again = LocalBackend(backend_dir)
        listed_again = await again.call("ListFaces", {"CollectionId": "wheres-ric"}, {})
        assert {f["FaceId"] for f in listed_again["Faces"]} == face_ids
        await again.aclose()

        await backend.call("DeleteCollection", {"CollectionId": "wheres-ric"}, {})
        with pytest.raises(BackendError) as info:
            await backend.call("ListFaces", {"CollectionId": "wheres-ric"}, {})
        assert info.value.code == "ResourceNotFoundException"

        with pytest.raises(BackendError) as info:
            await backend.call("CreateCollection", {"CollectionId": "../escape"}, {})
        assert info.value.code == "InvalidParameterException"

    backend_dir = backend.collections_dir
    asyncio.run(run())
