"""Shards: one job split into N disjoint parts that run anywhere, in any order, retried.

The shards of a job divide its listing (``JobSplit``): per source, each shard has its own
key ranges of an S3 prefix or a local folder, data files of an inventory, or line ranges of
a key list, and lists only those. Key ranges cover every possible key, so an object added
after the split still falls in exactly one shard's part. The split is made once per job and
stored where every shard finds it (``engine/shard_split.py``).

Each shard is a job of its own in ``OUTPUT/shard-KKKK-of-NNNN/`` (its ledger, lock and result
files), so a container that is retried resumes its shard by itself, and ``rekbatch merge``
puts the shards together. The rate ceilings are the job's: each shard gets 1/N of them.

Jobs sharded by earlier releases, before the split, gave an object to shard
``stable_hash(bucket, key) % N`` (``shard_of``); ``shard_owns`` still answers for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rekbatch.config import Config, IndexFacesOp, SearchFacesOp
from rekbatch.errors import ConfigError
from rekbatch.sources.ranges import KeyRange

# ASCII digits, the whole name: ``\d`` also takes other scripts' digits, which ``int`` reads
# (a folder named with Arabic-Indic digits would pass for shard 0), and ``$`` a trailing
# newline.
FOLDER = re.compile(r"shard-([0-9]{4})-of-([0-9]{4})")
JOB_FILE = "job.json"  # in a shard's folder: the job's own config and which shard it is
MAX_SHARDS = 9999  # four digits in the folder name


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ConfigError(f"--shards: must be between 1 and {MAX_SHARDS}, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ConfigError(
                f"--shard: index {self.index} is outside 0..{self.count - 1} "
                f"(shards are numbered from 0)"
            )

    @property
    def folder(self) -> str:
        return f"shard-{self.index:04d}-of-{self.count:04d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, bucket: str | None, key: str) -> bool:
        return self.count == 1 or shard_of(bucket, key, self.count) == self.index


def shard_of(bucket: str | None, key: str, count: int) -> int:
    """The shard of an object: a stable hash of its bucket and key (not Python's ``hash``,
    which changes from process to process)."""
    digest = hashlib.blake2b(f"{bucket or ''}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


@dataclass(frozen=True)
class JobSplit:
    """How a sharded job's listing is divided: ``parts[source][shard]`` are the ranges that
    shard lists of that source. Every key of a source is in exactly one shard's ranges
    (key ranges), or every data file or line of it in one shard's part (inventories, key
    lists)."""

    shards: int
    fingerprint: str
    parts: Sequence[Sequence[Sequence[KeyRange]]]

    @property
    def id(self) -> str:
        """A digest of what the shards must agree on."""
        body = json.dumps([self.shards, self.fingerprint, self._parts_json()], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def part(self, shard: Shard, source: int) -> list[KeyRange]:
        return list(self.parts[source][shard.index])

    def owner(self, source: int, key: str) -> int | None:
        """The shard whose key ranges hold ``key``; None where the source is divided by
        data files or lines, which a key alone does not tell."""
        for index, ranges in enumerate(self.parts[source]):
            for rng in ranges:
                if rng.part is not None:
                    return None
                if rng.holds(key):
                    return index
        return None

    def _parts_json(self) -> list[list[list[list[str | None]]]]:
        return [
            [[[r.after, r.upto, r.part] for r in ranges] for ranges in source]
            for source in self.parts
        ]

    def to_json(self) -> str:
        body = {
            "split": self.id,
            "shards": self.shards,
            "job_fingerprint": self.fingerprint,
            "parts": self._parts_json(),
        }
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> JobSplit:
        body = json.loads(text)
        parts = [
            [[KeyRange(*bounds) for bounds in ranges] for ranges in source]
            for source in body["parts"]
        ]
        split = cls(int(body["shards"]), str(body["job_fingerprint"]), parts)
        if body.get("split") != split.id:
            raise ValueError("its digest does not match its parts")
        return split


def shard_owns(
    shard: Shard, split: JobSplit | None, source: int, bucket: str | None, key: str
) -> bool | None:
    """Does shard K of N own this object? With the job's split (every job sharded since
    splits): whether the shard's key ranges of ``source`` hold ``key``; None for a source
    divided by data files or lines (an inventory, a key list), where only the shard's
    listing knows. Without a split (a job sharded before): the hash of bucket and key."""
    if split is None:
        return shard.owns(bucket, key)
    owner = split.owner(source, key)
    return None if owner is None else owner == shard.index


def job_file_owns(
    body: Mapping[str, Any], source: int, bucket: str | None, key: str
) -> bool | None:
    """``shard_owns`` from a shard's job.json alone (as ``merge`` reads it, locally or from
    S3): its ``parts`` (this shard's ranges, ``[after, upto, part]`` per source) where the
    job was split, else the hash."""
    shard = Shard(int(body["shard"]), int(body["shards"]))
    parts = body.get("parts")
    if parts is None:
        return shard.owns(bucket, key)
    ranges = [KeyRange(*bounds) for bounds in parts[source]]
    if any(r.part is not None for r in ranges):
        return None
    return any(r.holds(key) for r in ranges)


def parse_shard(text: str) -> Shard:
    """``K/N`` as ``--shard`` takes it."""
    match = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", text)
    if match is None:
        raise ConfigError(f"--shard: expected K/N (for example 3/16), got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def shard_from_env(variable: str, count: int, environ: Mapping[str, str] | None = None) -> Shard:
    """Shard K of ``count``, K read from the environment (``JOB_COMPLETION_INDEX`` on a
    Kubernetes Indexed Job, ``AWS_BATCH_JOB_ARRAY_INDEX`` on an AWS Batch array job)."""
    env = os.environ if environ is None else environ
    raw = env.get(variable)
    if raw is None:
        raise ConfigError(f"--shard-index-env: environment variable {variable} is not set")
    if not re.fullmatch(r"\s*[0-9]+\s*", raw):
        raise ConfigError(
            f"--shard-index-env: {variable}={raw!r} is not a non-negative whole number"
        )
    return Shard(int(raw), count)


def shard_config(cfg: Config, shard: Shard) -> Config:
    """The config shard ``shard`` runs with: its own output folder and upload folder and its
    own face collection (shards index at the same time). ``limits.max_tps`` stays the job's
    total; the run takes 1/N of it (``RunOptions.shard``)."""
    data: dict[str, Any] = cfg.model_dump()
    data["job"]["output_dir"] = str(Path(cfg.job.output_dir) / shard.folder)
    if cfg.output.upload_uri:
        data["output"]["upload_uri"] = cfg.output.upload_uri.rstrip("/") + f"/{shard.folder}/"
    for op, raw in zip(cfg.operations, data["operations"], strict=True):
        if isinstance(op, SearchFacesOp | IndexFacesOp) and shard.count > 1:
            raw["collection_id"] = f"{op.collection_id}-{shard.folder}"
    return Config.model_validate(data)


def write_job_file(out: Path, cfg: Config, shard: Shard, split: JobSplit | None = None) -> None:
    """What ``merge`` needs to know of a shard, also from S3 where there is no ledger: the
    job, which shard this is, and the job's split (``split``: its digest; ``parts``: this
    shard's ranges per source, ``[after, upto, part]`` each)."""
    body: dict[str, Any] = {
        "shard": shard.index,
        "shards": shard.count,
        "job_fingerprint": cfg.fingerprint(),
        "job_config": cfg.model_dump(mode="json"),
    }
    if split is not None:
        body["split"] = split.id
        body["parts"] = [
            [[r.after, r.upto, r.part] for r in split.part(shard, i)]
            for i in range(len(split.parts))
        ]
    path = out / JOB_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_job_file(out: Path) -> tuple[Config, Shard] | None:
    path = out / JOB_FILE
    if not path.is_file():
        return None
    body = json.loads(path.read_text(encoding="utf-8"))
    return Config.model_validate(body["job_config"]), Shard(body["shard"], body["shards"])


def shard_folders(directory: Path) -> dict[Shard, Path]:
    """The shard folders directly inside ``directory``."""
    found: dict[Shard, Path] = {}
    if not directory.is_dir():
        return found
    for child in sorted(directory.iterdir()):
        match = FOLDER.fullmatch(child.name)
        if match and child.is_dir():
            found[Shard(int(match.group(1)), int(match.group(2)))] = child
    return found


__all__ = [
    "JOB_FILE",
    "JobSplit",
    "Shard",
    "job_file_owns",
    "parse_shard",
    "read_job_file",
    "shard_config",
    "shard_folders",
    "shard_from_env",
    "shard_of",
    "shard_owns",
    "write_job_file",
]
