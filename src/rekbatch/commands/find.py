"""``rekbatch find DIR --person NAME=PHOTO [--person ...] [--threshold 80]``: who is where,
from a job's face index, without analysing its images again.

The job must have run ``index_faces``. Each reference photo is read once; then:

- AWS: one SearchFacesByImage per person per collection shard, the reference sent as bytes.
  Rekognition finds the reference's largest face and returns the indexed faces at least
  ``threshold`` similar; no call reads a photo of the job.
- Offline: the reference's largest face is analysed once in this process (the models of the
  offline backend), and the stored embeddings are scanned (``CollectionStore.scan``).

Every match is a face with the ExternalImageId of its photo; the ledger maps it back to the
object, and to the copies of it that were recorded from its result. A photo counts once per
person, with its most similar face. The threshold means what it means for compare_faces:
Rekognition's similarity, in percent.

Answers go to ``DIR/find/NAME.jsonl`` (one line per photo, best first), its Parquet twin when
pyarrow is installed, and ``DIR/find/summary.json`` (every person looked up so far), which
``rekbatch report`` shows. The photos need not be reachable. A job run as shards is merged
first (as ``rekbatch report`` does), and its shards' indexes are searched together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from rekbatch.config import Config, IndexFacesOp, parse_s3_uri
from rekbatch.errors import ConfigError, SetupError
from rekbatch.operations.collection_shards import MAX_SEARCH_FACES
from rekbatch.operations.summaries import indexed_face_ids
from rekbatch.records import utc_now
from rekbatch.store import jobdir
from rekbatch.store.ledger import LedgerDB

log = structlog.get_logger("rekbatch")

OPERATION = "index_faces"
FIND_DIR = "find"
SUMMARY_FILE = "summary.json"
# A person's name is the name of their answer file.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")

Box = dict[str, float]


@dataclass(frozen=True)
class Person:
    name: str
    reference: str


def parse_people(specs: list[str]) -> list[Person]:
    """``--person NAME=PHOTO`` values; a ``ConfigError`` names the first bad one."""
    if not specs:
        raise ConfigError("find: name at least one person: --person NAME=PHOTO")
    people: list[Person] = []
    for spec in specs:
        name, equals, reference = spec.partition("=")
        name = name.strip()
        if not equals or not reference:
            raise ConfigError(f"--person {spec}: expected NAME=PHOTO (a local path or s3://...)")
        if not _NAME.match(name):
            raise ConfigError(
                f"--person {spec}: the name becomes a file name: letters, digits, '_', '.', "
                "'-' (at most 100, starting with a letter or digit)"
            )
        if any(p.name == name for p in people):
            raise ConfigError(f"--person {name}: given twice")
        if reference.startswith("s3://") and not (parse_s3_uri(reference) or ("", ""))[1]:
            raise ConfigError(f"--person {spec}: not an s3://bucket/key URI of a photo")
        people.append(Person(name, reference))
    return people


@dataclass
class Found:
    """One photo where a person was found: its best face."""

    source: int
    bucket: str | None
    key: str
    similarity: float
    box: Box | None
    face_id: str | None
    collection: str


@dataclass
class Answer:
    person: Person
    threshold: float
    images: int  # the photos of the index (M in "found in N of M")
    found: list[Found] = field(default_factory=list)
    searched_face: Box | None = None  # the reference's face that was looked for
    calls: int = 0  # paid calls (AWS: SearchFacesByImage)

    def line(self) -> str:
        return f"{self.person.name}: found in {len(self.found)} of {self.images} images"


# -- the job ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexedJob:
    """What ``find`` reads of a job: its config, ledger, collections and, offline, where the
    collections' files are (one folder per shard of a sharded job)."""

    directory: Path
    config: Config
    collections: list[str]  # the collections (shards) the ledger names
    images: int
    stores: list[Path]


def open_indexed_job(directory: Path) -> IndexedJob:
    """The job in ``directory`` (merged first when it ran as shards), checked to hold a face
    index; a ``SetupError`` otherwise."""
    from rekbatch.engine.shards import shard_folders

    shards = shard_folders(directory)
    if shards and _merge_is_stale(directory, list(shards.values())):
        from rekbatch.commands.merge import merge_job

        merge_job(str(directory), None)
    cfg = jobdir.job_config(directory)
    if not any(isinstance(op, IndexFacesOp) for op in cfg.operations):
        raise SetupError(
            f"{directory}: the job has no index_faces operation; index the photos first "
            "(rekbatch scan URI --op index_faces --output DIR, or add it to the config)"
        )
    db = LedgerDB(jobdir.existing_ledger(directory), readonly=True)
    try:
        collections = db.collections_of(OPERATION)
        images = db.ok_count(OPERATION) + db.skipped_count(OPERATION, "no_face_local")
    finally:
        db.close()
    folders = list(shards.values()) or [directory]
    stores = [jobdir.state_dir(folder) / "collections" for folder in folders]
    return IndexedJob(directory, cfg, collections, images, stores)


