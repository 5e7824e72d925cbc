"""Careless configs and manifests: validate says every problem, each on its line with its
index, in plain words, and never prints a password; inventory data files are S3 objects;
``report`` with S3 out of reach fails at once and keeps the previous report."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

import rekbatch.sources.s3
from rekbatch.commands.report import REPORT_FILE, build_report
from rekbatch.config import Config
from rekbatch.errors import EndpointUnreachable, SetupError
from tests.conftest import REGION, SAMPLES, make_bucket
from tests.helpers import fake_jpeg, invoke, write_config

SECRET = "s3cr3t-Pa55"


def _lines(result: Any) -> list[str]:
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("s3_endpoint_url", f"http://minio:{SECRET}@127.0.0.1:9000"),
        ("rekognition_endpoint_url", f"https://AKIAEXAMPLE:{SECRET}@rekognition.example.com"),
        ("s3_endpoint_url", f"http://:{SECRET}@127.0.0.1:9000"),
        ("s3_endpoint_url", f"ftp://minio:{SECRET}@127.0.0.1:9000"),
        ("s3_endpoint_url", f"http://minio:{SECRET}@127.0.0.1:port"),
        ("sqs_endpoint_url", f"http://elasticmq:{SECRET}@127.0.0.1:9324"),
    ],
)
def test_an_endpoint_with_a_password_is_refused_and_never_printed(
    tmp_path: Path, field: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        '[source]\nuris = ["s3://photos/"]\n\n'
        f"[aws]\n{field} = {json.dumps(url)}\n\n"
        '[[operations]]\ntype = "detect_labels"\n'
    )
    config = write_config(tmp_path / "job.toml", text)
    result = invoke("validate", str(config))
    assert result.exit_code == 2
    lines = _lines(result)
    assert len(lines) == 1 and f"aws.{field}" in lines[0]
    assert SECRET not in result.stderr + result.stdout
    # The same from the environment, blamed on the variable.
    plain = write_config(tmp_path / "plain.toml", text.replace(json.dumps(url), '"http://h:1"'))
    monkeypatch.setenv(f"REKBATCH_AWS__{field.upper()}", url)
    result = invoke("validate", str(plain))
    assert result.exit_code == 2 and f"REKBATCH_AWS__{field.upper()}" in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_a_queue_url_with_a_password_is_refused_and_never_printed(tmp_path: Path) -> None:
    queue = f"sqs://https://user:{SECRET}@sqs.eu-west-1.amazonaws.com/123456789012/photos"
    ops = '[[operations]]\ntype = "detect_labels"\n'
    text = f'[source]\nuris = ["s3://photos/", "{queue}"]\n\n{ops}'
    result = invoke("validate", str(write_config(tmp_path / "job.toml", text)))
    assert result.exit_code == 2
    lines = _lines(result)
    assert len(lines) == 1 and "source.uris[1]: holds a user name or password" in lines[0]
    assert SECRET not in result.stderr + result.stdout


def test_validate_reports_every_problem_each_with_its_index(tmp_path: Path) -> None:
    """A misspelt key once hid a missing source folder and a missing reference (one line for
    three problems), and an invalid s3:// URI hid everything after it."""
    text = (
        f"[source]\nuris = [{json.dumps(str(tmp_path / 'no-such-folder'))}, "
        '"s3://Not_A_Bucket/x", "s3://ok-bucket/", "s3://"]\n\n'
        '[[operations]]\ntype = "detect_labels"\n\n'
        '[[operations]]\ntype = "compare_faces"\n'
        f"reference = {json.dumps(str(tmp_path / 'missing-ric.jpg'))}\n"
        "similarity_treshold = 80\n\n"
        '[[operations]]\ntype = "search_faces"\n'
        'people = { ric = ["s3://refs-bucket/ric.jpg", "s3://Bad Bucket/x.jpg"] }\n'
    )
    config = write_config(tmp_path / "job.toml", text)
    result = invoke("validate", str(config))
    assert result.exit_code == 2
    lines = _lines(result)
    expected = [
        "source.uris[0]:",
        "source.uris[1]:",
        "source.uris[3]:",
        "operations[1].similarity_treshold: unknown key; did you mean 'similarity_threshold'?",
        "operations[1].reference:",
        "operations[2].people.ric[1]:",
    ]
    for part in expected:
        assert sum(part in line for line in lines) == 1, (part, lines)
    assert len(lines) == len(expected), lines
    assert all(line.startswith(f"rekbatch: {config}: ") for line in lines)
    assert "does not exist" in next(line for line in lines if "uris[0]" in line)
    assert "does not exist" in next(line for line in lines if "].reference:" in line)


