"""The test stand-ins themselves: the config builder writes the TOML it is given."""

from __future__ import annotations

import tomllib
from pathlib import Path

from rekbatch.config import load_config
from tests.support.configs import job_config, operations, toml_tables


def test_toml_tables_round_trip_through_tomllib() -> None:
    text = toml_tables(
        job={"name": 'a "quoted" name', "output_dir": Path("/tmp/out")},
        source={"uris": ["s3://b/", Path("/photos")], "sniff": False, "max_pixels": 10},
        limits={"max_cost_usd": 1.5, "skipped": None},
        operations=operations(
            "detect_faces",
            {"type": "search_faces", "people": {"ric": ["s3://b/ric.jpg"], "two words": []}},
        ),
    )
    assert tomllib.loads(text) == {
        "job": {"name": 'a "quoted" name', "output_dir": "/tmp/out"},
        "source": {"uris": ["s3://b/", "/photos"], "sniff": False, "max_pixels": 10},
        "limits": {"max_cost_usd": 1.5},
        "operations": [
            {"type": "detect_faces"},
            {"type": "search_faces", "people": {"ric": ["s3://b/ric.jpg"], "two words": []}},
        ],
    }


def test_job_config_merges_over_its_defaults_and_loads(tmp_path: Path) -> None:
    text = job_config(
        uris=["s3://bucket/"],
        output_dir=tmp_path / "out",
        s3_endpoint="http://127.0.0.1:1",
        rek_endpoint="http://127.0.0.1:2",
        source={"sniff": False},
        aws={"image_mode": "bytes"},
        limits={"concurrency": 4},
        operations=operations("detect_labels"),
    )
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    cfg = load_config(path, environ={})
    assert cfg.source.uris == ["s3://bucket/"] and cfg.source.sniff is False
    assert cfg.aws.region == "eu-west-1" and cfg.aws.image_mode == "bytes"
    assert cfg.aws.rekognition_endpoint_url == "http://127.0.0.1:2"
    assert cfg.limits.concurrency == 4
    assert [op.type for op in cfg.operations] == ["detect_labels"]
