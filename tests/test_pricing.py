"""The price table: groups, tiers per group per month, volume already used."""

from __future__ import annotations

import pytest

from rekbatch.pricing import (
    PRICES_AS_OF,
    PRICES_REGION,
    estimate_cost,
    price_group,
)


def test_constants_say_when_and_where() -> None:
    assert PRICES_REGION == "us-east-1"
    assert len(PRICES_AS_OF) == 10 and PRICES_AS_OF.startswith("20")


@pytest.mark.parametrize(
    ("api", "group"),
    [
        ("CompareFaces", "group1"),
        ("IndexFaces", "group1"),
        ("SearchFacesByImage", "group1"),
        ("SearchUsersByImage", "group1"),
        ("compare_faces", "group1"),
        ("search_faces", "group1"),
        ("DetectFaces", "group2"),
        ("DetectLabels", "group2"),
        ("RecognizeCelebrities", "group2"),
        ("detect_protective_equipment", "group2"),
        ("ImageProperties", "image_properties"),
        ("ListFaces", "free"),
        ("all", "group2"),
        ("SomethingNew", "group2"),
    ],
)
def test_price_group(api: str, group: str) -> None:
    assert price_group(api) == group


def test_small_mix_in_the_first_tier() -> None:
    # 1,000 x $0.001 (Group 2) + 1,000 x $0.001 (Group 1)
    assert estimate_cost({"DetectFaces": 1_000, "CompareFaces": 1_000}) == 2.0
    assert estimate_cost({}) == 0.0
    assert estimate_cost({"DetectFaces": 1}) == 0.001


def test_old_call_shapes_still_work() -> None:
    # pipeline passes operation types, the budget check passes "all"
    assert estimate_cost({"detect_faces": 10, "compare_faces": 10}) == 0.02
    assert estimate_cost({"all": 2_000}) == 2.0


def test_crossing_the_first_tier_boundary() -> None:
    # Group 2 shared by both APIs: 1,500,000 images this month.
    # 1,000,000 x 0.001 = 1,000.00; 500,000 x 0.0008 = 400.00
    billed = {"DetectLabels": 900_000, "DetectFaces": 600_000}
    assert estimate_cost(billed) == 1_400.0


def test_tiers_are_per_group() -> None:
    # Group 2: 1,200,000 -> 1,000 + 200,000 x 0.0008 = 1,160.00
    # Group 1:   800,000 ->   800,000 x 0.001           =   800.00
    billed = {"DetectFaces": 1_200_000, "CompareFaces": 800_000}
    assert estimate_cost(billed) == 1_960.0


def test_volume_already_used_this_month() -> None:
    # 800,000 Group 2 images already billed: 200,000 x 0.001 + 300,000 x 0.0008 = 440.00
    already = {"DetectFaces": 800_000}
    assert estimate_cost({"DetectLabels": 500_000}, already_billed=already) == 440.0
    # Group 1 volume does not move Group 2 along its tiers.
    group1_month = {"IndexFaces": 5_000_000}
    assert estimate_cost({"DetectLabels": 500_000}, already_billed=group1_month) == 500.0
    # Already deep in the second tier: 1,000 x 0.0008
    deep = {"compare_faces": 2_000_000}
    assert estimate_cost({"CompareFaces": 1_000}, already_billed=deep) == 0.8


def test_all_four_tiers() -> None:
    # Group 2, 36,000,000 images:
    #   1,000,000 x 0.001   =  1,000.00
    #   4,000,000 x 0.0008  =  3,200.00
    #  30,000,000 x 0.0006  = 18,000.00
    #   1,000,000 x 0.00025 =    250.00
    assert estimate_cost({"DetectText": 36_000_000}) == 22_450.0
    # Group 1 over 35M: 1,000,000 x 0.0004 = 400.00
    past_35m = {"IndexFaces": 35_000_000}
    assert estimate_cost({"SearchFacesByImage": 1_000_000}, already_billed=past_35m) == 400.0


def test_image_properties_add_to_detect_labels() -> None:
    # 2,000 DetectLabels (0.001) + their Image Properties (0.00075)
    assert estimate_cost({"DetectLabels": 2_000, "ImageProperties": 2_000}) == 3.5


def test_free_apis_cost_nothing() -> None:
    assert estimate_cost({"CreateCollection": 5, "ListFaces": 100}) == 0.0


def test_regions() -> None:
    billed = {"DetectFaces": 1_000, "CompareFaces": 1_000}
    assert estimate_cost(billed, region="eu-west-1") == 2.0
    # a region without its own table falls back to us-east-1's
    assert estimate_cost(billed, region="ap-southeast-7") == 2.0


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        estimate_cost({"DetectFaces": -1})
