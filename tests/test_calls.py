"""``Caller`` alone, in virtual time: deadlines and attempts, failures to connect, an endpoint
never reached, refused credentials, and a run that is stopping."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from rekbatch.backends.base import ImageInput, InProcessBackend
from rekbatch.calls.caller import (
    TIMEOUT_CEILING,
    TIMEOUT_FACTOR,
    TIMEOUT_FLOOR,
    TIMEOUT_UNKNOWN,
    Caller,
    CallOutcome,
    LatencyWindow,
)
from rekbatch.calls.retry import Reachability, RetryPolicy
from rekbatch.errors import (
    BackendError,
    CredentialsRefused,
    EndpointNeverReached,
    EndpointUnreachable,
    Interrupted,
)
from tests.support.virtual_clock import FakeClock, VirtualClock

API = "DetectLabels"
Behaviour = Callable[[str, int], Any]  # (image name, its send number) -> seconds or an error


@dataclass
class NetworkBackend(InProcessBackend):
    """A backend over a pretend network: ``behave`` says, per send of an image (by key),
    how many seconds the answer takes or which error it raises."""

    behave: Behaviour
    network: bool = True
    endpoint_name: str = "the test endpoint"
    sends: Counter[str] = field(default_factory=Counter)
    refreshes: int = 0
    reload: Callable[[], Awaitable[None]] | None = None

    async def refresh_credentials(self) -> bool:
        if self.reload is None:
            return False
        await self.reload()
        return True

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        image = images["Image"]
        name = image.key or f"bytes:{len(image.data or b'')}"
        self.sends[name] += 1
        what = self.behave(name, self.sends[name])
        if isinstance(what, BaseException):
            raise what
        await asyncio.sleep(what)
        return {"Labels": []}

    async def aclose(self) -> None:
        pass


def _caller(backend: Any, clock: VirtualClock, **kwargs: Any) -> Caller:
    options: dict[str, Any] = {"max_tps": 10_000.0, "region": "eu-west-1"}
    options.update(kwargs)
    options.setdefault("retry", RetryPolicy(max_attempts=3, cap=2.0))
    return Caller(backend, apis=[API], clock=clock, **options)


def _image(key: str) -> dict[str, ImageInput]:
    return {"Image": ImageInput(bucket="bucket", key=key)}


def _refused() -> BackendError:
    return BackendError("EndpointConnectionError", "refused", "transient", connection="connect")


# --------------------------------------------------------------------------- deadlines


def test_a_request_always_slower_than_its_deadline_is_sent_max_attempts_times() -> None:
    """120 requests answer in 50 ms; one never answers in time. It is sent three times
    (max_attempts = 3) and fails with a timeout; before, it was sent until the endpoint
    counted as unreachable, although it answered everything else."""

    def behave(name: str, send: int) -> Any:
        return 3600.0 if name == "slow" else 0.05

    clock = VirtualClock()
    backend = NetworkBackend(behave)

    async def main() -> list[CallOutcome]:
        caller = _caller(backend, clock, unreachable_seconds=120.0)
        fast = [caller.call(API, {}, _image(f"img-{i:03d}")) for i in range(120)]
        outcomes = await asyncio.gather(*fast)
        return [*outcomes, await caller.call(API, {}, _image("slow"))]

    outcomes = clock.run(main())
    assert all(o.error is None for o in outcomes[:-1])
    slow = outcomes[-1]
    assert backend.sends["slow"] == 3
    assert slow.error is not None and slow.error.code == "Timeout"
    assert slow.attempts == 3


def test_a_deadline_follows_the_observed_latency_once_there_are_twenty_answers() -> None:
    """A stalled answer costs a few times the usual latency, not ``TIMEOUT_UNKNOWN``."""
    window = LatencyWindow()
    for _ in range(19):
        window.add(1.0)
    assert window.deadline() == TIMEOUT_UNKNOWN
    window.add(1.0)
    assert window.deadline() == TIMEOUT_FACTOR * 1.0 < TIMEOUT_UNKNOWN
    fast = LatencyWindow()
    for _ in range(20):
        fast.add(0.01)
    assert fast.deadline() == TIMEOUT_FLOOR
    slow = LatencyWindow()
    for _ in range(20):
        slow.add(1000.0)
    assert slow.deadline() == TIMEOUT_CEILING


def test_a_deadline_allows_for_the_upload_of_a_large_image() -> None:
    """A 4 MB image sent as bytes takes 8 s to upload on this link; the small ones answer
    in 50 ms, so the latency alone would give a deadline of ``TIMEOUT_FLOOR`` seconds."""
    big = b"\xff" * (4 << 20)

    def behave(name: str, send: int) -> Any:
        return 8.0 if name == f"bytes:{len(big)}" else 0.05

    clock = VirtualClock()
    backend = NetworkBackend(behave)

    async def main() -> CallOutcome:
        caller = _caller(backend, clock)
        await asyncio.gather(*(caller.call(API, {}, _image(f"i{i}")) for i in range(40)))
        assert caller.latency[API].deadline() == TIMEOUT_FLOOR
        return await caller.call(API, {}, {"Image": ImageInput(data=big)})

    outcome = clock.run(main())
    assert outcome.error is None and outcome.attempts == 1


def test_a_connection_that_fails_after_connecting_uses_attempts() -> None:
    def behave(name: str, send: int) -> Any:
        return BackendError("ConnectionClosedError", "closed", "transient", connection="exchange")

    clock = VirtualClock()
    backend = NetworkBackend(behave)
    outcome = clock.run(_caller(backend, clock).call(API, {}, _image("a")))
    assert backend.sends["a"] == 3
    assert outcome.error is not None and outcome.error.code == "ConnectionClosedError"


def test_failures_to_connect_use_no_attempts() -> None:
    def behave(name: str, send: int) -> Any:
        return _refused() if send <= 5 else 0.01

    clock = VirtualClock()
    backend = NetworkBackend(behave)

    async def main() -> CallOutcome:
        caller = _caller(backend, clock)
        await caller.call(API, {}, _image("warm-up"))  # the endpoint has answered before
        return await caller.call(API, {}, _image("a"))

    outcome = clock.run(main())
    assert outcome.error is None
    assert backend.sends["a"] == 6  # five refused connections, max_attempts = 3


# --------------------------------------------------------------------------- reachability


def test_an_endpoint_never_reached_stops_after_first_contact_seconds() -> None:
    clock = FakeClock()
    reach = Reachability("the endpoint", 120.0, clock, first_contact=15.0, ways_out="try X")
    reach.failed("refused", began=0.0)
    clock.advance(14.9)
    reach.failed("refused")
    clock.advance(0.1)
    with pytest.raises(EndpointNeverReached) as caught:
        reach.failed("refused: last")
    assert caught.value.exit_code == 2
    text = str(caught.value)
    assert "the endpoint" in text and "refused: last" in text and "try X" in text


def test_an_endpoint_that_answered_once_is_down_only_after_the_limit() -> None:
    clock = FakeClock()
    reach = Reachability("the endpoint", 120.0, clock, first_contact=15.0)
    reach.ok()
    reach.failed("refused")
    clock.advance(60.0)
    reach.failed("refused")  # 60 s: past first contact, but it has answered before
    clock.advance(60.0)
    with pytest.raises(EndpointUnreachable):
        reach.failed("refused")


def test_the_first_contact_clock_starts_when_the_failed_attempt_began() -> None:
    """A connect timeout of 10 s: the first failure is known only when it ends."""
    clock = FakeClock()
    reach = Reachability("the endpoint", 120.0, clock, first_contact=15.0)
    clock.advance(10.0)
    reach.failed("connect timeout", began=0.0)
    clock.advance(5.0)
    with pytest.raises(EndpointNeverReached):
        reach.failed("connect timeout", began=12.0)


def test_a_caller_whose_endpoint_never_answers_stops_with_exit_2() -> None:
    clock = VirtualClock()
    backend = NetworkBackend(lambda name, send: _refused())
    caller = _caller(backend, clock, first_contact_seconds=15.0)
    with pytest.raises(EndpointNeverReached):
        clock.run(caller.call(API, {}, _image("a")))
    assert 15.0 <= clock.now() < 25.0  # virtual seconds: a few backoffs past the limit


# --------------------------------------------------------------------------- credentials


def test_refused_credentials_are_reloaded_once_and_the_call_goes_through() -> None:
    state = {"renewed": False}

    def behave(name: str, send: int) -> Any:
        if state["renewed"]:
            return 0.01
        return BackendError("ExpiredTokenException", "expired", "credentials")

    async def renew() -> None:
        backend.refreshes += 1
        state["renewed"] = True

    clock = VirtualClock()
    backend = NetworkBackend(behave)
    backend.reload = renew

    async def main() -> list[CallOutcome]:
        caller = _caller(backend, clock)
        return await asyncio.gather(*(caller.call(API, {}, _image(f"i{i}")) for i in range(8)))

    outcomes = clock.run(main())
    assert all(o.error is None for o in outcomes)
    assert backend.refreshes == 1  # eight refusals at once, one reload


def test_credentials_refused_again_after_a_reload_stop_the_run() -> None:
    def behave(name: str, send: int) -> Any:
        return BackendError("UnrecognizedClientException", "invalid token", "credentials")

    async def renew() -> None:
        backend.refreshes += 1

    clock = VirtualClock()
    backend = NetworkBackend(behave)
    backend.reload = renew
    caller = _caller(backend, clock)
    with pytest.raises(CredentialsRefused) as caught:
        clock.run(caller.call(API, {}, _image("a")))
    assert backend.refreshes == 1 and backend.sends["a"] == 2
    assert "UnrecognizedClientException" in str(caught.value)
    assert caller.stats.failures[API] == 0  # nothing recorded against the image


def test_every_backend_declares_what_the_caller_reads_of_it() -> None:
    """``network``, ``endpoint_name``, ``ways_out`` and ``refresh_credentials`` are the
    ``Backend`` protocol's, read as they are; a backend in this process has nothing to
    reload, so a refusal of its credentials stops the run at once."""
    from rekbatch.backends.aws import AwsBackend
    from rekbatch.backends.base import Backend, InProcessBackend
    from rekbatch.backends.local.backend import LocalBackend
    from tests.support.fake_backend import FakeBackend

    members = ("network", "endpoint_name", "ways_out", "refresh_credentials")
    assert set(members) <= set(Backend.__annotations__) | set(vars(Backend))
    for backend in (AwsBackend, LocalBackend, FakeBackend, NetworkBackend):
        assert all(hasattr(backend, name) for name in members), backend
    assert AwsBackend.network and not LocalBackend.network and not FakeBackend.network
    assert issubclass(FakeBackend, InProcessBackend)

    fake = FakeBackend(hook=lambda n, api, ident: BackendError("X", "no", "credentials"))
    clock = VirtualClock()
    caller = _caller(fake, clock)
    with pytest.raises(CredentialsRefused, match="the backend"):
        clock.run(caller.call(API, {}, _image("a")))
    assert fake.calls[API] == 1


def test_credentials_that_expire_again_later_are_reloaded_again() -> None:
    """Credentials renewed every hour: each expiry gets its reload, as long as calls got
    through with the previous one."""
    generation = {"now": 0, "expired_at": 0}

    def behave(name: str, send: int) -> Any:
        if generation["expired_at"] == generation["now"] and name.startswith("x"):
            return BackendError("ExpiredTokenException", "expired", "credentials")
        return 0.01

    async def renew() -> None:
        backend.refreshes += 1
        generation["now"] += 1

    clock = VirtualClock()
    backend = NetworkBackend(behave)
    backend.reload = renew

    async def main() -> None:
        caller = _caller(backend, clock)
        assert (await caller.call(API, {}, _image("x1"))).error is None
        assert (await caller.call(API, {}, _image("ok"))).error is None
        generation["expired_at"] = generation["now"]  # an hour later
        assert (await caller.call(API, {}, _image("x2"))).error is None

    clock.run(main())
    assert backend.refreshes == 2


# --------------------------------------------------------------------------- stopping


def test_once_stopping_no_retry_starts() -> None:
    stopping = asyncio.Event()

    def behave(name: str, send: int) -> Any:
        stopping.set()  # the signal arrives while the first attempt is on the wire
        return BackendError("InternalServerError", "oops", "transient")

    clock = VirtualClock()
    backend = NetworkBackend(behave)
    caller = _caller(backend, clock, stopping=stopping)
    with pytest.raises(Interrupted):
        clock.run(caller.call(API, {}, _image("a")))
    assert backend.sends["a"] == 1
    with pytest.raises(Interrupted):  # a call begun while stopping is sent once
        clock.run(caller.call(API, {}, _image("b")))
    assert backend.sends["b"] == 1