def _merge_is_stale(directory: Path, folders: list[Path]) -> bool:
    merged = directory / "results.jsonl"
    if not merged.exists() or not jobdir.ledger_path(directory).exists():
        return True
    newest = max(
        ((f / "results.jsonl").stat().st_mtime for f in folders if (f / "results.jsonl").exists()),
        default=0.0,
    )
    return newest > merged.stat().st_mtime


class Resolver:
    """Faces' ExternalImageIds to the objects (and copies) the ledger recorded them for.

    A face counts for an object only if the object's current row names it: the faces of an
    earlier version of the photo, or of an IndexFaces whose row never came, may still be in
    the index (until the next run deletes them), under the same ExternalImageId. The rows are
    read from results.jsonl, once each."""

    def __init__(self, directory: Path) -> None:
        self._db = LedgerDB(jobdir.existing_ledger(directory), readonly=True)
        self._sources = [row["uri"] for row in self._db.sources()]
        self._results = directory / "results.jsonl"
        self._fd: int | None = None
        self._named: dict[int, frozenset[str]] = {}

    def objects(
        self, collection: str, external_id: str, face_id: str | None = None
    ) -> list[tuple[int, str | None, str]]:
        """The objects whose current row carries the face (any face of the image when
        ``face_id`` is None)."""
        rows = self._db.objects_with_detail(OPERATION, f"{collection}/{external_id}")
        return [
            (int(r["source"]), r["bucket"], str(r["key"]))
            for r in rows
            if face_id is None or self._names(r["jsonl_offset"], r["jsonl_length"], face_id)
        ]

    def still_found(self, source: str, key: str, face_id: str | None) -> bool:
        """Whether a face found earlier in the object is still in its current row."""
        if source not in self._sources:
            return False
        place = self._db.ok_place(OPERATION, self._sources.index(source), key)
        if place is None:
            return False  # removed, failed or skipped since
        return face_id is None or self._names(place[0], place[1], face_id)

    def _names(self, offset: int | None, length: int | None, face_id: str) -> bool:
        if offset is None or length is None:
            return True  # a ledger that does not know where its rows are: as it says
        named = self._named.get(offset)
        if named is None:
            if self._fd is None:
                self._fd = os.open(self._results, os.O_RDONLY)
            try:
                result = json.loads(os.pread(self._fd, length, offset)).get("result")
            except ValueError:
                result = None
            named = self._named[offset] = frozenset(indexed_face_ids(result))
        return face_id in named

    def source_uri(self, index: int) -> str:
        return self._sources[index] if 0 <= index < len(self._sources) else str(index)

    def close(self) -> None:
        self._db.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _best(found: Iterator[Found]) -> list[Found]:
    """One entry per photo, its most similar face; best first, then by key."""
    best: dict[tuple[int, str], Found] = {}
    for item in found:
        held = best.get((item.source, item.key))
        if held is None or item.similarity > held.similarity:
            best[(item.source, item.key)] = item
    return sorted(best.values(), key=lambda f: (-f.similarity, f.source, f.key))


# -- searching --------------------------------------------------------------------------------


async def _read_references(job: IndexedJob, people: list[Person]) -> dict[str, bytes]:
    """Each reference photo's bytes, read once, by location. S3 (and its client) only for
    references on S3: a local lookup stays quick to start."""
    locations = sorted({p.reference for p in people})
    data: dict[str, bytes] = {}
    async with contextlib.AsyncExitStack() as stack:
        s3: Any = None
        for location in locations:
            who = next(p.name for p in people if p.reference == location)
            parsed = parse_s3_uri(location)
            try:
                if parsed is None:
                    raw = await asyncio.to_thread(Path(location).expanduser().read_bytes)
                else:
                    if s3 is None:
                        s3 = await stack.enter_async_context(_s3(job.config))
                    raw = await s3.read(*parsed)
            except Exception as exc:
                raise SetupError(f"--person {who}: cannot read {location}: {exc}") from None
            if not raw.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")):
                raise SetupError(f"--person {who}: {location} is not a JPEG or PNG image")
            data[location] = raw
    return data


def _s3(cfg: Config) -> Any:
    import aioboto3

    from rekbatch.sources import S3

    session = aioboto3.Session(profile_name=cfg.aws.profile, region_name=cfg.aws.region)
    return S3(session, endpoint_url=cfg.aws.s3_endpoint_url, pool=4)


