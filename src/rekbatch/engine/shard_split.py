"""How the shards of a job agree on its split: made once, stored where every shard finds it.

The split (``JobSplit``) is ``split.json`` beside the shard folders: under
``output.upload_uri`` when the job uploads (S3, written with ``If-None-Match: *``, so only
the first write succeeds), else in the job's output directory (an exclusive create; the
folder must then be one every shard sees). A shard reads it; when there is none, the first
shard to store ``split.claim`` (the same way) divides the sources (``Source.divide``) and
stores the split, while the others wait for it (up to ``SPLIT_WAIT_SECONDS``, then divide
themselves: whichever split is stored first is the one every shard takes, before listing
anything). The shard that stored the split checks the job's reference faces and stores the
results in ``references.json``; the others wait a little for them
(``REFERENCE_WAIT_SECONDS``) before checking themselves, so a source is divided and a
reference checked once per job, not once per shard.

A shard keeps the split it lists by in its ledger. When the split it finds is not that one
(another was stored after the first was removed), or was made for another job or another
number of shards, it says so and stops (exit 2): going on could list an object twice or
never. A removed split is stored again from a shard's ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from rekbatch.calls.classify import failure_of
from rekbatch.config import Config, parse_s3_uri
from rekbatch.engine.shards import JobSplit, Shard
from rekbatch.errors import SetupError
from rekbatch.records import utc_now
from rekbatch.sources import S3, Source
from rekbatch.store.ledger import Ledger, LedgerDB

log = structlog.get_logger("rekbatch")

SPLIT_FILE = "split.json"
CLAIM_FILE = "split.claim"  # who is dividing the sources
REFERENCES_FILE = "references.json"
SPLIT_META = "job_split"  # in a shard's ledger: the split it lists by
REFERENCE_PREFIX = "reference:"  # ledger meta of a reference face check (operations/base.py)
SPLIT_WAIT_SECONDS = 180.0
REFERENCE_WAIT_SECONDS = 60.0
POLL_SECONDS = 0.5


class SplitStore(Protocol):
    where: str  # for messages: the folder or S3 prefix

    async def read(self, name: str) -> str | None: ...

    async def create(self, name: str, text: str) -> bool:
        """Store ``text`` as ``name`` unless it exists; whether it was stored."""
        ...

    async def remove(self, name: str) -> None: ...


class LocalStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where = str(folder)

    async def read(self, name: str) -> str | None:
        path = self.folder / name
        try:
            return await asyncio.to_thread(path.read_text, "utf-8")
        except FileNotFoundError:
            return None

    async def create(self, name: str, text: str) -> bool:
        return await asyncio.to_thread(self._create, name, text)

    def _create(self, name: str, text: str) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{uuid.uuid4().hex}"
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, self.folder / name)  # whole, and only if there is none yet
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    async def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread((self.folder / name).unlink)


class S3Store:
    def __init__(self, s3: S3, bucket: str, prefix: str) -> None:
        self._s3 = s3
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.where = f"s3://{bucket}/{self.prefix}/" if self.prefix else f"s3://{bucket}/"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    async def read(self, name: str) -> str | None:
        try:
            data = await self._s3.read(self.bucket, self._key(name))
        except Exception as exc:
            error = failure_of(exc)
            if error is not None and error.code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return data.decode("utf-8")

    async def create(self, name: str, text: str) -> bool:
        client = self._s3.client
        for _ in range(5):
            try:
                await self._s3.call(
                    lambda: client.put_object(
                        Bucket=self.bucket,
                        Key=self._key(name),
                        Body=text.encode("utf-8"),
                        IfNoneMatch="*",
                    )
                )
                return True
            except Exception as exc:
                error = failure_of(exc)
                if error is None:
                    raise
                if error.code in ("PreconditionFailed", "412"):
                    return False
                if error.code != "ConditionalRequestConflict":  # 409: S3 asks to try again
                    raise
                await asyncio.sleep(POLL_SECONDS)
        return False

    async def remove(self, name: str) -> None:
        client = self._s3.client
        await self._s3.call(lambda: client.delete_object(Bucket=self.bucket, Key=self._key(name)))


def store_for(job: Config, s3: S3 | None) -> SplitStore:
    """Where the job's split lives: beside the shard folders of ``output.upload_uri`` when
    the job uploads, else in its output directory."""
    parsed = parse_s3_uri(job.output.upload_uri) if job.output.upload_uri else None
    if parsed is not None:
        if s3 is None:
            raise SetupError(f"output.upload_uri: {job.output.upload_uri}: S3 is not open")
        return S3Store(s3, *parsed)
    return LocalStore(Path(job.job.output_dir))


@dataclass
class Agreement:
    split: JobSplit
    store: SplitStore
    made: bool  # this shard stored the split (and so checks the references first)


def _parse(text: str, store: SplitStore, job: Config, shard: Shard) -> JobSplit:
    where = f"{store.where.rstrip('/')}/{SPLIT_FILE}"
    try:
        split = JobSplit.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise SetupError(f"{where}: not a split of shards ({exc}); remove it") from None
    if split.fingerprint != job.fingerprint():
        raise SetupError(
            f"{where}: made for another job (other sources or operations); "
            "give this job another output, or remove it"
        )
    if split.shards != shard.count:
        raise SetupError(
            f"{where}: divides the job into {split.shards} shards, not {shard.count}; run "
            f"the shards with --shards {split.shards}, or remove it to divide the job again"
        )
    return split


def _mismatch(store: SplitStore, found: JobSplit, kept: JobSplit, shard: Shard) -> SetupError:
    return SetupError(
        f"{store.where.rstrip('/')}/{SPLIT_FILE}: split {found.id}, but shard {shard} has "
        f"listed by split {kept.id}; run it with --fresh (and so every shard that listed by "
        f"{kept.id}), or put split {kept.id} back"
    )


async def agree(
    job: Config, shard: Shard, sources: Sequence[Source], s3: S3 | None, ledger: Ledger
) -> Agreement:
    """The split shard ``shard`` lists by: the stored one, the one its ledger keeps, or a
    new one stored for every shard; a ``SetupError`` when they disagree."""
    store = store_for(job, s3)
    kept_text = await ledger.read(LedgerDB.get_meta, SPLIT_META)
    kept = JobSplit.from_json(kept_text) if kept_text else None
    found_text = await store.read(SPLIT_FILE)
    made = False
    if found_text is not None:
        split = _parse(found_text, store, job, shard)
        if kept is not None and kept.id != split.id:
            raise _mismatch(store, split, kept, shard)
    elif kept is not None:
        split = kept  # the stored split was removed: put back the one this shard lists by
        made = await store.create(SPLIT_FILE, split.to_json())
        if not made:
            found = _parse(await store.read(SPLIT_FILE) or "", store, job, shard)
            if found.id != split.id:
                raise _mismatch(store, found, split, shard)
    else:
        if await ledger.read(_listed_before):
            raise SetupError(
                f"shard {shard}: its folder was started by an earlier rekbatch, which gave "
                "objects to shards by a hash; finish the job with that release, or run it "
                "again with --fresh (every shard)"
            )
        claim = json.dumps({"shard": shard.index, "at": utc_now()}) + "\n"
        text = None
        if not await store.create(CLAIM_FILE, claim) and not await _own_claim(store, shard):
            text = await _wait_for_split(store)
        if text is None:
            concurrency = job.source.list_concurrency
            parts = [await s.divide(shard.count, concurrency, shard.index) for s in sources]
            split = JobSplit(shard.count, job.fingerprint(), parts)
            made = await store.create(SPLIT_FILE, split.to_json())
            if not made:  # another shard stored one first: take that
                text = await store.read(SPLIT_FILE)
        if text is not None:
            split = _parse(text, store, job, shard)
    await ledger.write(LedgerDB.set_meta, {SPLIT_META: split.to_json()})
    log.info(
        "shard_split",
        shard=str(shard),
        split=split.id,
        stored=f"{store.where.rstrip('/')}/{SPLIT_FILE}",
        made_here=made,
        ranges=[len(split.part(shard, i)) for i in range(len(sources))],
    )
    return Agreement(split, store, made)


async def _own_claim(store: SplitStore, shard: Shard) -> bool:
    """Whether the claim is this shard's own, from an attempt that died while dividing."""
    text = await store.read(CLAIM_FILE)
    try:
        return text is not None and json.loads(text).get("shard") == shard.index
    except ValueError:
        return False


