"""Reads bounded by the listing, and symbolic links not followed.

A local file swapped after listing (for a FIFO, a link to /dev/zero, a longer file) and an
S3 object replaced after listing are failed as ``ObjectChanged`` without reading past the
listed size; a link in a local folder is recorded as skipped (``symlink``) and never read
unless ``source.follow_symlinks`` is true. Changes are made at the seam between listing and
reading: the listing is collected whole, the files changed, then the entries handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rekbatch.config import load_config
from rekbatch.engine import Job, RunOptions
from rekbatch.records import ObjectRef
from rekbatch.sources import local
from rekbatch.sources import s3 as s3_source
from rekbatch.sources.base import ObjectChanged
from rekbatch.sources.local import LocalSource
from rekbatch.sources.s3 import _read_at_most
from rekbatch.store.ledger import LedgerDB
from tests.conftest import make_bucket
from tests.helpers import invoke, read_csv, read_jsonl, write_config
from tests.support.fake_backend import FakeBackend
from tests.support.servers import ServedJob, StartFake
from tests.test_engine import assert_exactly_once

BOUND = 60.0  # seconds a run may take before the test gives up on it


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (120, 100), (seed * 40 % 256, 90, 30)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def swap_after_listing(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Callable[[], None]]]:
    """Changes to make to the files once the folder is listed and before any is read (the
    listing is collected whole, then the changes made, then the entries handed out)."""
    changes: list[Callable[[], None]] = []
    original = local.list_local

    async def listed_then_changed(*args: Any, **kwargs: Any) -> AsyncIterator[ObjectRef]:
        refs = [ref async for ref in original(*args, **kwargs)]
        for change in changes:
            change()
        changes.clear()
        for ref in refs:
            yield ref

    monkeypatch.setattr(local, "list_local", listed_then_changed)
    yield changes


def _unblock_fifo(path: Path) -> None:
    """Open a FIFO's writing end and close it, so a reader stuck opening it gets EOF."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


def test_files_swapped_after_listing_are_failed_unread(
    tmp_path: Path, swap_after_listing: list[Callable[[], None]]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, name in enumerate(("a.jpg", "fifo.jpg", "grown.jpg", "link.jpg", "z.jpg")):
        (folder / name).write_bytes(_jpeg(k))
    listed = {p.name: p.stat().st_size for p in folder.iterdir()}

    def swap() -> None:
        (folder / "fifo.jpg").unlink()
        os.mkfifo(folder / "fifo.jpg")
        with (folder / "grown.jpg").open("ab") as handle:
            handle.write(b"\0" * 4096)
        (folder / "link.jpg").unlink()
        (folder / "link.jpg").symlink_to("/dev/zero")

    swap_after_listing.append(swap)
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "swapped"\noutput_dir = "{out}"\n[source]\nuris = ["{folder}"]\n'
        '[output]\nparquet = false\n[[operations]]\ntype = "detect_faces"\n',
    )
    backend = FakeBackend()
    try:
        outcome = asyncio.run(_run_job(config, backend))
    finally:
        _unblock_fifo(folder / "fifo.jpg")
    assert outcome == 3
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    for key in ("fifo.jpg", "grown.jpg", "link.jpg"):
        assert (rows[key]["status"], rows[key]["error_code"]) == ("failed", "ObjectChanged")
        assert rows[key]["size"] == listed[key]
    assert "FIFO" in rows["fifo.jpg"]["error_message"]
    assert "symbolic link" in rows["link.jpg"]["error_message"]
    assert f"{listed['grown.jpg']:,} bytes" in rows["grown.jpg"]["error_message"]
    assert rows["a.jpg"]["status"] == rows["z.jpg"]["status"] == "ok"
    sent = {ident for _, ident in backend.billed}
    assert sent == {identity_of(folder / "a.jpg"), identity_of(folder / "z.jpg")}

    # Resumed: what did not change is not read or sent again; the FIFO is no file to list;
    # the link is recorded as one; the grown file is a new version of it, sent once.
    again = FakeBackend()
    try:
        assert asyncio.run(_run_job(config, again)) == 3
    finally:
        _unblock_fifo(folder / "fifo.jpg")
    assert {ident for _, ident in again.billed} == {identity_of(folder / "grown.jpg")}
    rows_again = read_jsonl(out / "results.jsonl")
    link = [r for r in rows_again if r["key"] == "link.jpg"]
    assert [(r["status"], r["reason"]) for r in link] == [("failed", None), ("skipped", "symlink")]
    assert_once_per_version(out)


