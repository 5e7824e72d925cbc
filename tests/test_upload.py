"""Uploading result files to S3 (a moto server over real HTTP)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioboto3
import pytest

from rekbatch.errors import ConfigError, SetupError
from rekbatch.sinks.upload import TransferSettings, object_key, upload_results
from tests.conftest import REGION, make_bucket

MIB = 1024 * 1024


@pytest.fixture
async def aio_s3(moto_endpoint: str) -> AsyncIterator[Any]:
    session = aioboto3.Session(region_name=REGION)
    async with session.client("s3", endpoint_url=moto_endpoint) as client:
        yield client


def fill(output_dir: Path, *, with_parquet: bool = True) -> dict[str, bytes]:
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "results.jsonl": b'{"key":"a.jpg","status":"ok"}\n{"key":"b.jpg","status":"failed"}\n',
        "results.csv": b"run_id,key\nr1,a.jpg\nr1,b.jpg\n",
        "summary.json": json.dumps({"counts": {"ok": 1}}, indent=2).encode(),
    }
    if with_parquet:
        files["results.parquet"] = b"PAR1" + os.urandom(2048) + b"PAR1"
        files["faces.parquet"] = b"PAR1" + os.urandom(512) + b"PAR1"
        files["labels.parquet"] = b"PAR1" + os.urandom(256) + b"PAR1"
    for name, data in files.items():
        (output_dir / name).write_bytes(data)
    (output_dir / "notes.txt").write_text("not a result file")
    return files


async def fetch(aio_s3: Any, bucket: str, key: str) -> tuple[bytes, dict[str, Any]]:
    response = await aio_s3.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as body:
        data: bytes = await body.read()
    return data, response


def test_object_keys() -> None:
    assert object_key("runs/x/", "results.parquet") == "runs/x/results/results.parquet"
    assert object_key("", "summary.json") == "summary.json"
    checkpoint = object_key("runs/x", "faces.parquet", 3)
    assert checkpoint == "runs/x/parts/part-000003/faces/faces.parquet"
    assert object_key("", "results.jsonl", 12) == "parts/part-000012/results_jsonl/results.jsonl"
    with pytest.raises(ValueError, match="negative"):
        object_key("x", "summary.json", -1)


async def test_files_land_with_the_same_bytes(s3: Any, aio_s3: Any, tmp_path: Path) -> None:
    bucket = make_bucket(s3, "upload-final")
    files = fill(tmp_path)
    uris = await upload_results(aio_s3, tmp_path, f"s3://{bucket}/wheres-ric/")
    assert uris == [
        f"s3://{bucket}/wheres-ric/results/results.parquet",
        f"s3://{bucket}/wheres-ric/faces/faces.parquet",
        f"s3://{bucket}/wheres-ric/labels/labels.parquet",
        f"s3://{bucket}/wheres-ric/results_jsonl/results.jsonl",
        f"s3://{bucket}/wheres-ric/results_csv/results.csv",
        f"s3://{bucket}/wheres-ric/summary.json",
    ]
    for uri in uris:
        key = uri.removeprefix(f"s3://{bucket}/")
        data, response = await fetch(aio_s3, bucket, key)
        assert data == files[key.rsplit("/", 1)[-1]], key
        if key.endswith(".parquet"):
            assert response["ContentType"] == "application/vnd.apache.parquet"
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert len(listed) == len(uris)  # notes.txt stayed home


async def test_checkpoint_parts_and_missing_files(s3: Any, aio_s3: Any, tmp_path: Path) -> None:
    bucket = make_bucket(s3, "upload-parts")
    files = fill(tmp_path, with_parquet=False)
    uris = await upload_results(aio_s3, tmp_path, f"s3://{bucket}/job", part=7)
    assert uris == [
        f"s3://{bucket}/job/parts/part-000007/results_jsonl/results.jsonl",
        f"s3://{bucket}/job/parts/part-000007/results_csv/results.csv",
        f"s3://{bucket}/job/parts/part-000007/summary.json",
    ]
    data, _ = await fetch(aio_s3, bucket, "job/parts/part-000007/results_csv/results.csv")
    assert data == files["results.csv"]


async def test_a_line_being_written_is_left_out(s3: Any, aio_s3: Any, tmp_path: Path) -> None:
    bucket = make_bucket(s3, "upload-torn")
    fill(tmp_path, with_parquet=False)
    whole = b'{"key":"a.jpg"}\n'
    (tmp_path / "results.jsonl").write_bytes(whole + b'{"key":"b.j')
    await upload_results(aio_s3, tmp_path, f"s3://{bucket}/", part=1)
    data, _ = await fetch(aio_s3, bucket, "parts/part-000001/results_jsonl/results.jsonl")
    assert data == whole


async def test_big_files_go_up_in_parts(s3: Any, aio_s3: Any, tmp_path: Path) -> None:
    bucket = make_bucket(s3, "upload-multipart")
    fill(tmp_path)
    big = os.urandom(5 * MIB) * 2 + os.urandom(MIB)  # 11 MiB: three 5 MiB parts
    (tmp_path / "results.parquet").write_bytes(big)
    settings = TransferSettings(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    await upload_results(aio_s3, tmp_path, f"s3://{bucket}/big", transfer=settings)
    data, response = await fetch(aio_s3, bucket, "big/results/results.parquet")
    assert data == big
    assert response["ETag"].strip('"').endswith("-3")  # a multipart object of three parts


async def test_a_bad_uri_or_bucket_is_one_clear_error(aio_s3: Any, tmp_path: Path) -> None:
    fill(tmp_path, with_parquet=False)
    with pytest.raises(ConfigError, match="upload_uri"):
        await upload_results(aio_s3, tmp_path, "results-bucket/x")
    with pytest.raises(SetupError, match="no-such-bucket"):
        await upload_results(aio_s3, tmp_path, "s3://no-such-bucket/x")


class FailingPartClient:
    """Accepts the multipart upload, fails the second part, records the abort."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    async def create_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        return {"UploadId": "up-1"}

    async def upload_part(self, **kwargs: Any) -> dict[str, Any]:
        if kwargs["PartNumber"] == 2:
            raise RuntimeError("connection reset while sending part 2")
        return {"ETag": f'"etag-{kwargs["PartNumber"]}"'}

    async def complete_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("must not complete")

    async def abort_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        self.aborted.append(kwargs["UploadId"])
        return {}


async def test_a_failed_part_aborts_the_upload(tmp_path: Path) -> None:
    (tmp_path / "faces.parquet").write_bytes(os.urandom(3 * MIB))
    client = FailingPartClient()
    settings = TransferSettings(multipart_threshold=MIB, multipart_chunksize=MIB)
    with pytest.raises(RuntimeError, match="part 2"):
        await upload_results(client, tmp_path, "s3://fake-bucket/p", transfer=settings)
    assert client.aborted == ["up-1"]
