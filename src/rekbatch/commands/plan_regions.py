"""What spreading calls over ``aws.regions`` would give and cost, for ``rekbatch plan``.

For each set of the configured Regions (the home Region first, then one more at a time): the
time the calls would take, each stateless API at the sum of its ceilings in the set (the
others at home), and what spreading adds to the bill besides the calls: S3 GETs for the
objects read to be sent to another Region, and inter-region transfer for their bytes
(``pricing.spread_cost``). Calls are taken to go to each Region in proportion to its
ceiling, as the dispatcher hands them out when every Region is busy, and the buckets to be
in the home Region. Images that already go as bytes (converted ones, ``image_mode =
"bytes"``, buckets elsewhere) travel once either way and add nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rekbatch.calls.quotas import resolve_ceilings
from rekbatch.calls.regions import SPREAD_APIS
from rekbatch.calls.service_quotas import QuotaReading, account_quotas
from rekbatch.config import Config
from rekbatch.pricing import (
    INTER_REGION_USD_PER_GB,
    S3_GET_USD_PER_1000,
    SPREAD_PRICES_AS_OF,
    spread_cost,
)


def region_order(cfg: Config) -> list[str]:
    """The calling Regions, the home Region (``aws.region``) first when it is one of them."""
    regions = cfg.aws.calling_regions()
    home = cfg.aws.region
    return ([home] if home in regions else []) + [r for r in regions if r != home]


async def plan_quotas(cfg: Config, apis: list[str]) -> QuotaReading:
    """The account's applied quotas, as a run reads them (nothing for the offline backend)."""
    if cfg.backend.kind != "aws":
        return QuotaReading()
    import aioboto3

    return await account_quotas(
        aioboto3.Session(profile_name=cfg.aws.profile, region_name=cfg.aws.region),
        regions=[cfg.aws.region, *cfg.aws.calling_regions()],
        apis=apis,
        max_tps=cfg.limits.max_tps,
        endpoint_url=cfg.aws.rekognition_endpoint_url,
    )


def region_ceilings(
    cfg: Config, apis: list[str], quotas: QuotaReading
) -> dict[str, dict[str, float]]:
    """Region -> API -> ceiling, for the home Region and every calling one."""
    return {
        region: resolve_ceilings(cfg.limits.max_tps, region, apis, quotas.for_region(region))
        for region in dict.fromkeys([cfg.aws.region, *cfg.aws.calling_regions()])
    }


def region_plan(
    cfg: Config,
    calls: Mapping[str, int],
    ceilings: Mapping[str, Mapping[str, float]],
    *,
    images: int,
    by_reference: int,
    image_bytes: int,
) -> dict[str, Any] | None:
    """The time and extra cost of each Region set; None with one Region.

    ``ceilings``: Region -> API -> TPS, for every calling Region and the home one;
    ``by_reference``: the images that would go as S3 references from the home Region;
    ``image_bytes``: the bytes of all ``images``."""
    regions = region_order(cfg)
    if len(regions) < 2 or cfg.backend.kind != "aws":
        return None
    home = cfg.aws.region
    average = image_bytes / images if images else 0.0
    moved = by_reference / images if images else 0.0  # the share of calls that can move
    sets = []
    for k in range(1, len(regions) + 1):
        chosen = regions[:k]
        seconds = 0.0
        stay = 1.0  # the chance that an image has every call at home
        elsewhere_calls = 0.0
        for api, count in calls.items():
            if api not in SPREAD_APIS:
                seconds = max(seconds, count / ceilings[home][api])
                continue
            total = sum(ceilings[r][api] for r in chosen)
            seconds = max(seconds, count / total)
            at_home = ceilings[home][api] / total if home in chosen else 0.0
            elsewhere_calls += count * moved * (1.0 - at_home)
            if images:
                stay *= at_home ** (count / images)
        gets = round(by_reference * (1.0 - stay))
        sent = round(elsewhere_calls * average)
        sets.append(
            {
                "regions": chosen,
                "seconds": round(seconds, 1),
                "gets": gets,
                "bytes_elsewhere": sent,
                "extra_cost_usd": spread_cost(gets, sent),
            }
        )
    return {
        "sets": sets,
        "prices": {
            "as_of": SPREAD_PRICES_AS_OF,
            "s3_get_usd_per_1000": float(S3_GET_USD_PER_1000),
            "inter_region_usd_per_gb": float(INTER_REGION_USD_PER_GB),
        },
    }


def render_region_plan(plan: Mapping[str, Any] | None, duration: Any) -> list[str]:
    """The plan's lines for the Region sets; ``duration`` renders seconds."""
    if not plan:
        return []
    lines = []
    width = max(len(", ".join(s["regions"])) for s in plan["sets"])
    for one in plan["sets"]:
        names = ", ".join(one["regions"]).ljust(width)
        line = f"time in {names}  {duration(one['seconds'])}"
        if len(one["regions"]) > 1:
            gb = one["bytes_elsewhere"] / 2**30
            line += (
                f", spreading adds ${one['extra_cost_usd']:.2f} "
                f"({one['gets']} GETs, {gb:.{1 if gb >= 1 or gb == 0 else 3}f} GB to other Regions)"
            )
        lines.append(line)
    prices = plan["prices"]
    lines.append(
        f"spreading: S3 GETs at ${prices['s3_get_usd_per_1000']:g} per 1,000 and inter-region "
        f"transfer at ${prices['inter_region_usd_per_gb']:g}/GB (list prices as of "
        f"{prices['as_of']}), on top of the calls"
    )
    return lines
