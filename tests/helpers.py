"""Small test helpers: image bytes, configs, reading result files."""

from __future__ import annotations

import csv
import hashlib
import json
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from rekbatch.cli import app
from tests.conftest import REPO, SAMPLES, make_bucket


def tiny_png(seed: int = 0, side: int = 80) -> bytes:
    """A real PNG of ``side`` x ``side`` (80: the smallest Rekognition takes) whose pixels
    depend on ``seed``, so contents (and ETags) differ; a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    pixels = bytes([seed % 256, (seed // 256) % 256, 7]) * side
    raw = b"".join(b"\x00" + pixels for _ in range(side))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def fake_jpeg(seed: int = 0, size: int = 600) -> bytes:
    """Bytes with JPEG magic and seed-dependent content; enough for the fake service."""
    body = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    return b"\xff\xd8\xff\xe0" + body[: size - 6] + b"\xff\xd9"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def exactly_once(
    out: Path, pairs: int | None = None, *, all_ok: bool = False
) -> list[dict[str, Any]]:
    """The rows of ``out/results.jsonl``, asserting each (key, operation) is there once,
    results.csv holds the same pairs and the ledger as many records (``pairs`` of them when
    given; every one ok with ``all_ok``)."""
    from rekbatch.store.ledger import LedgerDB

    rows = read_jsonl(out / "results.jsonl")
    seen = Counter((r["key"], r["operation"]) for r in rows)
    assert max(seen.values(), default=1) == 1, seen.most_common(3)
    if pairs is not None:
        assert len(seen) == pairs, (len(seen), pairs)
    assert Counter((r["key"], r["operation"]) for r in read_csv(out / "results.csv")) == seen
    db = LedgerDB(out / ".rekbatch" / "ledger.sqlite", readonly=True)
    try:
        assert sum(row["n"] for row in db.counts()) == len(seen)
    finally:
        db.close()
    if all_ok:
        failed = [r for r in rows if r["status"] != "ok"]
        assert not failed, failed[:3]
    return rows


def invoke(*args: str) -> Any:
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def upload_samples(s3: Any, bucket: str, prefix: str = "") -> str:
    """The Where's Ric sample photos (and the non-images among them) in a new bucket."""
    make_bucket(s3, bucket)
    for path in sorted(SAMPLES.iterdir()):
        s3.put_object(Bucket=bucket, Key=prefix + path.name, Body=path.read_bytes())
    return bucket


def sample_people() -> dict[str, list[str]]:
    """Who the fake sees in each sample photo: the project's ``configs/fake-people.json``."""
    people: dict[str, list[str]] = json.loads((REPO / "configs" / "fake-people.json").read_text())
    return people


def sized_png(seed: int, width: int = 96, height: int = 96) -> bytes:
    """A real RGB PNG of ``width`` x ``height`` whose pixels depend on ``seed``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    colour = bytes([seed % 251, (seed * 7) % 253, (seed * 13) % 255])
    raw = b"".join(b"\x00" + colour * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def local_images(folder: Path, count: int, *, start: int = 0, prefix: str = "img") -> list[str]:
    """``count`` distinct PNG files in ``folder``; their keys."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(start, start + count):
        key = f"{prefix}{i:05d}.png"
        (folder / key).write_bytes(sized_png(i))
        keys.append(key)
    return keys
