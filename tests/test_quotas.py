"""Ceilings from the account's applied quotas (Service Quotas), else the default table."""

from __future__ import annotations

from collections.abc import Iterator

import aioboto3
import pytest
import structlog
from structlog.testing import capture_logs

from rekbatch.calls.quotas import QUOTA_CODES, quota_api, resolve_ceilings, user_rated
from rekbatch.calls.service_quotas import account_quotas
from tests.support.fake_rekognition import SERVICE_QUOTAS, FakeRekognition
from tests.support.servers import StartFake

pytestmark = pytest.mark.timeout(60)

APIS = ["DetectFaces", "DetectLabels", "CompareFaces"]


@pytest.fixture(autouse=True)
def _plain_logging() -> Iterator[None]:
    """Log capture sees every level: a CLI run in this process may have raised it."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def test_quota_codes_agree_with_the_fakes_listing() -> None:
    # Two tables written from AWS's listing: a typo in either shows here.
    for api, (code, name) in SERVICE_QUOTAS.items():
        assert QUOTA_CODES[api] == code
        assert quota_api(code, name) == api
        assert quota_api("L-00000000", name) == api  # recoded: still found by its name
    assert (
        quota_api(
            "L-1234",
            "Transactions per second per account for the Amazon Rekognition operation: SearchUsers",
        )
        == "SearchUsers"
    )
    assert (
        quota_api(
            "L-F1558568", "Concurrent Amazon Rekognition Custom Labels training jobs per account"
        )
        is None
    )
    assert (
        quota_api(
            "L-9",
            "Transactions per second per account for the Amazon "
            "Rekognition Video stored video get operation GetFaceSearch",
        )
        is None
    )


def test_applied_quotas_between_max_tps_and_the_default_table() -> None:
    applied = {"DetectFaces": 250.0, "DetectLabels": 0.0}  # a zero is no quota at all
    assert resolve_ceilings(None, "eu-west-1", APIS, applied) == {
        "DetectFaces": 250.0,
        "DetectLabels": 50.0,
        "CompareFaces": 100.0,
    }
    assert resolve_ceilings({"detect_labels": 7}, "eu-west-1", APIS, applied) == {
        "DetectFaces": 250.0,
        "DetectLabels": 7.0,
        "CompareFaces": 100.0,
    }
    assert resolve_ceilings(12, "eu-west-1", APIS, applied) == dict.fromkeys(APIS, 12.0)
    assert user_rated({"detect_labels": 7, "CompareFaces": 3}, APIS) == {
        "DetectLabels",
        "CompareFaces",
    }
    assert user_rated(None, APIS) == set() and user_rated(5, APIS) == set(APIS)


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(s3_endpoint_url=None)


@pytest.fixture
def quotas_endpoint(fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch) -> FakeRekognition:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SERVICE_QUOTAS", fake.url)
    return fake


async def test_applied_quotas_are_read_per_region(quotas_endpoint: FakeRekognition) -> None:
    fake = quotas_endpoint
    fake.configure(
        applied_quotas={
            "us-east-1": {"DetectFaces": 300, "DetectLabels": 120, "CompareFaces": 90},
            "us-west-2": {"DetectFaces": 40, "DetectLabels": 40},
        }
    )
    with capture_logs() as logs:
        reading = await account_quotas(
            aioboto3.Session(),
            regions=["us-east-1", "us-west-2"],
            apis=APIS,
            max_tps=None,
            endpoint_url=fake.url,
        )
    assert reading.applied == {
        "us-east-1": {"DetectFaces": 300.0, "DetectLabels": 120.0, "CompareFaces": 90.0},
        "us-west-2": {"DetectFaces": 40.0, "DetectLabels": 40.0},
    }
    # us-west-2 lists no CompareFaces quota: asked once more, then the default table
    assert reading.missing == {"us-west-2": "quota not found for CompareFaces"}
    assert fake.stats()["service_quotas"] == {"ListServiceQuotas": 2, "GetServiceQuota": 1}
    west = resolve_ceilings(None, "us-west-2", APIS, reading.for_region("us-west-2"))
    assert west == {"DetectFaces": 40.0, "DetectLabels": 40.0, "CompareFaces": 100.0}
    fallback = [e for e in logs if e["event"] == "quotas_from_default_table"]
    assert len(fallback) == 1
    assert "us-west-2: quota not found for CompareFaces" in fallback[0]["reason"]


async def test_access_denied_takes_the_default_table_with_one_line(
    quotas_endpoint: FakeRekognition,
) -> None:
    fake = quotas_endpoint
    fake.configure(
        applied_quotas={"us-east-1": {"DetectFaces": 300}},
        service_quotas_error="AccessDeniedException",
    )
    with capture_logs() as logs:
        reading = await account_quotas(
            aioboto3.Session(),
            regions=["us-east-1", "eu-west-1", "ap-south-1"],
            apis=APIS,
            max_tps={"compare_faces": 5},
            endpoint_url=fake.url,
        )
    assert reading.applied == {}
    assert set(reading.missing) == {"us-east-1", "eu-west-1", "ap-south-1"}
    assert all(why == "access denied (AccessDeniedException)" for why in reading.missing.values())
    lines = [e for e in logs if e["event"].startswith("quotas_")]
    assert len(lines) == 1 and lines[0]["event"] == "quotas_from_default_table"
    assert lines[0]["apis"] == ["DetectFaces", "DetectLabels"]  # max_tps rates CompareFaces
    assert resolve_ceilings({"compare_faces": 5}, "ap-south-1", APIS, {}) == {
        "DetectFaces": 25.0,
        "DetectLabels": 5.0,
        "CompareFaces": 5.0,
    }


async def test_not_read_when_not_needed_or_not_reachable(fake: FakeRekognition) -> None:
    fake.configure(applied_quotas={"us-east-1": {"DetectFaces": 300}})
    session = aioboto3.Session()
    with capture_logs() as logs:
        rated = await account_quotas(
            session, regions=["us-east-1"], apis=APIS, max_tps=10, endpoint_url=None
        )
        # A custom Rekognition endpoint and none for Service Quotas: nothing is asked.
        custom = await account_quotas(
            session, regions=["us-east-1"], apis=APIS, max_tps=None, endpoint_url=fake.url
        )
    assert rated.applied == {} and rated.missing == {}
    assert custom.applied == {} and custom.missing == {}
    assert fake.stats()["service_quotas"] == {}
    assert [e["event"] for e in logs] == ["quotas_from_default_table"]
    assert "AWS_ENDPOINT_URL_SERVICE_QUOTAS" in logs[0]["reason"]
