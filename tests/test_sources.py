"""S3 Inventory reports and key lists as sources, against moto."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest

from rekbatch.config import load_config
from rekbatch.engine import Job, RunOptions
from rekbatch.sources.s3 import S3
from rekbatch.store.jobdir import ledger_path
from tests.conftest import REGION, make_bucket
from tests.helpers import fake_jpeg, invoke, read_jsonl, write_config
from tests.support.fake_backend import FakeBackend
from tests.support.moto import put_objects
from tests.test_engine import make_config

SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag"
CURRENT = [f"photos/{i:03d}.jpg" for i in range(60)] + [
    "odd/with space.jpg",
    "odd/plus+sign.jpg",
    "odd/café ünï.jpg",
    "odd/100%.jpg",
]
GONE = ["photos/deleted-1.jpg", "photos/deleted-2.jpg"]  # only a delete marker is left


def _rows(s3: Any, bucket: str) -> list[dict[str, Any]]:
    """Inventory rows as S3 writes them: current objects, an older version of some, and
    delete markers."""
    rows: list[dict[str, Any]] = []
    for key in CURRENT:
        head = s3.head_object(Bucket=bucket, Key=key)
        base = {"bucket": bucket, "key": key, "size": head["ContentLength"]}
        base["last_modified_date"] = "2026-11-30T10:00:00.000Z"
        rows.append(
            {
                **base,
                "version_id": "v2",
                "is_latest": True,
                "is_delete_marker": False,
                "e_tag": head["ETag"].strip('"'),
            }
        )
        if key.endswith(("0.jpg", "space.jpg")):
            rows.append(
                {
                    **base,
                    "version_id": "v1",
                    "is_latest": False,
                    "is_delete_marker": False,
                    "e_tag": "0" * 32,
                }
            )
    for key in GONE:
        rows.append(
            {
                "bucket": bucket,
                "key": key,
                "size": None,
                "version_id": "v3",
                "is_latest": True,
                "is_delete_marker": True,
                "e_tag": None,
                "last_modified_date": "2026-11-30T10:00:00.000Z",
            }
        )
        rows.append(
            {
                "bucket": bucket,
                "key": key,
                "size": 600,
                "version_id": "v2",
                "is_latest": False,
                "is_delete_marker": False,
                "e_tag": "1" * 32,
                "last_modified_date": "2026-11-29T10:00:00.000Z",
            }
        )
    return rows


def _csv_gz(rows: list[dict[str, Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL)
    for r in rows:
        writer.writerow(
            [
                r["bucket"],
                quote_plus(r["key"], safe="/"),
                r["version_id"],
                str(r["is_latest"]).lower(),
                str(r["is_delete_marker"]).lower(),
                "" if r["size"] is None else r["size"],
                r["last_modified_date"],
                r["e_tag"] or "",
            ]
        )
    return gzip.compress(text.getvalue().encode())


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def build_inventory(s3: Any, name: str, kind: str) -> str:
    """A source bucket and its inventory report in the real layout; the manifest's URI."""
    source, dest = make_bucket(s3, f"{name}-src"), make_bucket(s3, f"{name}-inv")
    put_objects(source, ((key, fake_jpeg(i)) for i, key in enumerate(CURRENT)))
    rows = _rows(s3, source)
    half = len(rows) // 2
    files = []
    for n, part in enumerate((rows[:half], rows[half:])):
        body = _csv_gz(part) if kind == "CSV" else _parquet(part)
        ext = "csv.gz" if kind == "CSV" else "parquet"
        key = f"{source}/daily/data/part-{n}.{ext}"
        s3.put_object(Bucket=dest, Key=key, Body=body)
        files.append({"key": key, "size": len(body), "MD5checksum": "x"})
    manifest = {
        "sourceBucket": source,
        "destinationBucket": f"arn:aws:s3:::{dest}",
        "version": "2016-11-30",
        "creationTimestamp": "1764547200000",
        "fileFormat": kind,
        "files": files,
    }
    if kind == "CSV":
        manifest["fileSchema"] = SCHEMA
    key = f"{source}/daily/2026-12-01T01-00Z/manifest.json"
    s3.put_object(Bucket=dest, Key=key, Body=json.dumps(manifest).encode())
    return f"inventory:s3://{dest}/{key}"


