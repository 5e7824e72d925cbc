"""Several Regions: the dispatcher over one limiter per (Region, API), in simulated time.

Each simulated Region is a token bucket per API at its quota (one second of burst) with
lognormal latency, as Rekognition's quota behaves; calls go through the real ``Caller`` and
``Regions``. Rates here are of simulated seconds (``VirtualClock``), so they hold on any
machine; the real-HTTP figures are in ``benchmarks/bench_regions.py``.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from rekbatch.backends.base import ImageInput, InProcessBackend, ObjectBytes
from rekbatch.calls.caller import Caller
from rekbatch.calls.limiter import AdaptiveLimiter
from rekbatch.calls.regions import BucketRegions, Regions
from rekbatch.calls.retry import RetryPolicy
from rekbatch.config import load_config
from rekbatch.errors import BackendError, ErrorKind
from tests.helpers import invoke, write_config
from tests.support.virtual_clock import VirtualClock

REGIONS = ("us-east-1", "us-west-2", "eu-west-1")
QUOTA = 40.0


@pytest.fixture(autouse=True)
def _plain_logging() -> Iterator[None]:
    """Log capture sees every level: a CLI run in this process may have raised it."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


class SimRegion(InProcessBackend):
    """One Region's Rekognition: a token bucket at ``quota`` per API, answers after a
    lognormal latency; ``down`` refuses connections, ``denied`` refuses every call."""

    def __init__(self, clock: VirtualClock, name: str, quota: float, seed: int) -> None:
        self.clock = clock
        self.name = name
        self.quota = quota
        self.rng = random.Random(seed)
        self.tokens: dict[str, float] = {}
        self.at: dict[str, float] = {}
        self.log: list[tuple[float, bool]] = []
        self.answered: Counter[str] = Counter()  # identity -> accepted answers
        self.images: Counter[str] = Counter()  # how images came: "bytes" or "s3"
        self.down = False
        self.denied: tuple[str, ErrorKind] | None = None  # every call refused so

    def _take(self, api: str, now: float) -> bool:
        tokens = self.tokens.get(api, self.quota)
        tokens = min(self.quota, tokens + (now - self.at.get(api, now)) * self.quota)
        self.at[api] = now
        ok = tokens >= 1.0
        self.tokens[api] = tokens - 1.0 if ok else tokens
        return ok

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        if self.down:
            await self.clock.sleep(0.005)
            raise BackendError("EndpointConnectionError", "Could not connect", "transient")
        if self.denied is not None:
            await self.clock.sleep(0.02)
            raise BackendError(self.denied[0], "not in this Region", self.denied[1])
        now = self.clock.now()
        ok = self._take(api, now)
        self.log.append((now, ok))
        await self.clock.sleep(self.rng.lognormvariate(math.log(0.15), 0.5))
        if not ok:
            raise BackendError("ProvisionedThroughputExceededException", "rate", "throttle")
        image = images["Image"]
        self.images["bytes" if image.data is not None else "s3"] += 1
        self.answered[str(params.get("Id"))] += 1
        return {"FaceDetails": []}

    async def aclose(self) -> None:
        pass


@dataclass
class Run:
    sims: dict[str, SimRegion]
    regions: Regions | None
    outcomes: dict[int, BackendError | None] = field(default_factory=dict)
    finished_at: float = 0.0

    def accepted(self, start: float, end: float, region: str | None = None) -> int:
        sims = [self.sims[region]] if region else list(self.sims.values())
        return sum(1 for sim in sims for t, ok in sim.log if ok and start <= t < end)

    def throttled_share(self) -> float:
        log = [ok for sim in self.sims.values() for _, ok in sim.log]
        return 1.0 - sum(log) / len(log)


