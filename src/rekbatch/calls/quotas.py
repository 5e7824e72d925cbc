"""Amazon Rekognition's published default TPS quotas, and the rate ceiling of each operation.

Source: AWS General Reference, "Amazon Rekognition endpoints and quotas", section "Service
quotas" (https://docs.aws.amazon.com/general/latest/gr/rekognition.html), as published in
2025 (the version listing Asia Pacific (Malaysia) and (Thailand)); read on 2026-11-24.
Quotas are per account, per Region, per operation, and can be raised on request, so these are
only defaults: a job that knows its account's quotas says so with ``limits.max_tps``.

The table (transactions per second):

- DetectLabels, DetectModerationLabels, DetectText, GetCelebrityInfo, IndexFaces, ListFaces,
  RecognizeCelebrities, SearchFaces, SearchFacesByImage, SearchUsers, SearchUsersByImage:
  50 in US East (N. Virginia), US West (Oregon) and Europe (Ireland); 5 in every other Region.
- CompareFaces, DetectFaces: 100 in those three Regions; 25 elsewhere.
- AssociateFaces, DisassociateFaces, DetectProtectiveEquipment, and the control plane
  (CreateCollection, DeleteCollection, DeleteFaces, DescribeCollection, ListCollections,
  CreateUser, DeleteUser, ListUsers): 5 in every Region.

An operation or Region the table does not know gets the lowest default (5): starting low
costs a little time, starting high costs throttled calls.

The account's own quotas (raised ones included) are in Service Quotas under service code
``rekognition``, one quota per operation and Region, named "Transactions per second per
account for the Amazon Rekognition Image operation <API>" with the codes of
``QUOTA_CODES``. Sources: the quota table of the page above (its Service Quotas links carry
the codes) and Service Quotas' own listing of Rekognition's defaults
(ListAWSDefaultServiceQuotas, as of February 2024); read on 2026-12-07. Without
``limits.max_tps`` those applied quotas are the ceilings (``resolve_ceilings``'s
``applied``), and this table stands in for any it could not read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from rekbatch.errors import ConfigError

#: Regions with the higher defaults.
LARGE_REGIONS = frozenset({"us-east-1", "us-west-2", "eu-west-1"})

#: Regions the quota table lists (all others fall back to the lowest default too).
REGIONS = frozenset(
    {
        "us-east-1",
        "us-east-2",
        "us-west-1",
        "us-west-2",
        "ap-south-1",
        "ap-northeast-1",
        "ap-northeast-2",
        "ap-southeast-1",
        "ap-southeast-2",
        "ap-southeast-5",
        "ap-southeast-7",
        "ca-central-1",
        "eu-central-1",
        "eu-west-1",
        "eu-west-2",
        "eu-south-2",
        "il-central-1",
        "sa-east-1",
        "us-gov-west-1",
    }
)

LOWEST_DEFAULT = 5.0

#: API name -> (TPS in the large Regions, TPS elsewhere).
DEFAULT_TPS: dict[str, tuple[float, float]] = {
    **dict.fromkeys(
        (
            "DetectLabels",
            "DetectModerationLabels",
            "DetectText",
            "GetCelebrityInfo",
            "IndexFaces",
            "ListFaces",
            "RecognizeCelebrities",
            "SearchFaces",
            "SearchFacesByImage",
            "SearchUsers",
            "SearchUsersByImage",
        ),
        (50.0, 5.0),
    ),
    **dict.fromkeys(("CompareFaces", "DetectFaces"), (100.0, 25.0)),
    **dict.fromkeys(
        (
            "AssociateFaces",
            "DisassociateFaces",
            "DetectProtectiveEquipment",
            "CreateCollection",
            "DeleteCollection",
            "DeleteFaces",
            "DescribeCollection",
            "ListCollections",
            "CreateUser",
            "DeleteUser",
            "ListUsers",
        ),
        (5.0, 5.0),
    ),
}

#: Config operation type -> the API it mostly calls, then the others it may call. A rate given
#: for an operation type applies to those APIs; one given for an API name wins over it.
OPERATION_APIS: dict[str, tuple[str, ...]] = {
    "detect_faces": ("DetectFaces",),
    "detect_labels": ("DetectLabels",),
    "compare_faces": ("CompareFaces",),
    "detect_text": ("DetectText",),
    "detect_moderation_labels": ("DetectModerationLabels",),
    "recognize_celebrities": ("RecognizeCelebrities",),
    "detect_protective_equipment": ("DetectProtectiveEquipment",),
    "search_faces": ("SearchFacesByImage", "SearchFaces", "IndexFaces", "CompareFaces"),
    "index_faces": ("IndexFaces",),
}


#: API -> its TPS quota's code in Service Quotas (service code ``rekognition``).
QUOTA_CODES: dict[str, str] = {
    "DetectFaces": "L-A5121FD7",
    "CompareFaces": "L-73A341CE",
    "DetectLabels": "L-E29B542B",
    "DetectText": "L-87CF5BA6",
    "DetectModerationLabels": "L-7F4D1AC4",
    "RecognizeCelebrities": "L-5FF750C4",
    "DetectProtectiveEquipment": "L-6F294C5B",
    "IndexFaces": "L-7C13EBAD",
    "SearchFacesByImage": "L-43CBEB68",
    "SearchFaces": "L-99829151",
    "ListFaces": "L-970B5808",
    "GetCelebrityInfo": "L-973FFF99",
    "CreateCollection": "L-CE977716",
    "DeleteCollection": "L-5346A13A",
    "DescribeCollection": "L-6FDFFAF5",
    "ListCollections": "L-0366BB0F",
    "DeleteFaces": "L-220834FB",
    "AssociateFaces": "L-DBC0DD5B",
    "DisassociateFaces": "L-D56ABB32",
    "SearchUsers": "L-532A3DAC",
    "SearchUsersByImage": "L-D319BBAF",
    "CreateUser": "L-9A87C986",
    "DeleteUser": "L-E112E6C6",
    "ListUsers": "L-BF8F67AA",
}
_API_OF_CODE = {code: api for api, code in QUOTA_CODES.items()}
# The quota names end in the API name: "...Rekognition Image operation DetectFaces",
# "...Rekognition operation: SearchUsers".
_QUOTA_NAME = re.compile(r"Amazon Rekognition\b.*\boperation:?\s+([A-Za-z]+)\s*$")


def quota_api(code: str, name: str) -> str | None:
    """The API a Service Quotas quota of ``rekognition`` is the TPS quota of, by its code,
    else by its name (a quota AWS added or recoded since); None for any other quota."""
    api = _API_OF_CODE.get(code)
    if api is not None:
        return api
    match = _QUOTA_NAME.search(name)
    if match and "Transactions per second" in name and match[1] in DEFAULT_TPS:
        return match[1]
    return None


def default_tps(api: str, region: str) -> float:
    """The published default TPS quota of ``api`` (e.g. ``DetectFaces``) in ``region``."""
    large, other = DEFAULT_TPS.get(api, (LOWEST_DEFAULT, LOWEST_DEFAULT))
    return large if region in LARGE_REGIONS else other


def api_name(key: str) -> str | None:
    """``DetectFaces`` or ``detect_faces``-style spelling of an API name -> the API name."""
    if key in DEFAULT_TPS:
        return key
    if re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", key):
        camel = "".join(part.capitalize() for part in key.split("_"))
        if camel in DEFAULT_TPS:
            return camel
    return None


def user_rated(max_tps: float | Mapping[str, float] | None, apis: Iterable[str]) -> set[str]:
    """The APIs among ``apis`` that ``limits.max_tps`` gives a rate; the others' ceilings
    are the account's quotas."""
    if max_tps is None:
        return set()
    if not isinstance(max_tps, Mapping):
        return set(apis)
    given: set[str] = set()
    for key in max_tps:
        given.update(OPERATION_APIS.get(key, ()))
        api = api_name(key)
        if api is not None:
            given.add(api)
    return given & set(apis)


