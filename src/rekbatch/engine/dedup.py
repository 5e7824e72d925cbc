"""Same content, called once: objects with equal ETag and size share one result.

The first object of a content is its original; the others are copies, written from the
original's rows in results.jsonl with ``dedup_of``, never paid for. What is remembered is a
content key and where the original's rows are, never the response itself:

- in memory, only while an original is in flight or its rows are not committed yet (a copy
  seen meanwhile waits for it);
- after that, in the ledger, which the producer asks for each chunk of listed objects, so a
  copy seen in a later run of the job is not called again either.

Memory is bounded by the work in flight, not by the bucket.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from rekbatch.records import ObjectRef
from rekbatch.store.ledger import Location

Content = tuple[str, int]  # (ETag, size)


def content_of(obj: ObjectRef) -> Content | None:
    """The content key of an S3 object; None where the ETag says nothing about the content
    (a local file's ETag is its size and modification time)."""
    if obj.bucket is None or not obj.etag or obj.size <= 0:
        return None
    return obj.etag, obj.size


@dataclass(slots=True)
class _Open:
    future: asyncio.Future[list[Location] | None]
    visible_at: int | None = None  # the commit after which the ledger holds the rows


class Dedup:
    def __init__(self) -> None:
        self._open: dict[Content, _Open] = {}
        self.copies = 0

    def claim(
        self,
        content: Content,
        operations: list[str],
        committed: list[Location] | None,
    ) -> list[Location] | asyncio.Future[list[Location] | None] | None:
        """For an object of ``content`` needing ``operations``: the committed original's
        rows, or a future of an original in flight, or None when this object is the
        original (then ``settle`` must follow)."""
        if committed is not None and covers(committed, operations):
            return committed
        entry = self._open.get(content)
        if entry is not None:
            if entry.future.done():
                found = entry.future.result()
                if found is not None and covers(found, operations):
                    return found
            else:
                return entry.future
        self._open[content] = _Open(asyncio.get_running_loop().create_future())
        return None

    def settle(self, content: Content, rows: list[Location] | None, visible_at: int) -> None:
        """The original of ``content`` is done: its ok rows (None when it did not succeed,
        and its copies do their own work)."""
        entry = self._open.get(content)
        if entry is None:
            return
        if not entry.future.done():
            entry.future.set_result(rows)
        if rows is None:
            del self._open[content]
        else:
            entry.visible_at = visible_at

    def evict(self, committed: int) -> None:
        """Forget originals whose rows the ledger holds as of commit ``committed`` (the
        producer asks it from then on)."""
        gone = [
            c
            for c, e in self._open.items()
            if e.visible_at is not None and e.visible_at <= committed
        ]
        for content in gone:
            del self._open[content]

    def __len__(self) -> int:
        return len(self._open)


def covers(rows: list[Location], operations: list[str]) -> bool:
    have = {row.operation for row in rows}
    return all(op in have for op in operations)
