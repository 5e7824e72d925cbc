"""The account's applied Rekognition quotas, read from Service Quotas when a run starts.

A quota raised for the account is in Service Quotas (service code ``rekognition``, one TPS
quota per API and Region; names and codes in ``calls.quotas``), so a job need not repeat it
in ``limits.max_tps``. Per Region, one ``ListServiceQuotas`` (paged) reads them all; an API
it leaves out (AWS lists only quotas with an applied value) is asked once with
``GetServiceQuota``. The Regions are read at once, each with short timeouts: this happens
before the first call of the run.

Whatever cannot be read (access denied, no credentials, an endpoint out of reach, a quota
not found) takes the built-in default table, and one log line says which and why. With
``aws.rekognition_endpoint_url`` set (a fake, a proxy) Service Quotas is read only when it
has an endpoint of its own (``AWS_ENDPOINT_URL_SERVICE_QUOTAS``, botocore's setting): the
quotas of AWS's endpoints say nothing of another one, and a test machine has no AWS to ask.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from rekbatch.calls.quotas import QUOTA_CODES, quota_api, user_rated

log = structlog.get_logger("rekbatch")

SERVICE_CODE = "rekognition"
READ_SECONDS = 20.0  # all Regions together, paging and retries included
MAX_PAGES = 20  # Rekognition has about 80 quotas: one page of 100, two at worst
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_SERVICE_QUOTAS", "AWS_ENDPOINT_URL")


@dataclass
class QuotaReading:
    """What Service Quotas gave: per Region the applied TPS of each API it knows, and per
    Region why the APIs it did not give fall back to the default table."""

    applied: dict[str, dict[str, float]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # region -> reason

    def for_region(self, region: str) -> dict[str, float]:
        return self.applied.get(region, {})


def _reason(exc: BaseException) -> str:
    from rekbatch.calls.classify import failure_of

    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code") or "")
        if code in ("AccessDeniedException", "AccessDenied"):
            return f"access denied ({code})"
        if code:
            return code
    classified = failure_of(exc)
    if classified is not None:
        return f"{classified.code}: {classified.message}"[:200]
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"[:200]


async def _read_region(session: Any, region: str, apis: set[str]) -> dict[str, float]:
    from aiobotocore.config import AioConfig
    from botocore.exceptions import ClientError

    config = AioConfig(
        connect_timeout=5, read_timeout=10, retries={"mode": "standard", "total_max_attempts": 2}
    )
    found: dict[str, float] = {}
    async with session.client("service-quotas", region_name=region, config=config) as client:
        token: str | None = None
        for _ in range(MAX_PAGES):
            request: dict[str, Any] = {"ServiceCode": SERVICE_CODE, "MaxResults": 100}
            if token:
                request["NextToken"] = token
            page = await client.list_service_quotas(**request)
            for quota in page.get("Quotas", []):
                _keep(quota, found)
            token = page.get("NextToken")
            if not token:
                break
        for api in sorted(apis - set(found)):
            code = QUOTA_CODES.get(api)
            if code is None:
                continue
            try:
                answer = await client.get_service_quota(ServiceCode=SERVICE_CODE, QuotaCode=code)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchResourceException":
                    continue
                raise
            _keep(answer.get("Quota", {}), found)
    return found


def _keep(quota: Mapping[str, Any], found: dict[str, float]) -> None:
    api = quota_api(str(quota.get("QuotaCode", "")), str(quota.get("QuotaName", "")))
    value = quota.get("Value")
    if api is not None and isinstance(value, int | float) and value > 0:
        found[api] = float(value)


async def read_applied_quotas(session: Any, regions: Iterable[str], apis: set[str]) -> QuotaReading:
    """The applied quotas of ``apis`` in each of ``regions``; never raises for what the
    service says (that is in ``missing``)."""
    regions = list(dict.fromkeys(regions))
    reading = QuotaReading()

    async def one(region: str) -> None:
        try:
            found = await _read_region(session, region, apis)
        except Exception as exc:
            reading.missing[region] = _reason(exc)
            return
        reading.applied[region] = found
        absent = sorted(apis - set(found))
        if absent:
            reading.missing[region] = f"quota not found for {', '.join(absent)}"

    tasks = {region: asyncio.ensure_future(one(region)) for region in regions}
    if not tasks:
        return reading
    _, late = await asyncio.wait(tasks.values(), timeout=READ_SECONDS)
    for region, task in tasks.items():
        if task in late:
            task.cancel()
            reading.missing[region] = f"no answer within {READ_SECONDS:g} s"
    await asyncio.gather(*late, return_exceptions=True)
    return reading


async def account_quotas(
    session: Any,
    *,
    regions: Iterable[str],
    apis: Iterable[str],
    max_tps: float | Mapping[str, float] | None,
    endpoint_url: str | None,
) -> QuotaReading:
    """The applied quotas the ceilings need (those of APIs ``max_tps`` does not rate), with
    the one log line saying where the ceilings come from."""
    regions = list(dict.fromkeys(regions))
    wanted = set(apis) - user_rated(max_tps, apis)
    if not wanted:
        return QuotaReading()
    if endpoint_url and not any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        log.info(
            "quotas_from_default_table",
            reason="aws.rekognition_endpoint_url is set and Service Quotas has no endpoint "
            "of its own (AWS_ENDPOINT_URL_SERVICE_QUOTAS)",
            regions=regions,
        )
        return QuotaReading()
    reading = await read_applied_quotas(session, regions, wanted)
    if reading.missing:
        log.warning(
            "quotas_from_default_table",
            reason="; ".join(f"{region}: {why}" for region, why in sorted(reading.missing.items())),
            apis=sorted(wanted),
            hint="set limits.max_tps, or allow servicequotas:ListServiceQuotas and "
            "servicequotas:GetServiceQuota",
        )
    else:
        log.info(
            "quotas_from_service_quotas",
            applied={
                r: {a: v for a, v in q.items() if a in wanted} for r, q in reading.applied.items()
            },
        )
    return reading
