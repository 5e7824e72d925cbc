"""Clocks for tests: a fake clock that moves when told, and simulated time for many tasks."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class FakeClock:
    """A clock that moves only when told to, or when someone sleeps on it.

    ``sleep`` advances time immediately by the requested amount (then yields once to the
    loop), which makes single-consumer rate tests deterministic and instant.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        await asyncio.sleep(0)


class VirtualClock:
    """Simulated time for deterministic simulations of many concurrent tasks.

    ``run(main)`` runs a coroutine on a private event loop whose clock is this object: the
    loop never blocks, and whenever every task is waiting its time jumps straight to the next
    timer (any ``asyncio.sleep``, ``clock.sleep`` or ``wait_for`` deadline). A minute of
    simulated traffic runs in a fraction of a second, and the same program gives the same
    result on every run. ``now()`` and ``sleep()`` are meant for code running inside
    ``run``; outside it ``now()`` returns the last simulated time.

    ``max_steps`` bounds the loop iterations of one ``run`` so that a livelock fails fast;
    a deadlock (every task waits on something that no timer will ever set) raises at once.
    """

    def __init__(self, start: float = 0.0, *, max_steps: int = 10_000_000) -> None:
        self._now = float(start)
        self.max_steps = max_steps
        self.steps = 0

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """Run ``main`` to completion in virtual time and return its result."""
        with asyncio.Runner(loop_factory=lambda: _VirtualLoop(self)) as runner:
            return runner.run(main)

    def _advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)

    def _step(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise RuntimeError(f"virtual clock: more than {self.max_steps} loop steps")


class _VirtualSelector(selectors.SelectSelector):
    """Polls real file descriptors without blocking; 'waiting' advances virtual time."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._clock._step()
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:
            raise RuntimeError("virtual clock: deadlock, every task waits and no timer is set")
        self._clock._advance(timeout)
        return []


class _VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        self._virtual_clock = clock
        super().__init__(_VirtualSelector(clock))

    def time(self) -> float:
        return self._virtual_clock.now()