def _config(tmp_path: Path, uri: str, moto: str, extra: str = "") -> Any:
    aws = f'\n[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{moto}"\n'
    return make_config(
        tmp_path, [uri], ops='[[operations]]\ntype = "detect_labels"\n', extra=extra + aws
    )


async def _run(cfg: Any, tmp_path: Path) -> Any:
    async with asyncio.timeout(60):
        return await Job(cfg, RunOptions(output_dir=tmp_path / "out"), backend=FakeBackend()).run()


@pytest.mark.parametrize("kind", ["CSV", "Parquet"])
async def test_an_inventory_report_runs_exactly_the_current_objects(
    s3: Any, moto_endpoint: str, tmp_path: Path, kind: str
) -> None:
    uri = build_inventory(s3, f"inv-{kind.lower()}", kind)
    cfg = _config(tmp_path, uri, moto_endpoint, "max_images = 40\n")
    first = await _run(cfg, tmp_path)
    assert first.exit_code == 4  # the cap: resumable, per data file
    db = sqlite3.connect(ledger_path(tmp_path / "out"))
    parts = db.execute("SELECT part, watermark, done FROM source_ranges").fetchall()
    db.close()
    assert len(parts) == 2 and all(p.endswith(("csv.gz", "parquet")) for p, _, _ in parts)

    raised = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_images": None})})
    assert (await _run(raised, tmp_path)).exit_code == 0
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted(CURRENT)  # each current object once; no marker, no old one
    from rekbatch.commands.status import job_status

    listing = job_status(tmp_path / "out", now=0.0)["sources"][0]["listing"]
    assert listing["ranges"] == 2 and listing["percent"] == 100.0
    assert all(r["status"] == "ok" and r["bucket"] == f"inv-{kind.lower()}-src" for r in rows)
    by_key = {r["key"]: r for r in rows}
    head = s3.head_object(Bucket=f"inv-{kind.lower()}-src", Key="odd/plus+sign.jpg")
    assert by_key["odd/plus+sign.jpg"]["etag"] == head["ETag"].strip('"')
    assert by_key["odd/plus+sign.jpg"]["size"] == head["ContentLength"]


