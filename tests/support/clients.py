"""boto3 clients on the test servers, with the tests' own credentials."""

from __future__ import annotations

from typing import Any

import boto3

REGION = "eu-west-1"  # the test S3's Region


def aws_client(service: str, endpoint_url: str, region: str = REGION) -> Any:
    """A plain boto3 client for ``service`` at ``endpoint_url`` (moto, the fake)."""
    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
