"""The engine in-process, with the fake backend: supervision, faults, dedup, search steps.

No HTTP here: sources are local folders (or moto where S3 itself matters) and the backend
is ``tests.support.fake_backend.FakeBackend``, handed to ``Job`` the way httpx tests hand a
client a mock transport. Every run is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import gc
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
    tmp_path: Path,
    uris: list[str],
    ops: str = TWO_OPS,
    extra: str = "",
    name: str = "job",
    concurrency: int = 8,
) -> Config:
    uri_list = ", ".join(json.dumps(u) for u in uris)
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[job]\nname = "{name}"\noutput_dir = "{tmp_path / "out"}"\n\n'
        f"[source]\nuris = [{uri_list}]\n\n"
        f"[limits]\nconcurrency = {concurrency}\nmax_tps = 10000\n{extra}\n{ops}",
        encoding="utf-8",
    )
    return load_config(path, environ={})


async def run(
    cfg: Config, backend: FakeBackend, *, bound: float = BOUND, **options: Any
) -> RunOutcome:
    """The job run in this process on ``backend``; ``bound`` only catches a hang."""
    out = Path(cfg.job.output_dir)
    job = Job(cfg, RunOptions(output_dir=out, **options), backend=backend)
    async with asyncio.timeout(bound):
        return await job.run()


def pairs(out: Path) -> Counter[tuple[str, str, str]]:
    """(source, key, operation) of every row, counted, after checking JSONL and CSV agree."""
    rows = Counter(
        (r["source"], r["key"], r["operation"]) for r in read_jsonl(out / "results.jsonl")
    )
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


def expected_pairs(
    source: Path, keys: list[str], ops: tuple[str, ...] = ("detect_faces", "detect_labels")
) -> set[tuple[str, str, str]]:
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
    assert (
        outcome.failure.startswith("worker-")
        and "RuntimeError: the backend broke" in outcome.failure
    )
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

    monkeypatch.setattr("rekbatch.engine.run.HEARTBEAT_SECONDS", 0.01)
    real = LedgerDB.heartbeat
    monkeypatch.setattr(LedgerDB, "heartbeat", broken)
    outcome = await run(cfg, FakeBackend(latency=0.05))
    assert outcome.exit_code == 1
    assert outcome.failure is not None and outcome.failure.startswith("heartbeat failed")
    monkeypatch.setattr(LedgerDB, "heartbeat", real)
    assert (await run(cfg, FakeBackend())).exit_code == 0
    assert_exactly_once(tmp_path / "out", expected_pairs(photos, keys))


async def test_a_task_handed_to_the_job_runs_beside_the_work_until_it_ends(
    tmp_path: Path,
) -> None:
    """How the command line shows its progress display: a side task, supervised with the
    run's own (a failure ends the run as theirs does, and it resumes)."""
    photos = tmp_path / "photos"
    keys = local_images(photos, 40)
    cfg = make_config(tmp_path, [str(photos)])
    seen: list[dict[str, Any]] = []
    ended = asyncio.Event()

    async def watch(job: Job) -> None:
        try:
            while True:
                seen.append(job.live_stats())
                await asyncio.sleep(0.01)
        finally:
            ended.set()

    tenth_call = asyncio.Event()

    def count(number: int, api: str, ident: str) -> None:
        if number == 10:
            tenth_call.set()

    async def fail(job: Job) -> None:
        await tenth_call.wait()
        raise RuntimeError("the display broke")

    out = Path(cfg.job.output_dir)
    job = Job(cfg, RunOptions(output_dir=out), backend=FakeBackend(latency=0.02, hook=count))
    job.side_tasks.append(("display", fail))
    async with asyncio.timeout(BOUND):
        outcome = await job.run()
    assert outcome.exit_code == 1
    assert outcome.failure is not None
    assert outcome.failure.startswith("display failed: RuntimeError: the display broke")

    job = Job(cfg, RunOptions(output_dir=out), backend=FakeBackend(latency=0.01))
    job.side_tasks.append(("display", watch))
    async with asyncio.timeout(BOUND):
        outcome = await job.run()
    assert outcome.exit_code == 0 and ended.is_set()
    assert seen and seen[-1]["objects_done"] <= len(keys)
    assert_exactly_once(out, expected_pairs(photos, keys))


