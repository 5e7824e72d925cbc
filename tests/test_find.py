"""Index once, find anyone: ``index_faces`` then ``rekbatch find``, with AWS (the fake) and
offline (the samples)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAMPLES, make_bucket
from tests.helpers import (
    fake_jpeg,
    invoke,
    read_csv,
    read_jsonl,
    sha256,
    write_config,
)
from tests.support.clients import aws_client
from tests.support.configs import job_config
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import put_objects
from tests.support.servers import StartFake

PEOPLE = ("ric", "al", "zed")  # zed is in no photo


def _photos(first: int, count: int) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    """``count`` photos from number ``first``: keys, bodies and who the fake sees in each
    (ric in every 7th, al in every 11th; the rest 0-3 strangers)."""
    bodies: dict[str, bytes] = {}
    people: dict[str, list[str]] = {}
    for i in range(first, first + count):
        body = fake_jpeg(i)
        key = f"photos/{i:04d}.jpg"
        bodies[key] = body
        who = (["ric"] if i % 7 == 0 else []) + (["al"] if i % 11 == 0 else [])
        if who:
            people[sha256(body)] = [*who, f"stranger-{i}"]
    return bodies, people


def _references(folder: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    people: dict[str, list[str]] = {}
    for n, name in enumerate(PEOPLE):
        body = fake_jpeg(90_000 + n)
        paths[name] = folder / f"{name}.jpg"
        paths[name].write_bytes(body)
        people[sha256(body)] = [name]
    return paths, people


def _truth(bodies: dict[str, bytes], people: dict[str, list[str]], name: str) -> set[str]:
    return {key for key, body in bodies.items() if name in people.get(sha256(body), [])}


def _config(tmp_path: Path, moto: str, fake: FakeRekognition, bucket: str, extra: str = "") -> Path:
    ops = '[[operations]]\ntype = "index_faces"\ncollection_id = "find-test"\n'
    text = job_config(
        uris=[f"s3://{bucket}/"],
        output_dir=tmp_path / "out",
        s3_endpoint=moto,
        rek_endpoint=fake.url,
        operations=ops,
        extra=extra,
        # No header reads: the fake reads the objects itself, and the tests stay quick.
        source={"sniff": False},
    )
    return write_config(tmp_path / "job.toml", text)


def _find(out: Path, refs: dict[str, Path], *names: str) -> Any:
    args = [arg for name in names for arg in ("--person", f"{name}={refs[name]}")]
    return invoke("find", str(out), *args)


def _found(out: Path, name: str) -> list[dict[str, Any]]:
    return read_jsonl(out / "find" / f"{name}.jsonl")


def _faces_in(fake: FakeRekognition, collections: list[str]) -> int:
    client = aws_client("rekognition", fake.url)
    return sum(client.describe_collection(CollectionId=c)["FaceCount"] for c in collections)


def test_find_answers_from_the_collection_alone(
    s3: Any,
    moto_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    start_fake: StartFake,
) -> None:
    """300 photos (and two copies) indexed into collection shards of about 100 faces; with
    every photo then deleted, find answers each person with one SearchFacesByImage per
    shard, and nothing else: no indexing, no compare, no photo read."""
    monkeypatch.setattr("rekbatch.operations.index_faces.SHARD_FACES", 100)
    bucket = make_bucket(s3, "find-all")
    bodies, people = _photos(0, 300)
    bodies["copies/ric.jpg"] = bodies["photos/0007.jpg"]
    bodies["copies/plain.jpg"] = bodies["photos/0001.jpg"]
    put_objects(bucket, bodies.items())
    refs, ref_people = _references(tmp_path / "refs")
    fake = start_fake(people={**people, **ref_people})
    result = invoke("run", str(_config(tmp_path, moto_endpoint, fake, bucket)))
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())["index_faces"]
    shards = list(summary["collection_shards"])
    assert shards[0] == "find-test" and len(shards) >= 3
    calls = fake.stats()["ok"]
    assert calls["IndexFaces"] == 300  # the copies were not indexed again
    assert calls["CreateCollection"] == len(shards)
    assert summary["images_indexed"] == 302
    assert summary["faces_indexed"] == _faces_in(fake, shards)
    assert f"index_faces: {summary['faces_indexed']} faces of 302 images" in result.stdout

    s3.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": key} for key in bodies]}
    )  # the photos are gone: find must not need them
    fake.reset_stats()
    result = _find(out, refs, *PEOPLE)
    assert result.exit_code == 0, result.stderr
    stats = fake.stats()
    assert stats["calls"] == {"SearchFacesByImage": len(PEOPLE) * len(shards)}
    searches = len(PEOPLE) * len(shards)
    assert f"cost: {searches} SearchFacesByImage, ${searches / 1000:.4f}" in result.stdout
    assert stats["s3_reads"] == {}
    assert all(ident.startswith("sha256:") for _, ident in stats["billed"])

    for name in PEOPLE:
        truth = _truth(bodies, people, name)
        assert f"{name}: found in {len(truth)} of 302 images" in result.stdout
        rows = _found(out, name)
        assert {r["key"] for r in rows} == truth
        assert all(r["bucket"] == bucket and r["similarity"] >= 80 for r in rows)
        assert all(r["source"] == f"s3://{bucket}/" for r in rows)
    assert "copies/ric.jpg" in {r["key"] for r in _found(out, "ric")}
    assert not _found(out, "zed")
    # faces.parquet names every indexed face: a find joins back to photos by its FaceId.
    import pyarrow.parquet as pq

    faces = pq.read_table(out / "faces.parquet").to_pylist()
    indexed = {f["face_id"]: f["key"] for f in faces if f["operation"] == "index_faces"}
    for row in _found(out, "ric"):
        assert indexed[row["face_id"]] in {row["key"], "photos/0007.jpg"}
    twin = pq.read_table(out / "find" / "ric.parquet").to_pylist()
    assert {r["key"] for r in twin} == _truth(bodies, people, "ric")
    found = json.loads((out / "find" / "summary.json").read_text())["people"]
    assert found["ric"]["images_matched"] == len(_truth(bodies, people, "ric"))
    assert found["zed"]["images_matched"] == 0


def test_a_second_run_indexes_only_new_photos_and_find_sees_them(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    bucket = make_bucket(s3, "find-more")
    bodies, people = _photos(0, 40)
    put_objects(bucket, bodies.items())
    refs, ref_people = _references(tmp_path / "refs")
    new_bodies, new_people = _photos(40, 15)
    fake = start_fake(people={**people, **new_people, **ref_people})
    job = _config(tmp_path, moto_endpoint, fake, bucket)
    assert invoke("run", str(job)).exit_code == 0
    out = tmp_path / "out"
    assert _find(out, refs, "ric").exit_code == 0
    assert {r["key"] for r in _found(out, "ric")} == _truth(bodies, people, "ric")

    put_objects(bucket, new_bodies.items())
    fake.reset_stats()
    result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    assert fake.stats()["ok"].get("IndexFaces") == 15  # the 40 old ones stay as they are
    summary = json.loads((out / "summary.json").read_text())["index_faces"]
    assert summary["faces_indexed"] == _faces_in(fake, list(summary["collection_shards"]))
    result = _find(out, refs, "ric", "al")
    assert result.exit_code == 0, result.stderr
    everything = {**bodies, **new_bodies}
    both = {**people, **new_people}
    for name in ("ric", "al"):
        assert {r["key"] for r in _found(out, name)} == _truth(everything, both, name)
        assert f"{name}: found in {len(_truth(everything, both, name))} of 55 images" in (
            result.stdout
        )
    rows = read_jsonl(out / "results.jsonl")
    assert Counter((r["key"], r["operation"]) for r in rows) == {
        (key, "index_faces"): 1 for key in everything
    }


def test_find_over_merged_shards(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    """Two shards index into collections of their own; find merges the job and searches
    every shard's collection."""
    bucket = make_bucket(s3, "find-shards")
    bodies, people = _photos(0, 60)
    put_objects(bucket, bodies.items())
    refs, ref_people = _references(tmp_path / "refs")
    fake = start_fake(people={**people, **ref_people})
    job = _config(tmp_path, moto_endpoint, fake, bucket)
    for shard in ("0/2", "1/2"):
        result = invoke("run", str(job), "--shard", shard)
        assert result.exit_code == 0, result.stderr
    fake.reset_stats()
    out = tmp_path / "out"
    result = _find(out, refs, "ric", "al")
    assert result.exit_code == 0, result.stderr
    collections = json.loads((out / "summary.json").read_text())["index_faces"]
    names = set(collections["collection_shards"])
    assert names == {"find-test-shard-0000-of-0002", "find-test-shard-0001-of-0002"}
    assert fake.stats()["calls"] == {"SearchFacesByImage": 2 * len(names)}
    for name in ("ric", "al"):
        truth = _truth(bodies, people, name)
        assert {r["key"] for r in _found(out, name)} == truth
        assert f"{name}: found in {len(truth)} of 60 images" in result.stdout


