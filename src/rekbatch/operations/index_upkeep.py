"""The face index kept to the faces the current rows name.

Two kinds of faces leave the index (DeleteFaces, offline as with AWS):

- **Retired faces**: those of a row that was replaced (the object changed or was removed),
  noted by the writer in the commit of the replacing row (``sinks/retired.py``).
- **Stray faces**: those IndexFaces put into a collection for a call whose row never came (a
  kill between the call and the row, or an answer lost and the call retried). The images
  are named by the write-ahead notes (``store/index_notes.py``); their collections are
  listed (ListFaces, 4,096 faces a page: one page per collection shard of about 4,000
  faces) and the faces carrying their ExternalImageIds are the candidates. Offline, the
  store finds those faces itself (``FaceLookup``: one scan of its row table, where listing a
  million faces would take seconds).

A candidate is deleted only when no current ok row names it: the rows carrying its detail
(``collection/external image id``: the object's row and its copies' rows) are read from
results.jsonl. So a copy of an object's old content keeps the faces it was recorded with, and
a call whose row did commit keeps its faces.

This runs where no IndexFaces is in flight: when a run starts (after the results' tail was
replayed, so every row written is committed) and at the end of a run that was not stopped.
``find`` does not depend on it: it only answers faces that a current row names.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from rekbatch.backends.base import FaceLookup
from rekbatch.errors import BackendError
from rekbatch.operations.summaries import indexed_face_ids
from rekbatch.store.index_notes import Note
from rekbatch.store.ledger import LedgerDB

if TYPE_CHECKING:
    from rekbatch.calls.caller import Caller
    from rekbatch.store.ledger import Ledger

log = structlog.get_logger("rekbatch")

PAGE_FACES = 4096  # ListFaces' most faces a page, and DeleteFaces' most FaceIds a call
RETIRED_CHUNK = 20_000  # retired faces taken from the ledger at a time


@dataclass
class UpkeepCalls:
    """What a pass cost and did."""

    list_faces: int = 0
    delete_faces: int = 0
    deleted: int = 0
    kept: int = 0  # candidates a current row still names
    by_collection: dict[str, int] = field(default_factory=dict)


class FaceUpkeep:
    def __init__(self, operation: str, out: Path, ledger: Ledger, caller: Caller) -> None:
        self.operation = operation
        self.results = out / "results.jsonl"
        self.ledger = ledger
        self.caller = caller
        self.calls = UpkeepCalls()

    async def run(self, notes: Iterable[Note]) -> None:
        """Delete the stray faces of ``notes``' images and every retired face that no
        current row names. A failed call raises its ``BackendError``: what was not done is
        still noted (the notes, the retired faces) for the next pass."""
        started = time.monotonic()
        self.calls = UpkeepCalls()
        noted: dict[str, set[str]] = {}
        for collection, external in notes:
            noted.setdefault(collection, set()).add(external)
        strays: dict[str, dict[str, str]] = {}
        for collection in sorted(noted):
            strays[collection] = await self._candidates(collection, noted[collection])
        await self._delete_unnamed(strays)
        while retired := await self.ledger.read(LedgerDB.retired_faces, RETIRED_CHUNK):
            candidates: dict[str, dict[str, str]] = {}
            for collection, face_id, detail in retired:
                candidates.setdefault(collection, {})[face_id] = detail
            await self._delete_unnamed(candidates)
            await self.ledger.write(LedgerDB.forget_retired, [(c, f) for c, f, _ in retired])
        if self.calls.deleted or self.calls.list_faces:
            log.info(
                "face_index_upkeep",
                deleted=self.calls.deleted,
                kept=self.calls.kept,
                list_faces_calls=self.calls.list_faces,
                delete_faces_calls=self.calls.delete_faces,
                seconds=round(time.monotonic() - started, 3),
            )

    async def _candidates(self, collection: str, externals: set[str]) -> dict[str, str]:
        """The faces of ``collection`` carrying one of ``externals``: FaceId -> detail."""
        backend = self.caller.backend
        if isinstance(backend, FaceLookup):  # offline: no need to list the collection
            try:
                faces = await backend.faces_of_images(collection, externals)
            except BackendError as exc:
                if exc.code == "ResourceNotFoundException":
                    return {}
                raise
            return {
                str(f["FaceId"]): f"{collection}/{f['ExternalImageId']}"
                for f in faces
                if f.get("ExternalImageId") in externals
            }
        found: dict[str, str] = {}
        token: str | None = None
        while True:
            params: dict[str, Any] = {"CollectionId": collection, "MaxResults": PAGE_FACES}
            if token is not None:
                params["NextToken"] = token
            outcome = await self.caller.call("ListFaces", params, {})
            self.calls.list_faces += 1
            if outcome.error is not None:
                if outcome.error.code == "ResourceNotFoundException":
                    return {}  # the collection is gone, and its faces with it
                raise outcome.error
            page = outcome.result or {}
            for face in page.get("Faces") or []:
                external = face.get("ExternalImageId")
                if external in externals and face.get("FaceId"):
                    found[str(face["FaceId"])] = f"{collection}/{external}"
            token = page.get("NextToken")
            if not token:
                return found

    async def _delete_unnamed(self, candidates: dict[str, dict[str, str]]) -> None:
        details = sorted({d for faces in candidates.values() for d in faces.values()})
        if not details:
            return
        named = await self._named(details)
        for collection in sorted(candidates):
            faces = candidates[collection]
            doomed = sorted(f for f, d in faces.items() if f not in named and d not in named)
            self.calls.kept += len(faces) - len(doomed)
            for start in range(0, len(doomed), PAGE_FACES):
                batch = doomed[start : start + PAGE_FACES]
                params = {"CollectionId": collection, "FaceIds": batch}
                outcome = await self.caller.call("DeleteFaces", params, {})
                self.calls.delete_faces += 1
                error = outcome.error
                if error is not None and error.code != "ResourceNotFoundException":
                    raise error
                self.calls.deleted += len(batch)
                counts = self.calls.by_collection
                counts[collection] = counts.get(collection, 0) + len(batch)

    async def _named(self, details: list[str]) -> set[str]:
        """The FaceIds that current ok rows carrying ``details`` name; a detail whose row's
        place the ledger does not know stands for all its faces."""
        rows = await self.ledger.read(LedgerDB.rows_with_details, self.operation, details)
        return await asyncio.to_thread(_faces_named, self.results, rows)


def _faces_named(path: Path, rows: list[tuple[str, int | None, int | None]]) -> set[str]:
    named: set[str] = set()
    places = sorted({(offset, length) for _, offset, length in rows if offset is not None})
    named.update(detail for detail, offset, _ in rows if offset is None)
    if not places:
        return named
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in places:
            line = os.pread(fd, length or 0, offset)
            try:
                named.update(indexed_face_ids(json.loads(line).get("result")))
            except ValueError:
                continue
    finally:
        os.close(fd)
    return named


__all__ = ["FaceUpkeep", "UpkeepCalls"]
