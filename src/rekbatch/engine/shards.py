"""Shards: one job split into N disjoint parts that run anywhere, in any order, retried.

An object belongs to shard ``stable_hash(bucket, key) % N``. The hash depends on nothing but
the object's name, so every shard, on any machine, in any run, agrees which objects are its
own; N shards together hold every object exactly once. The producer drops the objects of
other shards as they are listed, before anything is read or paid for.

Each shard is a job of its own in ``OUTPUT/shard-KKKK-of-NNNN/`` (its ledger, lock and result
files), so a container that is retried resumes its shard by itself, and ``rekbatch merge``
puts the shards together. The rate ceilings are the job's: each shard gets 1/N of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rekbatch.config import Config, IndexFacesOp, SearchFacesOp
from rekbatch.errors import ConfigError

FOLDER = re.compile(r"^shard-(\d{4})-of-(\d{4})$")
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


def parse_shard(text: str) -> Shard:
    """``K/N`` as ``--shard`` takes it."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
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
    if not re.fullmatch(r"\s*\d+\s*", raw):
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


def write_job_file(out: Path, cfg: Config, shard: Shard) -> None:
    """What ``merge`` needs to know of a shard, also from S3 where there is no ledger."""
    body = {
        "shard": shard.index,
        "shards": shard.count,
        "job_fingerprint": cfg.fingerprint(),
        "job_config": cfg.model_dump(mode="json"),
    }
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
        match = FOLDER.match(child.name)
        if match and child.is_dir():
            found[Shard(int(match.group(1)), int(match.group(2)))] = child
    return found


__all__ = [
    "JOB_FILE",
    "Shard",
    "parse_shard",
    "read_job_file",
    "shard_config",
    "shard_folders",
    "shard_from_env",
    "shard_of",
    "write_job_file",
]