def simulate(
    names: tuple[str, ...],
    *,
    items: int,
    consumers: int = 64,
    image: Callable[[int], ImageInput] = lambda i: ImageInput(data=b"\xff\xd8\xff"),
    events: list[tuple[float, Callable[[dict[str, SimRegion]], None]]] | None = None,
    ceiling: float = QUOTA,
    buckets: dict[str, str] | None = None,
    pin: bool = False,
) -> Run:
    """``items`` DetectFaces calls (one per item) by ``consumers`` workers over ``names``."""
    clock = VirtualClock()
    sims = {name: SimRegion(clock, name, QUOTA, seed=i) for i, name in enumerate(names)}
    home = names[0]
    caller = Caller(
        sims[home],
        max_tps=ceiling,
        region=home,
        retry=RetryPolicy(max_attempts=8, cap=2.0),
        apis=["DetectFaces"],
        clock=clock,
        rng=random.Random(1),
    )
    regions = None
    if len(names) > 1:

        def limiter(region: str, api: str) -> AdaptiveLimiter:
            if region == home:
                return caller.limiter(api)
            return AdaptiveLimiter(ceiling, clock=clock, name=f"{api}@{region}")

        regions = Regions(
            sims,
            home=home,
            limiter=limiter,
            buckets=BucketRegions(None, home, buckets),
            pin=pin,
            clock=clock,
        )
        caller.regions = regions
    run = Run(sims, regions)
    todo = iter(range(items))

    async def consumer() -> None:
        for i in todo:
            outcome = await caller.call("DetectFaces", {"Id": i}, {"Image": image(i)})
            run.outcomes[i] = outcome.error

    async def main() -> None:
        timers = [
            asyncio.get_running_loop().call_at(at, change, sims) for at, change in events or []
        ]
        await asyncio.gather(*(consumer() for _ in range(consumers)))
        run.finished_at = clock.now()
        for timer in timers:
            timer.cancel()
        if regions is not None:
            await regions.aclose()

    clock.run(main())
    return run


def exactly_once(run: Run, items: int) -> None:
    assert sorted(run.outcomes) == list(range(items))
    assert [i for i, error in run.outcomes.items() if error is not None] == []
    answered: Counter[str] = Counter()
    for sim in run.sims.values():
        answered.update(sim.answered)
    assert answered == Counter({str(i): 1 for i in range(items)})