def _the_one_error_about(tmp_path: Path, setting: str, where: str, words: str) -> str:
    """Validate a job with ``setting``: one line of error, naming ``where`` and saying
    ``words``. What it says after ``where``."""
    ops = '[[operations]]\ntype = "detect_labels"\n'
    text = f'[source]\nuris = ["s3://photos/"]\n\n{setting}\n\n{ops}'
    result = invoke("validate", str(write_config(tmp_path / "job.toml", text)))
    assert result.exit_code == 2
    lines = _lines(result)
    assert len(lines) == 1, lines
    assert where in lines[0] and words in lines[0], lines
    return lines[0].split(where, 1)[1]


@pytest.mark.parametrize(
    ("setting", "where", "words"),
    [
        ('[limits]\nmax_tps = "fast"', "limits.max_tps:", "a number or a table of numbers"),
        ("[limits]\nmax_tps = [1, 2]", "limits.max_tps:", "a number or a table of numbers"),
        (
            '[limits]\nmax_tps = { DetectFaces = "quick" }',
            "limits.max_tps.DetectFaces:",
            "a valid number",
        ),
        ('[output]\nparquet = "sometimes"', "output.parquet:", "true or false, or 'auto'"),
    ],
)
def test_union_type_errors_are_in_plain_words(
    tmp_path: Path, setting: str, where: str, words: str
) -> None:
    said = _the_one_error_about(tmp_path, setting, where, words)
    for internal in ("float", "dict[", "literal[", "bool", "function-"):
        assert internal not in said.replace("true or false", ""), said


@pytest.mark.parametrize(
    ("setting", "where", "words"),
    [
        ('[aws]\nregion = "eu west 1"', "aws.region:", "not a Region name such as eu-west-1"),
        (
            '[aws]\nregions = ["us-east-1", "US-WEST-2"]',
            "aws.regions[1]:",
            "not a Region name such as eu-west-1",
        ),
    ],
)
def test_pattern_errors_are_in_plain_words(
    tmp_path: Path, setting: str, where: str, words: str
) -> None:
    said = _the_one_error_about(tmp_path, setting, where, words)
    assert "pattern" not in said and "\\d" not in said, said