async def test_a_run_leaves_the_collector_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Library code changes no process-wide setting: freezing the collector for a run's
    work is the command line's (tests/test_operator.py)."""
    changed: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: changed.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: changed.append("unfreeze"))
    photos = tmp_path / "photos"
    local_images(photos, 10)
    outcome = await run(make_config(tmp_path, [str(photos)]), FakeBackend())
    assert outcome.exit_code == 0 and changed == []


async def test_a_malformed_answer_is_retried_then_recorded_as_failed(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    keys = local_images(photos, 10)
    cfg = make_config(tmp_path, [str(photos)], extra="max_attempts = 3\n")
    bad = keys[3]
    bad_ident = "sha256:" + __import__("hashlib").sha256((photos / bad).read_bytes()).hexdigest()

    def malformed(number: int, api: str, ident: str) -> BaseException | None:
        if ident == bad_ident and api == "DetectLabels":
            return BackendError(
                "InvalidResponse", "AttributeError: 'str' has no 'get'", "transient"
            )
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


def _ident(path: Path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_failing_upload_ends_the_run_and_it_resumes(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str
) -> None:
    from tests.conftest import make_bucket

    make_bucket(s3, "uploads-fail")
    photos = tmp_path / "photos"
    keys = local_images(photos, 60)
    extra = f'\n[aws]\ns3_endpoint_url = "{moto_endpoint}"\n\n[output]\nupload_uri = "s3://uploads-fail/job/"\n'
    cfg = make_config(tmp_path, [str(photos)], extra="", ops=extra + TWO_OPS)

    async def broken(*args: Any, **kwargs: Any) -> list[str]:
        raise ConnectionError("S3 went away")

    import rekbatch.sinks.upload

    real = rekbatch.sinks.upload.upload_results
    monkeypatch.setattr(rekbatch.sinks.upload, "upload_results", broken)
    monkeypatch.setattr("rekbatch.engine.run.UPLOAD_EVERY_SECONDS", 0.05)
    outcome = await run(cfg, FakeBackend(latency=0.02))
    assert outcome.exit_code == 1
    assert outcome.failure is not None and outcome.failure.startswith("upload failed")
    monkeypatch.setattr(rekbatch.sinks.upload, "upload_results", real)
    assert (await run(cfg, FakeBackend())).exit_code == 0
    assert_exactly_once(tmp_path / "out", expected_pairs(photos, keys))
    assert s3.get_object(Bucket="uploads-fail", Key="job/summary.json")["Body"].read()


async def test_copies_are_recognised_across_runs(
    tmp_path: Path, s3: Any, moto_endpoint: str
) -> None:
    from tests.conftest import make_bucket
    from tests.helpers import sized_png

    bucket = make_bucket(s3, "dedup-runs")
    s3.put_object(Bucket=bucket, Key="a/original.png", Body=sized_png(1))
    s3.put_object(Bucket=bucket, Key="a/other.png", Body=sized_png(2))
    ops = f'[aws]\ns3_endpoint_url = "{moto_endpoint}"\n\n' + TWO_OPS
    cfg = make_config(tmp_path, [f"s3://{bucket}/"], ops=ops)
    first = FakeBackend()
    assert (await run(cfg, first)).exit_code == 0
    assert sum(first.calls.values()) == 4
    s3.put_object(Bucket=bucket, Key="b/copy.png", Body=sized_png(1))
    second = FakeBackend()
    assert (await run(cfg, second)).exit_code == 0
    assert sum(second.calls.values()) == 0  # the copy's content was answered by the first run
    rows = {(r["key"], r["operation"]): r for r in read_jsonl(tmp_path / "out" / "results.jsonl")}
    for op in ("detect_faces", "detect_labels"):
        copy = rows[("b/copy.png", op)]
        assert copy["dedup_of"] == f"s3://{bucket}/a/original.png"
        assert copy["result"] == rows[("a/original.png", op)]["result"]
    assert len(rows) == 6


def _search_setup(tmp_path: Path) -> tuple[Path, dict[str, list[str]], set[str], str]:
    photos = tmp_path / "photos"
    keys = local_images(photos, 30)
    refs = tmp_path / "refs"
    local_images(refs, 2, start=900, prefix="ref")
    people = {_ident(refs / "ref00900.png"): ["ric"], _ident(refs / "ref00901.png"): ["al"]}
    ric = {k for i, k in enumerate(keys) if i % 3 == 0}
    for i, key in enumerate(keys):
        who = ["ric"] if key in ric else ["al", "someone"] if i % 3 == 1 else ["someone"]
        people[_ident(photos / key)] = who
    ops = (
        '[[operations]]\ntype = "search_faces"\n'
        f'people = {{ ric = ["{refs / "ref00900.png"}"], al = ["{refs / "ref00901.png"}"] }}\n'
        'collection_id = "people"\n'
    )
    return photos, people, ric, ops


async def test_search_shards_the_collection_so_no_answer_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("rekbatch.operations.search_faces.SHARD_FACES", 4)
    monkeypatch.setattr("rekbatch.operations.search_faces.MAX_SEARCH_FACES", 4)
    photos, people, ric, ops = _search_setup(tmp_path)
    cfg = make_config(tmp_path, [str(photos)], ops=ops, concurrency=2)
    backend = FakeBackend(people=people)
    outcome = await run(cfg, backend)
    assert outcome.exit_code == 0, outcome
    answer = outcome.summary["search_faces"]
    assert len(answer["collections"]) > 3  # 30 images with 1-2 faces, 4 faces a shard
    # Each search returns at most 4 faces, yet every one of the 10 photos of ric is found.
    assert set(answer["people"]["ric"]["matched_keys"]) == ric
    assert answer["people"]["al"]["images_matched"] == 10
    assert backend.collections == {}  # every shard deleted at the end
    assert "search_faces: ric found in 10 of 30 images" in outcome.answers


async def test_a_failed_search_step_keeps_what_it_found_and_resumes(tmp_path: Path) -> None:
    photos, people, ric, ops = _search_setup(tmp_path)
    ops += "keep_collection = true\n"
    cfg = make_config(tmp_path, [str(photos)], ops=ops)
    searches = 0

    def second_search_fails(number: int, api: str, ident: str) -> BaseException | None:
        nonlocal searches
        if api == "SearchFacesByImage":
            searches += 1
            if searches == 2:
                return BackendError("AccessDeniedException", "not allowed", "permanent")
        return None

    backend = FakeBackend(people=people, hook=second_search_fails)
    outcome = await run(cfg, backend)
    assert outcome.exit_code == 3
    answer = outcome.summary["search_faces"]
    assert answer["complete"] is False and "AccessDeniedException" in answer["error"]
    assert set(answer["people"]["ric"]["matched_keys"]) == ric  # searched before the failure
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["search_faces"]["complete"] is False
    paid = sum(backend.billed.values())

    backend.hook = None
    outcome = await run(cfg, backend)
    assert outcome.exit_code == 0
    answer = outcome.summary["search_faces"]
    assert "complete" not in answer
    assert answer["people"]["al"]["images_matched"] == 10
    # Only the searches were made again: no image and no reference check paid twice.
    assert sum(backend.billed.values()) - paid == 2


async def test_a_signal_during_the_search_step_exits_130_and_the_resume_finishes_it(
    tmp_path: Path,
) -> None:
    """Stopping while the last step (searching the collection) retries a call: it is not
    retried, the run exits 130 with what it found, and the resume searches again."""
    photos, people, ric, ops = _search_setup(tmp_path)
    ops += "keep_collection = true\n"
    cfg = make_config(tmp_path, [str(photos)], ops=ops)
    job: Job | None = None

    def signal_then_fail(number: int, api: str, ident: str) -> BaseException | None:
        if api == "SearchFacesByImage" and job is not None and not job.stopping.is_set():
            job.request_stop("interrupted by SIGTERM")
            return BackendError("InternalServerError", "busy", "transient")
        return None

    backend = FakeBackend(people=people, hook=signal_then_fail)
    out = Path(cfg.job.output_dir)
    job = Job(cfg, RunOptions(output_dir=out), backend=backend)
    async with asyncio.timeout(BOUND):
        outcome = await job.run()
    assert outcome.exit_code == 130
    assert backend.calls["SearchFacesByImage"] == 1  # not retried once stopping
    assert outcome.summary["search_faces"]["complete"] is False

    backend.hook = None
    outcome = await run(cfg, backend)
    assert outcome.exit_code == 0
    assert set(outcome.summary["search_faces"]["people"]["ric"]["matched_keys"]) == ric
    assert_exactly_once(out, expected_pairs(photos, sorted(people_keys(photos)), ("search_faces",)))


def people_keys(photos: Path) -> set[str]:
    return {p.name for p in photos.iterdir()}


def _two_sources_with_a_failure(tmp_path: Path) -> tuple[Config, Path, Path, list[str], str]:
    """Two folders holding the same file names; one file of the second fails to label."""
    first, second = tmp_path / "first", tmp_path / "second"
    keys = local_images(first, 12)
    local_images(second, 12, start=100)
    for i, key in enumerate(keys):  # same names, other contents
        (second / f"img{100 + i:05d}.png").rename(second / key)
    cfg = make_config(tmp_path, [str(first), str(second)])
    return cfg, first, second, keys, _ident(second / keys[4])


def _failing_on(ident_to_fail: str) -> FakeBackend:
    def hook(number: int, api: str, ident: str) -> BaseException | None:
        if ident == ident_to_fail and api == "DetectLabels":
            return BackendError("InvalidImageFormatException", "bad image", "permanent")
        return None

    return FakeBackend(hook=hook)


async def test_retry_failed_keys_on_the_source_so_the_same_key_elsewhere_stays(
    tmp_path: Path,
) -> None:
    cfg, first, second, keys, bad = _two_sources_with_a_failure(tmp_path)
    out = tmp_path / "out"
    assert (await run(cfg, _failing_on(bad))).exit_code == 3
    before = {(r["source"], r["key"], r["operation"]): r for r in read_jsonl(out / "results.jsonl")}
    assert before[(str(second), keys[4], "detect_labels")]["status"] == "failed"
    assert before[(str(first), keys[4], "detect_labels")]["status"] == "ok"

    healthy = FakeBackend()
    assert (await run(cfg, healthy, retry_failed=True)).exit_code == 0
    assert sum(healthy.calls.values()) == 1  # only the failed record is tried again
    expected = expected_pairs(first, keys) | expected_pairs(second, keys)
    assert_exactly_once(out, expected)
    after = {(r["source"], r["key"], r["operation"]): r for r in read_jsonl(out / "results.jsonl")}
    assert all(r["status"] == "ok" for r in after.values())
    # The row of the same key in the other source is the very same row as before.
    kept = (str(first), keys[4], "detect_labels")
    assert after[kept] == before[kept]


CRASHER = """
import asyncio, os, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
import rekbatch.store.retry_failed as rf
from rekbatch.config import load_config
from rekbatch.engine import Job, RunOptions
from tests.support.fake_backend import FakeBackend

def crash(name):
    if name == {step!r}:
        os._exit(137)

rf._step = crash
cfg = load_config({config!r}, environ={{}})
job = Job(cfg, RunOptions(output_dir=Path(cfg.job.output_dir), retry_failed=True),
          backend=FakeBackend())
asyncio.run(job.run())
"""


@pytest.mark.parametrize(
    "step", ["files_written", "committed", "renamed:results.jsonl", "renamed:results.csv"]
)
def test_retry_failed_survives_a_kill_at_each_step(tmp_path: Path, step: str) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    cfg, first, second, keys, bad = _two_sources_with_a_failure(tmp_path)
    out = tmp_path / "out"
    assert asyncio.run(run(cfg, _failing_on(bad))).exit_code == 3
    script = CRASHER.format(repo=str(REPO), step=step, config=str(tmp_path / "job.toml"))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 137, proc.stderr

    # Whatever step the kill hit, the job opens, resumes, and every row is there once.
    assert asyncio.run(run(cfg, FakeBackend(), retry_failed=True)).exit_code == 0
    assert_exactly_once(out, expected_pairs(first, keys) | expected_pairs(second, keys))
    assert all(r["status"] == "ok" for r in read_jsonl(out / "results.jsonl"))
    assert not list(out.glob("*.retry"))


async def test_a_budget_cap_stops_with_4_and_the_resume_lists_only_what_is_left(
    tmp_path: Path,
) -> None:
    photos = tmp_path / "photos"
    keys = local_images(photos, 1200)
    cfg = make_config(tmp_path, [str(photos)], extra="max_images = 900\n")
    out = tmp_path / "out"
    first = FakeBackend()
    outcome = await run(cfg, first)
    assert outcome.exit_code == 4 and outcome.stop_reason == "budget: limits.max_images reached"
    done = {r["key"] for r in read_jsonl(out / "results.jsonl")}
    assert len(done) == 900
    assert max(first.billed.values()) == 1

    raised = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_images": 5000})})
    job = Job(raised, RunOptions(output_dir=out), backend=(second := FakeBackend()))
    async with asyncio.timeout(BOUND):
        outcome = await job.run()
    assert outcome.exit_code == 0
    assert_exactly_once(out, expected_pairs(photos, keys))
    assert job.writer is not None
    # The watermark holds: only the unfinished tail is listed again, not the 900 done.
    listed = job.writer.listed[0]
    assert listed <= 1200 - 900 + 2 * 8 + 500, listed
    # Nothing finished was paid for twice.
    assert not set(first.billed) & set(second.billed)
    assert sum(second.billed.values()) == 2 * 300


KILL_BETWEEN_OPERATIONS = """
import asyncio, hashlib, os, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from rekbatch.config import load_config
from rekbatch.engine import Job, RunOptions
from tests.support.fake_backend import FakeBackend

victim = "sha256:" + hashlib.sha256(Path({victim!r}).read_bytes()).hexdigest()

def hook(number, api, ident):
    if api == "DetectLabels" and ident == victim:
        os._exit(137)  # killed after the object's first result, before its second

cfg = load_config({config!r}, environ={{}})
job = Job(cfg, RunOptions(output_dir=Path(cfg.job.output_dir)), backend=FakeBackend(hook=hook))
asyncio.run(job.run())
"""


def test_a_kill_between_two_operations_keeps_the_first_result(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    photos = tmp_path / "photos"
    keys = local_images(photos, 12)
    cfg = make_config(tmp_path, [str(photos)], concurrency=1)
    victim = photos / keys[5]
    script = KILL_BETWEEN_OPERATIONS.format(
        repo=str(REPO), victim=str(victim), config=str(tmp_path / "job.toml")
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 137, proc.stderr
    out = tmp_path / "out"
    before = {(r["key"], r["operation"]): r for r in read_jsonl(out / "results.jsonl")}
    assert before[(keys[5], "detect_faces")]["status"] == "ok"
    assert (keys[5], "detect_labels") not in before

    again = FakeBackend()
    assert asyncio.run(run(cfg, again)).exit_code == 0
    assert_exactly_once(out, expected_pairs(photos, keys))
    # The first result of the object was kept and not asked for again; only what the
    # kill lost is.
    ident = _ident(victim)
    assert ("DetectFaces", ident) not in again.billed
    assert again.billed[("DetectLabels", ident)] == 1
    after = {(r["key"], r["operation"]): r for r in read_jsonl(out / "results.jsonl")}
    assert after[(keys[5], "detect_faces")] == before[(keys[5], "detect_faces")]
