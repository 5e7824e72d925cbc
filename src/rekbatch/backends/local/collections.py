"""The offline backend's face collections, kept on disk.

Collections live under a root directory, one folder per collection: ``meta.json`` and
``faces.jsonl`` (one indexed face per line: ids, box, confidence and the 128-d embedding).
Lines are only appended, except by ``DeleteFaces``, which rewrites the file atomically; a
torn last line (a crash mid-write) is skipped on reading. One process at a time should write
a collection.

In memory a collection is its list of faces and a matrix of their embeddings, which grows in
chunks: rows live in a preallocated buffer whose capacity doubles when it is full, so indexing
N faces one image at a time copies O(N) rows in all, not O(N^2) as stacking the whole matrix
on every ``IndexFaces`` would. Rows below the current count are never written again, so a
search may read a snapshot (``matrix()``) while another thread appends.

Every method is blocking: the backend runs them in threads.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

from rekbatch.errors import BackendError

__all__ = ["EMBEDDING_SIZE", "CollectionStore", "EmbeddingMatrix", "StoredFace"]

FACE_MODEL_VERSION = "local-dlib-resnet-v1"  # == faces.FACE_MODEL_VERSION
EMBEDDING_SIZE = 128
_INITIAL_CAPACITY = 64

_COLLECTION_ID_RE = re.compile(r"[a-zA-Z0-9_.\-]{1,255}")


def _invalid(message: str) -> BackendError:
    return BackendError("InvalidParameterException", message, "permanent")


@dataclass
class StoredFace:
    face_id: str
    image_id: str
    external_image_id: str | None
    box: dict[str, float]
    confidence: float
    embedding: list[float]

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

    def line(self) -> str:
        return json.dumps(
            {
                "FaceId": self.face_id,
                "ImageId": self.image_id,
                "ExternalImageId": self.external_image_id,
                "BoundingBox": self.box,
                "Confidence": self.confidence,
                "Embedding": [round(v, 7) for v in self.embedding],
            },
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, line: str) -> StoredFace:
        raw = json.loads(line)
        embedding = [float(v) for v in raw["Embedding"]]
        if len(embedding) != EMBEDDING_SIZE:
            raise ValueError("wrong embedding size")
        return cls(
            face_id=str(raw["FaceId"]),
            image_id=str(raw["ImageId"]),
            external_image_id=raw.get("ExternalImageId"),
            box={k: float(v) for k, v in raw["BoundingBox"].items()},
            confidence=float(raw["Confidence"]),
            embedding=embedding,
        )


class EmbeddingMatrix:
    """An append-only N x 128 float64 matrix in a buffer that doubles when full."""

    def __init__(self, capacity: int = _INITIAL_CAPACITY) -> None:
        self._buffer: npt.NDArray[np.float64] = np.empty(
            (max(1, capacity), EMBEDDING_SIZE), dtype=np.float64
        )
        self._count = 0
        self.reallocations = 0  # how many times the buffer grew (tests read it)

    def __len__(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        return int(self._buffer.shape[0])

    def append(self, rows: npt.ArrayLike) -> None:
        block = np.asarray(rows, dtype=np.float64).reshape(-1, EMBEDDING_SIZE)
        needed = self._count + block.shape[0]
        if needed > self.capacity:
            capacity = self.capacity
            while capacity < needed:
                capacity *= 2
            grown = np.empty((capacity, EMBEDDING_SIZE), dtype=np.float64)
            grown[: self._count] = self._buffer[: self._count]
            self._buffer = grown
            self.reallocations += 1
        self._buffer[self._count : needed] = block
        self._count = needed

    def matrix(self) -> npt.NDArray[np.float64]:
        """The rows so far, as a view (later appends never change it)."""
        return self._buffer[: self._count]


@dataclass
class _Loaded:
    stamp: tuple[int, int]  # size and mtime of faces.jsonl as this process last saw it
    faces: list[StoredFace]
    embeddings: EmbeddingMatrix


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
        self._cache: dict[str, _Loaded] = {}
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}

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
        return directory

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
        (directory / "faces.jsonl").touch()
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
        # Rename first so a half-deleted collection never looks like a live one.
        doomed = directory.with_name(f".deleting-{collection_id}-{uuid.uuid4().hex}")
        directory.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        self._cache.pop(collection_id, None)
        return {"StatusCode": 200}

    @_locked
    def describe(self, collection_id: str) -> dict[str, Any]:
        directory = self._existing(collection_id)
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        return {
            "FaceCount": len(self.faces(collection_id)),
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

    @_locked
    def _load(self, collection_id: str) -> _Loaded:
        path = self._existing(collection_id) / "faces.jsonl"
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        stamp = (stat.st_size, stat.st_mtime_ns) if stat else (0, 0)
        cached = self._cache.get(collection_id)
        if cached is not None and cached.stamp == stamp:
            return cached
        faces: list[StoredFace] = []
        if stat is not None:
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    try:
                        faces.append(StoredFace.parse(line))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # a torn line from an interrupted write
        embeddings = EmbeddingMatrix(max(_INITIAL_CAPACITY, 2 * len(faces)))
        if faces:
            embeddings.append([f.embedding for f in faces])
        loaded = _Loaded(stamp=stamp, faces=faces, embeddings=embeddings)
        self._cache[collection_id] = loaded
        return loaded

    @_locked
    def faces(self, collection_id: str) -> list[StoredFace]:
        """A snapshot of the collection's faces, in indexing order."""
        return list(self._load(collection_id).faces)

    @_locked
    def snapshot(self, collection_id: str) -> tuple[list[StoredFace], npt.NDArray[np.float64]]:
        """The faces and their embedding matrix as of now (consistent with each other)."""
        loaded = self._load(collection_id)
        count = len(loaded.faces)
        return loaded.faces[:count], loaded.embeddings.matrix()[:count]

    @_locked
    def append(self, collection_id: str, faces: list[StoredFace]) -> None:
        path = self._existing(collection_id) / "faces.jsonl"
        if not faces:
            return
        before = self._load(collection_id)
        text = "".join(face.line() + "\n" for face in faces)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        after = path.stat()
        if after.st_size == before.stamp[0] + len(text.encode("utf-8")):
            # Nobody else wrote in between: extend the cache in place instead of re-reading.
            before.embeddings.append([f.embedding for f in faces])
            before.faces.extend(faces)
            before.stamp = (after.st_size, after.st_mtime_ns)
        else:
            self._cache.pop(collection_id, None)

    @_locked
    def delete_faces(self, collection_id: str, face_ids: set[str]) -> list[str]:
        loaded = self._load(collection_id)
        keep = [f for f in loaded.faces if f.face_id not in face_ids]
        deleted = [f.face_id for f in loaded.faces if f.face_id in face_ids]
        if deleted:
            path = self._existing(collection_id) / "faces.jsonl"
            _write_atomic(path, "".join(face.line() + "\n" for face in keep))
            self._cache.pop(collection_id, None)
        return deleted

    def search(
        self,
        collection_id: str,
        embedding: list[float],
        threshold: float,
        max_faces: int,
        exclude: str | None = None,
    ) -> list[dict[str, Any]]:
        from rekbatch.backends.local.faces import similarity_from_distance

        faces, matrix = self.snapshot(collection_id)
        if not faces:
            return []
        query = np.asarray(embedding, dtype=np.float64)
        distances = np.linalg.norm(matrix - query, axis=1)
        matches: list[dict[str, Any]] = []
        for index in np.argsort(distances, kind="stable"):
            face = faces[int(index)]
            if face.face_id == exclude:
                continue
            similarity = similarity_from_distance(float(distances[index]))
            if similarity < threshold or len(matches) >= max_faces:
                break
            matches.append({"Similarity": similarity, "Face": face.record()})
        return matches


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
