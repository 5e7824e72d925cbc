"""The offline backend's face collections, kept on disk: the offline face index.

One folder per collection under a root directory:

- ``meta.json``: the collection's id, creation time and model; a folder without it is not a
  collection (it is written last when one is created).
- ``embeddings.f32``: one row per face ever indexed, only ever appended: the 128-d embedding
  followed by its squared norm, 129 little-endian float32 (``ROW_BYTES``). float32 keeps the
  embeddings as exact as the comparisons need (dlib's descriptors differ in the third decimal
  between people), and a row is found by its number alone.
- ``faces.sqlite``: the row table: per row its FaceId, ImageId, ExternalImageId, box and
  confidence, and how many rows of ``embeddings.f32`` are committed.

An append truncates ``embeddings.f32`` to the committed rows (a crash may have left a tail),
appends and fsyncs the new rows, then commits them in the row table in one transaction: the
committed count never runs ahead of the file, and rows past it are ignored until they are
overwritten. ``DeleteFaces`` drops rows from the table; their embeddings stay in the file as
dead rows that searches skip. One process at a time should write a collection (the job's
lock); readers may read while it writes.

A search scans the file, memory-mapped, in chunks of ``CHUNK_ROWS`` rows: for each row
``|x|^2 - 2 x.q`` is one matrix-vector product with ``[-2q, 1]`` (hence the norm column), the
rows within the threshold's distance are measured again in float64, and only those are
looked up in the row table. Each chunk's pages are released once computed, so memory stays
at one chunk whatever the collection's size, and a million faces (516 MB) are scanned in a
fraction of a second (BENCHMARKS.md).

Collections written by earlier versions (``faces.jsonl`` with the embeddings in JSON) are
converted on first use.

Every method is blocking: the backend runs them in threads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

from rekbatch.errors import BackendError

__all__ = [
    "EMBEDDING_SIZE",
    "ROW_BYTES",
    "CollectionStore",
    "FaceMatch",
    "StoredFace",
    "distance_for_similarity",
]

FACE_MODEL_VERSION = "local-dlib-resnet-v1"  # == faces.FACE_MODEL_VERSION
EMBEDDING_SIZE = 128
ROW_FLOATS = EMBEDDING_SIZE + 1  # the embedding, then its squared norm
ROW_BYTES = ROW_FLOATS * 4
CHUNK_ROWS = 32_768  # rows per step of a scan: 17 MB, a whole number of 4 KiB pages
EMBEDDINGS_FILE = "embeddings.f32"
ROWS_FILE = "faces.sqlite"
_LEGACY_FILE = "faces.jsonl"
_LOOKUP = 500  # rows per SQL lookup
# float32 dot products of 129 terms are good to about 1e-6 here; rows this close to the
# threshold's distance (squared) are measured again in float64 before they are kept or left.
_SLACK = 1e-3

_COLLECTION_ID_RE = re.compile(r"[a-zA-Z0-9_.\-]{1,255}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS faces (
    row INTEGER PRIMARY KEY,
    face_id TEXT NOT NULL UNIQUE,
    image_id TEXT NOT NULL,
    external_image_id TEXT,
    box TEXT NOT NULL,
    confidence REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS store (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

Matrix = npt.NDArray[np.float64]


def _invalid(message: str) -> BackendError:
    return BackendError("InvalidParameterException", message, "permanent")


@dataclass
class StoredFace:
    face_id: str
    image_id: str
    external_image_id: str | None
    box: dict[str, float]
    confidence: float
    embedding: list[float] | None = None  # None where the row table alone was read

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "FaceId": self.face_id,
            "BoundingBox": self.box,
            "ImageId": self.image_id,
            "Confidence": self.confidence,
            "IndexFacesModelVersion": FACE_MODEL_VERSION,
        }
        if self.external_image_id is not None:
            out["ExternalImageId"] = self.external_image_id
        return out


@dataclass(frozen=True)
class FaceMatch:
    """A stored face close enough to a searched one: its row, similarity and face."""

    row: int
    similarity: float
    face: StoredFace


def distance_for_similarity(threshold: float) -> float:
    """The largest embedding distance whose similarity is at least ``threshold`` (the
    inverse of ``faces.similarity_from_distance``); inf for 0, -1 (nothing) from 100."""
    from rekbatch.backends.local.faces import SIMILARITY_MIDPOINT, SIMILARITY_SLOPE

    if threshold <= 0:
        return math.inf
    if threshold >= 100:
        return -1.0
    return SIMILARITY_MIDPOINT + math.log(100.0 / threshold - 1.0) / SIMILARITY_SLOPE


def _face_from_row(row: sqlite3.Row | tuple[Any, ...]) -> StoredFace:
    return StoredFace(
        face_id=str(row[1]),
        image_id=str(row[2]),
        external_image_id=row[3],
        box={k: float(v) for k, v in json.loads(row[4]).items()},
        confidence=float(row[5]),
    )


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(
    method: Callable[Concatenate[CollectionStore, str, _P], _R],
) -> Callable[Concatenate[CollectionStore, str, _P], _R]:
    """Run a store method holding the lock of the collection it is given."""

    @functools.wraps(method)
    def wrapper(
        self: CollectionStore, collection_id: str, /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _R:
        with self.lock(collection_id):
            return method(self, collection_id, *args, **kwargs)

    return wrapper


class CollectionStore:
    """Face collections as folders under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._connections: dict[str, sqlite3.Connection] = {}

    def lock(self, collection_id: str) -> threading.RLock:
        """The lock serialising this process's reads and writes of one collection."""
        with self._guard:
            lock = self._locks.get(collection_id)
            if lock is None:
                lock = self._locks[collection_id] = threading.RLock()
            return lock

    def _dir(self, collection_id: str) -> Path:
        if not _COLLECTION_ID_RE.fullmatch(collection_id) or collection_id in (".", ".."):
            raise _invalid("CollectionId must match [a-zA-Z0-9_.\\-]+ (at most 255 characters)")
        return self.root / collection_id

    def _existing(self, collection_id: str) -> Path:
        directory = self._dir(collection_id)
        if not (directory / "meta.json").is_file():
            raise BackendError(
                "ResourceNotFoundException",
                f"The collection id: {collection_id} does not exist",
                "permanent",
            )
        if (directory / _LEGACY_FILE).exists():
            with self.lock(collection_id):
                if (directory / _LEGACY_FILE).exists():
                    _convert_legacy(directory)
        return directory

    @contextlib.contextmanager
    def _rows_db(self, directory: Path) -> Iterator[sqlite3.Connection]:
        """The collection's row table, holding its lock. One connection per collection is
        kept open: closing the last connection to a WAL database checkpoints it, which would
        cost an append two more fsyncs."""
        with self.lock(directory.name):
            db = self._connections.get(directory.name)
            if db is None:
                db = self._connections[directory.name] = _connect(directory)
            yield db

    def close(self) -> None:
        """Close the row tables' connections (the store can still be used: they reopen)."""
        with self._guard:
            connections, self._connections = self._connections, {}
        for db in connections.values():
            db.close()

    def arn(self, collection_id: str) -> str:
        return f"aws:rekognition:local:000000000000:collection/{collection_id}"

    @_locked
    def create(self, collection_id: str) -> dict[str, Any]:
        directory = self._dir(collection_id)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir()
        except FileExistsError:
            raise BackendError(
                "ResourceAlreadyExistsException",
                f"The collection id: {collection_id} already exists",
                "permanent",
            ) from None
        _init_files(directory)
        meta = {
            "CollectionId": collection_id,
            "CreationTimestamp": time.time(),
            "FaceModelVersion": FACE_MODEL_VERSION,
        }
        _write_atomic(directory / "meta.json", json.dumps(meta))
        return {
            "StatusCode": 200,
            "CollectionArn": self.arn(collection_id),
            "FaceModelVersion": FACE_MODEL_VERSION,
        }

    @_locked
    def delete(self, collection_id: str) -> dict[str, Any]:
        directory = self._existing(collection_id)
        db = self._connections.pop(collection_id, None)
        if db is not None:
            db.close()
        # Rename first so a half-deleted collection never looks like a live one.
        doomed = directory.with_name(f".deleting-{collection_id}-{uuid.uuid4().hex}")
        directory.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return {"StatusCode": 200}

    @_locked
    def describe(self, collection_id: str) -> dict[str, Any]:
        directory = self._existing(collection_id)
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        return {
            "FaceCount": self.count(collection_id),
            "FaceModelVersion": FACE_MODEL_VERSION,
            "CollectionARN": self.arn(collection_id),
            "CreationTimestamp": meta.get("CreationTimestamp"),
            "UserCount": 0,
        }

    def list_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith(".") and (p / "meta.json").is_file()
        )

    def check(self, collection_id: str) -> None:
        self._existing(collection_id)

    # -- the row table ----------------------------------------------------------------------

    def rows(self, collection_id: str) -> int:
        """Rows committed to ``embeddings.f32`` (deleted faces included)."""
        with self._rows_db(self._existing(collection_id)) as db:
            return _committed(db)

    def count(self, collection_id: str) -> int:
        """Faces in the collection."""
        with self._rows_db(self._existing(collection_id)) as db:
            return int(db.execute("SELECT COUNT(*) FROM faces").fetchone()[0])

    def page(
        self, collection_id: str, start: int, limit: int, face_ids: set[str] | None = None
    ) -> tuple[list[StoredFace], int | None]:
        """Up to ``limit`` faces from row ``start`` on, in indexing order (only ``face_ids``
        when given), without embeddings, and the row the next page starts from (None: no
        more). Pages are found by row number, not by position, so listing a collection
        costs the same per page however far in, and deleting faces meanwhile skips none."""
        query = (
            "SELECT row, face_id, image_id, external_image_id, box, confidence FROM faces "
            "WHERE row >= ?"
        )
        args: list[Any] = [start]
        if face_ids is not None:
            query += f" AND face_id IN ({','.join('?' * len(face_ids))})"
            args += sorted(face_ids)
        query += " ORDER BY row LIMIT ?"
        with self._rows_db(self._existing(collection_id)) as db:
            found = db.execute(query, [*args, limit + 1]).fetchall()
        following = int(found[limit][0]) if len(found) > limit else None
        return [_face_from_row(r) for r in found[:limit]], following

    def faces_of_images(self, collection_id: str, external_ids: set[str]) -> list[StoredFace]:
        """The faces carrying one of ``external_ids``, in indexing order: one scan of the
        row table per 500 ids (SQLite reads a million rows in a fraction of a second;
        listing them as faces takes a hundred times longer)."""
        wanted = sorted(external_ids)
        found: list[Any] = []
        with self._rows_db(self._existing(collection_id)) as db:
            for start in range(0, len(wanted), _LOOKUP):
                part = wanted[start : start + _LOOKUP]
                found += db.execute(
                    "SELECT row, face_id, image_id, external_image_id, box, confidence FROM "
                    f"faces WHERE external_image_id IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
        return [_face_from_row(r) for r in sorted(found, key=lambda r: int(r[0]))]

    def faces(self, collection_id: str) -> list[StoredFace]:
        """Every face of the collection in indexing order, without embeddings."""
        faces, _ = self.page(collection_id, 0, 2**62)
        return faces

    def face(self, collection_id: str, face_id: str) -> StoredFace | None:
        """One face with its embedding, by FaceId."""
        directory = self._existing(collection_id)
        with self._rows_db(directory) as db:
            found = db.execute(
                "SELECT row, face_id, image_id, external_image_id, box, confidence FROM faces "
                "WHERE face_id = ?",
                (face_id,),
            ).fetchone()
        if found is None:
            return None
        face = _face_from_row(found)
        with (directory / EMBEDDINGS_FILE).open("rb") as fh:
            fh.seek(int(found[0]) * ROW_BYTES)
            raw = np.frombuffer(fh.read(ROW_BYTES), dtype="<f4")
        face.embedding = [float(v) for v in raw[:EMBEDDING_SIZE]]
        return face

    def snapshot(self, collection_id: str) -> tuple[list[StoredFace], Matrix]:
        """Every face with its embedding, and the embeddings as one matrix (small
        collections: tools and tests)."""
        directory = self._existing(collection_id)
        with self._rows_db(directory) as db:
            listed = db.execute(
                "SELECT row, face_id, image_id, external_image_id, box, confidence FROM faces "
                "ORDER BY row"
            ).fetchall()
            committed = _committed(db)
        stored = np.fromfile(
            directory / EMBEDDINGS_FILE, dtype="<f4", count=committed * ROW_FLOATS
        ).reshape(-1, ROW_FLOATS)
        rows = np.array([int(r[0]) for r in listed], dtype=np.int64)
        matrix = stored[rows, :EMBEDDING_SIZE].astype(np.float64)
        faces = [_face_from_row(r) for r in listed]
        for face, vector in zip(faces, matrix, strict=True):
            face.embedding = [float(v) for v in vector]
        return faces, matrix

    # -- writing ----------------------------------------------------------------------------

    @_locked
    def append(self, collection_id: str, faces: list[StoredFace]) -> list[int]:
        """Add ``faces`` (with embeddings); their row numbers."""
        directory = self._existing(collection_id)
        with self._rows_db(directory) as db:
            return _append(db, directory, faces)

    @_locked
    def delete_faces(self, collection_id: str, face_ids: set[str]) -> list[str]:
        directory = self._existing(collection_id)
        wanted = sorted(face_ids)
        deleted: list[str] = []
        with self._rows_db(directory) as db, db:
            for start in range(0, len(wanted), _LOOKUP):
                part = wanted[start : start + _LOOKUP]
                marks = ",".join("?" * len(part))
                deleted += [
                    str(r[0])
                    for r in db.execute(
                        f"SELECT face_id FROM faces WHERE face_id IN ({marks}) ORDER BY row", part
                    )
                ]
                db.execute(f"DELETE FROM faces WHERE face_id IN ({marks})", part)
        return deleted

    # -- searching --------------------------------------------------------------------------

    def scan(
        self, collection_id: str, embedding: npt.ArrayLike, threshold: float
    ) -> list[FaceMatch]:
        """Every face whose similarity to ``embedding`` is at least ``threshold``, best
        first: an exact scan of the stored embeddings."""
        directory = self._existing(collection_id)
        with self._rows_db(directory) as db:
            committed = _committed(db)
        found = scan_embeddings(
            directory / EMBEDDINGS_FILE, committed, embedding, distance_for_similarity(threshold)
        )
        if not found:
            return []
        from rekbatch.backends.local.faces import similarity_from_distance

        faces = self._lookup(directory, sorted(found))
        matches = [
            FaceMatch(row, similarity_from_distance(found[row]), face)
            for row, face in faces.items()
        ]
        matches = [m for m in matches if m.similarity >= threshold]
        matches.sort(key=lambda m: (-m.similarity, m.row))
        return matches

    def _lookup(self, directory: Path, rows: list[int]) -> dict[int, StoredFace]:
        """The faces of ``rows`` that are still in the collection."""
        out: dict[int, StoredFace] = {}
        with self._rows_db(directory) as db:
            for start in range(0, len(rows), _LOOKUP):
                part = rows[start : start + _LOOKUP]
                for found in db.execute(
                    "SELECT row, face_id, image_id, external_image_id, box, confidence "
                    f"FROM faces WHERE row IN ({','.join('?' * len(part))})",
                    part,
                ):
                    out[int(found[0])] = _face_from_row(found)
        return out

    def search(
        self,
        collection_id: str,
        embedding: list[float],
        threshold: float,
        max_faces: int,
        exclude: str | None = None,
    ) -> list[dict[str, Any]]:
        """SearchFaces' FaceMatches: the ``max_faces`` best, ``exclude`` left out."""
        matches = self.scan(collection_id, embedding, threshold)
        return [
            {"Similarity": m.similarity, "Face": m.face.record()}
            for m in matches
            if m.face.face_id != exclude
        ][:max_faces]


def scan_embeddings(
    path: Path, rows: int, embedding: npt.ArrayLike, max_distance: float
) -> dict[int, float]:
    """Rows among the first ``rows`` of an embeddings file within ``max_distance`` of
    ``embedding``, with their distances (float64).

    The file is memory-mapped and read a chunk at a time straight from the page cache (no
    copy into a buffer: a third less time than ``read()``); each chunk's pages are dropped
    from this process once computed (``MADV_DONTNEED``), so the resident memory stays one
    chunk however large the index."""
    if max_distance < 0 or rows <= 0:
        return {}
    query = np.asarray(embedding, dtype=np.float64).reshape(EMBEDDING_SIZE)
    probe = np.empty(ROW_FLOATS, dtype=np.float32)
    probe[:EMBEDDING_SIZE] = -2.0 * query
    probe[EMBEDDING_SIZE] = 1.0
    # |x - q|^2 = (|x|^2 - 2 x.q) + |q|^2: keep rows whose first part is at most this.
    bound = math.inf if math.isinf(max_distance) else max_distance**2 - float(query @ query)
    found: dict[int, float] = {}
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < rows * ROW_BYTES:
            raise BackendError(
                "InternalServerError",
                f"{path}: holds fewer rows than its row table commits ({rows})",
                "permanent",
            )
        with mmap.mmap(fh.fileno(), rows * ROW_BYTES, access=mmap.ACCESS_READ) as mapped:
            _advise(mapped, "MADV_SEQUENTIAL")
            done = 0
            while done < rows:
                count = min(CHUNK_ROWS, rows - done)
                start = done * ROW_BYTES
                block = np.frombuffer(mapped, "<f4", count * ROW_FLOATS, start)
                block = block.reshape(count, ROW_FLOATS)
                partial = block @ probe
                near = np.flatnonzero(partial <= bound + _SLACK)
                if near.size:
                    exact = np.linalg.norm(
                        block[near, :EMBEDDING_SIZE].astype(np.float64) - query, axis=1
                    )
                    for index, distance in zip(near.tolist(), exact.tolist(), strict=True):
                        if distance <= max_distance:
                            found[done + index] = distance
                del block  # no view of the mapping may outlive it
                # CHUNK_ROWS rows are whole pages: each chunk starts on a page boundary.
                _advise(mapped, "MADV_DONTNEED", start, count * ROW_BYTES)
                done += count
    return found


def _advise(mapped: mmap.mmap, name: str, *span: int) -> None:
    """An madvise hint, where the platform has it."""
    option = getattr(mmap, name, None)
    if option is not None and hasattr(mapped, "madvise"):
        mapped.madvise(option, *span)


def _committed(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM store WHERE key = 'rows'").fetchone()
    return 0 if row is None else int(row[0])


def _connect(directory: Path) -> sqlite3.Connection:
    db = sqlite3.connect(directory / ROWS_FILE, timeout=30, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: an append that returned survives power loss, as the ledger's commits do.
    db.execute("PRAGMA synchronous=FULL")
    return db


def _append(db: sqlite3.Connection, directory: Path, faces: list[StoredFace]) -> list[int]:
    if not faces:
        return []
    block = np.empty((len(faces), ROW_FLOATS), dtype="<f4")
    for i, face in enumerate(faces):
        if face.embedding is None or len(face.embedding) != EMBEDDING_SIZE:
            raise ValueError(f"a face to store needs a {EMBEDDING_SIZE}-d embedding")
        block[i, :EMBEDDING_SIZE] = face.embedding
    vectors = block[:, :EMBEDDING_SIZE].astype(np.float64)
    block[:, EMBEDDING_SIZE] = np.einsum("ij,ij->i", vectors, vectors)
    first = _committed(db)
    with (directory / EMBEDDINGS_FILE).open("r+b") as fh:
        fh.truncate(first * ROW_BYTES)  # a tail left by an interrupted append
        fh.seek(first * ROW_BYTES)
        fh.write(block.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    rows = list(range(first, first + len(faces)))
    with db:
        db.executemany(
            "INSERT INTO faces VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    row,
                    face.face_id,
                    face.image_id,
                    face.external_image_id,
                    json.dumps(face.box, separators=(",", ":")),
                    face.confidence,
                )
                for row, face in zip(rows, faces, strict=True)
            ],
        )
        db.execute(
            "INSERT INTO store VALUES ('rows', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (first + len(faces),),
        )
    return rows


def _init_files(directory: Path) -> None:
    (directory / EMBEDDINGS_FILE).touch()
    db = sqlite3.connect(directory / ROWS_FILE)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
    finally:
        db.close()


def _convert_legacy(directory: Path) -> None:
    """A collection of an earlier version (``faces.jsonl``, embeddings in JSON) into the
    current files; a torn last line is left out, as it always was. The old file goes last,
    so a conversion cut short starts again from it."""
    legacy = directory / _LEGACY_FILE
    for name in (EMBEDDINGS_FILE, ROWS_FILE, ROWS_FILE + "-wal", ROWS_FILE + "-shm"):
        (directory / name).unlink(missing_ok=True)
    _init_files(directory)
    faces: list[StoredFace] = []
    if legacy.exists():
        with legacy.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    raw = json.loads(line)
                    if len(raw["Embedding"]) != EMBEDDING_SIZE:
                        continue
                    faces.append(
                        StoredFace(
                            face_id=str(raw["FaceId"]),
                            image_id=str(raw["ImageId"]),
                            external_image_id=raw.get("ExternalImageId"),
                            box={k: float(v) for k, v in raw["BoundingBox"].items()},
                            confidence=float(raw["Confidence"]),
                            embedding=[float(v) for v in raw["Embedding"]],
                        )
                    )
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
    db = _connect(directory)
    try:
        _append(db, directory, faces)
    finally:
        db.close()
    legacy.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
