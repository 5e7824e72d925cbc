"""End to end through the CLI: moto S3 over HTTP, the project's fake Rekognition over HTTP."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_bucket
from tests.helpers import (
    fake_jpeg,
    invoke,
    read_csv,
    read_jsonl,
    sample_people,
    tiny_png,
    upload_samples,
    write_config,
)
from tests.support.configs import job_config
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import put_objects
from tests.support.servers import ServedJob, StartFake

OPS = (
    '[[operations]]\ntype = "detect_faces"\nattributes = ["ALL"]\n\n'
    '[[operations]]\ntype = "detect_labels"\nmax_labels = 5\n'
)


def _expected_bucket(s3: Any, bucket: str) -> dict[str, str | None]:
    """Fill a bucket with a mix of objects; return key -> expected skip reason (None: ok)."""
    expected: dict[str, str | None] = {}

    def put(key: str, body: bytes, reason: str | None) -> None:
        put_objects(bucket, [(key, body)])  # in-process: an HTTP put costs ~15 ms
        expected[key] = reason

    for i in range(220):
        put(f"photos/{i:04d}.jpg", fake_jpeg(i), None)
    for i in range(30):
        put(f"png/{i:03d}.png", tiny_png(i), None)
    awkward = [
        "odd keys/with space.jpg",
        "odd keys/ünïcødé-カメラ.jpeg",
        "odd keys/a+b.jpg",
        "odd keys/100%.jpg",
        "odd keys/%2F-not-a-slash.jpg",
        "odd keys/UPPER.JPG",
    ]
    for i, key in enumerate(awkward):
        put(key, fake_jpeg(1000 + i), None)
    for i in range(20):
        put(f"docs/readme-{i}.txt", b"plain text", "excluded")
    put("docs/data.csv", b"a,b\n1,2\n", "excluded")
    put(
        "fake/text-named.jpg",
        b"this is text that pretends to be a picture, really. " * 4,
        "not_image",
    )
    put("fake/gif-named.png", b"GIF89a" + b"\x00" * 200, "not_image")
    put("fake/empty.jpg", b"", "empty")
    put("fake/tiny.jpg", b"\xff\xd8\xff", "too_small")
    put("big/16mb.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * (16 * 1024 * 1024), "too_large")
    return expected


def test_mixed_bucket_every_object_times_every_operation_once(
    s3: Any,
    fake: FakeRekognition,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    served_job: ServedJob,
) -> None:
    # The skip reasons without conversion (test_formats.py converts): a 16 MB JPEG is
    # too_large, a GIF not_image.
    monkeypatch.setenv("REKBATCH_SOURCE__CONVERT", "false")
    bucket = make_bucket(s3, "mixed-bucket")
    expected = _expected_bucket(s3, bucket)
    out = tmp_path / "out"
    config = served_job(
        fake,
        f"s3://{bucket}/",
        operations=OPS,
        extra="[limits]\nconcurrency = 16\nmax_tps = 1000\n",
    )
    result = invoke("run", str(config), "--log-format", "json")
    assert result.exit_code == 0, result.stderr

    rows = read_jsonl(out / "results.jsonl")
    csv_rows = read_csv(out / "results.csv")
    pairs = Counter((r["key"], r["operation"]) for r in rows)
    assert set(pairs) == {(k, op) for k in expected for op in ("detect_faces", "detect_labels")}
    assert set(pairs.values()) == {1}
    assert Counter((r["key"], r["operation"]) for r in csv_rows) == pairs

    for row in rows:
        reason = expected[row["key"]]
        if reason is None:
            assert row["status"] == "ok", row
            assert row["result"] is not None and "ResponseMetadata" not in row["result"]
            assert row["attempts"] >= 1
        else:
            assert (row["status"], row["reason"]) == ("skipped", reason), row
            assert row["result"] is None
        assert row["bucket"] == bucket
        assert row["processed_at"].endswith("Z")

    by_key = {(r["key"], r["operation"]): r for r in csv_rows}
    for row in rows:
        flat = by_key[(row["key"], row["operation"])]
        assert flat["status"] == row["status"]
        if row["status"] == "ok" and row["operation"] == "detect_faces":
            assert int(flat["face_count"]) == len(row["result"]["FaceDetails"])
            assert json.loads(flat["result_json"]) == row["result"]

    summary = json.loads((out / "summary.json").read_text())
    images = sum(1 for r in expected.values() if r is None)
    assert summary["counts"]["by_status"]["ok"] == images * 2
    assert summary["counts"]["by_reason"]["excluded"] == 21 * 2
    stats = fake.stats()
    # Nothing skipped was sent; every image was sent once per operation.
    assert stats["ok"]["DetectFaces"] == images
    assert stats["ok"]["DetectLabels"] == images
    assert sum(stats["billed"].values()) == images * 2


def test_files_load_in_duckdb(
    s3: Any, fake: FakeRekognition, tmp_path: Path, served_job: ServedJob
) -> None:
    duckdb = pytest.importorskip("duckdb")
    bucket = make_bucket(s3, "duck-bucket")
    for i in range(12):
        s3.put_object(Bucket=bucket, Key=f"p/{i}.jpg", Body=fake_jpeg(i))
    s3.put_object(Bucket=bucket, Key="p/bad.jpg", Body=b"not an image at all, only words. " * 4)
    out = tmp_path / "out"
    config = served_job(fake, f"s3://{bucket}/p/", operations=OPS)
    assert invoke("run", str(config)).exit_code == 0
    con = duckdb.connect()
    jsonl = str(out / "results.jsonl")
    count = con.execute(f"SELECT count(*) FROM read_json_auto('{jsonl}')").fetchone()
    assert count == (26,)
    by_status = dict(
        con.execute(
            f"SELECT status, count(*) FROM read_csv_auto('{out / 'results.csv'}') GROUP BY 1"
        ).fetchall()
    )
    assert by_status == {"ok": 24, "skipped": 2}


def test_wheres_ric_samples_answer(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    upload_samples(s3, "image-demo-lab")
    shows_ric = {"ric_harvey.jpeg", "ric.jpg", "ric_crowd1.jpg"}
    server = start_fake(people=sample_people())
    out = tmp_path / "ric"
    ops = (
        '[[operations]]\ntype = "compare_faces"\n'
        'reference = "s3://image-demo-lab/ric_harvey.jpeg"\nsimilarity_threshold = 80\n'
    )
    config = write_config(
        tmp_path / "ric.toml",
        job_config(
            uris=["s3://image-demo-lab/"],
            output_dir=out,
            s3_endpoint=moto_endpoint,
            rek_endpoint=server.url,
            operations=ops,
        ),
    )
    result = invoke("run", str(config))
    assert result.exit_code == 0, result.stderr
    assert "compare_faces: reference face found in 3 of 7 images" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    answer = summary["compare_faces"]
    assert answer["images_compared"] == 7
    assert sorted(answer["matched_keys"]) == sorted(shows_ric)
    assert all(m["similarity"] >= 80 and m["bounding_box"] for m in answer["matches"])
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert rows["notes.txt"]["reason"] == "excluded"
    assert rows["broken.jpg"]["reason"] == "not_image"
    # The reference was read once and sent as bytes, never fetched per call.
    calls = server.stats()["ok"]
    assert calls["CompareFaces"] == 7


def test_local_folder_source_with_bytes(
    fake: FakeRekognition, tmp_path: Path, served_job: ServedJob
) -> None:
    folder = tmp_path / "photos"
    (folder / "sub dir").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(fake_jpeg(1))
    (folder / "sub dir" / "b.png").write_bytes(tiny_png(2))
    (folder / "c.jpg").write_bytes(b"words, not a picture, no magic here. " * 4)
    (folder / "d.txt").write_text("hello")
    out = tmp_path / "out"
    config = served_job(fake, str(folder))
    result = invoke("run", str(config))
    assert result.exit_code == 0, result.stderr
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert set(rows) == {"a.jpg", "sub dir/b.png", "c.jpg", "d.txt"}
    assert rows["a.jpg"]["status"] == "ok" and rows["a.jpg"]["bucket"] is None
    assert rows["sub dir/b.png"]["status"] == "ok"
    assert rows["c.jpg"]["reason"] == "not_image"
    assert rows["d.txt"]["reason"] == "excluded"
    billed = fake.stats()["billed"]
    assert billed and all(ident.startswith("sha256:") for _, ident in billed)


def test_permanent_errors_are_recorded_with_exit_3(
    s3: Any, fake: FakeRekognition, tmp_path: Path, served_job: ServedJob
) -> None:
    bucket = make_bucket(s3, "sniffless")
    s3.put_object(Bucket=bucket, Key="good.jpg", Body=fake_jpeg(5))
    s3.put_object(
        Bucket=bucket, Key="liar.jpg", Body=b"plain words, no image magic bytes here. " * 4
    )
    out = tmp_path / "out"
    config = served_job(fake, f"s3://{bucket}/", source={"sniff": False})
    result = invoke("run", str(config))
    assert result.exit_code == 3, result.stderr
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert rows["good.jpg"]["status"] == "ok"
    assert rows["liar.jpg"]["status"] == "failed"
    assert rows["liar.jpg"]["error_code"] == "InvalidImageFormatException"
    assert rows["liar.jpg"]["attempts"] == 1


def test_unknown_bucket_is_one_line_exit_2(
    fake: FakeRekognition, tmp_path: Path, served_job: ServedJob
) -> None:
    config = served_job(fake, "s3://no-such-bucket-here/")
    result = invoke("run", str(config))
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no-such-bucket-here" in result.stderr and "not found" in result.stderr


def test_missing_credentials_is_one_line_exit_2(
    fake: FakeRekognition,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    served_job: ServedJob,
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    config = served_job(fake, "s3://any-bucket/")
    result = invoke("run", str(config))
    assert result.exit_code == 2
    assert "credentials" in result.stderr
    assert "Traceback" not in result.stderr
