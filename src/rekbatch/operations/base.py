"""What an operation is to the engine: prepare once, process each image, finish once.

- ``prepare``: before any image is paid for (read and check reference images, create a face
  collection). A failure here is a ``SetupError``: the run stops before its first image.
- ``reconcile``: once the result files are open and every row written is committed, before
  any image (index_faces: the face index brought back to the rows).
- ``process``: one image to its result, through the run's ``Caller`` (the only way to reach
  the backend), returning the response or the error and the attempts.
- ``finish``: after the last image of a run that was not stopped early (search a face
  collection, delete it).
- ``answer``: the operation's section of summary.json, read from the ledger.

The engine treats every operation alike; compare_faces and search_faces are not special
cases in it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from rekbatch.backends.base import ImageInput
from rekbatch.calls.caller import CallOutcome
from rekbatch.errors import SetupError, setup_error_from
from rekbatch.records import ObjectRef
from rekbatch.sources.filters import MAX_IMAGE_BYTES, SNIFF_BYTES, sniff_kind

if TYPE_CHECKING:
    from rekbatch.calls.caller import Caller
    from rekbatch.sources.s3 import S3
    from rekbatch.store.ledger import Ledger, LedgerDB

log = structlog.get_logger("rekbatch")


@dataclass
class OperationContext:
    """What an operation may use to prepare and finish."""

    caller: Caller
    ledger: Ledger
    s3: S3 | None
    out: Path | None = None  # the job's output directory (its results.jsonl, .rekbatch/)
    # Operations stopped by a failed finish: their error, for summary.json and the exit code.
    failures: dict[str, str] = field(default_factory=dict)


class Operation:
    """One configured operation. Subclasses set ``type`` and ``api`` and implement
    ``process``."""

    type: str
    api: str  # the API called once per image (more for search_faces' compare strategy)
    # prefilter = "faces": not called for photos in which the offline detector finds no face.
    prefilter: bool = False

    def calls_per_image(self) -> dict[str, int]:
        """The most calls one image can cost, by API (budget caps and plans)."""
        return {self.api: 1}

    def setup_calls(self) -> dict[str, int]:
        """Calls made once per run outside the images (reference checks), by API."""
        return {}

    async def prepare(self, ctx: OperationContext) -> None:
        return None

    async def reconcile(self, ctx: OperationContext) -> None:
        return None

    async def process(self, image: ImageInput, obj: ObjectRef, caller: Caller) -> CallOutcome:
        raise NotImplementedError

    async def finish(self, ctx: OperationContext) -> None:
        return None

    def answer(self, db: LedgerDB) -> dict[str, Any] | None:
        return None


@dataclass(frozen=True)
class Reference:
    """A reference image, read once per run and checked for a face."""

    location: str
    data: bytes
    faces: int
    face_used: dict[str, Any] | None


async def load_reference(ctx: OperationContext, field_name: str, location: str) -> Reference:
    """Read ``location`` and check it holds a face with one DetectFaces call, before any
    image is paid for. The check's answer is kept in the ledger by content, so a resumed or
    repeated run does not pay for it again. With several faces, Rekognition compares the
    largest: say which one that is."""
    from rekbatch.sources import read_location
    from rekbatch.store.ledger import LedgerDB

    try:
        data = await read_location(location, ctx.s3)
    except Exception as exc:
        setup = setup_error_from(exc, f"{field_name} {location}")
        if setup is not None:
            raise setup from None
        raise SetupError(f"{field_name}: cannot read {location}: {exc}") from None
    if sniff_kind(data[:SNIFF_BYTES]) is None:
        raise SetupError(f"{field_name}: {location} is not a JPEG or PNG image")
    if len(data) > MAX_IMAGE_BYTES:
        raise SetupError(
            f"{field_name}: {location} is {len(data)} bytes; Rekognition takes at most 5 MB "
            "as bytes"
        )
    meta_key = "reference:" + hashlib.sha256(data).hexdigest()
    cached = await ctx.ledger.read(LedgerDB.get_meta, meta_key)
    if cached is not None:
        known = json.loads(cached)
        return Reference(location, data, known["faces"], known["face_used"])
    outcome = await ctx.caller.call("DetectFaces", {}, {"Image": ImageInput(data=data)})
    if outcome.error is not None:
        raise SetupError(f"{field_name}: {location}: {outcome.error.code}: {outcome.error.message}")
    faces = (outcome.result or {}).get("FaceDetails", [])
    if not faces:
        raise SetupError(f"{field_name}: no face found in {location}")

    def area(face: dict[str, Any]) -> float:
        box = face.get("BoundingBox", {})
        return float(box.get("Width", 0.0)) * float(box.get("Height", 0.0))

    largest = max(faces, key=area)
    if len(faces) > 1:
        box = largest.get("BoundingBox", {})
        log.warning(
            "reference_has_several_faces",
            reference=location,
            faces=len(faces),
            used="the largest",
            left=round(float(box.get("Left", 0.0)), 3),
            top=round(float(box.get("Top", 0.0)), 3),
        )
    reference = Reference(location, data, len(faces), largest.get("BoundingBox"))
    await ctx.ledger.write(
        LedgerDB.set_meta,
        {meta_key: json.dumps({"faces": reference.faces, "face_used": reference.face_used})},
    )
    return reference
