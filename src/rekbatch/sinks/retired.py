"""Faces that leave the face index with the rows that named them.

An ``index_faces`` row is replaced when its object changed (a new ETag, listed again or
reported by an S3 event), was removed, or failed on a new version: the faces its result put
into the collection are no longer the object's. The writer notes them in the transaction
that commits the replacing row, so no crash can leave a replaced row's faces unnoted; the
operation deletes them later from the index (``operations/index_upkeep.py``), once no
current row still names them (a copy of the same content is recorded with its original's
faces).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from rekbatch.operations.summaries import indexed_face_ids
from rekbatch.store.ledger import RECORD_COLUMNS, LedgerDB, LedgerRow

INDEX_OPERATION = "index_faces"

_SOURCE, _KEY, _OPERATION, _STATUS, _DETAIL, _OFFSET, _LENGTH = (
    RECORD_COLUMNS.index(name)
    for name in (
        "source", "key", "operation", "status", "detail", "jsonl_offset", "jsonl_length",
    )
)  # fmt: skip

# (collection, FaceId, detail): ``detail`` (``collection/external image id``) finds the rows
# that may still name the face.
RetiredFace = tuple[str, str, str]


def retired_faces(
    db: LedgerDB, rows: Sequence[LedgerRow], read: Callable[[int, int], bytes]
) -> list[RetiredFace]:
    """The faces indexed by the rows that ``rows`` (a batch about to be committed) replace:
    the ledger's current row of each object, and a row of the batch followed by another of
    the same object. ``read(offset, length)`` reads a line of results.jsonl."""
    latest: dict[tuple[int, str], LedgerRow] = {}
    replaced: list[tuple[int, int, str]] = []
    for row in rows:
        if row[_OPERATION] != INDEX_OPERATION:
            continue
        place = (row[_SOURCE], row[_KEY])
        earlier = latest.get(place)
        if earlier is not None and _indexed(earlier):
            replaced.append((earlier[_OFFSET], earlier[_LENGTH], earlier[_DETAIL]))
        latest[place] = row
    if not latest:
        return []
    replaced += db.indexed_rows(INDEX_OPERATION, list(latest))
    retired: list[RetiredFace] = []
    for offset, length, detail in replaced:
        try:
            result = json.loads(read(offset, length)).get("result")
        except ValueError:
            continue  # not a row: nothing to take back
        collection = detail.partition("/")[0]
        retired += [(collection, face_id, detail) for face_id in indexed_face_ids(result)]
    return retired


def _indexed(row: LedgerRow) -> bool:
    detail = row[_DETAIL]
    return row[_STATUS] == "ok" and isinstance(detail, str) and "/" in detail


__all__ = ["INDEX_OPERATION", "RetiredFace", "retired_faces"]
