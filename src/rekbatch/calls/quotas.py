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


def resolve_ceilings(
    max_tps: float | Mapping[str, float] | None, region: str, apis: Iterable[str]
) -> dict[str, float]:
    """The rate ceiling of each API in ``apis``.

    - ``None``: the published default quota of each.
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
    if max_tps is None:
        return {api: default_tps(api, region) for api in apis}
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
            ceilings[api] = default_tps(api, region)
    return ceilings
