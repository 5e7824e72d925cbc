"""Stopping a run with signals, in real processes: SIGTERM while every call is stalled ends
the run after ``limits.stop_grace_seconds``, and a second SIGINT to an offline run leaves no
process of it behind. Each ends with a resume and an exactly-once check.

Times are only bounded generously (to catch a hang), never asserted; the seconds from the
signal to the exit are printed for the record."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rekbatch.config import load_config
from rekbatch.engine import Job, RunOptions
from rekbatch.errors import Interrupted
from tests.conftest import REPO, make_bucket
from tests.helpers import (
    exactly_once,
    fake_jpeg,
    invoke,
    local_images,
    read_jsonl,
    write_config,
)
from tests.support.fake_backend import FakeBackend
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import put_objects
from tests.support.servers import ServedJob, StartFake

GENEROUS = 120.0  # seconds: only a hang takes this long


def _wait_for(what: str, ready: Callable[[], bool], seconds: float = GENEROUS) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:.0f} s: {what}")
        time.sleep(0.05)


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "rekbatch", "run", str(config), "--log-format", "json"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=os.environ.copy(),
        )


def _exit_code(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=GENEROUS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the run did not exit within {GENEROUS:.0f} s") from None


def _exactly_once(out: Path, keys: int, operations: int = 1) -> list[dict[str, Any]]:
    return exactly_once(out, keys * operations)


# --------------------------------------------------------------------------- SIGTERM


@pytest.fixture
def stalling(start_fake: StartFake) -> FakeRekognition:
    return start_fake(stall_rate=1.0, stall_seconds=0)


def test_sigterm_with_every_call_stalled_exits_130_after_the_grace_period(
    tmp_path: Path, s3: Any, stalling: FakeRekognition, served_job: ServedJob
) -> None:
    bucket = make_bucket(s3, "stalled-bucket")
    put_objects(bucket, ((f"img/{i:03d}.jpg", fake_jpeg(i)) for i in range(40)))
    out = tmp_path / "out"
    config = served_job(
        stalling,
        f"s3://{bucket}/",
        operations='[[operations]]\ntype = "detect_labels"\n',
        limits={"concurrency": 4, "max_tps": 100, "stop_grace_seconds": 2},
        source={"sniff": False},
    )
    proc = _start(config, tmp_path / "run.log")
    try:
        _wait_for("four stalled calls", lambda: sum(stalling.stats()["stalled"].values()) >= 4)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = _exit_code(proc)
        seconds = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"SIGTERM to exit, every call stalled, stop_grace_seconds = 2: {seconds:.1f} s")
    log = (tmp_path / "run.log").read_text()
    assert code == 130, log[-3000:]
    assert "interrupted; resume with" in log and '"grace_over"' in log
    assert "listed no objects" not in log  # a stopped run says nothing of its sources
    # Nothing was retried once stopping, and nothing was recorded as failed.
    assert not [r for r in read_jsonl(out / "results.jsonl") if r["status"] != "ok"]

    stalling.configure(stall_rate=0.0)
    result = invoke("resume", str(out))
    assert result.exit_code == 0, result.stderr
    rows = _exactly_once(out, 40)
    assert all(r["status"] == "ok" for r in rows)


# --------------------------------------------------------------------------- second signal


def _descendants(root: int) -> set[int]:
    """Every process below ``root``, from /proc (Linux)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever inherited it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_second_sigint_to_an_offline_run_leaves_no_process_of_it(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    keys = local_images(photos, 300)
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\noutput_dir = "{out}"\n\n[source]\nuris = ["{photos}"]\n\n'
        '[backend]\nkind = "local"\n\n[limits]\nconcurrency = 2\n\n'
        '[[operations]]\ntype = "detect_faces"\n',
    )
    proc = _start(config, tmp_path / "run.log")
    try:
        jsonl = out / "results.jsonl"
        _wait_for("a first record", lambda: jsonl.exists() and jsonl.stat().st_size > 0)
        family = _descendants(proc.pid)
        assert family, "the offline run has no worker processes"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        code = _exit_code(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert code == 130, log[-3000:]
    assert "stopped at once" in log
    # The pool's workers are killed; the resource tracker then finds its pipe closed,
    # cleans up and exits by itself.
    _wait_for("no process of the run left", lambda: not any(map(_alive, family)), 30.0)

    result = invoke("resume", str(out))
    assert result.exit_code == 0, result.stderr
    _exactly_once(out, len(keys))


# --------------------------------------------------------------------------- during startup


@dataclass
class _StalledReferenceCheck(FakeBackend):
    """The reference check (DetectFaces on the reference's bytes) never answers."""

    checking: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(self, api: str, params: dict[str, Any], images: dict[str, Any]) -> Any:
        if api == "DetectFaces":
            self.checking.set()
            await asyncio.sleep(3600)
        return await super().call(api, params, images)


async def test_a_stop_while_the_run_starts_ends_after_the_grace_period(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    keys = local_images(photos, 6)
    reference = photos / keys[0]
    path = write_config(
        tmp_path / "job.toml",
        f'[job]\noutput_dir = "{tmp_path / "out"}"\n\n[source]\nuris = ["{photos}"]\n\n'
        "[limits]\nmax_tps = 1000\nstop_grace_seconds = 0.2\n\n"
        f'[[operations]]\ntype = "compare_faces"\nreference = "{reference}"\n',
    )
    cfg = load_config(path, environ={})
    out = Path(cfg.job.output_dir)
    backend = _StalledReferenceCheck()
    job = Job(cfg, RunOptions(output_dir=out), backend=backend)
    running = asyncio.create_task(job.run())
    async with asyncio.timeout(GENEROUS):
        await backend.checking.wait()
        job.request_stop("interrupted by SIGTERM")
        with pytest.raises(Interrupted) as caught:
            await running
    assert caught.value.exit_code == 130
    assert not (out / "results.jsonl").exists()

    ident = f"sha256:{hashlib.sha256(reference.read_bytes()).hexdigest()}"
    healthy = FakeBackend(people={ident: ["ric"]})
    async with asyncio.timeout(GENEROUS):
        outcome = await Job(cfg, RunOptions(output_dir=out), backend=healthy).run()
    assert outcome.exit_code == 0
    _exactly_once(out, len(keys))