def search_offline(
    job: IndexedJob, embedding: Any, threshold: float, resolver: Resolver
) -> list[Found]:
    """The stored embeddings of every collection of the job, scanned for ``embedding``."""
    from rekbatch.backends.local.collections import CollectionStore

    found: list[Found] = []
    for root in job.stores:
        store = CollectionStore(root)
        try:
            matches = [
                (collection, match)
                for collection in store.list_ids()
                # A collection the job never recorded has no faces to map back to photos.
                if collection in job.collections
                for match in store.scan(collection, embedding, threshold)
            ]
        finally:
            store.close()
        for collection, match in matches:
            external = match.face.external_image_id
            if external is None:
                continue
            for source, bucket, key in resolver.objects(collection, external, match.face.face_id):
                found.append(
                    Found(
                        source,
                        bucket,
                        key,
                        match.similarity,
                        dict(match.face.box),
                        match.face.face_id,
                        collection,
                    )
                )
    return _best(iter(found))


def _reference_embedding(data: bytes, who: str, location: str) -> tuple[Box, list[float]]:
    """The reference's largest face and its embedding, as compare_faces takes it."""
    from rekbatch.backends.local import faces
    from rekbatch.errors import BackendError

    try:
        detail, embedding = faces.reference_face(data)
    except BackendError as exc:
        raise SetupError(f"--person {who}: {location}: {exc.code}: {exc.message}") from None
    return dict(detail["BoundingBox"]), embedding


def _find_offline(
    job: IndexedJob, people: list[Person], threshold: float, references: dict[str, bytes]
) -> list[Answer]:
    """In this process, one person after another: the work is all CPU and file reads."""
    from rekbatch.backends.local.backend import local_backend_available

    missing = local_backend_available()
    if missing is not None:
        raise SetupError(f"find: {missing}")
    resolver = Resolver(job.directory)
    try:
        embedded: dict[str, tuple[Box, list[float]]] = {}
        answers: list[Answer] = []
        for person in people:
            key = hashlib.sha256(references[person.reference]).hexdigest()
            if key not in embedded:
                embedded[key] = _reference_embedding(
                    references[person.reference], person.name, person.reference
                )
            box, embedding = embedded[key]
            found = search_offline(job, embedding, threshold, resolver)
            answers.append(Answer(person, threshold, job.images, found, box))
        return answers
    finally:
        resolver.close()


async def _find_aws(
    job: IndexedJob, people: list[Person], threshold: float, references: dict[str, bytes]
) -> list[Answer]:
    import aioboto3

    from rekbatch.backends.aws import AwsBackend
    from rekbatch.backends.base import ImageInput
    from rekbatch.calls.caller import Caller
    from rekbatch.calls.retry import RetryPolicy

    cfg = job.config
    collections = sorted(job.collections, key=lambda name: (len(name), name))
    session = aioboto3.Session(profile_name=cfg.aws.profile, region_name=cfg.aws.region)
    resolver = Resolver(job.directory)
    answers: list[Answer] = []
    try:
        async with AwsBackend(
            session,
            endpoint_url=cfg.aws.rekognition_endpoint_url,
            pool=8,
            call_path=cfg.aws.call_path,
        ) as backend:
            caller = Caller(
                backend,
                max_tps=cfg.limits.max_tps,
                region=cfg.aws.region,
                retry=RetryPolicy(max_attempts=cfg.limits.max_attempts, cap=2.0),
                apis=["SearchFacesByImage"],
                unreachable_seconds=cfg.limits.unreachable_seconds,
            )
            for person in people:
                image = ImageInput(data=references[person.reference])
                found: list[Found] = []
                searched: Box | None = None
                for collection in collections:
                    params = {
                        "CollectionId": collection,
                        "FaceMatchThreshold": threshold,
                        "MaxFaces": MAX_SEARCH_FACES,
                        "QualityFilter": "NONE",
                    }
                    outcome = await caller.call("SearchFacesByImage", params, {"Image": image})
                    if outcome.error is not None:
                        error = outcome.error
                        raise SetupError(
                            f"--person {person.name}: SearchFacesByImage in {collection}: "
                            f"{error.code}: {error.message}"
                        )
                    result = outcome.result or {}
                    searched = result.get("SearchedFaceBoundingBox") or searched
                    matches = result.get("FaceMatches") or []
                    if len(matches) >= MAX_SEARCH_FACES:
                        log.warning("search_may_be_cut", collection=collection, found=len(matches))
                    found += _aws_matches(matches, collection, resolver)
                answers.append(
                    Answer(
                        person, threshold, job.images, _best(iter(found)), searched,
                        calls=len(collections),
                    )
                )  # fmt: skip
    finally:
        resolver.close()
    return answers


