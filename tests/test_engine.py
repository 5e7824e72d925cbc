"""The engine in-process, with the fake backend: supervision, faults, dedup, search steps.

No HTTP here: sources are local folders (or moto where S3 itself matters) and the backend
is ``tests.support.fake_backend.FakeBackend``, handed to ``Job`` the way httpx tests hand a
client a mock transport. Every run is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rekbatch.config import Config, load_config
from rekbatch.engine import Job, RunOptions, RunOutcome
from rekbatch.engine.budget import Budget
from rekbatch.engine.dedup import Dedup
from rekbatch.errors import BackendError
from rekbatch.store.ledger import LedgerDB, Location
from tests.helpers import local_images, read_csv, read_jsonl
from tests.support.fake_backend import FakeBackend

TWO_OPS = '[[operations]]\ntype = "detect_faces"\n\n[[operations]]\ntype = "detect_labels"\n'
BOUND = 30.0


def make_config(
    tmp_path: Path, uris: list[str], ops: str = TWO_OPS, extra: str = "", name: str = "job"
) -> Config:
    uri_list = ", ".join(json.dumps(u) for u in uris)
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[job]\nname = "{name}"\noutput_dir = "{tmp_path / "out"}"\n\n'
        f"[source]\nuris = [{uri_list}]\n\n[limits]\nconcurrency = 8\nmax_tps = 10000\n{extra}\n{ops}",
        encoding="utf-8",
    )
    return load_config(path, environ={})


async def run(cfg: Config, backend: FakeBackend, **options: Any) -> RunOutcome:
    out = Path(cfg.job.output_dir)
    job = Job(cfg, RunOptions(output_dir=out, **options), backend=backend)
    async with asyncio.timeout(BOUND):
        return await job.run()


def pairs(out: Path) -> Counter[tuple[str, str, str]]:
    """(source, key, operation) of every row, counted, after checking JSONL and CSV agree."""
    rows = Counter((r["source"], r["key"], r["operation"]) for r in read_jsonl(out / "results.jsonl"))
    csv = Counter((r["source"], r["key"], r["operation"]) for r in read_csv(out / "results.csv"))
    assert rows == csv
    return rows


def assert_exactly_once(out: Path, expected: set[tuple[str, str, str]]) -> None:
    found = pairs(out)
    assert set(found) == expected
    assert max(found.values()) == 1
    db = LedgerDB(out / ".rekbatch" / "ledger.sqlite", readonly=True)
    try:
        assert sum(row["n"] for row in db.counts()) == len(expected)
    finally:
        db.close()


def expected_pairs(source: Path, keys: list[str], ops: tuple[str, ...] = ("detect_faces", "detect_labels")) -> set[tuple[str, str, str]]:
    return {(str(source), k, op) for k in keys for op in ops}


async def test_a_backend_raising_an_unexpected_exception_ends_the_run_and_it_resumes(
    tmp_path: Path,
) -> None:
    photos = tmp_path / "photos"
    keys = local_images(photos, 60)
    cfg = make_config(tmp_path, [str(photos)])
    broken = FakeBackend(fail_on={25: RuntimeError("the backend broke")})
    outcome = await run(cfg, broken)
    assert outcome.exit_code == 1
    assert outcome.failure is not None
    assert outcome.failure.startswith("worker-") and "RuntimeError: the backend broke" in outcome.failure
    done_before = sum(pairs(tmp_path / "out").values())
    assert 0 < done_before < 120

    healthy = FakeBackend()
    outcome = await run(cfg, healthy)
    assert outcome.exit_code == 0
    assert_exactly_once(tmp_path / "out", expected_pairs(photos, keys))
    # What the broken run finished was not asked for again.
    assert sum(healthy.calls.values()) == 120 - done_before


async def test_a_failing_ledger_commit_ends_the_run_and_it_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    keys = local_images(photos, 200)
    cfg = make_config(tmp_path, [str(photos)])
    real = LedgerDB.commit
    commits = 0

    def failing(self: LedgerDB, *args: Any) -> None:
        nonlocal commits
        commits += 1
        if commits >= 3:
            raise OSError(28, "No space left on device")
        real(self, *args)

    monkeypatch.setattr(LedgerDB, "commit", failing)
    backend = FakeBackend(latency=0.02)  # long enough for several batches
    outcome = await run(cfg, backend)
    assert outcome.exit_code == 1
    assert outcome.failure is not None and outcome.failure.startswith("writer failed")
    assert "No space left on device" in outcome.failure
    paid = sum(backend.billed.values())
    monkeypatch.setattr(LedgerDB, "commit", real)

    again = FakeBackend()
    assert (await run(cfg, again)).exit_code == 0
    assert_exactly_once(tmp_path / "out", expected_pairs(photos, keys))
    # Every answer that reached results.jsonl was replayed, not paid for again.
    assert sum(again.billed.values()) == 400 - paid


async def test_a_failing_heartbeat_ends_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    keys = local_images(photos, 40)
    cfg = make_config(tmp_path, [str(photos)])

    def broken(self: LedgerDB, run_id: str, stats: dict[str, Any]) -> None:
        raise RuntimeError("heartbeat lost its disk")

    monkeypatch.setattr(LedgerDB, "heartbeat", broken)
    monkeypatch.setattr("rekbatch.engine.run.HEARTBEAT_SECONDS", 0.01)
    outcome = await run(cfg, FakeBackend(latency=0.05))
    assert outcome.exit_code == 1
    assert outcome.failure is not None and outcome.failure.startswith("heartbeat failed")
    monkeypatch.undo()
    assert (await run(cfg, FakeBackend())).exit_code == 0
    assert_exactly_once(tmp_path / "out", expected_pairs(photos, keys))


async def test_a_malformed_answer_is_retried_then_recorded_as_failed(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    keys = local_images(photos, 10)
    cfg = make_config(tmp_path, [str(photos)], extra="max_attempts = 3\n")
    bad = keys[3]
    bad_ident = "sha256:" + __import__("hashlib").sha256((photos / bad).read_bytes()).hexdigest()

    def malformed(number: int, api: str, ident: str) -> BaseException | None:
        if ident == bad_ident and api == "DetectLabels":
            return BackendError("InvalidResponse", "AttributeError: 'str' has no 'get'", "transient")
        return None

    backend = FakeBackend(hook=malformed)
    outcome = await run(cfg, backend)
    assert outcome.exit_code == 3  # done; one record failed permanently
    rows = {(r["key"], r["operation"]): r for r in read_jsonl(tmp_path / "out" / "results.jsonl")}
    failed = rows[(bad, "detect_labels")]
    assert failed["status"] == "failed" and failed["error_code"] == "InvalidResponse"
    assert failed["attempts"] == 3
    assert rows[(bad, "detect_faces")]["status"] == "ok"
    assert sum(r["status"] == "ok" for r in rows.values()) == 19


def test_dedup_memory_holds_only_what_is_in_flight_or_uncommitted() -> None:
    async def main() -> None:
        dedup = Dedup()
        for i in range(1000):
            content = (f"etag-{i}", 100)
            assert dedup.claim(content, ["detect_faces"], None) is None
            dedup.settle(content, [Location("detect_faces", i * 10, 10)], visible_at=i // 100 + 1)
            if i % 100 == 99:
                dedup.evict(i // 100 + 1)
                assert len(dedup) == 0
        # A copy of an original whose rows are not committed yet waits for nothing: it has
        # the rows at once.
        content = ("etag-x", 5)
        assert dedup.claim(content, ["detect_faces"], None) is None
        waiting = dedup.claim(content, ["detect_faces"], None)
        assert isinstance(waiting, asyncio.Future) and not waiting.done()
        dedup.settle(content, [Location("detect_faces", 0, 1)], visible_at=99)
        assert waiting.result() == [Location("detect_faces", 0, 1)]
        assert dedup.claim(content, ["detect_faces"], None) == [Location("detect_faces", 0, 1)]
        # An original that did not succeed: its copies do their own work.
        other = ("etag-y", 5)
        assert dedup.claim(other, ["detect_faces"], None) is None
        copy = dedup.claim(other, ["detect_faces"], None)
        dedup.settle(other, None, visible_at=0)
        assert isinstance(copy, asyncio.Future) and copy.result() is None
        assert dedup.claim(other, ["detect_faces"], None) is None

    asyncio.run(main())


def test_the_cost_cap_counts_every_call_of_an_image() -> None:
    # search_faces' compare strategy with 3 references: up to 3 CompareFaces per image.
    budget = Budget(
        max_images=None,
        max_cost_usd=0.03,  # 30 CompareFaces at $0.001
        region="us-east-1",
        calls_per_image={"CompareFaces": 3},
        images_before=0,
    )
    taken = 0
    while budget.reserve() is None:
        taken += 1
    assert taken == 10
