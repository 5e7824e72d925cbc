"""The fake Rekognition endpoint per signing region, and its Service Quotas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig
from botocore.exceptions import ClientError, EndpointConnectionError

from tests.support.fake_rekognition import SERVICE_QUOTAS, FakeRekognition
from tests.support.servers import StartFake

pytestmark = pytest.mark.timeout(60)

CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGIONS = ("us-east-1", "us-west-2", "eu-west-1")
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(s3_endpoint_url=None)


@pytest.fixture
async def clients(fake: FakeRekognition) -> AsyncIterator[dict[str, Any]]:
    """One Rekognition client per region, all on the fake's one URL."""
    async with AsyncExitStack() as stack:
        made = {
            region: await stack.enter_async_context(
                aioboto3.Session().client(
                    "rekognition",
                    endpoint_url=fake.url,
                    region_name=region,
                    config=AioConfig(retries={"total_max_attempts": 1}),
                    **CREDS,
                )
            )
            for region in REGIONS
        }
        yield made


def code_of(exc: BaseException) -> str:
    assert isinstance(exc, ClientError), repr(exc)
    return str(exc.response["Error"]["Code"])


async def burst(client: Any, n: int) -> tuple[int, list[BaseException]]:
    results = await asyncio.gather(
        *(client.detect_labels(Image={"Bytes": JPEG}) for _ in range(n)), return_exceptions=True
    )
    return sum(isinstance(r, dict) for r in results), [
        r for r in results if isinstance(r, BaseException)
    ]


async def test_each_signing_region_has_its_own_quota(
    fake: FakeRekognition, clients: dict[str, Any]
) -> None:
    fake.configure(quotas={"DetectLabels": 4}, region_quotas={"us-west-2": {"DetectLabels": 2}})
    accepted = {}
    for region in REGIONS:  # one after the other: a region's calls spend only its own tokens
        ok, refused = await burst(clients[region], 12)
        accepted[region] = ok
        assert all(code_of(e) == "ProvisionedThroughputExceededException" for e in refused)
    # a full bucket each (4, 2, 4), and at most what refilled during the burst
    assert 4 <= accepted["us-east-1"] <= 6
    assert 2 <= accepted["us-west-2"] <= 3
    assert 4 <= accepted["eu-west-1"] <= 6
    regions = fake.stats()["regions"]
    for region in REGIONS:
        assert regions[region]["calls"] == 12
        assert regions[region]["ok"] == accepted[region]
        assert regions[region]["throttled"] == 12 - accepted[region]
    timeline = fake.stats()["region_timeline"]
    assert sum(timeline["us-west-2"]["ok"]) == accepted["us-west-2"]

    fake.set_quota("DetectLabels", None, region="us-west-2")  # back to the shared quota of 4
    fake.set_quota("DetectLabels", None)
    ok, _ = await burst(clients["us-west-2"], 12)
    assert ok == 12


async def test_region_faults_touch_only_their_region(
    fake: FakeRekognition, clients: dict[str, Any]
) -> None:
    fake.configure(region_faults={"us-west-2": "denied", "eu-west-1": "reset"})
    assert "Labels" in await clients["us-east-1"].detect_labels(Image={"Bytes": JPEG})
    with pytest.raises(ClientError) as denied:
        await clients["us-west-2"].detect_labels(Image={"Bytes": JPEG})
    assert code_of(denied.value) == "AccessDeniedException"
    with pytest.raises(EndpointConnectionError):
        await clients["eu-west-1"].detect_labels(Image={"Bytes": JPEG})
    regions = fake.stats()["regions"]
    assert regions["us-east-1"] == {"calls": 1, "ok": 1}
    assert regions["us-west-2"] == {"calls": 1, "errors": 1}
    assert regions["eu-west-1"] == {"calls": 1, "reset": 1}

    fake.configure(region_faults={})
    assert "Labels" in await clients["eu-west-1"].detect_labels(Image={"Bytes": JPEG})
    with pytest.raises(ValueError, match="unknown fault"):
        fake.configure(region_faults={"us-east-1": "melt"})


@pytest.fixture
async def quotas(fake: FakeRekognition) -> AsyncIterator[Any]:
    async with aioboto3.Session().client(
        "service-quotas", endpoint_url=fake.url, region_name="us-west-2", **CREDS
    ) as client:
        yield client


async def test_service_quotas_lists_and_gets_the_applied_quotas(
    fake: FakeRekognition, quotas: Any
) -> None:
    fake.configure(
        applied_quotas={
            "us-west-2": {"DetectFaces": 250.0, "DetectLabels": 80.0, "IndexFaces": 60.0},
            "us-east-1": {"DetectFaces": 5.0},
        }
    )
    listed: list[dict[str, Any]] = []
    pages = 0
    token: str | None = None
    while True:  # two to a page: the paging works as botocore's paginator expects
        kwargs: dict[str, Any] = {"ServiceCode": "rekognition", "MaxResults": 2}
        if token:
            kwargs["NextToken"] = token
        page = await quotas.list_service_quotas(**kwargs)
        listed += page["Quotas"]
        pages += 1
        token = page.get("NextToken")
        if not token:
            break
    assert pages == 2
    by_code = {q["QuotaCode"]: q for q in listed}
    assert set(by_code) == {
        SERVICE_QUOTAS[a][0] for a in ("DetectFaces", "DetectLabels", "IndexFaces")
    }
    faces = by_code["L-A5121FD7"]
    assert faces["Value"] == 250.0
    assert faces["QuotaName"] == (
        "Transactions per second per account for the Amazon Rekognition Image operation DetectFaces"
    )
    assert faces["QuotaArn"].startswith("arn:aws:servicequotas:us-west-2:")

    got = await quotas.get_service_quota(ServiceCode="rekognition", QuotaCode="L-E29B542B")
    assert got["Quota"]["Value"] == 80.0
    with pytest.raises(ClientError) as missing:  # not applied in this region
        await quotas.get_service_quota(ServiceCode="rekognition", QuotaCode="L-73A341CE")
    assert code_of(missing.value) == "NoSuchResourceException"
    with pytest.raises(ClientError) as other:
        await quotas.list_service_quotas(ServiceCode="s3")
    assert code_of(other.value) == "NoSuchResourceException"

    fake.configure(service_quotas_error="AccessDeniedException")
    with pytest.raises(ClientError) as denied:
        await quotas.list_service_quotas(ServiceCode="rekognition")
    assert code_of(denied.value) == "AccessDeniedException"
    stats = fake.stats()
    assert stats["service_quotas"] == {"ListServiceQuotas": 4, "GetServiceQuota": 2}
    assert stats["calls"] == {}  # none of them counts as a Rekognition call
