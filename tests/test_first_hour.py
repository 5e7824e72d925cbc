"""The first hour of a new user, through the CLI: validate, plan, init, scan, reruns, help."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAMPLES, make_bucket
from tests.helpers import invoke, write_config
from tests.support.fake_rekognition import FakeConfig, FakeRekognition

REFERENCE = SAMPLES / "ric_harvey.jpeg"


@pytest.fixture
def fake(moto_endpoint: str) -> Iterator[FakeRekognition]:
    server = FakeRekognition(FakeConfig(s3_endpoint_url=moto_endpoint, region="eu-west-1"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _local_config(tmp_path: Path, uri: str | Path, *, ops: str = "", extra: str = "") -> Path:
    ops = ops or '[[operations]]\ntype = "detect_faces"\n'
    return write_config(
        tmp_path / "job.toml",
        f'[job]\noutput_dir = "{tmp_path / "out"}"\n\n[source]\nuris = ["{uri}"]\n\n'
        f'[backend]\nkind = "local"\n\n{extra}\n{ops}',
    )


def _problems(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# -- validate ---------------------------------------------------------------------------------


def test_validate_names_a_missing_folder(tmp_path: Path) -> None:
    config = _local_config(tmp_path, tmp_path / "no-such-folder")
    result = invoke("validate", str(config))
    assert result.exit_code == 2
    (line,) = _problems(result)
    assert line.startswith(f"rekbatch: {config}: source.uris[0]: ")
    assert "no-such-folder does not exist" in line


def test_validate_accepts_a_single_image_file_and_refuses_other_files(tmp_path: Path) -> None:
    good = invoke("validate", str(_local_config(tmp_path, SAMPLES / "ric.jpg")))
    assert good.exit_code == 0, good.stderr
    assert "valid (1 source(s)" in good.stdout
    bad = invoke("validate", str(_local_config(tmp_path, SAMPLES / "notes.txt")))
    assert bad.exit_code == 2
    (line,) = _problems(bad)
    assert "source.uris[0]:" in line and "notes.txt is not a JPEG or PNG image" in line


def test_validate_prints_every_error_one_line_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REKBATCH_LIMITS__CONCURRENCY", "0")
    config = _local_config(
        tmp_path,
        SAMPLES,
        ops='[[operations]]\ntype = "compare_faces"\nreference = "missing-ref.jpg"\n'
        "similarity_treshold = 90\n",
        extra='[aws]\nrekognition_endpoint_url = "localhost:9001"\n',
    )
    result = invoke("validate", str(config))
    assert result.exit_code == 2
    lines = _problems(result)
    assert len(lines) == 3, lines
    assert any(
        "operations[0].similarity_treshold: unknown key; did you mean 'similarity_threshold'?"
        in line
        for line in lines
    )
    assert any(
        line.startswith("rekbatch: environment REKBATCH_LIMITS__CONCURRENCY: limits.concurrency:")
        for line in lines
    )
    assert any(f"{config}: aws.rekognition_endpoint_url: not an http(s)" in line for line in lines)
    # The schema is fixed now; what is left are the paths, also every one at once.
    monkeypatch.delenv("REKBATCH_LIMITS__CONCURRENCY")
    text = config.read_text().replace("similarity_treshold", "similarity_threshold")
    text = text.replace('"localhost:9001"', '"http://localhost:9001"')
    config.write_text(text.replace(f'["{SAMPLES}"]', f'["{SAMPLES}", "{tmp_path}/nothing"]'))
    again = _problems(invoke("validate", str(config)))
    assert len(again) == 2, again
    assert "source.uris[1]:" in again[0] and "operations[0].reference:" in again[1]


def test_unknown_section_suggests_the_right_one(tmp_path: Path) -> None:
    config = _local_config(tmp_path, SAMPLES, extra="[limit]\nconcurrency = 2\n")
    (line,) = _problems(invoke("validate", str(config)))
    assert line.endswith("limit: unknown key; did you mean 'limits'?")


def test_validate_online_checks_buckets_objects_and_credentials(
    s3: Any, moto_endpoint: str, fake: FakeRekognition, tmp_path: Path
) -> None:
    make_bucket(s3, "online-ok")
    s3.put_object(Bucket="online-ok", Key="ref.jpg", Body=REFERENCE.read_bytes())
    aws = (
        f'[aws]\nregion = "eu-west-1"\ns3_endpoint_url = "{moto_endpoint}"\n'
        f'rekognition_endpoint_url = "{fake.url}"\n'
    )

    def config(source: str, reference: str) -> Path:
        return write_config(
            tmp_path / "online.toml",
            f'[source]\nuris = ["{source}"]\n\n{aws}\n'
            f'[[operations]]\ntype = "compare_faces"\nreference = "{reference}"\n',
        )

    good = invoke("validate", "--online", str(config("s3://online-ok/", "s3://online-ok/ref.jpg")))
    assert good.exit_code == 0, good.stderr
    assert "buckets and credentials checked" in good.stdout
    offline = invoke("validate", str(config("s3://online-missing/", "s3://online-ok/nope.jpg")))
    assert offline.exit_code == 0  # nothing is asked of S3 without --online
    bad = invoke(
        "validate", "--online", str(config("s3://online-missing/", "s3://online-ok/nope.jpg"))
    )
    assert bad.exit_code == 2
    lines = _problems(bad)
    assert len(lines) == 2, lines
    assert "source.uris[0]: s3://online-missing: bucket or object not found" in lines[0]
    assert "operations[0].reference: s3://online-ok/nope.jpg:" in lines[1]


def test_validate_online_names_refused_credentials(
    s3: Any, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_bucket(s3, "online-creds")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    config = write_config(
        tmp_path / "creds.toml",
        f'[source]\nuris = ["s3://online-creds/"]\n\n[aws]\ns3_endpoint_url = "{moto_endpoint}"\n'
        '[backend]\nkind = "local"\n\n[[operations]]\ntype = "detect_faces"\n',
    )
    result = invoke("validate", "--online", str(config))
    assert result.exit_code == 2
    (line,) = _problems(result)
    assert "source.uris[0]: s3://online-creds: no AWS credentials found" in line


# -- plan on what validate now refuses or accepts ---------------------------------------------


def test_plan_on_a_missing_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    result = invoke("plan", str(_local_config(tmp_path, tmp_path / "gone")))
    assert result.exit_code == 2
    (line,) = _problems(result)
    assert "source.uris[0]:" in line and "gone does not exist" in line


def test_plan_and_validate_on_a_single_file_source(tmp_path: Path) -> None:
    config = _local_config(tmp_path, SAMPLES / "ric.jpg")
    result = invoke("plan", "--json", str(config))
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["objects_listed"] == 1 and plan["images_eligible"] == 1