def test_inventory_data_files_are_read_from_s3_only(
    s3: Any, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest whose destination bucket is not a bucket name once made its data file be
    read from a local path (``s3://Bad_Bucket/key`` is no S3 URI, so it was a file name)."""
    source = make_bucket(s3, "inv-local-src")
    s3.put_object(Bucket=source, Key="p/0.jpg", Body=fake_jpeg(0))
    schema = "Bucket, Key, Size"
    local = tmp_path / "s3:" / "Bad_Bucket" / "data" / "part-0.csv.gz"
    local.parent.mkdir(parents=True)
    local.write_bytes(gzip.compress(f'"{source}","p/0.jpg","600"\n'.encode()))
    monkeypatch.chdir(tmp_path)
    inv = make_bucket(s3, "inv-local-manifest")
    manifest = {
        "sourceBucket": source,
        "destinationBucket": "arn:aws:s3:::Bad_Bucket",
        "fileFormat": "CSV",
        "fileSchema": schema,
        "files": [{"key": "data/part-0.csv.gz", "size": 40}],
    }
    s3.put_object(Bucket=inv, Key="m/manifest.json", Body=json.dumps(manifest).encode())
    out = tmp_path / "out"
    text = (
        f"[job]\noutput_dir = {json.dumps(str(out))}\n[source]\n"
        f'uris = ["inventory:s3://{inv}/m/manifest.json"]\n'
        f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{moto_endpoint}"\n'
        'rekognition_endpoint_url = "http://127.0.0.1:9"\n'
        '[[operations]]\ntype = "detect_labels"\n'
    )
    result = invoke("run", str(write_config(tmp_path / "job.toml", text)))
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = _lines(result)
    assert len(lines) == 1 and "Bad_Bucket" in lines[0] and "inventory:s3://" in lines[0]
    results = out / "results.jsonl"
    assert not results.exists() or results.read_text() == ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _s3_report_job(client: Any, endpoint: str, out: Path, bucket: str) -> Config:
    make_bucket(client, bucket)
    for name in ("ric_harvey.jpeg", "ric.jpg"):
        client.put_object(Bucket=bucket, Key=name, Body=(SAMPLES / name).read_bytes())
    out.mkdir()
    reference = f"s3://{bucket}/ric_harvey.jpeg"
    box = {"Left": 0.26, "Top": 0.15, "Width": 0.52, "Height": 0.64}
    summary = {
        "job": "down",
        "compare_faces": {
            "reference": reference,
            "similarity_threshold": 80.0,
            "images_compared": 1,
            "images_matched": 1,
            "matched_keys": ["ric.jpg"],
            "matches": [
                {"bucket": bucket, "key": "ric.jpg", "similarity": 99.0, "bounding_box": box}
            ],
        },
    }
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return Config.model_validate(
        {
            "job": {"name": "down"},
            "source": {"uris": [f"s3://{bucket}/"]},
            "aws": {"region": REGION, "s3_endpoint_url": endpoint},
            "operations": [{"type": "compare_faces", "reference": reference}],
        }
    )


async def test_report_with_s3_out_of_reach_fails_at_once_and_keeps_the_last_report(
    tmp_path: Path,
) -> None:
    """S3 down once meant 138 s of silence, then a report whose every thumbnail said the
    run stopped, written over the good one."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    out = tmp_path / "out"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
        cfg = _s3_report_job(client, endpoint, out, "report-down")
        async with asyncio.timeout(60):
            good = (await build_report(out, cfg)).read_bytes()
    finally:
        server.stop()
    assert good.count(b"data:image/jpeg;base64,") == 2
    with pytest.raises(SetupError) as raised:
        async with asyncio.timeout(60):  # a bound for the test, not a measurement
            await build_report(out, cfg)
    message = str(raised.value)
    assert "\n" not in message and "S3" in message and endpoint in message
    assert (out / REPORT_FILE).read_bytes() == good
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "summary.json"]


async def test_report_stops_when_s3_goes_away_while_it_reads(
    tmp_path: Path, s3: Any, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 answers the first request, then goes down: the report stops (no page of images
    that each say the run stopped) and the previous report stays."""
    out = tmp_path / "out"
    cfg = _s3_report_job(s3, moto_endpoint, out, "report-goes-away")
    good = (await build_report(out, cfg)).read_bytes()
    reads: list[str] = []

    async def down(self: Any, bucket: str, key: str) -> bytes:
        reads.append(key)
        raise EndpointUnreachable("the S3 endpoint", 15.0, "EndpointConnectionError: refused")

    monkeypatch.setattr(rekbatch.sources.s3.S3, "read", down)
    with pytest.raises(SetupError, match="S3 is out of reach"):
        async with asyncio.timeout(60):
            await build_report(out, cfg)
    assert reads and (out / REPORT_FILE).read_bytes() == good
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "summary.json"]
