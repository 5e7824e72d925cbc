"""Disjoint key ranges of one S3 prefix, so that several paginators can list it at once.

A range is every key ``k`` with ``after < k <= upto`` (``None``: unbounded), in S3's order
(UTF-8 binary, which is Python's code point order for str). Any increasing list of boundary
strings cuts the key space into ranges that cover it exactly once, whatever keys exist:
the boundaries decide only how evenly the work is shared, never which keys are listed. So
the splitter may guess, and a guess that turns out lopsided costs speed, not correctness.

Boundaries come from the bucket itself, cheaply:

- ``Delimiter="/"`` on the prefix gives its sub-prefixes (one page); where a level has fewer
  than wanted, its sub-prefixes are split the same way, a few levels down;
- where that gives too few (a flat prefix, or one huge folder), keys are sampled with
  one-key probes (``StartAfter=probe, MaxKeys=1``): after each known key, the next string at
  each of its character positions (``img_0999`` → ``img_1``, ``img_01``, ...) finds keys at
  every scale of a numbered layout in one round, and between two known keys the characters
  seen so far at their first difference fill the gap. A few rounds, each one batch of
  concurrent requests.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

# (kwargs for ListObjectsV2) -> the page
PageFn = Callable[..., Awaitable[dict[str, Any]]]

MAX_DELIMITER_DEPTH = 3
DESCENT = 3  # characters of the last key looked for
TOP = "\U0010ffff"  # above every character a key can hold


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys ``k`` with ``after < k <= upto``; ``None`` is unbounded on that side. ``part``:
    instead, one file of a source that is a set of files (an inventory's data file)."""

    after: str | None
    upto: str | None
    part: str | None = None

    def holds(self, key: str) -> bool:
        return (self.after is None or key > self.after) and (self.upto is None or key <= self.upto)


def ranges_from_boundaries(boundaries: Iterable[str]) -> list[KeyRange]:
    """The ranges between sorted distinct ``boundaries``: (None, b1], (b1, b2], ..., (bn, None)."""
    cuts = sorted(set(boundaries))
    edges: list[str | None] = [None, *cuts, None]
    return [KeyRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def pick_evenly(items: list[str], n: int) -> list[str]:
    """At most ``n`` of the sorted ``items``, spread evenly over them."""
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


class KeySpace:
    """Strings after a shared prefix read as numbers over an alphabet, so that boundaries can
    be spread evenly between two keys (numbered and hashed names come out even)."""

    DIGITS = 8  # positions of precision after the shared prefix

    def __init__(self, shared: str, alphabet: Iterable[str]) -> None:
        self.shared = shared
        self.alphabet = sorted(set(alphabet)) or ["0"]
        self.base = len(self.alphabet) + 2  # 0: end of the string; base-1: above all

    def value(self, key: str) -> int:
        tail = key[len(self.shared) :] if key.startswith(self.shared) else ""
        total = 0
        for i in range(self.DIGITS):
            digit = 0
            if i < len(tail):
                at = bisect.bisect_left(self.alphabet, tail[i])
                exact = at < len(self.alphabet) and self.alphabet[at] == tail[i]
                digit = at + 1 if exact else min(at + 1, self.base - 1)
            total = total * self.base + digit
        return total

    def string(self, value: int) -> str:
        digits: list[int] = []
        for _ in range(self.DIGITS):
            value, digit = divmod(value, self.base)
            digits.append(digit)
        chars: list[str] = []
        for digit in reversed(digits):
            if digit == 0:
                break
            chars.append(self.alphabet[min(digit, len(self.alphabet)) - 1])
        return self.shared + "".join(chars)

    def spread(self, low: str, high_value: int, n: int) -> list[str]:
        """``n - 1`` strings evenly between ``low`` and the value ``high_value``."""
        lo = self.value(low)
        if high_value <= lo or n <= 1:
            return []
        step = (high_value - lo) / n
        return sorted({self.string(int(lo + step * i)) for i in range(1, n)})


class Splitter:
    """Finds boundaries for ``want`` ranges of ``bucket``/``prefix`` with at most
    ``concurrency`` requests at a time."""

    def __init__(
        self, page: PageFn, bucket: str, prefix: str, *, want: int, concurrency: int
    ) -> None:
        self._page = page
        self.bucket = bucket
        self.prefix = prefix
        self.want = want
        self._sem = asyncio.Semaphore(max(1, concurrency))
        self.requests = 0

    async def _list(self, **kwargs: Any) -> dict[str, Any]:
        async with self._sem:
            self.requests += 1
            return await self._page(Bucket=self.bucket, **kwargs)

    async def split(self) -> list[KeyRange]:
        first = await self._list(Prefix=self.prefix, MaxKeys=1000)
        keys = [item["Key"] for item in first.get("Contents", ())]
        if not first.get("IsTruncated") or self.want <= 1:
            return [KeyRange(None, None)]  # one page or less: nothing to share
        boundaries: set[str] = {keys[-1]} if keys else set()
        boundaries |= await self._by_delimiter(self.prefix, 0)
        if len(boundaries) < self.want // 2:
            boundaries |= set(await self._by_interpolation(keys))
        return ranges_from_boundaries(pick_evenly(sorted(boundaries), self.want))

    async def _by_delimiter(self, prefix: str, depth: int) -> set[str]:
        page = await self._list(Prefix=prefix, Delimiter="/", MaxKeys=1000)
        subs = [p["Prefix"] for p in page.get("CommonPrefixes", ())]
        found = set(subs)
        if subs and len(subs) < self.want and depth + 1 < MAX_DELIMITER_DEPTH:
            deeper = await asyncio.gather(*(self._by_delimiter(p, depth + 1) for p in subs))
            for more in deeper:
                found |= more
        return found

    async def _by_interpolation(self, first: list[str]) -> list[str]:
        """Boundaries spread evenly between the first key and an estimate of the last."""
        lowest = first[0]
        common = common_prefix(first[0], first[-1])
        # How much of the first page's common prefix every key shares: keys after
        # ``common[:j]`` followed by the highest character exist only if some key leaves it.
        cuts = list(range(len(self.prefix), len(common) + 1))
        pages = await asyncio.gather(*(self._probe(common[:j] + TOP) for j in cuts))
        shared = self.prefix
        for j, page in zip(cuts, pages, strict=True):
            if not page:
                shared = common[:j]
        alphabet = {c for key in first for c in key[len(shared) :]}
        # The largest key, a few characters deep: at each position the highest character
        # some key has there.
        top = shared
        for _ in range(DESCENT):
            chars = sorted(c for c in alphabet if not top + c < lowest[: len(top) + 1])
            found = await asyncio.gather(*(self._probe(top + c) for c in chars))
            here = [key for key in found if key is not None and key.startswith(top)]
            here += [c for c in ([lowest] if lowest.startswith(top) else [])]
            if not here:
                break
            best = max(here)
            if len(best) <= len(top):
                break
            alphabet |= {c for key in here for c in key[len(shared) :]}
            top = best[: len(top) + 1]
        space = KeySpace(shared, alphabet)
        upper = space.value(top) + space.base ** (KeySpace.DIGITS - (len(top) - len(shared)))
        return space.spread(lowest, upper, self.want)

    async def _probe(self, after: str) -> str | None:
        """The first key after ``after``, or None."""
        page = await self._list(Prefix=self.prefix, StartAfter=after, MaxKeys=1)
        contents = page.get("Contents") or []
        return str(contents[0]["Key"]) if contents else None