def _aws_matches(matches: list[Any], collection: str, resolver: Resolver) -> list[Found]:
    found: list[Found] = []
    for match in matches:
        face = match.get("Face") or {}
        external = face.get("ExternalImageId")
        if not external:
            continue
        face_id = face.get("FaceId")
        for source, bucket, key in resolver.objects(
            collection, str(external), str(face_id) if face_id else None
        ):
            found.append(
                Found(
                    source,
                    bucket,
                    key,
                    float(match.get("Similarity", 0.0)),
                    face.get("BoundingBox"),
                    face.get("FaceId"),
                    collection,
                )
            )
    return found


async def find_people(job: IndexedJob, people: list[Person], threshold: float) -> list[Answer]:
    references = await _read_references(job, people)
    if job.config.backend.kind == "local":
        return _find_offline(job, people, threshold, references)
    return await _find_aws(job, people, threshold, references)


# -- the answer files -------------------------------------------------------------------------


def _rows(answer: Answer, resolver: Resolver) -> list[dict[str, Any]]:
    return [
        {
            "person": answer.person.name,
            "source": resolver.source_uri(f.source),
            "bucket": f.bucket,
            "key": f.key,
            "similarity": round(f.similarity, 3),
            "bounding_box": f.box,
            "face_id": f.face_id,
            "collection_id": f.collection,
        }
        for f in answer.found
    ]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_answers(job: IndexedJob, answers: list[Answer]) -> list[Path]:
    """``find/NAME.jsonl`` (and ``.parquet``) per person, and ``find/summary.json``."""
    folder = job.directory / FIND_DIR
    folder.mkdir(exist_ok=True)
    resolver = Resolver(job.directory)
    written: list[Path] = []
    try:
        for answer in answers:
            rows = _rows(answer, resolver)
            path = folder / f"{answer.person.name}.jsonl"
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            _write_atomic(path, text.encode("utf-8"))
            written.append(path)
            if job.config.output.parquet_enabled():
                written.append(_write_parquet(folder / f"{answer.person.name}.parquet", rows))
    finally:
        resolver.close()
    summary_path = folder / SUMMARY_FILE
    summary: dict[str, Any] = {"people": {}}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(summary_path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict) and isinstance(loaded.get("people"), dict):
            summary = loaded
    for answer in answers:
        summary["people"][answer.person.name] = {
            "reference": answer.person.reference,
            "reference_face": answer.searched_face,
            "similarity_threshold": answer.threshold,
            "images_searched": answer.images,
            "images_matched": len(answer.found),
            "matches_file": f"{FIND_DIR}/{answer.person.name}.jsonl",
            "found_at": utc_now(),
            "backend": job.config.backend.kind,
            "calls": {"SearchFacesByImage": answer.calls} if answer.calls else {},
        }
    text = json.dumps(summary, indent=2) + "\n"
    _write_atomic(summary_path, text.encode("utf-8"))
    written.append(summary_path)
    return written


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("person", pa.string()),
            ("source", pa.string()),
            ("bucket", pa.string()),
            ("key", pa.string()),
            ("similarity", pa.float64()),
            ("bbox_left", pa.float64()),
            ("bbox_top", pa.float64()),
            ("bbox_width", pa.float64()),
            ("bbox_height", pa.float64()),
            ("face_id", pa.string()),
            ("collection_id", pa.string()),
        ]
    )
    flat = []
    for row in rows:
        box = row["bounding_box"] or {}
        flat.append(
            {
                **{k: row[k] for k in ("person", "source", "bucket", "key", "similarity")},
                "bbox_left": box.get("Left"),
                "bbox_top": box.get("Top"),
                "bbox_width": box.get("Width"),
                "bbox_height": box.get("Height"),
                "face_id": row["face_id"],
                "collection_id": row["collection_id"],
            }
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(flat, schema=schema), str(tmp))
    os.replace(tmp, path)
    return path


def find_command(directory: Path, specs: list[str], threshold: float) -> list[str]:
    """The whole command: the answer lines to print."""
    people = parse_people(specs)
    job = open_indexed_job(directory)
    answers = asyncio.run(find_people(job, people, threshold))
    write_answers(job, answers)
    lines = [answer.line() for answer in answers]
    calls = sum(answer.calls for answer in answers)
    if calls:
        from rekbatch.pricing import estimate_cost

        cost = estimate_cost({"SearchFacesByImage": calls}, region=job.config.aws.region)
        lines.append(f"cost: {calls} SearchFacesByImage, ${cost:.4f} (list prices; an estimate)")
    return lines


__all__ = [
    "Answer",
    "Found",
    "IndexedJob",
    "Person",
    "find_command",
    "find_people",
    "open_indexed_job",
    "parse_people",
    "search_offline",
    "write_answers",
]