def test_failed_indexing_is_retried_and_then_found(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    """IndexFaces failing for some photos: they are recorded failed (exit 3) and find does
    not see them; ``resume --retry-failed`` indexes them once, and find sees them."""
    bucket = make_bucket(s3, "find-retry")
    bodies, people = _photos(0, 30)
    put_objects(bucket, bodies.items())
    refs, ref_people = _references(tmp_path / "refs")
    failing = {n: "error" for n in (3, 8, 9, 15, 22)}  # call numbers (CreateCollection is 1)
    fake = start_fake(people={**people, **ref_people}, fail_calls=failing)
    job = _config(tmp_path, moto_endpoint, fake, bucket, extra="[limits]\nmax_attempts = 1\n")
    assert invoke("run", str(job)).exit_code == 3
    out = tmp_path / "out"
    failed = {r["key"] for r in read_jsonl(out / "results.jsonl") if r["status"] == "failed"}
    assert len(failed) == len(failing)
    result = _find(out, refs, "ric")
    assert "ric: found in" in result.stdout and " of 25 images" in result.stdout
    assert {r["key"] for r in _found(out, "ric")} == _truth(bodies, people, "ric") - failed

    fake.configure(fail_calls={})
    fake.reset_stats()
    result = invoke("resume", str(out), "--retry-failed")
    assert result.exit_code == 0, result.stderr
    assert fake.stats()["ok"]["IndexFaces"] == len(failing)
    assert _find(out, refs, "ric").exit_code == 0
    assert {r["key"] for r in _found(out, "ric")} == _truth(bodies, people, "ric")
    rows = read_jsonl(out / "results.jsonl")
    pairs = Counter((r["key"], r["operation"]) for r in rows)
    assert pairs == {(key, "index_faces"): 1 for key in bodies}
    assert Counter((r["key"], r["operation"]) for r in read_csv(out / "results.csv")) == pairs
    assert all(r["status"] == "ok" for r in rows)


def test_the_ledger_names_each_collection_once(tmp_path: Path) -> None:
    """Collections whose names sort around each other ('-' and '.' sort before '/')."""
    from rekbatch.store.ledger import RECORD_COLUMNS, LedgerDB

    db = LedgerDB(tmp_path / "ledger.sqlite")
    details = ["c/a", "c/b", "c-0001/a", "c.x/a", "c0/z", "cc/a", "c-0001/z", None, "odd"]
    rows = []
    for n, detail in enumerate(details):
        values = dict.fromkeys(RECORD_COLUMNS)
        values.update(
            source=0, key=f"k{n}", operation="index_faces", etag="e", size=1, status="ok",
            attempts=1, billed=1, detail=detail, processed_at="now",
        )  # fmt: skip
        rows.append(tuple(values[c] for c in RECORD_COLUMNS))
    db.commit(rows, {}, {}, {}, [])
    try:
        assert db.collections_of("index_faces") == ["c-0001", "c.x", "c", "c0", "cc"]
        assert db.collections_of("search_faces") == []
        assert db.ok_count("index_faces") == len(details)
    finally:
        db.close()


def test_scan_makes_an_index_faces_job() -> None:
    from rekbatch.commands.scan import parse_op
    from rekbatch.config import IndexFacesOp

    assert parse_op("index_faces") == {"type": "index_faces"}
    named = parse_op("index_faces=event-2026")
    assert named == {"type": "index_faces", "collection_id": "event-2026"}
    assert IndexFacesOp.model_validate(named).collection_id == "event-2026"


def test_find_refuses_what_it_cannot_answer(tmp_path: Path) -> None:
    photo = SAMPLES / "ric.jpg"
    assert invoke("find", str(tmp_path), "--person", f"ric={photo}").exit_code == 2
    for bad in ("ric", "ric=", "../x=" + str(photo), "a b=" + str(photo)):
        result = invoke("find", str(tmp_path), "--person", bad)
        assert result.exit_code == 2 and "--person" in result.stderr
    twice = invoke("find", str(tmp_path), "--person", f"a={photo}", "--person", f"a={photo}")
    assert twice.exit_code == 2 and "given twice" in twice.stderr


# -- offline, on the samples ------------------------------------------------------------------


def test_offline_index_then_find_without_the_photos(tmp_path: Path) -> None:
    """Index the samples but the group selfie: Ric is in 2 of 6 and the selfie's largest
    face (someone else) in none. Add the selfie and run again: only it is indexed. With
    the photos gone, Ric is in exactly ric_harvey.jpeg, ric.jpg and ric_crowd1.jpg."""
    photos = tmp_path / "photos"
    shutil.copytree(SAMPLES, photos, ignore=shutil.ignore_patterns("ric_crowd1.jpg"))
    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(SAMPLES / "ric_harvey.jpeg", refs / "ric.jpeg")
    shutil.copy(SAMPLES / "ric_crowd1.jpg", refs / "stranger.jpg")
    out = tmp_path / "out"
    aside = tmp_path / "aside"

    def index() -> None:
        result = invoke(
            "scan", str(photos), "--op", "index_faces", "--offline", "--output", str(out)
        )
        assert result.exit_code == 0, result.stderr

    def find() -> Any:
        photos.rename(aside)  # find needs the index, not the photos
        try:
            result = invoke(
                "find", str(out),
                "--person", f"ric={refs / 'ric.jpeg'}",
                "--person", f"stranger={refs / 'stranger.jpg'}",
            )  # fmt: skip
        finally:
            aside.rename(photos)
        assert result.exit_code == 0, result.stderr
        return result

    index()
    store = out / ".rekbatch" / "collections" / "rekbatch-index"
    rows_before = (store / "embeddings.f32").stat().st_size
    result = find()
    assert "ric: found in 2 of 6 images" in result.stdout
    assert "stranger: found in 0 of 6 images" in result.stdout
    assert not _found(out, "stranger")

    shutil.copy(SAMPLES / "ric_crowd1.jpg", photos / "ric_crowd1.jpg")
    index()
    rows = read_jsonl(out / "results.jsonl")
    assert Counter((r["key"], r["operation"]) for r in rows) == {
        (p.name, "index_faces"): 1 for p in photos.iterdir()
    }
    crowd = next(r for r in rows if r["key"] == "ric_crowd1.jpg")["result"]
    assert (store / "embeddings.f32").stat().st_size == rows_before + 516 * len(
        crowd["FaceRecords"]
    )
    result = find()
    assert "ric: found in 3 of 7 images" in result.stdout
    assert "stranger: found in 1 of 7 images" in result.stdout
    ric = _found(out, "ric")
    assert {r["key"] for r in ric} == {"ric_harvey.jpeg", "ric.jpg", "ric_crowd1.jpg"}
    assert all(r["similarity"] >= 80 and r["bounding_box"]["Width"] > 0 for r in ric)
    assert {r["key"] for r in _found(out, "stranger")} == {"ric_crowd1.jpg"}
    # The face index names every face with why it was left out, as IndexFaces does.
    faces = [f for r in rows for f in (r["result"] or {}).get("UnindexedFaces", [])]
    assert {reason for f in faces for reason in f["Reasons"]} <= {
        "SMALL_BOUNDING_BOX",
        "LOW_SHARPNESS",
        "EXCEEDS_MAX_FACES",
    }
    assert faces
    report = invoke("report", str(out))
    assert report.exit_code == 0, report.stderr
    page = (out / "report.html").read_text()
    assert "ric" in page and "found in 3 of 7 images" in page


def test_offline_find_over_merged_shards(tmp_path: Path) -> None:
    """Each shard keeps its own stored embeddings; find merges the job and scans them all."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("ric.jpg", "ric_harvey.jpeg", "sample-image1.jpeg"):
        shutil.copy(SAMPLES / name, photos / name)
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "shards"\noutput_dir = "{out}"\n[source]\nuris = ["{photos}"]\n'
        '[backend]\nkind = "local"\n[[operations]]\ntype = "index_faces"\n',
    )
    for shard in ("0/2", "1/2"):
        result = invoke("run", str(config), "--shard", shard)
        assert result.exit_code == 0, result.stderr
    stores = sorted(out.glob("shard-*/.rekbatch/collections/*"))
    assert [s.name for s in stores] == [
        "rekbatch-index-shard-0000-of-0002",
        "rekbatch-index-shard-0001-of-0002",
    ]
    result = invoke("find", str(out), "--person", f"ric={SAMPLES / 'ric_harvey.jpeg'}")
    assert result.exit_code == 0, result.stderr
    assert "ric: found in 2 of 3 images" in result.stdout
    assert {r["key"] for r in _found(out, "ric")} == {"ric.jpg", "ric_harvey.jpeg"}