def test_a_broken_manifest_is_one_line_naming_the_source(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    make_bucket(s3, "inv-broken")
    s3.put_object(Bucket="inv-broken", Key="m/manifest.json", Body=b'{"files": 3}')
    text = (
        f'[job]\noutput_dir = "{tmp_path / "out"}"\n[source]\n'
        'uris = ["inventory:s3://inv-broken/m/manifest.json"]\n'
        f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{moto_endpoint}"\n'
        'rekognition_endpoint_url = "http://127.0.0.1:9"\n'
        '[[operations]]\ntype = "detect_labels"\n'
    )
    result = invoke("run", str(write_config(tmp_path / "job.toml", text)))
    assert result.exit_code == 2
    assert "inventory:s3://inv-broken/m/manifest.json is not an S3 Inventory manifest" in (
        result.stderr
    )
    bad = write_config(tmp_path / "bad.toml", text.replace("manifest.json", "manifest.txt"))
    assert invoke("validate", str(bad)).exit_code == 2


@pytest.mark.parametrize("where", ["local", "s3"])
async def test_a_key_list_with_and_without_sizes_and_etags(
    s3: Any, moto_endpoint: str, tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = make_bucket(s3, f"keys-{where}")
    for i in range(6):
        s3.put_object(Bucket=bucket, Key=f"k/{i}.jpg", Body=fake_jpeg(i))
    etag = s3.head_object(Bucket=bucket, Key="k/0.jpg")["ETag"].strip('"')
    size = s3.head_object(Bucket=bucket, Key="k/0.jpg")["ContentLength"]
    lines = [
        "bucket,key,size,etag",
        f"{bucket},k/0.jpg,{size},{etag}",  # complete: no HeadObject
        f"{bucket},k/1.jpg",
        f"s3://{bucket}/k/2.jpg",
        f"s3://{bucket}/k/3.jpg,{size}",
        "just-one-field",
        f"{bucket},k/4.jpg,not-a-size",
        f"{bucket},k/missing.jpg",
        f"s3://{bucket}/k/5.jpg",
    ]
    body = "\n".join(lines) + "\n"
    if where == "local":
        path = tmp_path / "list.csv"
        path.write_text(body)
        uri = f"keys:{path}"
    else:
        jsonl = [
            json.dumps({"bucket": bucket, "key": "k/0.jpg", "size": size, "etag": etag}),
            json.dumps({"uri": f"s3://{bucket}/k/1.jpg"}),
            json.dumps({"bucket": bucket, "key": "k/2.jpg"}),
            json.dumps({"uri": f"s3://{bucket}/k/3.jpg", "size": size}),
            "[1, 2]",
            json.dumps({"bucket": bucket, "key": "k/4.jpg", "size": "big"}),
            json.dumps({"bucket": bucket, "key": "k/missing.jpg"}),
            json.dumps({"uri": f"s3://{bucket}/k/5.jpg"}),
            "{not json",
        ]
        s3.put_object(Bucket=bucket, Key="lists/batch.jsonl", Body="\n".join(jsonl).encode())
        uri = f"keys:s3://{bucket}/lists/batch.jsonl"
    heads: list[str] = []
    original = S3.head

    async def counting(self: S3, b: str, key: str) -> dict[str, Any]:
        heads.append(key)
        return await original(self, b, key)

    monkeypatch.setattr(S3, "head", counting)
    outcome = await _run(_config(tmp_path, uri, moto_endpoint), tmp_path)
    assert outcome.exit_code == 0
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    ok = sorted(r["key"] for r in rows if r["status"] == "ok")
    assert ok == ["k/0.jpg", "k/1.jpg", "k/2.jpg", "k/3.jpg", "k/5.jpg"]
    skipped = {r["key"]: r for r in rows if r["status"] == "skipped"}
    assert skipped["k/missing.jpg"]["reason"] == "not_found"
    malformed = [r for r in skipped.values() if r["reason"] == "malformed_entry"]
    assert len(malformed) == (2 if where == "local" else 3)
    assert all(r["error_message"] for r in malformed)
    assert all(r["key"].startswith("line:") for r in malformed)
    # Only the lines without a size or an ETag cost a HeadObject.
    assert sorted(heads) == ["k/1.jpg", "k/2.jpg", "k/3.jpg", "k/5.jpg", "k/missing.jpg"]
    # A key list knows its length: the listing's share and rate are in the status.
    from rekbatch.commands.status import job_status, render_status

    report = job_status(tmp_path / "out", now=0.0)
    listing = report["sources"][0]["listing"]
    assert listing["listed"] == 9 - (1 if where == "local" else 0) or listing["listed"] > 0
    assert listing["percent"] == 100.0 and listing["per_second"] > 0
    assert render_status(report)
    with_size = next(r for r in rows if r["key"] == "k/0.jpg")
    assert with_size["etag"] == etag and with_size["size"] == size


@pytest.mark.parametrize("jsonl", [False, True])
async def test_a_key_list_divided_into_runs_of_lines_lists_what_the_whole_list_does(
    tmp_path: Path, jsonl: bool
) -> None:
    """Parts found by reading around each cut only; a malformed line keeps its number in
    the whole list whichever part it falls in."""
    from rekbatch.sources.keylist import KeyListSource

    lines = ["bucket,key"] if not jsonl else []
    for i in range(997):
        if i % 97 == 13:
            lines.append("not a line" if not jsonl else "{broken")
        else:
            key = f"photos/{'x' * (i % 50)}{i}.jpg"
            row = {"bucket": "bkt", "key": key, "size": 10 + i, "etag": f"e{i}"}
            lines.append(",".join(map(str, row.values())) if not jsonl else json.dumps(row))
    path = tmp_path / ("list.jsonl" if jsonl else "list.csv")
    path.write_text("\n".join(lines) + "\n")
    source = KeyListSource(f"keys:{path}", 0, None)  # type: ignore[arg-type]

    async def listed(rng: Any) -> list[tuple[str, str | None]]:
        return [(o.key, o.skip) async for o in source.list_range(rng, None)]

    whole = await listed((await source.split(1))[0])
    parts = await source.divide(4, 16)
    assert [len(p) for p in parts] == [4, 4, 4, 4]
    together = [entry for part in parts for rng in part for entry in await listed(rng)]
    assert together == whole
    malformed = [k for k, skip in whole if skip == "malformed_entry"]
    first = 2 if not jsonl else 1  # the header is line 1 of the CSV
    assert malformed == [f"line:{i + first}" for i in range(997) if i % 97 == 13]


@pytest.mark.parametrize("form", ["csv", "jsonl"])
async def test_a_key_list_takes_keys_as_written_and_a_key_listed_twice_once(
    s3: Any, moto_endpoint: str, tmp_path: Path, form: str
) -> None:
    bucket = make_bucket(s3, f"keys-exact-{form}")
    keys = [" lead.jpg", "trail.jpg ", " both .jpg", "twice.jpg", "plain.jpg"]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=bucket, Key=key, Body=fake_jpeg(i))
    # Spaced twins that must not be taken for them.
    s3.put_object(Bucket=bucket, Key="lead.jpg", Body=fake_jpeg(90))
    size = s3.head_object(Bucket=bucket, Key="twice.jpg")["ContentLength"]
    if form == "csv":
        lines = [
            "bucket,key",
            f"{bucket}, lead.jpg",  # unquoted: the space is the key's
            f'{bucket},"trail.jpg "',
            f"s3://{bucket}/ both .jpg",
            f"{bucket},twice.jpg",
            f"s3://{bucket}/twice.jpg,{size}",  # the same object again, as a URI
            f"s3://{bucket}/plain.jpg",
        ]
    else:
        lines = [
            json.dumps({"bucket": bucket, "key": " lead.jpg"}),
            json.dumps({"uri": f"s3://{bucket}/trail.jpg "}),
            json.dumps({"bucket": bucket, "key": " both .jpg"}),
            json.dumps({"bucket": bucket, "key": "twice.jpg"}),
            json.dumps({"uri": f"s3://{bucket}/twice.jpg", "size": size}),
            json.dumps({"bucket": bucket, "key": "plain.jpg"}),
        ]
    path = tmp_path / f"list.{form}"
    path.write_text("\n".join(lines) + "\n")
    backend = FakeBackend()
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\noutput_dir = "{tmp_path / "out"}"\n'
        f'[source]\nuris = ["keys:{path}"]\ninclude = ["*"]\n'  # "trail.jpg " is no *.jpg
        f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{moto_endpoint}"\n'
        '[[operations]]\ntype = "detect_labels"\n',
    )
    cfg = load_config(config, environ={})
    async with asyncio.timeout(60):
        outcome = await Job(cfg, RunOptions(output_dir=tmp_path / "out"), backend=backend).run()
    assert outcome.exit_code == 0
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert sorted(r["key"] for r in rows) == sorted(keys)
    assert all(r["status"] == "ok" and r.get("dedup_of") is None for r in rows), rows
    assert sum(backend.calls.values()) == len(keys)
    db = sqlite3.connect(ledger_path(tmp_path / "out"))
    try:
        assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == len(keys)
    finally:
        db.close()
