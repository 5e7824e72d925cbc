"""The offline backend: Rekognition's face operations answered on this machine's CPUs.

``LocalBackend`` implements ``rekbatch.backends.base.Backend`` for ``DetectFaces``,
``CompareFaces`` and a face collection kept on disk (``CreateCollection``,
``DescribeCollection``, ``ListCollections``, ``DeleteCollection``, ``IndexFaces``,
``ListFaces``, ``DeleteFaces``, ``SearchFaces``, ``SearchFacesByImage``). The image work runs in
``rekbatch.backends.local.faces`` inside a process pool (one worker per available core, models
loaded once per worker), so the event loop never waits on the CPU; collection files are read
and written in threads.

Collections live under the directory given to the constructor, one folder per collection:
``meta.json`` and ``faces.jsonl`` (one indexed face per line: ids, box, confidence and the
128-d embedding). Lines are only appended, except by ``DeleteFaces``, which rewrites the file
atomically; a torn last line (a crash mid-write) is skipped on reading. One process at a time
should write a collection.

Needs the ``local`` extra (``pip install 'rekbatch[local]'``); ``local_backend_available``
says what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from rekbatch.backends.base import ImageInput
from rekbatch.errors import BackendError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "LOCAL_SUPPORTED_OPERATIONS",
    "LocalBackend",
    "local_backend_available",
]

# Config operation types the local backend can run.
LOCAL_SUPPORTED_OPERATIONS: frozenset[str] = frozenset(
    {"detect_faces", "compare_faces", "search_faces"}
)

INSTALL_HINT = "pip install 'rekbatch[local]'"
FACE_MODEL_VERSION = "local-dlib-resnet-v1"  # == local_faces.FACE_MODEL_VERSION

_COLLECTION_ID_RE = re.compile(r"[a-zA-Z0-9_.\-]{1,255}")
_EXTERNAL_IMAGE_ID_RE = re.compile(r"[a-zA-Z0-9_.\-:]{1,255}")
_FACE_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAX_FACES_PER_IMAGE = 100


def local_backend_available() -> str | None:
    """None when the local backend can run; otherwise a message saying what is missing and how
    to install it."""
    missing: list[str] = []
    for module, package in (("numpy", "numpy"), ("PIL", "Pillow"), ("dlib", "dlib-bin")):
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(package)
                continue
            if module == "dlib":
                importlib.import_module("dlib")  # a wheel for the wrong platform fails here
        except (ImportError, OSError, ValueError):
            missing.append(package)
    if "numpy" not in missing and "Pillow" not in missing:
        from rekbatch.backends.local import faces as local_faces

        if local_faces.models_dir() is None:
            missing.append("face_recognition_models")
    elif importlib.util.find_spec("face_recognition_models") is None:
        missing.append("face_recognition_models")
    if not missing:
        return None
    return "the local backend needs " + ", ".join(missing) + f"; install the extra: {INSTALL_HINT}"


def default_workers() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    """Process-pool initializer: load the models once per worker. A failure here is left for
    the first task to report as a ``BackendError`` instead of breaking the pool."""
    from rekbatch.backends.local import faces as local_faces

    with contextlib.suppress(Exception):
        local_faces.warm_up()


def _invalid(message: str) -> BackendError:
    return BackendError("InvalidParameterException", message, "permanent")


def _int_param(params: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = params.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _invalid(f"{name} must be an integer between {lo} and {hi}")
    return value


def _float_param(
    params: dict[str, Any], name: str, default: float, lo: float = 0.0, hi: float = 100.0
) -> float:
    value = params.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _invalid(f"{name} must be a number between {lo} and {hi}")
    return float(value)


def _str_param(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise _invalid(f"{name} is required")
    return value


# ---------------------------------------------------------------------------------------------
# Collections on disk


@dataclass
class _StoredFace:
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
    def parse(cls, line: str) -> _StoredFace:
        raw = json.loads(line)
        return cls(
            face_id=str(raw["FaceId"]),
            image_id=str(raw["ImageId"]),
            external_image_id=raw.get("ExternalImageId"),
            box={k: float(v) for k, v in raw["BoundingBox"].items()},
            confidence=float(raw["Confidence"]),
            embedding=[float(v) for v in raw["Embedding"]],
        )


@dataclass
class _Loaded:
    stamp: tuple[int, int]  # size and mtime of faces.jsonl when read
    faces: list[_StoredFace]
    matrix: npt.NDArray[np.float64]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(
    method: Callable[Concatenate[_CollectionStore, str, _P], _R],
) -> Callable[Concatenate[_CollectionStore, str, _P], _R]:
    """Run a store method holding the lock of the collection it is given."""

    @functools.wraps(method)
    def wrapper(
        self: _CollectionStore, collection_id: str, /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _R:
        with self.lock(collection_id):
            return method(self, collection_id, *args, **kwargs)

    return wrapper


class _CollectionStore:
    """Face collections as folders under ``root``; every method is blocking (run in a thread)."""

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
            "FaceCount": len(self.load(collection_id).faces),
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
    def load(self, collection_id: str) -> _Loaded:
        import numpy as np

        path = self._existing(collection_id) / "faces.jsonl"
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        stamp = (stat.st_size, stat.st_mtime_ns) if stat else (0, 0)
        cached = self._cache.get(collection_id)
        if cached is not None and cached.stamp == stamp:
            return cached
        faces: list[_StoredFace] = []
        if stat is not None:
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    try:
                        faces.append(_StoredFace.parse(line))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # a torn line from an interrupted write
        matrix = (
            np.array([f.embedding for f in faces], dtype=np.float64)
            if faces
            else np.zeros((0, 128), dtype=np.float64)
        )
        loaded = _Loaded(stamp=stamp, faces=faces, matrix=matrix)
        self._cache[collection_id] = loaded
        return loaded

    @_locked
    def append(self, collection_id: str, faces: list[_StoredFace]) -> None:
        import numpy as np

        path = self._existing(collection_id) / "faces.jsonl"
        if not faces:
            return
        before = self.load(collection_id)
        text = "".join(face.line() + "\n" for face in faces)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        after = path.stat()
        if after.st_size == before.stamp[0] + len(text.encode("utf-8")):
            # Nobody else wrote in between: extend the cache instead of re-reading the file.
            added = np.array([f.embedding for f in faces], dtype=np.float64)
            self._cache[collection_id] = _Loaded(
                stamp=(after.st_size, after.st_mtime_ns),
                faces=[*before.faces, *faces],
                matrix=np.vstack([before.matrix, added]),
            )

    @_locked
    def delete_faces(self, collection_id: str, face_ids: set[str]) -> list[str]:
        loaded = self.load(collection_id)
        keep = [f for f in loaded.faces if f.face_id not in face_ids]
        deleted = [f.face_id for f in loaded.faces if f.face_id in face_ids]
        if deleted:
            path = self._existing(collection_id) / "faces.jsonl"
            _write_atomic(path, "".join(face.line() + "\n" for face in keep))
        return deleted

    def search(
        self,
        collection_id: str,
        embedding: list[float],
        threshold: float,
        max_faces: int,
        exclude: str | None = None,
    ) -> list[dict[str, Any]]:
        import numpy as np

        from rekbatch.backends.local.faces import similarity_from_distance

        loaded = self.load(collection_id)
        if not loaded.faces:
            return []
        query = np.asarray(embedding, dtype=np.float64)
        distances = np.linalg.norm(loaded.matrix - query, axis=1)
        matches: list[dict[str, Any]] = []
        for index in np.argsort(distances, kind="stable"):
            face = loaded.faces[int(index)]
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


# ---------------------------------------------------------------------------------------------
# The backend


class LocalBackend:
    """Answers Rekognition face operations offline with dlib models in a process pool.

    ``collections_dir`` holds the face collections (created on first ``CreateCollection``);
    without it the collection operations are refused. ``workers`` defaults to the cores this
    process may use. ``executor`` replaces the private process pool (the caller owns it).

    The pool starts on the first image operation, with the ``spawn`` start method (workers
    never inherit the event loop's threads or locks); as with any spawn pool, a script that
    uses the backend must keep its top-level code under ``if __name__ == "__main__":``."""

    def __init__(
        self,
        collections_dir: str | os.PathLike[str] | None = None,
        *,
        workers: int | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.workers = workers if workers is not None else default_workers()
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        self.collections_dir = Path(collections_dir) if collections_dir is not None else None
        self._store = _CollectionStore(self.collections_dir) if self.collections_dir else None
        self._external_executor = executor
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    # -- plumbing

    def _executor(self) -> Executor:
        if self._closed:
            raise BackendError("BackendClosed", "the local backend has been closed", "permanent")
        if self._external_executor is not None:
            return self._external_executor
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                # spawn: workers never inherit the event loop's threads or locks.
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
            )
        return self._pool

    async def _run(self, task: str, *args: Any) -> Any:
        from rekbatch.backends.local import faces as local_faces

        executor = self._executor()
        loop = asyncio.get_running_loop()
        try:
            status, payload = await loop.run_in_executor(
                executor, functools.partial(local_faces.run_task, task, *args)
            )
        except BrokenProcessPool as exc:
            # A worker died (out of memory, killed): start a fresh pool, let the pipeline retry.
            if executor is self._pool:
                self._pool = None
                executor.shutdown(wait=False, cancel_futures=True)
            raise BackendError(
                "ServiceUnavailableException",
                f"a local face worker process died: {exc}",
                "transient",
            ) from exc
        if status == "error":
            code, message, kind = payload
            raise BackendError(code, message, kind)
        return payload

    def _collections(self) -> _CollectionStore:
        if self._store is None:
            raise BackendError(
                "UnsupportedOperation",
                "face collections need a collections directory (LocalBackend(collections_dir=...))",
                "permanent",
            )
        return self._store

    @staticmethod
    def _bytes(api: str, images: dict[str, ImageInput], field: str) -> bytes:
        image = images.get(field)
        if image is None:
            raise _invalid(f"{api} needs an image under {field!r}")
        if image.data is None:
            where = f"s3://{image.bucket}/{image.key}" if image.bucket else "an S3 object"
            raise BackendError(
                "InvalidParameterException",
                f"the local backend needs the image bytes (ImageInput.data) for {field}, "
                f"got a reference to {where}; read the object and pass its bytes",
                "permanent",
            )
        return image.data

    # -- the Backend protocol

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        handler = _HANDLERS.get(api)
        if handler is None:
            raise BackendError(
                "UnsupportedOperation",
                f"the local backend does not support {api}; it answers "
                + ", ".join(sorted(_HANDLERS)),
                "permanent",
            )
        result: dict[str, Any] = await handler(self, params, images)
        return result

    async def aclose(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    # -- operations

    async def _detect_faces(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        data = self._bytes("DetectFaces", images, "Image")
        result: dict[str, Any] = await self._run("detect_faces", data)
        return result

    async def _compare_faces(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        source = self._bytes("CompareFaces", images, "SourceImage")
        target = self._bytes("CompareFaces", images, "TargetImage")
        threshold = _float_param(params, "SimilarityThreshold", 80.0)
        result: dict[str, Any] = await self._run("compare_faces", source, target, threshold)
        return result

    async def _create_collection(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        store = self._collections()
        collection_id = _str_param(params, "CollectionId")
        return await asyncio.to_thread(store.create, collection_id)

    async def _delete_collection(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        store = self._collections()
        collection_id = _str_param(params, "CollectionId")
        return await asyncio.to_thread(store.delete, collection_id)

    async def _describe_collection(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        store = self._collections()
        collection_id = _str_param(params, "CollectionId")
        return await asyncio.to_thread(store.describe, collection_id)

    async def _list_collections(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        store = self._collections()
        start, limit = _page(params, 1000)
        ids = await asyncio.to_thread(store.list_ids)
        page = ids[start : start + limit]
        body: dict[str, Any] = {
            "CollectionIds": page,
            "FaceModelVersions": [FACE_MODEL_VERSION] * len(page),
        }
        if start + limit < len(ids):
            body["NextToken"] = str(start + limit)
        return body

    async def _index_faces(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        store = self._collections()
        collection_id = _str_param(params, "CollectionId")
        external = params.get("ExternalImageId")
        if external is not None and (
            not isinstance(external, str) or not _EXTERNAL_IMAGE_ID_RE.fullmatch(external)
        ):
            raise _invalid("ExternalImageId must match [a-zA-Z0-9_.\\-:]+ (at most 255)")
        max_faces = _int_param(params, "MaxFaces", _MAX_FACES_PER_IMAGE, 1, 4096)
        data = self._bytes("IndexFaces", images, "Image")
        await asyncio.to_thread(store.check, collection_id)  # before paying for the models
        found: list[tuple[dict[str, Any], list[float]]] = await self._run(
            "face_embeddings", data, _MAX_FACES_PER_IMAGE
        )
        image_id = str(uuid.uuid4())
        stored: list[_StoredFace] = []
        records: list[dict[str, Any]] = []
        unindexed: list[dict[str, Any]] = []
        for index, (detail, embedding) in enumerate(found):
            if index >= max_faces:
                unindexed.append({"Reasons": ["EXCEEDS_MAX_FACES"], "FaceDetail": detail})
                continue
            face = _StoredFace(
                face_id=str(uuid.uuid4()),
                image_id=image_id,
                external_image_id=external,
                box=detail["BoundingBox"],
                confidence=float(detail["Confidence"]),
                embedding=embedding,
            )
            stored.append(face)
            record = face.record()
            del record["IndexFacesModelVersion"]
            records.append({"Face": record, "FaceDetail": detail})
        await asyncio.to_thread(store.append, collection_id, stored)
        return {
            "FaceRecords": records,
            "FaceModelVersion": FACE_MODEL_VERSION,
            "UnindexedFaces": unindexed,
        }

    async def _list_faces(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        store = self._collections()
        collection_id = _str_param(params, "CollectionId")
        start, limit = _page(params, 1000)
        loaded = await asyncio.to_thread(store.load, collection_id)
        faces = loaded.faces
        wanted = params.get("FaceIds")
        if isinstance(wanted, list):
            wanted_ids = {str(w) for w in wanted}
            faces = [f for f in faces if f.face_id in wanted_ids]
        page = faces[start : start + limit]
        body: dict[str, Any] = {
            "Faces": [f.record() for f in page],
            "FaceModelVersion": FACE_MODEL_VERSION,
        }
        if start + limit < len(faces):
            body["NextToken"] = str(start + limit)
        return body

    async def _delete_faces(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        store = self._collections()
        collection_id = _str_param(params, "CollectionId")
        face_ids = params.get("FaceIds")
        if not isinstance(face_ids, list) or not face_ids:
            raise _invalid("FaceIds is required")
        deleted = await asyncio.to_thread(
            store.delete_faces, collection_id, {str(f) for f in face_ids}
        )
        return {"DeletedFaces": deleted}

    async def _search_faces(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        store = self._collections()
        collection_id = _str_param(params, "CollectionId")
        face_id = _str_param(params, "FaceId")
        if not _FACE_ID_RE.fullmatch(face_id):
            raise _invalid("FaceId must be a face id returned by IndexFaces")
        threshold = _float_param(params, "FaceMatchThreshold", 80.0)
        max_faces = _int_param(params, "MaxFaces", 4096, 1, 4096)
        loaded = await asyncio.to_thread(store.load, collection_id)
        searched = next((f for f in loaded.faces if f.face_id == face_id), None)
        if searched is None:
            raise _invalid(f"faceId {face_id} was not found in the collection.")
        matches = await asyncio.to_thread(
            store.search, collection_id, searched.embedding, threshold, max_faces, face_id
        )
        return {
            "SearchedFaceId": face_id,
            "FaceMatches": matches,
            "FaceModelVersion": FACE_MODEL_VERSION,
        }

    async def _search_faces_by_image(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        store = self._collections()
        collection_id = _str_param(params, "CollectionId")
        threshold = _float_param(params, "FaceMatchThreshold", 80.0)
        max_faces = _int_param(params, "MaxFaces", 4096, 1, 4096)
        data = self._bytes("SearchFacesByImage", images, "Image")
        await asyncio.to_thread(store.check, collection_id)
        detail, embedding = await self._run("largest_face_embedding", data)
        matches = await asyncio.to_thread(
            store.search, collection_id, embedding, threshold, max_faces, None
        )
        return {
            "SearchedFaceBoundingBox": detail["BoundingBox"],
            "SearchedFaceConfidence": detail["Confidence"],
            "FaceMatches": matches,
            "FaceModelVersion": FACE_MODEL_VERSION,
        }


def _page(params: dict[str, Any], default_max: int) -> tuple[int, int]:
    limit = _int_param(params, "MaxResults", default_max, 0, 4096)
    token = params.get("NextToken")
    if token is None:
        return 0, limit or default_max
    if not isinstance(token, str) or not token.isdigit():
        raise BackendError("InvalidPaginationTokenException", "Invalid Token", "permanent")
    return int(token), limit or default_max


_HANDLERS = {
    "DetectFaces": LocalBackend._detect_faces,
    "CompareFaces": LocalBackend._compare_faces,
    "CreateCollection": LocalBackend._create_collection,
    "DeleteCollection": LocalBackend._delete_collection,
    "DescribeCollection": LocalBackend._describe_collection,
    "ListCollections": LocalBackend._list_collections,
    "IndexFaces": LocalBackend._index_faces,
    "ListFaces": LocalBackend._list_faces,
    "DeleteFaces": LocalBackend._delete_faces,
    "SearchFaces": LocalBackend._search_faces,
    "SearchFacesByImage": LocalBackend._search_faces_by_image,
}