def assert_once_per_version(out: Path) -> None:
    """Every (key, ETag, operation) once in results.jsonl and results.csv, and the ledger
    holding one row per (key, operation): its latest version."""

    rows = Counter((r["key"], r["etag"], r["operation"]) for r in read_jsonl(out / "results.jsonl"))
    csv = Counter((r["key"], r["etag"], r["operation"]) for r in read_csv(out / "results.csv"))
    assert rows == csv and max(rows.values()) == 1
    db = LedgerDB(out / ".rekbatch" / "ledger.sqlite", readonly=True)
    try:
        assert sum(row["n"] for row in db.counts()) == len({(k, op) for k, _, op in rows})
    finally:
        db.close()


def identity_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def _run_job(config: Path, backend: Any) -> int:
    cfg = load_config(config, environ={})
    job = Job(cfg, RunOptions(output_dir=Path(cfg.job.output_dir)), backend=backend)
    async with asyncio.timeout(BOUND):
        outcome = await job.run()
    return outcome.exit_code


async def test_a_local_read_stops_at_the_listed_size(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg(1))
    source = LocalSource(str(tmp_path), 0)
    [obj] = [ref async for ref in source.list(None)]
    assert await source.read(obj) == (tmp_path / "a.jpg").read_bytes()
    assert await source.read_head(obj, 10) == (tmp_path / "a.jpg").read_bytes()[:10]
    # Same size and time as listed, more bytes behind them: never read past the listing.
    stat = (tmp_path / "a.jpg").stat()
    with (tmp_path / "a.jpg").open("ab") as handle:
        handle.write(b"\0" * 100)
    os.utime(tmp_path / "a.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ObjectChanged):
        await source.read(obj)


async def test_an_s3_read_never_takes_more_than_the_listed_size() -> None:
    class Endless:
        """A body from a server that ignores Range: bytes for ever."""

        def __init__(self) -> None:
            self.given = 0

        async def read(self, amt: int | None = None) -> bytes:
            assert amt is not None  # never "all of it"
            self.given += amt
            return b"\0" * amt

    body = Endless()
    data = await _read_at_most(body, 1001)
    assert len(data) == 1001 and body.given == 1001


@pytest.mark.parametrize("mode", ["bytes", "s3"])
def test_an_s3_object_replaced_after_listing_is_failed_as_changed(
    mode: str,
    s3: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    start_fake: StartFake,
    served_job: ServedJob,
) -> None:
    bucket = make_bucket(s3, f"changing-{mode}")
    for k, key in enumerate(("a.jpg", "b.jpg", "c.jpg", "d.jpg")):
        s3.put_object(Bucket=bucket, Key=key, Body=_jpeg(k))
    original = s3_source.S3Source.list_range
    replaced: list[str] = []

    async def listed_then_replaced(self: Any, *args: Any, **kwargs: Any) -> Any:
        refs = [ref async for ref in original(self, *args, **kwargs)]
        if not replaced:  # once: the resume lists the new versions
            s3.put_object(Bucket=bucket, Key="b.jpg", Body=_jpeg(7))  # same size, new content
            s3.put_object(Bucket=bucket, Key="d.jpg", Body=_jpeg(3) + b"\0" * 5000)
            replaced.append("b.jpg")
        for ref in refs:
            yield ref

    monkeypatch.setattr(s3_source.S3Source, "list_range", listed_then_replaced)
    out = tmp_path / "out"
    fake = start_fake(region="eu-west-1")
    config = served_job(
        fake, f"s3://{bucket}/", output={"parquet": False}, aws={"image_mode": mode}
    )
    result = invoke("run", str(config))
    assert result.exit_code == 3, result.stderr
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    for key in ("b.jpg", "d.jpg"):
        assert (rows[key]["status"], rows[key]["error_code"]) == ("failed", "ObjectChanged")
        assert "changed since it was listed" in rows[key]["error_message"]
    assert rows["a.jpg"]["status"] == rows["c.jpg"]["status"] == "ok"
    billed = {ident for _, ident in fake.stats()["billed"]}
    assert len(billed) == 2  # a and c only
    again = invoke("run", str(config))  # resumed: the new versions, once each
    assert again.exit_code == 0, again.stderr
    latest = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert {k for k, r in latest.items() if r["status"] == "ok"} == {
        "a.jpg",
        "b.jpg",
        "c.jpg",
        "d.jpg",
    }
    assert_once_per_version(out)


# -- symbolic links -----------------------------------------------------------------------------


def test_a_symlink_is_recorded_and_never_sent(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(_jpeg(9))
    (folder / "a.jpg").write_bytes(_jpeg(1))
    (folder / "link.jpg").symlink_to("/etc/passwd")
    (folder / "sub" / "elsewhere").symlink_to(outside)  # a folder leading outside
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "links"\noutput_dir = "{out}"\n'
        f'[source]\nuris = ["{folder}"]\nsniff = false\ninclude = ["*"]\n'
        '[output]\nparquet = false\n[[operations]]\ntype = "detect_faces"\n',
    )
    backend = FakeBackend()
    assert asyncio.run(_run_job(config, backend)) == 0
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert set(rows) == {"a.jpg", "link.jpg", "sub/elsewhere"}
    for key, target in (("link.jpg", "/etc/passwd"), ("sub/elsewhere", str(outside))):
        assert (rows[key]["status"], rows[key]["reason"]) == ("skipped", "symlink")
        assert target in rows[key]["error_message"]
        assert "source.follow_symlinks" in rows[key]["error_message"]
    passwd = identity_of(Path("/etc/passwd"))
    assert [ident for _, ident in backend.billed] == [identity_of(folder / "a.jpg")]
    assert passwd not in {ident for _, ident in backend.billed}
    summary = json.loads((out / "summary.json").read_text())
    assert "symlink" in json.dumps(summary)
    again = FakeBackend()
    assert asyncio.run(_run_job(config, again)) == 0
    assert not again.billed
    assert_exactly_once(out, {(str(folder), k, "detect_faces") for k in rows})


def test_follow_symlinks_true_follows_them(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.jpg").write_bytes(_jpeg(2))
    (folder / "a.jpg").write_bytes(_jpeg(1))
    (folder / "link.jpg").symlink_to(outside / "b.jpg")
    (folder / "more").symlink_to(outside)
    (outside / "loop").symlink_to(folder)  # a way back up: entered once only
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "follow"\noutput_dir = "{out}"\n'
        f'[source]\nuris = ["{folder}"]\nfollow_symlinks = true\n'
        '[output]\nparquet = false\n[[operations]]\ntype = "detect_faces"\n',
    )
    backend = FakeBackend()
    assert asyncio.run(_run_job(config, backend)) == 0
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert set(rows) == {"a.jpg", "link.jpg", "more/b.jpg"}
    assert {r["status"] for r in rows.values()} == {"ok"}


def test_following_links_is_part_of_what_the_job_is(tmp_path: Path) -> None:
    def config(extra: str) -> Path:
        return write_config(
            tmp_path / f"job{len(extra)}.toml",
            f'[source]\nuris = ["{tmp_path}"]\n{extra}[[operations]]\ntype = "detect_faces"\n',
        )

    default = load_config(config(""), environ={})
    stated = load_config(config("follow_symlinks = false\n"), environ={})
    following = load_config(config("follow_symlinks = true\n"), environ={})
    assert default.fingerprint() == stated.fingerprint() != following.fingerprint()


def test_a_link_the_globs_leave_out_is_excluded(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_jpeg(1))
    (folder / "b.jpg").symlink_to("/etc/passwd")
    (folder / "latest").symlink_to(tmp_path)  # not an image name: excluded, as any other
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "globs"\noutput_dir = "{out}"\n[source]\nuris = ["{folder}"]\n'
        '[output]\nparquet = false\n[[operations]]\ntype = "detect_faces"\n',
    )
    assert asyncio.run(_run_job(config, FakeBackend())) == 0
    rows = {r["key"]: (r["status"], r["reason"]) for r in read_jsonl(out / "results.jsonl")}
    assert rows == {
        "a.jpg": ("ok", None),
        "b.jpg": ("skipped", "symlink"),
        "latest": ("skipped", "excluded"),
    }


async def test_cancelled_reads_leave_no_file_open(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(_jpeg(1) + os.urandom(4 * 1024 * 1024))
    source = LocalSource(str(tmp_path), 0)
    [obj] = [ref async for ref in source.list(None)]

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_files()
    for k in range(60):  # cancelled at every point of a read: opening, reading, closing
        task = asyncio.create_task(source.read(obj))
        for _ in range(k % 4):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    async with asyncio.timeout(BOUND):  # the reads still running on their threads finish
        await asyncio.get_running_loop().shutdown_default_executor()
    gc.collect()  # a file object left unclosed would warn here (warnings are errors)
    assert open_files() == before
