"""Shared fixtures: a real-HTTP moto S3 server and clean AWS settings for every test."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from tests.support.clients import aws_client

# The fake Rekognition's fixtures (start_fake, fake), beside moto's below.
pytest_plugins = ["tests.support.servers"]

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "wheres-ric"
REGION = "eu-west-1"

# moto's HTTP server logs every request; that drowns the output of a failing test.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def _clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A developer's own credentials and settings never reach a test."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "REKBATCH_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server (S3 over real HTTP) for the whole session; tests use their own buckets."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_endpoint: str) -> Any:
    """A plain boto3 S3 client on the moto server, for tests to fill buckets."""
    return aws_client("s3", moto_endpoint, REGION)


def make_bucket(s3: Any, name: str) -> str:
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    return name
