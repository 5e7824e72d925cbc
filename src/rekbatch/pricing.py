"""Estimated Rekognition Image cost from the published list prices.

An estimate, never a bill: the user's AWS bill is the authority. It leaves out the free tier,
taxes, private pricing and Savings Plans, S3 requests and data transfer (except what
spreading calls over Regions adds, below), and face metadata storage
(``FACE_STORAGE_USD_PER_FACE_MONTH``, listed for reference). Prices change: the table below
carries the date it was read (``PRICES_AS_OF``) and the region it was read for
(``PRICES_REGION``).

How Rekognition Image bills: per image per API call (two APIs on one image are two images),
at a per-image price that falls with the monthly volume. The APIs fall in price groups, and
the volume tiers count each group's images in the calendar month separately:

    images this month, per group   Group 1      Group 2      DetectLabels Image Properties
    first 1,000,000                $0.00100     $0.00100     $0.00075  (added to DetectLabels)
    next 4,000,000                 $0.00080     $0.00080     $0.00060
    next 30,000,000                $0.00060     $0.00060     $0.00045 (*)
    over 35,000,000                $0.00040 (*) $0.00025 (*) $0.00030 (*)

Sources, read 2026-11-24, for us-east-1 (N. Virginia): https://aws.amazon.com/rekognition/pricing/
(the page fills its price cells in by script, so the figures were taken from stored copies
of it: the group lists from the page text; the first three tiers of both groups from pump.co's
Rekognition pricing guide, which quotes the page's us-east-1 table; the first two Image
Properties tiers from the page's worked examples). Figures marked (*) could not be confirmed
from a stored copy on that date and are the last-known list prices; check them before
relying on estimates above 5M images a month. eu-west-1 (Ireland) has the same first-tier
price as us-east-1 in a third-party per-region table and is given the same table; any other
region falls back to the us-east-1 table (some regions list 10-30% more).

Spreading calls over Regions (``aws.regions``) adds two AWS charges outside Rekognition, for
each image of a bucket sent to a Region other than its own: one S3 GET to read it (once per
object, whatever its operations and retries), and inter-region data transfer for its bytes
(once per call). ``spread_cost`` prices them at ``S3_GET_USD_PER_1000`` (S3 Standard, GET
requests, us-east-1: https://aws.amazon.com/s3/pricing/, "Requests & data retrievals") and
``INTER_REGION_USD_PER_GB`` (data transferred out of a US or European Region to another AWS
Region: https://aws.amazon.com/ec2/pricing/on-demand/, "Data Transfer"; AWS bills a GB as
2^30 bytes), read from stored copies of those pages on ``SPREAD_PRICES_AS_OF``. Some pairs
cost less (us-east-1 and us-east-2: $0.01), transfers out of some Asia Pacific, South
American and Middle East Regions several times more. The images are assumed to be read by a
machine in the bucket's own Region, where reading S3 moves no billed data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal

PRICES_AS_OF = "2026-11-24"
PRICES_REGION = "us-east-1"
DEFAULT_REGION = PRICES_REGION

SPREAD_PRICES_AS_OF = "2026-12-07"
S3_GET_USD_PER_1000 = Decimal("0.0004")
INTER_REGION_USD_PER_GB = Decimal("0.02")
GB = 2**30

# Face metadata kept in a collection (search_faces' collection strategy), per face per month.
FACE_STORAGE_USD_PER_FACE_MONTH = 0.00001

GROUP_1 = "group1"
GROUP_2 = "group2"
IMAGE_PROPERTIES = "image_properties"
FREE = "free"

# (cumulative upper bound of the tier in images this month, or None for the rest; USD/image)
Tiers = tuple[tuple[int | None, Decimal], ...]

_US_EAST_1: dict[str, Tiers] = {
    GROUP_1: (
        (1_000_000, Decimal("0.001")),
        (5_000_000, Decimal("0.0008")),
        (35_000_000, Decimal("0.0006")),
        (None, Decimal("0.0004")),
    ),
    GROUP_2: (
        (1_000_000, Decimal("0.001")),
        (5_000_000, Decimal("0.0008")),
        (35_000_000, Decimal("0.0006")),
        (None, Decimal("0.00025")),
    ),
    IMAGE_PROPERTIES: (
        (1_000_000, Decimal("0.00075")),
        (5_000_000, Decimal("0.0006")),
        (35_000_000, Decimal("0.00045")),
        (None, Decimal("0.0003")),
    ),
    FREE: ((None, Decimal("0")),),
}

PRICE_TABLES: dict[str, dict[str, Tiers]] = {
    "us-east-1": _US_EAST_1,
    "eu-west-1": _US_EAST_1,
}

_GROUP_1_APIS = (
    "CompareFaces",
    "IndexFaces",
    "SearchFacesByImage",
    "SearchFaces",
    "AssociateFaces",
    "SearchUsers",
    "SearchUsersByImage",
)
_GROUP_2_APIS = (
    "DetectFaces",
    "DetectModerationLabels",
    "DetectLabels",
    "DetectText",
    "RecognizeCelebrities",
    "DetectProtectiveEquipment",
)
# Collection housekeeping: not billed per call.
_FREE_APIS = (
    "CreateCollection",
    "DeleteCollection",
    "DescribeCollection",
    "ListCollections",
    "ListFaces",
    "DeleteFaces",
)
# DetectLabels called with Features=["IMAGE_PROPERTIES"]: billed on top of DetectLabels.
_IMAGE_PROPERTIES_NAMES = ("ImageProperties", "DetectLabelsImageProperties")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_GROUP_OF: dict[str, str] = {
    **{_norm(api): GROUP_1 for api in _GROUP_1_APIS},
    **{_norm(api): GROUP_2 for api in _GROUP_2_APIS},
    **{_norm(api): FREE for api in _FREE_APIS},
    **{_norm(name): IMAGE_PROPERTIES for name in _IMAGE_PROPERTIES_NAMES},
}


def price_group(api: str) -> str:
    """The price group of an API: ``group1``, ``group2``, ``image_properties`` or ``free``.

    Takes Rekognition API names (``CompareFaces``) and rekbatch operation types
    (``compare_faces``; ``search_faces`` bills as Group 1). Unknown names, such as ``all``,
    price as Group 2.
    """
    return _GROUP_OF.get(_norm(api), GROUP_2)


def _by_group(counts: Mapping[str, int] | None) -> dict[str, int]:
    totals: dict[str, int] = {}
    for api, n in (counts or {}).items():
        if n < 0:
            raise ValueError(f"negative image count for {api!r}: {n}")
        group = price_group(api)
        totals[group] = totals.get(group, 0) + int(n)
    return totals


def _tiered(count: int, already: int, tiers: Tiers) -> Decimal:
    """The price of images ``already + 1 .. already + count`` of the month."""
    cost = Decimal(0)
    start, end, lower = already, already + count, 0
    for upper, price in tiers:
        top = end if upper is None else min(end, upper)
        bottom = max(start, lower)
        if top > bottom:
            cost += (top - bottom) * price
        if upper is None or upper >= end:
            break
        lower = upper
    return cost


def estimate_cost(
    billed_by_api: Mapping[str, int],
    *,
    region: str = DEFAULT_REGION,
    already_billed: Mapping[str, int] | None = None,
) -> float:
    """Estimated USD for ``billed_by_api`` (API name or operation type -> billed images).

    ``already_billed`` is the volume this account already used this month (same keys), so the
    tiers start where the month stands; tiers are counted per price group. Regions without a
    table of their own are priced with the us-east-1 table. An estimate: see the module doc.
    """
    table = PRICE_TABLES.get(region, PRICE_TABLES[DEFAULT_REGION])
    before = _by_group(already_billed)
    total = Decimal(0)
    for group, count in _by_group(billed_by_api).items():
        total += _tiered(count, before.get(group, 0), table[group])
    return float(round(total, 6))


def spread_cost(gets: int, bytes_elsewhere: int) -> float:
    """Estimated USD of sending images to Rekognition in other Regions than their buckets':
    ``gets`` objects read once each, ``bytes_elsewhere`` bytes sent in all."""
    if gets < 0 or bytes_elsewhere < 0:
        raise ValueError("counts must not be negative")
    cost = gets * S3_GET_USD_PER_1000 / 1000 + bytes_elsewhere * INTER_REGION_USD_PER_GB / GB
    return float(round(cost, 6))
