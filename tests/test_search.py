"""Where's Ric: answers, several people, strategies, deduplication, reference checks."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rekbatch.config import SearchFacesOp
from rekbatch.operations.search_faces import (
    choose_strategy,
    decode_external_image_id,
    external_image_id,
    strategy_calls,
)
from tests.conftest import SAMPLES, make_bucket
from tests.helpers import (
    fake_jpeg,
    invoke,
    read_csv,
    read_jsonl,
    sample_people,
    sha256,
    upload_samples,
    write_config,
)
from tests.support.configs import job_config
from tests.support.fake_rekognition import FakeRekognition
from tests.support.servers import StartFake

EXTERNAL_ID = re.compile(r"^[a-zA-Z0-9_.\-:]+$")


@pytest.mark.parametrize(
    "key",
    [
        "plain.jpg",
        "team photos/ric at the desk (2).jpg",
        "ünïcødé/カメラ+1%2F.jpeg",
        "colon:and:hash#.png",
        "a" * 300 + ".jpg",
    ],
)
def test_external_image_ids_are_valid_and_reversible(key: str) -> None:
    external = external_image_id("my-bucket", key)
    assert EXTERNAL_ID.match(external)
    assert len(external) <= 255
    decoded = decode_external_image_id(external)
    if len(key) < 200:
        assert decoded == ("my-bucket", key)
    else:
        assert decoded is None  # hashed: the ledger maps it back
    assert decode_external_image_id(external_image_id(None, key[:50])) == (None, key[:50])


def test_auto_strategy_picks_fewer_calls() -> None:
    one = SearchFacesOp(type="search_faces", people={"ric": ["s3://bkt/r.jpg"]})
    two = SearchFacesOp(type="search_faces", people={"ric": ["s3://bkt/r.jpg"], "al": ["a.jpg"]})
    assert choose_strategy(one) == "compare"
    assert choose_strategy(two) == "collection"
    forced = SearchFacesOp(type="search_faces", people=two.people, strategy="compare")
    assert choose_strategy(forced) == "compare"
    assert strategy_calls(1000, 3) == {"compare": 3000, "collection": 1005}


def _people_for_samples() -> dict[str, list[str]]:
    """The shipped identities, with the guitarist of two samples cast as Andrew."""
    people = sample_people()
    people[sha256((SAMPLES / "sample-image0.jpeg").read_bytes())] = ["andrew"]
    people[sha256((SAMPLES / "demo0.png").read_bytes())] = ["andrew", "e"]
    return people


def _run(tmp_path: Path, moto: str, fake: FakeRekognition, uris: list[str], ops: str) -> Any:
    config = write_config(
        tmp_path / "job.toml",
        job_config(
            uris=uris,
            output_dir=tmp_path / "out",
            s3_endpoint=moto,
            rek_endpoint=fake.url,
            operations=ops,
        ),
    )
    return invoke("run", str(config))


def test_compare_faces_answer_and_reference_checked_once(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    upload_samples(s3, "ric-one")
    fake = start_fake(people=_people_for_samples())
    ops = '[[operations]]\ntype = "compare_faces"\nreference = "s3://ric-one/ric_harvey.jpeg"\n'
    result = _run(tmp_path, moto_endpoint, fake, ["s3://ric-one/"], ops)
    assert result.exit_code == 0, result.stderr
    assert "compare_faces: reference face found in 3 of 7 images" in result.stdout
    answer = json.loads((tmp_path / "out" / "summary.json").read_text())["compare_faces"]
    assert answer["faces"] == 1 and answer["face_used"]
    assert {m["key"]: m["similarity"] >= 95 for m in answer["matches"]} == {
        "ric.jpg": True,
        "ric_crowd1.jpg": True,
        "ric_harvey.jpeg": True,
    }
    # The group selfie's match box is the second face, not the first.
    crowd = next(m for m in answer["matches"] if m["key"] == "ric_crowd1.jpg")
    assert set(crowd["bounding_box"]) == {"Left", "Top", "Width", "Height"}
    stats = fake.stats()
    assert stats["ok"]["DetectFaces"] == 1  # the reference check, once
    assert stats["ok"]["CompareFaces"] == 7  # non-images were never compared


def test_reference_without_a_face_stops_before_any_image_is_paid(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    upload_samples(s3, "ric-noface")
    people = {sha256((SAMPLES / "ric_harvey.jpeg").read_bytes()): []}
    fake = start_fake(people=people)
    ops = '[[operations]]\ntype = "compare_faces"\nreference = "s3://ric-noface/ric_harvey.jpeg"\n'
    result = _run(tmp_path, moto_endpoint, fake, ["s3://ric-noface/"], ops)
    assert result.exit_code == 2
    assert "no face found in s3://ric-noface/ric_harvey.jpeg" in result.stderr
    assert "CompareFaces" not in fake.stats()["calls"]

    missing = ops.replace("ric_harvey.jpeg", "nobody.jpeg")
    result = _run(tmp_path, moto_endpoint, fake, ["s3://ric-noface/"], missing)
    assert result.exit_code == 2
    assert "nobody.jpeg" in result.stderr and "not found" in result.stderr


def _awkward_ric_copies(s3: Any, bucket: str) -> dict[str, list[str]]:
    """Distinct images of Ric under keys that need ExternalImageId mapping."""
    people = _people_for_samples()
    for i, key in enumerate(["team photos/ric at the desk (2).jpg", "ünï/ric+1%.jpg"]):
        body = fake_jpeg(500 + i)
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        people[sha256(body)] = ["ric"]
    return people


@pytest.mark.parametrize("strategy", ["auto", "compare"])
def test_several_people_by_either_strategy(
    s3: Any, moto_endpoint: str, tmp_path: Path, strategy: str, start_fake: StartFake
) -> None:
    bucket = f"people-{strategy}"
    upload_samples(s3, bucket)
    people = _awkward_ric_copies(s3, bucket)
    refs = tmp_path / "refs"
    refs.mkdir()
    andrew = fake_jpeg(4242)
    (refs / "andrew.jpg").write_bytes(andrew)
    people[sha256(andrew)] = ["andrew"]
    fake = start_fake(people=people)
    ops = (
        '[[operations]]\ntype = "search_faces"\n'
        f'people = {{ ric = ["s3://{bucket}/ric_harvey.jpeg"], '
        f'andrew = ["{refs / "andrew.jpg"}"] }}\n'
        f'strategy = "{strategy}"\ncollection_id = "wheres-ric-{strategy}"\n'
    )
    result = _run(tmp_path, moto_endpoint, fake, [f"s3://{bucket}/"], ops)
    assert result.exit_code == 0, result.stderr
    assert "search_faces: ric found in 5 of 9 images" in result.stdout
    assert "search_faces: andrew found in 2 of 9 images" in result.stdout
    answer = json.loads((tmp_path / "out" / "summary.json").read_text())["search_faces"]
    ric = set(answer["people"]["ric"]["matched_keys"])
    assert ric == {
        "ric_harvey.jpeg",
        "ric.jpg",
        "ric_crowd1.jpg",
        "team photos/ric at the desk (2).jpg",
        "ünï/ric+1%.jpg",
    }
    assert set(answer["people"]["andrew"]["matched_keys"]) == {
        "sample-image0.jpeg",
        "demo0.png",
    }
    calls = fake.stats()["ok"]
    if strategy == "auto":
        assert answer["strategy"] == "collection"
        assert calls["IndexFaces"] == 9
        assert calls["SearchFacesByImage"] == 2
        assert calls["CreateCollection"] == 1 and calls["DeleteCollection"] == 1
        assert "CompareFaces" not in calls
    else:
        assert answer["strategy"] == "compare"
        assert calls["CompareFaces"] == 9 * 2
        assert "IndexFaces" not in calls
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert Counter(r["status"] for r in rows) == {"ok": 9, "skipped": 2}


def test_same_content_is_called_once_and_copies_recorded_with_dedup_of(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    bucket = make_bucket(s3, "dedup-bucket")
    original = fake_jpeg(1)
    for key in ("a/original.jpg", "b/copy.jpg", "c/another copy.jpg"):
        s3.put_object(Bucket=bucket, Key=key, Body=original)
    s3.put_object(Bucket=bucket, Key="d/different.jpg", Body=fake_jpeg(2))
    fake = start_fake()
    ops = '[[operations]]\ntype = "detect_faces"\n\n[[operations]]\ntype = "detect_labels"\n'
    result = _run(tmp_path, moto_endpoint, fake, [f"s3://{bucket}/"], ops)
    assert result.exit_code == 0, result.stderr
    assert fake.stats()["ok"] == {"DetectFaces": 2, "DetectLabels": 2}
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    copies = [r for r in rows if r.get("dedup_of")]
    assert len(copies) == 4
    assert {r["dedup_of"] for r in copies} == {f"s3://{bucket}/a/original.jpg"}
    by_key = {(r["key"], r["operation"]): r for r in rows}
    assert (
        by_key[("b/copy.jpg", "detect_faces")]["result"]
        == by_key[("a/original.jpg", "detect_faces")]["result"]
    )
    csv_copies = [r for r in read_csv(tmp_path / "out" / "results.csv") if r["dedup_of"]]
    assert len(csv_copies) == 4
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["calls"]["total"] == 4