def test_three_regions_run_at_their_quotas_together() -> None:
    items = 7200  # a minute at 120/s
    three = simulate(REGIONS, items=items)
    one = simulate(REGIONS[:1], items=items // 3)
    exactly_once(three, items)
    exactly_once(one, items // 3)
    # the steady seconds: past the first five, until the queue runs dry
    end = three.finished_at - 2.0
    rate = three.accepted(5.0, end) / (end - 5.0)
    assert rate >= 0.85 * 3 * QUOTA, rate
    one_end = one.finished_at - 2.0
    one_rate = one.accepted(5.0, one_end) / (one_end - 5.0)
    assert rate >= 2.5 * one_rate, (rate, one_rate)
    assert three.throttled_share() <= 0.02, three.throttled_share()
    for region in REGIONS:  # each at its own quota
        assert three.accepted(5.0, end, region) / (end - 5.0) >= 0.85 * QUOTA
    assert three.regions is not None
    snapshot = three.regions.snapshot(three.finished_at)
    assert {r: s["ok"] for r, s in snapshot.items()} == {
        r: sum(sim.answered.values()) for r, sim in three.sims.items()
    }


def test_a_region_that_goes_down_leaves_and_comes_back() -> None:
    items = 6000

    def down(sims: dict[str, SimRegion]) -> None:
        sims["us-west-2"].down = True

    def up(sims: dict[str, SimRegion]) -> None:
        sims["us-west-2"].down = False

    with capture_logs() as logs:
        run = simulate(REGIONS, items=items, events=[(15.0, down), (30.0, up)])
    exactly_once(run, items)
    events = [(e["event"], e.get("region")) for e in logs if e["event"].startswith("region_")]
    assert events == [("region_left_rotation", "us-west-2"), ("region_back", "us-west-2")]
    # the other two carried on at their quotas meanwhile
    others = run.accepted(17.0, 30.0, "us-east-1") + run.accepted(17.0, 30.0, "eu-west-1")
    assert others / 13.0 >= 0.85 * 2 * QUOTA
    assert run.accepted(17.0, 30.0, "us-west-2") == 0
    assert run.accepted(45.0, run.finished_at - 2.0, "us-west-2") > 0  # back in the rotation
    assert run.regions is not None
    moved = run.regions.snapshot(1.0)["us-west-2"]["moved"]
    assert moved >= 1  # the calls it failed went elsewhere, using no attempt


@pytest.mark.parametrize(
    "refusal",
    [
        ("AccessDeniedException", "permanent"),  # an SCP denying the Region
        ("UnrecognizedClientException", "credentials"),  # a Region not enabled
    ],
)
def test_a_region_that_refuses_every_call_fails_no_record(refusal: tuple[str, ErrorKind]) -> None:
    def deny(sims: dict[str, SimRegion]) -> None:
        sims["eu-west-1"].denied = refusal

    with capture_logs() as logs:
        run = simulate(REGIONS, items=1500, events=[(3.0, deny)])
    exactly_once(run, 1500)
    left = [e for e in logs if e["event"] == "region_left_rotation"]
    assert [e["region"] for e in left] == ["eu-west-1"]
    assert refusal[0] in left[0]["error"]


def test_images_go_as_bytes_outside_their_buckets_region_read_once() -> None:
    reads: Counter[int] = Counter()

    def image(i: int) -> ImageInput:
        async def read() -> bytes:
            reads[i] += 1
            return b"\xff\xd8\xff" + bytes([i % 256])

        return ImageInput(bucket="photos", key=f"{i}.jpg", fetch=ObjectBytes(1000, read))

    run = simulate(REGIONS, items=900, image=image, buckets={"photos": "us-west-2"})
    exactly_once(run, 900)
    assert run.sims["us-west-2"].images == Counter(
        {"s3": sum(run.sims["us-west-2"].answered.values())}
    )
    for region in ("us-east-1", "eu-west-1"):
        assert run.sims[region].images["s3"] == 0 and run.sims[region].images["bytes"] > 0
    assert max(reads.values()) == 1  # however many Regions and retries it met
    assert run.regions is not None
    snapshot = run.regions.snapshot(1.0)
    assert snapshot["us-west-2"]["objects_read"] == 0
    assert sum(s["objects_read"] for s in snapshot.values()) == len(reads)


def test_pinned_images_stay_in_their_buckets_region() -> None:
    def image(i: int) -> ImageInput:
        bucket = "east" if i % 2 else "west"

        async def read() -> bytes:
            raise AssertionError("image_mode s3 never downloads")

        return ImageInput(bucket=bucket, key=f"{i}.jpg", fetch=ObjectBytes(1000, read))

    run = simulate(
        REGIONS,
        items=600,
        image=image,
        buckets={"east": "us-east-1", "west": "us-west-2"},
        pin=True,
    )
    exactly_once(run, 600)
    assert set(run.sims["us-east-1"].answered) == {str(i) for i in range(1, 600, 2)}
    assert set(run.sims["us-west-2"].answered) == {str(i) for i in range(0, 600, 2)}
    assert not run.sims["eu-west-1"].answered


# ------------------------------------------------------------------------------------ config

CONFIG = """
[source]
uris = ["s3://photos/"]

[aws]
region = "us-east-1"
{aws}

[[operations]]
type = "detect_faces"
"""


def test_regions_in_the_config(tmp_path: Path) -> None:
    plain = load_config(write_config(tmp_path / "a.toml", CONFIG.format(aws="")), environ={})
    assert plain.aws.calling_regions() == ["us-east-1"]
    spread = load_config(
        write_config(
            tmp_path / "b.toml", CONFIG.format(aws='regions = ["us-west-2", "us-east-1"]')
        ),
        environ={"REKBATCH_AWS__REGIONS": '["eu-west-1", "us-east-1"]'},
    )
    assert spread.aws.calling_regions() == ["eu-west-1", "us-east-1"]
    assert spread.fingerprint() == plain.fingerprint()  # the same job, faster

    for aws, field_name in (
        ('regions = ["us-east-1", "us-east-1"]', "aws.regions"),
        ('regions = ["mars"]', "aws.regions"),
        ("regions = []", "aws.regions"),
        ('regions = ["us-west-2"]\nrekognition_region = "bucket"', "aws"),
        ('rekognition_region = "us-west-2"', "aws.rekognition_region"),
    ):
        path = write_config(tmp_path / "bad.toml", CONFIG.format(aws=aws))
        result = invoke("validate", str(path))
        assert result.exit_code == 2, (aws, result.stdout)
        assert field_name in result.stderr, (aws, result.stderr)
    bucket = load_config(
        write_config(tmp_path / "c.toml", CONFIG.format(aws='rekognition_region = "bucket"')),
        environ={},
    )
    assert bucket.aws.rekognition_region == "bucket"


@pytest.mark.parametrize("consumers", [1, 8])
def test_a_call_given_up_hands_its_permit_on(consumers: int) -> None:
    """Calls cancelled while waiting (a stop) leave no permit lost: the rest still run."""
    clock = VirtualClock()
    sims = {name: SimRegion(clock, name, QUOTA, seed=i) for i, name in enumerate(REGIONS)}
    caller = Caller(
        sims["us-east-1"], max_tps=QUOTA, region="us-east-1", retry=RetryPolicy(), clock=clock
    )
    regions = Regions(
        sims,
        home="us-east-1",
        limiter=lambda r, a: AdaptiveLimiter(QUOTA, clock=clock, name=f"{a}@{r}"),
        buckets=BucketRegions(None, "us-east-1"),
        clock=clock,
    )
    caller.regions = regions

    async def main() -> int:
        image = {"Image": ImageInput(data=b"\xff\xd8\xff")}
        doomed = [
            asyncio.ensure_future(caller.call("DetectFaces", {"Id": f"x{i}"}, image))
            for i in range(200)
        ]
        await asyncio.sleep(0.5)
        for task in doomed:
            task.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        done = await asyncio.gather(
            *(caller.call("DetectFaces", {"Id": i}, image) for i in range(consumers * 10))
        )
        await regions.aclose()
        return sum(o.error is None for o in done)

    assert clock.run(main()) == consumers * 10


# -------------------------------------------------------------------------------------- plan


def test_plan_shows_each_region_set_with_what_spreading_adds(tmp_path: Path) -> None:
    from rekbatch.commands.plan import _duration
    from rekbatch.commands.plan_regions import region_plan, render_region_plan

    aws = 'regions = ["us-west-2", "us-east-1", "eu-west-1"]'
    cfg = load_config(write_config(tmp_path / "p.toml", CONFIG.format(aws=aws)), environ={})
    ceilings = {
        region: {"DetectFaces": 40.0, "SearchFacesByImage": 50.0}
        for region in ("us-east-1", "us-west-2", "eu-west-1")
    }
    mib = 2**20
    plan = region_plan(
        cfg,
        {"DetectFaces": 3000, "SearchFacesByImage": 300},
        ceilings,
        images=3000,
        by_reference=3000,
        image_bytes=3000 * mib,
    )
    assert plan is not None
    sets = plan["sets"]
    # The home Region first, then the others in their order; collections stay home.
    assert [s["regions"] for s in sets] == [
        ["us-east-1"],
        ["us-east-1", "us-west-2"],
        ["us-east-1", "us-west-2", "eu-west-1"],
    ]
    assert [s["seconds"] for s in sets] == [75.0, 37.5, 25.0]
    assert [s["gets"] for s in sets] == [0, 1500, 2000]
    assert [s["bytes_elsewhere"] for s in sets] == [0, 1500 * mib, 2000 * mib]
    assert sets[1]["extra_cost_usd"] == pytest.approx(
        1500 * 0.0004 / 1000 + 1500 / 1024 * 0.02, abs=1e-6
    )
    assert sets[2]["extra_cost_usd"] == pytest.approx(
        2000 * 0.0004 / 1000 + 2000 / 1024 * 0.02, abs=1e-6
    )
    lines = render_region_plan(plan, _duration)
    assert lines[0].startswith("time in us-east-1 ") and lines[0].endswith("1 min 15 s")
    assert "25 s, spreading adds $0.04 (2000 GETs, 2.0 GB to other Regions)" in lines[2]
    assert "as of 2026-12-07" in lines[3]
    # Images that go as bytes anyway add nothing; one Region has no Region plan.
    assert region_plan(cfg, {"DetectFaces": 30}, ceilings, images=30, by_reference=0,
                       image_bytes=30 * mib)["sets"][2]["extra_cost_usd"] == 0.0  # fmt: skip
    one = load_config(write_config(tmp_path / "o.toml", CONFIG.format(aws="")), environ={})
    assert region_plan(one, {"DetectFaces": 30}, ceilings, images=30, by_reference=30,
                       image_bytes=30) is None  # fmt: skip
