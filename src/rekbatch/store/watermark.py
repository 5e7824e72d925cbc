"""The listing watermark of one source: the last key below which everything is finished.

Keys are pushed in listing order and completed in any order; the mark moves over the longest
finished prefix. Only the unfinished window is held, so memory is bounded by the work in
flight, not by the bucket.
"""

from __future__ import annotations

from collections import deque


class WatermarkTracker:
    def __init__(self, start: str | None) -> None:
        self.mark = start
        self._pending: deque[tuple[int, str]] = deque()
        self._done: set[int] = set()
        self._next = 0
        self.moved = False

    def push(self, key: str) -> int:
        seq = self._next
        self._next += 1
        self._pending.append((seq, key))
        return seq

    def complete(self, seq: int) -> None:
        self._done.add(seq)
        while self._pending and self._pending[0][0] in self._done:
            first, key = self._pending.popleft()
            self._done.discard(first)
            self.mark = key
            self.moved = True

    @property
    def outstanding(self) -> int:
        return len(self._pending)
