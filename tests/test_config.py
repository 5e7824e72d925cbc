"""Config loading, precedence and the one-line errors of ``rekbatch validate``."""

from __future__ import annotations

from pathlib import Path

import pytest

from rekbatch.config import load_config
from rekbatch.errors import ConfigError
from tests.helpers import invoke, write_config

GOOD = """
[job]
name = "wheres-ric"
output_dir = "out/wheres-ric"

[source]
uris = ["s3://image-demo-lab/"]

[aws]
region = "eu-west-1"

[[operations]]
type = "detect_labels"
max_labels = 10

[[operations]]
type = "compare_faces"
reference = "s3://image-demo-lab/ric_harvey.jpeg"
similarity_threshold = 80

[limits]
concurrency = 32
max_tps = 50
"""


def test_valid_config_exits_zero(tmp_path: Path) -> None:
    path = write_config(tmp_path / "job.toml", GOOD)
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.stderr
    assert "valid" in result.stdout


def test_yaml_with_the_same_keys(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "job.yaml",
        "source:\n  uris: ['s3://image-demo-lab/']\noperations:\n  - type: detect_faces\n"
        "    attributes: [ALL]\nlimits:\n  max_tps: {detect_faces: 20}\n",
    )
    cfg = load_config(path, environ={})
    assert cfg.operations[0].type == "detect_faces"
    assert cfg.limits.max_tps == {"detect_faces": 20}


@pytest.mark.parametrize(
    ("name", "text", "field"),
    [
        (
            "unknown key",
            GOOD.replace("max_labels = 10", "max_labls = 10"),
            "operations[0].max_labls",
        ),
        (
            "wrong type",
            GOOD.replace("concurrency = 32", 'concurrency = "many"'),
            "limits.concurrency",
        ),
        (
            "missing section",
            GOOD.split("[source]")[0] + '[[operations]]\ntype = "detect_faces"\n',
            "source",
        ),
        ("bad uri", GOOD.replace('s3://image-demo-lab/"]', 's3://Bad_Bucket!/"]'), "source.uris"),
        ("not s3", GOOD.replace('s3://image-demo-lab/"]', 'gs://bucket/"]'), "source.uris"),
        ("bad operation", GOOD.replace('"detect_labels"', '"detect_fish"'), "operations[0]"),
        (
            "bad reference",
            GOOD.replace("s3://image-demo-lab/ric_harvey.jpeg", "s3://image-demo-lab"),
            "operations[1].reference",
        ),
        (
            "out of range",
            GOOD.replace("similarity_threshold = 80", "similarity_threshold = 180"),
            "operations[1].similarity_threshold",
        ),
        ("invalid toml", GOOD.replace("[job]", "[job"), "invalid TOML"),
        (
            "bad image mode",
            GOOD.replace('region = "eu-west-1"', 'image_mode = "url"'),
            "aws.image_mode",
        ),
    ],
)
def test_malformed_config_is_one_line_naming_the_field(
    tmp_path: Path, name: str, text: str, field: str
) -> None:
    path = write_config(tmp_path / "job.toml", text)
    result = invoke("validate", str(path))
    assert result.exit_code == 2, name
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0]
    assert field in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    result = invoke("validate", str(tmp_path / "nope.toml"))
    assert result.exit_code == 2
    assert "file not found" in result.stderr


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path / "job.toml", GOOD)
    env = {
        "REKBATCH_AWS__S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "REKBATCH_LIMITS__CONCURRENCY": "8",
        "REKBATCH_SOURCE__SNIFF": "false",
        "REKBATCH_SOURCE__URIS": '["s3://other-bucket/x/"]',
    }
    cfg = load_config(path, environ=env)
    assert cfg.aws.s3_endpoint_url == "http://127.0.0.1:9000"
    assert cfg.limits.concurrency == 8
    assert cfg.source.sniff is False
    assert cfg.source.uris == ["s3://other-bucket/x/"]
    cfg = load_config(path, environ=env, overrides={"limits": {"concurrency": 3}})
    assert cfg.limits.concurrency == 3


def test_environment_value_of_the_wrong_type_names_the_field(tmp_path: Path) -> None:
    path = write_config(tmp_path / "job.toml", GOOD)
    with pytest.raises(ConfigError, match=r"limits\.max_attempts"):
        load_config(path, environ={"REKBATCH_LIMITS__MAX_ATTEMPTS": "lots"})


def test_same_operation_twice_is_refused(tmp_path: Path) -> None:
    text = GOOD + '\n[[operations]]\ntype = "detect_labels"\n'
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(write_config(tmp_path / "job.toml", text), environ={})


def test_fingerprint_ignores_rates_but_not_operations(tmp_path: Path) -> None:
    base = load_config(write_config(tmp_path / "a.toml", GOOD), environ={})
    faster = load_config(
        write_config(tmp_path / "b.toml", GOOD.replace("max_tps = 50", "max_tps = 10")), environ={}
    )
    other = load_config(
        write_config(tmp_path / "c.toml", GOOD.replace("max_labels = 10", "max_labels = 5")),
        environ={},
    )
    assert base.fingerprint() == faster.fingerprint()
    assert base.fingerprint() != other.fingerprint()
