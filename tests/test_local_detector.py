"""The offline backend's detector and recogniser on synthetic faces made from the samples.

The reference face (``ric_harvey.jpeg``) is pasted at 30, 40 and 60 px, upright and turned
30 degrees either way, into a large photo of a crowd (``tests/faces_synthetic.py``): each must
be found and recognised (similarity at least 80), and nobody in the crowd mistaken for him.
Also: the numpy ResNet gives dlib's own embeddings, and the pre-filter counts what
DetectFaces reports. Runs in this process (models loaded once), except the backend-level
compare, which goes through a process pool as the engine uses it.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from rekbatch.backends.base import ImageInput
from rekbatch.backends.local.backend import LocalBackend, local_backend_available

_MISSING = local_backend_available()
if _MISSING is not None:
    raise RuntimeError(f"the offline face tests need the local extra: {_MISSING}")

from PIL import Image  # noqa: E402

from rekbatch.backends.local import detector, resnet  # noqa: E402
from rekbatch.backends.local import faces as local_faces  # noqa: E402
from tests import faces_synthetic as synth  # noqa: E402

REFERENCE = synth.REFERENCE.read_bytes()
SIZES = (30.0, 40.0, 60.0)
ANGLES = (-30.0, 0.0, 30.0)
# A large photo at the default detection canvas: 1920x1440 (2.8 MP, more than Full HD).
LARGE = (1920, 1440)


def _compare(backend: LocalBackend, target: bytes) -> Any:
    return backend.call(
        "CompareFaces",
        {"SimilarityThreshold": 0.0},  # every face comes back with its similarity
        {"SourceImage": ImageInput(data=REFERENCE), "TargetImage": ImageInput(data=target)},
    )


@pytest.fixture(scope="module")
def scenes() -> Iterator[dict[float, tuple[tuple[int, int], list[synth.Pasted], Any]]]:
    """Per angle: the 30, 40 and 60 px faces pasted into the large crowd photo, compared with
    the reference through a two-worker pool."""
    built = {angle: synth.scene([(px, angle) for px in SIZES], size=LARGE) for angle in ANGLES}
    backend = LocalBackend(workers=2)

    async def run() -> list[Any]:
        try:
            return await asyncio.gather(
                *(_compare(backend, synth.jpeg(built[a][0])) for a in ANGLES)
            )
        finally:
            await backend.aclose()

    answers = asyncio.run(run())
    yield {
        angle: (LARGE, built[angle][1], answer)
        for angle, answer in zip(ANGLES, answers, strict=True)
    }


def _matches_for(
    pasted: synth.Pasted, answer: dict[str, Any], size: tuple[int, int]
) -> list[dict[str, Any]]:
    return [m for m in answer["FaceMatches"] if synth.found(pasted, m["Face"]["BoundingBox"], size)]


@pytest.mark.parametrize("angle", ANGLES)
def test_pasted_faces_are_found_and_matched(scenes: dict[float, Any], angle: float) -> None:
    size, pasted, answer = scenes[angle]
    for face in pasted:
        matches = _matches_for(face, answer, size)
        assert len(matches) == 1, (face, [m["Similarity"] for m in answer["FaceMatches"]])
        match = matches[0]
        assert match["Similarity"] >= 80.0, (face, match["Similarity"])
        # Pillow turns counter-clockwise: the image-right eye goes up, Roll goes negative.
        assert match["Face"]["Pose"]["Roll"] == pytest.approx(-angle, abs=6.0), face


@pytest.mark.parametrize("angle", ANGLES)
def test_nobody_in_the_crowd_is_taken_for_him(scenes: dict[float, Any], angle: float) -> None:
    size, pasted, answer = scenes[angle]
    others = [
        m
        for m in answer["FaceMatches"]
        if not any(synth.found(p, m["Face"]["BoundingBox"], size) for p in pasted)
    ]
    assert others or answer["UnmatchedFaces"]  # the crowd's faces were looked at
    assert all(m["Similarity"] < 70.0 for m in others), [m["Similarity"] for m in others]


def test_a_larger_canvas_finds_30_px_tilted_faces_in_an_8_mp_photo() -> None:
    """At the default 1 MP canvas the smallest face found in an 8 MP photo is about 46 px;
    ``megapixels=3`` (LocalBackend(detect_megapixels=3)) finds 30 px faces there too."""
    image, pasted = synth.scene([(30.0, 30.0), (30.0, -30.0), (40.0, 0.0)], size=(3264, 2448))
    answer = local_faces.compare_faces(REFERENCE, synth.jpeg(image), 0.0, megapixels=3.0)
    for face in pasted:
        matches = _matches_for(face, answer, image.size)
        assert len(matches) == 1 and matches[0]["Similarity"] >= 80.0, face


@pytest.mark.parametrize("face_px", SIZES)
def test_scaled_crops_of_the_reference_are_matched(face_px: float) -> None:
    """Just the face, at 30, 40 and 60 px and turned both ways, as a small image of its own."""
    for angle in (-30.0, 30.0):
        crop = synth.crop_of_reference(face_px, angle)
        answer = local_faces.compare_faces(REFERENCE, synth.jpeg(crop), 80.0)
        assert len(answer["FaceMatches"]) == 1, (face_px, angle)
        assert answer["FaceMatches"][0]["Similarity"] >= 80.0


def test_numpy_resnet_gives_dlibs_embeddings() -> None:
    """The same network and weights as dlib.face_recognition_model_v1: the descriptors of real
    face chips agree to well under 1e-4 (the same-person distance is 0.6)."""
    import dlib

    models = local_faces._models()
    directory = local_faces.models_dir()
    assert directory is not None
    reference_net = dlib.face_recognition_model_v1(str(directory / local_faces.MODEL_FILES[1]))
    with Image.open(synth.SAMPLES / "ric_crowd1.jpg") as photo:
        rgb = np.asarray(photo.convert("RGB").resize((1632, 1224)))
    chips = []
    for hit in detector.detect(Image.fromarray(rgb), 80.0):
        side = 1.22 * hit.width
        left, top = round(hit.cx - side / 2), round(hit.cy - side / 2 + 0.06 * hit.width)
        rect = dlib.rectangle(left, top, round(left + side), round(top + side))
        shape = models.landmarks(rgb, rect)
        chips.append(dlib.get_face_chip(rgb, shape, resnet.CHIP_SIZE, 0.25))
    assert len(chips) == 5
    ours = models.encoder.descriptors(chips)
    theirs = np.array([np.array(reference_net.compute_face_descriptor(c)) for c in chips])
    assert ours.shape == (5, 128)
    assert float(np.abs(ours - theirs).max()) < 1e-4


def test_the_prefilter_counts_what_detect_faces_reports() -> None:
    for name in ("ric.jpg", "ric_crowd1.jpg", "sample-image0.jpeg", "sample-image1.jpeg"):
        data = (synth.SAMPLES / name).read_bytes()
        found = len(local_faces.detect_faces(data)["FaceDetails"])
        assert local_faces.count_faces(data) == found, name
        assert local_faces.has_face(data) is (found > 0), name
    blank = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 180, 160)).save(blank, "JPEG")
    assert local_faces.count_faces(blank.getvalue()) == 0
    assert local_faces.count_faces((synth.SAMPLES / "ric_crowd1.jpg").read_bytes(), limit=2) == 2


def test_a_face_across_tile_edges_is_found_once() -> None:
    """A large face straddling the canvas's tile edges is dropped by the cut tiles and found
    whole on a coarser level: one face, not several pieces. (A 1 MP canvas is one tile: the
    3 MP one is cut in four.)"""
    with Image.open(synth.REFERENCE) as portrait:
        face = portrait.convert("RGB").crop((560, 500, 1480, 1600)).resize((460, 550))
    image = synth.host((1600, 1200)).copy()
    image.paste(face, (800 - 230, 600 - 300))  # centred where the four tiles meet
    answer = local_faces.detect_faces(synth.jpeg(image), megapixels=3.0)
    centred = [
        d
        for d in answer["FaceDetails"]
        if abs(d["BoundingBox"]["Left"] + d["BoundingBox"]["Width"] / 2 - 0.5) < 0.1
        and abs(d["BoundingBox"]["Top"] + d["BoundingBox"]["Height"] / 2 - 0.5) < 0.15
    ]
    assert len(centred) == 1, [d["BoundingBox"] for d in centred]
    assert centred[0]["BoundingBox"]["Width"] * 1600 > 250


def test_levels_are_cut_to_whole_blocks_only_when_a_few_pixels_over() -> None:
    """yuface pads its input to whole 32-pixel blocks: 1155x866 (the 4:3 canvas of 1 MP) is
    searched as 1152x864, but a level 4 or more pixels over a block keeps them."""
    cut = {1155: 1152, 866: 864, 385: 384, 289: 288, 1152: 1152}
    kept = (1181, 750, 548, 20)
    assert {n: detector._trimmed(n) for n in cut} == cut
    assert [detector._trimmed(n) for n in kept] == list(kept)


def test_the_workers_allocator_keeps_yuface_buffers() -> None:
    """On glibc the face workers keep freed memory (see detector.keep_freed_memory), and a
    1 MP canvas is searched without faulting its buffers in again."""
    import resource
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    local_faces.warm_up()
    assert detector.keep_freed_memory()
    canvas = Image.new("RGB", (1155, 866), (120, 110, 100))
    detector.detect(canvas, 80.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    detector.detect(canvas, 80.0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2000