async def _wait_for_split(store: SplitStore) -> str | None:
    """The split another shard claimed to make, once stored; None after a while (that
    shard may have died while dividing)."""
    waited = 0.0
    while waited < SPLIT_WAIT_SECONDS:
        text = await store.read(SPLIT_FILE)
        if text is not None:
            return text
        await asyncio.sleep(POLL_SECONDS)
        waited += POLL_SECONDS
    log.warning("split_not_stored", waited_seconds=SPLIT_WAIT_SECONDS, action="dividing here")
    return None


def _listed_before(db: LedgerDB) -> bool:
    """Whether a shard's ledger has listed or recorded anything (without a split: by hash)."""
    connection = db.connection
    ranges = connection.execute("SELECT 1 FROM source_ranges LIMIT 1").fetchone()
    return ranges is not None or db.has_records()


def _references(db: LedgerDB) -> dict[str, str]:
    rows = db.connection.execute(
        "SELECT key, value FROM meta WHERE key LIKE ?", (REFERENCE_PREFIX + "%",)
    )
    return {str(key): str(value) for key, value in rows}


async def take_references(agreement: Agreement, ledger: Ledger, *, wanted: bool) -> None:
    """Before the operations prepare: the job's reference checks, as stored, into this
    shard's ledger, where the operations find them instead of calling. A shard that did not
    store the split waits a little for the one that did to store them (``wanted``: the job
    checks references at all)."""
    store = agreement.store
    text = await store.read(REFERENCES_FILE)
    if text is None and wanted and not agreement.made:
        waited = 0.0
        while text is None and waited < REFERENCE_WAIT_SECONDS:
            await asyncio.sleep(POLL_SECONDS)
            waited += POLL_SECONDS
            text = await store.read(REFERENCES_FILE)
        if text is None:
            log.warning(
                "references_not_stored",
                waited_seconds=REFERENCE_WAIT_SECONDS,
                action="checking the references here",
            )
    if text is None:
        return
    entries: dict[str, Any] = json.loads(text)
    known = {k: str(v) for k, v in entries.items() if k.startswith(REFERENCE_PREFIX)}
    if known:
        await ledger.write(LedgerDB.set_meta, known)


async def give_references(agreement: Agreement, ledger: Ledger) -> None:
    """After the operations prepared: this shard's reference checks stored for the others,
    unless some are stored already."""
    entries = await ledger.read(_references)
    if entries:
        await agreement.store.create(REFERENCES_FILE, json.dumps(entries, indent=1) + "\n")


async def forget_split(job: Config, s3: S3 | None) -> None:
    """The job's stored split and references removed (``--fresh`` over all shards)."""
    store = store_for(job, s3)
    for name in (SPLIT_FILE, CLAIM_FILE, REFERENCES_FILE):
        await store.remove(name)


__all__ = [
    "SPLIT_FILE",
    "Agreement",
    "agree",
    "forget_split",
    "give_references",
    "store_for",
    "take_references",
]
