"""prefilter = "faces": the offline detector keeps photos with no face from Rekognition."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from tests.helpers import (
    invoke,
    read_jsonl,
    sample_people,
    upload_samples,
    write_config,
)
from tests.support.configs import job_config
from tests.support.fake_rekognition import FakeRekognition
from tests.support.servers import StartFake

SHOWS_RIC = {"ric_harvey.jpeg", "ric.jpg", "ric_crowd1.jpg"}


def _landscape(seed: int) -> bytes:
    """A smooth colour gradient: a photo with nobody in it."""
    image = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
    tint = Image.new("RGB", image.size, (40 * seed % 255, 90, 160))
    buffer = io.BytesIO()
    Image.blend(image, tint, 0.5).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _job(tmp_path: Path, moto_endpoint: str, fake: FakeRekognition, ops: str, bucket: str) -> Path:
    return write_config(
        tmp_path / "job.toml",
        job_config(
            uris=[f"s3://{bucket}/"],
            output_dir=tmp_path / "out",
            s3_endpoint=moto_endpoint,
            rek_endpoint=fake.url,
            operations=ops,
        ),
    )


def test_compare_faces_prefilter_saves_the_photos_without_faces(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    upload_samples(s3, "prefilter-compare")
    for seed in range(3):
        s3.put_object(
            Bucket="prefilter-compare", Key=f"empty/view{seed}.jpg", Body=_landscape(seed)
        )
    # Who is in each sample photo (the fake's own table): the ones with nobody in them, plus
    # the three landscapes, are what the pre-filter should keep from CompareFaces.
    nobody = sum(1 for people in sample_people().values() if not people) + 3
    images = len(sample_people()) + 3
    fake = start_fake(people=sample_people())
    ops = (
        '[[operations]]\ntype = "compare_faces"\n'
        'reference = "s3://prefilter-compare/ric_harvey.jpeg"\nprefilter = "faces"\n'
    )
    result = invoke("run", str(_job(tmp_path, moto_endpoint, fake, ops, "prefilter-compare")))
    assert result.exit_code == 0, result.stderr
    assert fake.stats()["ok"]["CompareFaces"] == images - nobody
    assert (
        f"reference face found in 3 of {images} images "
        f"({nobody} with no face found locally, not sent)" in result.stdout
    )
    rows = {r["key"]: r for r in read_jsonl(tmp_path / "out" / "results.jsonl")}
    no_face = {key for key, row in rows.items() if row["reason"] == "no_face_local"}
    assert len(no_face) == nobody
    assert {f"empty/view{seed}.jpg" for seed in range(3)} <= no_face
    assert all(rows[key]["status"] == "skipped" for key in no_face)
    matched = {key for key, row in rows.items() if (row["result"] or {}).get("FaceMatches")}
    assert matched == SHOWS_RIC


def test_prefilter_applies_only_to_the_operations_that_ask_for_it(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    upload_samples(s3, "prefilter-mixed")
    s3.put_object(Bucket="prefilter-mixed", Key="empty/view.jpg", Body=_landscape(1))
    fake = start_fake(people=sample_people())
    ops = (
        '[[operations]]\ntype = "detect_faces"\nprefilter = "faces"\n\n'
        '[[operations]]\ntype = "detect_labels"\n'
    )
    result = invoke("run", str(_job(tmp_path, moto_endpoint, fake, ops, "prefilter-mixed")))
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    view = {r["operation"]: r for r in rows if r["key"] == "empty/view.jpg"}
    assert view["detect_faces"]["reason"] == "no_face_local"
    assert view["detect_labels"]["status"] == "ok"
    images = len(sample_people()) + 1
    calls = fake.stats()["ok"]
    assert calls["DetectLabels"] == images
    assert calls["DetectFaces"] < images
    skipped = sum(1 for r in rows if r["reason"] == "no_face_local")
    assert calls["DetectFaces"] == images - skipped


def test_prefilter_on_a_detector_failure_sends_the_image(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    """A PNG that sniffs as an image but does not decode: the local detector cannot tell, so
    the image goes to Rekognition (which records its own verdict), not skipped unseen."""
    from tests.conftest import make_bucket

    make_bucket(s3, "prefilter-broken")
    s3.put_object(Bucket="prefilter-broken", Key="cut.png", Body=b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    fake = start_fake()
    ops = '[[operations]]\ntype = "detect_faces"\nprefilter = "faces"\n'
    result = invoke("run", str(_job(tmp_path, moto_endpoint, fake, ops, "prefilter-broken")))
    (row,) = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert row["reason"] != "no_face_local"
    assert fake.stats()["calls"].get("DetectFaces", 0) >= 1, result.stdout


def test_plan_estimates_the_saving_from_a_sample(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    upload_samples(s3, "prefilter-plan")
    for seed in range(3):
        s3.put_object(Bucket="prefilter-plan", Key=f"empty/view{seed}.jpg", Body=_landscape(seed))
    nobody = sum(1 for people in sample_people().values() if not people) + 3
    images = len(sample_people()) + 3
    fake = start_fake(people=sample_people())
    ops = (
        '[[operations]]\ntype = "compare_faces"\n'
        'reference = "s3://prefilter-plan/ric_harvey.jpeg"\nprefilter = "faces"\n'
    )
    config = _job(tmp_path, moto_endpoint, fake, ops, "prefilter-plan")
    result = invoke("plan", str(config), "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    # Fewer images than the sample size: the detector saw every one of them.
    assert plan["prefilter"]["sampled"] == images
    assert plan["prefilter"]["no_face"] == nobody
    assert plan["prefilter"]["calls_saved"] == {"CompareFaces": nobody}
    assert plan["calls_by_api"]["CompareFaces"] == images - nobody
    assert fake.stats()["calls"] == {}  # a plan calls no Rekognition API
    text = invoke("plan", str(config))
    assert f"{nobody} of {images} sampled images have no face found locally" in text.stdout
