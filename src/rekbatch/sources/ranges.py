"""Disjoint key ranges of one S3 prefix, so that several paginators can list it at once, and
the listing of one range that reads little past its end.

A range is every key ``k`` with ``after < k <= upto`` (``None``: unbounded), in S3's order
(UTF-8 binary, which is Python's code point order for str). Any increasing list of boundary
strings cuts the key space into ranges that cover it exactly once, whatever keys exist:
the boundaries decide only how evenly the work is shared, never which keys are listed. So
the splitter may guess, and a guess that turns out lopsided costs speed, not correctness.

Boundaries are the ends of prefixes, ``P + TOP`` (TOP above every character), each the
shortest prefix that ends before the next boundary (``as_prefix_ends``): a range ends where a
prefix ends. S3 has no end key, only a Prefix, and a page that runs past a range's end reads
keys the next range reads again. So a range is listed prefix by prefix (``list_keys``): where
the last key read first differs from the range's end, its branch there lies wholly in the
range and is listed with that Prefix (S3 stops at its end); a one-key probe finds the next
branch, a level deeper each time the end's own branch is reached, and the end's own prefix
is listed whole. Only a probe past the end reads a key outside the range.

Boundaries come from the bucket itself, cheaply:

- ``Delimiter="/"`` on the prefix gives its sub-prefixes (one page); where a level has fewer
  than wanted and the first page shows folders below it, its sub-prefixes are split the same
  way, a few levels down (a level of files is not read for nothing);
- where that gives too few (a flat prefix, or one huge folder), keys are sampled with
  one-key probes (``StartAfter=probe, MaxKeys=1``): after each known key, the next string at
  each of its character positions (``img_0999`` → ``img_1``, ``img_01``, ...) finds keys at
  every scale of a numbered layout in one round, and between two known keys the characters
  seen so far at their first difference fill the gap. A few rounds, each one batch of
  concurrent requests.

The splitter's first page (up to 1,000 keys) is kept (``Head``) and handed out by the ranges
it covers, so splitting reads no key twice either.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

# (kwargs for ListObjectsV2) -> the page
PageFn = Callable[..., Awaitable[dict[str, Any]]]

MAX_DELIMITER_DEPTH = 3
MAX_FOLDERS = 10_000  # sub-prefixes of one level read to place boundaries
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


def prefix_end(prefix: str) -> str:
    """The boundary after every key that starts with ``prefix``."""
    return prefix + TOP


@dataclass(frozen=True, slots=True)
class Head:
    """The first page of a prefix, read by the splitter and handed out by the ranges that
    cover it instead of being listed again."""

    items: list[dict[str, Any]]
    truncated: bool

    @property
    def last(self) -> str | None:
        return str(self.items[-1]["Key"]) if self.items else None

    def covers(self, cursor: str | None) -> bool:
        last = self.last
        return last is not None and (cursor is None or cursor < last)

    def after(self, cursor: str | None) -> list[dict[str, Any]]:
        if cursor is None:
            return self.items
        keys = [str(item["Key"]) for item in self.items]
        return self.items[bisect.bisect_right(keys, cursor) :]


def ranges_from_boundaries(boundaries: Iterable[str]) -> list[KeyRange]:
    """The ranges between sorted distinct ``boundaries``: (None, b1], (b1, b2], ..., (bn, None)."""
    cuts = sorted(set(boundaries))
    edges: list[str | None] = [None, *cuts, None]
    return [KeyRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


MOVE_REACH = 0.5  # how far towards the next boundary a boundary may move to end a prefix


def as_prefix_ends(boundaries: list[str], prefix: str, alphabet: Iterable[str]) -> list[str]:
    """Sorted ``boundaries`` moved to the ends of prefixes: each to the shortest prefix
    (longer than the source's ``prefix``) whose end comes before the next boundary and not
    more than half way to it, as the keys' characters measure it. A range then ends where a
    prefix ends, and the shorter that prefix, the fewer requests its listing takes; the
    half way keeps the ranges about as even as the boundaries were. A boundary no prefix
    end fits stays where it is."""
    chars = set(alphabet)
    moved: list[str] = []
    for i, boundary in enumerate(boundaries):
        stem = boundary[:-1] if boundary.endswith(TOP) else boundary
        if i + 1 == len(boundaries):
            moved.append(prefix_end(stem))
            break
        after = boundaries[i + 1]
        space = KeySpace(common_prefix(stem, after), chars | set(stem) | set(after))
        low, high = space.value(boundary), space.value(after)
        for length in range(len(prefix) + 1, len(stem) + 1):
            end = prefix_end(stem[:length])
            if end < after and space.value(end) - low <= MOVE_REACH * (high - low):
                moved.append(end)
                break
        else:
            moved.append(boundary)
    return sorted(set(moved))


def estimate_keys(ranges: list[KeyRange], sample: list[str]) -> list[float]:
    """Keys each of the sorted ``ranges`` holds: counted where it lies within the sorted
    ``sample`` (a first page), else the average of those (the splitter meant its ranges to
    be even; a density over the key space misjudges folders)."""
    counted: list[float | None] = [
        float(sum(1 for key in sample if r.holds(key)))
        if r.upto is not None and r.upto <= sample[-1]
        else None
        for r in ranges
    ]
    known = [n for n in counted if n is not None]
    typical = max(1.0, sum(known) / len(known)) if known else 1.0
    return [typical if n is None else n for n in counted]


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
        self,
        page: PageFn,
        bucket: str,
        prefix: str,
        *,
        want: int,
        concurrency: int,
        sample: int = 1000,
    ) -> None:
        self._page = page
        self.bucket = bucket
        self.prefix = prefix
        self.want = want
        self.sample = sample  # keys of the first page
        self._sem = asyncio.Semaphore(max(1, concurrency))
        self.requests = 0
        self.head: Head | None = None

    async def _list(self, **kwargs: Any) -> dict[str, Any]:
        async with self._sem:
            self.requests += 1
            return await self._page(Bucket=self.bucket, **kwargs)

    async def split(self) -> list[KeyRange]:
        first = await self._list(Prefix=self.prefix, MaxKeys=self.sample)
        self.head = Head(list(first.get("Contents", ())), bool(first.get("IsTruncated")))
        keys = [item["Key"] for item in self.head.items]
        if not first.get("IsTruncated") or self.want <= 1 or not keys:
            return [KeyRange(None, None)]  # one page or less: nothing to share
        boundaries: set[str] = set()
        if any("/" in key[len(self.prefix) :] for key in keys):
            found = await self._by_delimiter(self.prefix, 0, keys)
            boundaries |= {prefix_end(p) for p in found}
        if len(boundaries) < self.want // 2:
            boundaries |= set(await self._by_interpolation(keys))
        picked = pick_evenly(sorted(b for b in boundaries if b > self.prefix), self.want)
        alphabet = {c for key in keys for c in key[len(self.prefix) :]}
        return ranges_from_boundaries(as_prefix_ends(picked, self.prefix, alphabet))

    async def _by_delimiter(self, prefix: str, depth: int, sample: list[str]) -> set[str]:
        page = await self._list(Prefix=prefix, Delimiter="/", MaxKeys=1000)
        subs = [p["Prefix"] for p in page.get("CommonPrefixes", ())]
        # More pages of a level of folders alone (many small folders), none of files.
        while page.get("IsTruncated") and subs and not page.get("Contents"):
            if len(subs) >= MAX_FOLDERS:
                break
            page = await self._list(
                Prefix=prefix, Delimiter="/", MaxKeys=1000, StartAfter=prefix_end(subs[-1])
            )
            subs += [p["Prefix"] for p in page.get("CommonPrefixes", ())]
        found = set(subs)
        # Down a level only where the first page shows folders below this level's: a level
        # of files would be read for nothing.
        deeper_exists = any(
            "/" in key[len(sub) :] for key in sample for sub in subs if key.startswith(sub)
        )
        if subs and len(subs) < self.want and depth + 1 < MAX_DELIMITER_DEPTH and deeper_exists:
            deeper = await asyncio.gather(*(self._by_delimiter(p, depth + 1, sample) for p in subs))
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


PROBE_KEYS = 1  # a probe finds where the next prefix starts; its key is the range's own


def whole_prefix(cursor: str, upto: str) -> str | None:
    """The shortest prefix of ``cursor`` every key of which lies in ``(cursor's range, upto]``:
    where the cursor first differs from the end, its branch there (or, at the end's own
    prefix, that prefix). None when the cursor is not below ``upto`` that way."""
    shared = common_prefix(cursor, upto)
    if upto.endswith(TOP) and len(shared) == len(upto) - 1:
        return shared  # inside the last prefix: it ends where the range ends
    at = len(shared)
    if len(cursor) <= at or len(upto) <= at or cursor[at] > upto[at]:
        return None
    return cursor[: at + 1]


async def list_keys(
    page: PageFn,
    bucket: str,
    prefix: str,
    rng: KeyRange,
    start_after: str | None,
    *,
    page_size: int = 1000,
    head: Head | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The ListObjectsV2 entries of ``rng`` under ``prefix`` after ``start_after``, in key
    order, reading little past the range's end.

    S3 has no end key, only a Prefix. So where the cursor (the last key read) first differs
    from the range's end, its branch there lies wholly in the range: it is listed with that
    Prefix and S3 stops at its end. Then a one-key probe, under what the cursor and the end
    share, finds the next key, and so on towards the end, a level deeper each time the
    cursor reaches the end's own branch. Only the probe past the end reads a key that is not
    the range's. A range ending where a prefix ends is done with that prefix."""
    upto = rng.upto
    cursor = max((k for k in (rng.after, start_after) if k is not None), default=None)
    # Whether the cursor is a key of this range (then its branch is the range's, whole).
    inside = start_after is not None and (rng.after is None or start_after > rng.after)
    if head is not None and head.covers(cursor):
        for item in head.after(cursor):
            if upto is not None and item["Key"] > upto:
                return
            yield item
        if not head.truncated:
            return
        cursor, inside = head.last, True
    while True:
        narrow = prefix
        whole: str | None = None  # a prefix listed to its end
        size = page_size
        if cursor is not None and upto is not None:
            narrow = max(prefix, common_prefix(cursor, upto), key=len)
            whole = whole_prefix(cursor, upto) if inside else None
            if whole is not None and len(whole) > len(narrow):
                narrow = whole
            elif whole is None:
                size = PROBE_KEYS
        elif upto is not None:
            size = PROBE_KEYS  # from the source's start: find its first key
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": narrow, "MaxKeys": size}
        if cursor is not None:
            kwargs["StartAfter"] = cursor
        answer = await page(**kwargs)
        items = answer.get("Contents") or []
        for item in items:
            if upto is not None and item["Key"] > upto:
                return
            yield item
        if items and answer.get("IsTruncated"):
            cursor, inside = str(items[-1]["Key"]), True
            continue
        if whole is None or upto is None or whole == common_prefix(whole, upto):
            return  # nothing left under what every remaining key starts with
        cursor, inside = prefix_end(whole), False  # this branch is done: find the next