def resolve_ceilings(
    max_tps: float | Mapping[str, float] | None,
    region: str,
    apis: Iterable[str],
    applied: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The rate ceiling of each API in ``apis``.

    ``applied``: the account's applied quotas in ``region`` (API -> TPS) as Service Quotas
    gave them; an API ``max_tps`` does not rate takes its applied quota, else its default.

    - ``None``: the applied quota, else the published default quota of each.
    - a number: that rate for each API (each operation has its own quota: this is not split
      between them). It replaces the default, so it can be higher (a raised quota) or lower
      (a share left to other jobs).
    - a mapping: keys are config operation types (``detect_faces``, ``search_faces``...) or
      API names (``DetectFaces``, also spelt ``detect_faces``-style, e.g.
      ``search_faces_by_image``); an API name beats an operation type, an operation's main
      API beats the others it may call; anything not given keeps its default. An operation
      type name wins over the API spelt the same way (``search_faces`` is the operation).
      Unknown keys raise ``ConfigError``.
    """
    apis = list(dict.fromkeys(apis))
    account = applied or {}

    def quota(api: str) -> float:
        rate = account.get(api)
        return float(rate) if rate is not None and rate > 0 else default_tps(api, region)

    if max_tps is None:
        return {api: quota(api) for api in apis}
    if not isinstance(max_tps, Mapping):
        rate = float(max_tps)
        if rate <= 0:
            raise ConfigError(f"limits.max_tps: rates must be positive, got {max_tps!r}")
        return dict.fromkeys(apis, rate)

    by_api: dict[str, float] = {}
    main: dict[str, float] = {}
    secondary: dict[str, float] = {}
    for key, value in max_tps.items():
        rate = float(value)
        if rate <= 0:
            raise ConfigError(f"limits.max_tps.{key}: rates must be positive, got {value!r}")
        if key in OPERATION_APIS:
            first, *others = OPERATION_APIS[key]
            main[first] = rate
            for other in others:
                secondary.setdefault(other, rate)
            continue
        api = api_name(key)
        if api is None:
            known = ", ".join(sorted(OPERATION_APIS))
            raise ConfigError(
                f"limits.max_tps.{key}: not an operation type ({known}) "
                "nor a Rekognition API name (e.g. DetectFaces)"
            )
        by_api[api] = rate

    ceilings: dict[str, float] = {}
    for api in apis:
        for source in (by_api, main, secondary):
            if api in source:
                ceilings[api] = source[api]
                break
        else:
            ceilings[api] = quota(api)
    return ceilings
