"""Operator experience: plan, budget caps, progress, Parquet and DuckDB, upload, exit codes."""

from __future__ import annotations

import gc
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pytest
from benchmarks import run_unchecked
from rich.console import Console

from rekbatch.display.progress import ProgressView, progress_wanted
from rekbatch.display.summary import after_run
from rekbatch.engine import RunOutcome
from rekbatch.errors import EXIT_OK
from rekbatch.pricing import estimate_cost
from rekbatch.sinks.parquet import EXAMPLE_QUERIES
from rekbatch.sinks.writer import Writer
from tests.conftest import make_bucket
from tests.helpers import (
    fake_jpeg,
    invoke,
    local_images,
    read_jsonl,
    sample_people,
    tiny_png,
    upload_samples,
)
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import put_objects
from tests.support.servers import ServedJob, StartFake


def _mixed(s3: Any, bucket: str) -> None:
    make_bucket(s3, bucket)  # filled in-process: an HTTP put costs ~15 ms
    objects = [(f"jpg/{i:03d}.jpg", fake_jpeg(i)) for i in range(40)]
    objects += [(f"png/{i:03d}.png", tiny_png(i)) for i in range(10)]
    objects += [(f"txt/{i}.txt", b"text " * 30) for i in range(5)]
    objects += [("fake/liar.jpg", b"no picture in here at all " * 5), ("fake/empty.png", b"")]
    put_objects(bucket, objects)


OPS = (
    '[[operations]]\ntype = "detect_faces"\nattributes = ["ALL"]\n\n'
    '[[operations]]\ntype = "detect_labels"\n'
)


def test_plan_counts_exactly_and_calls_nothing(
    s3: Any, tmp_path: Path, start_fake: StartFake, served_job: ServedJob
) -> None:
    _mixed(s3, "plan-bucket")
    fake = start_fake()
    config = served_job(fake, "s3://plan-bucket/", operations=OPS, extra="[limits]\nmax_tps = 10\n")
    result = invoke("plan", str(config), "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["objects_listed"] == 57
    assert plan["images_eligible"] == 50
    assert plan["eligible_by_type"] == {"jpeg": 40, "png": 10}
    assert plan["skipped_by_reason"] == {"excluded": 5, "not_image": 1, "empty": 1}
    assert plan["calls_by_api"] == {"DetectFaces": 50, "DetectLabels": 50}
    assert plan["estimated_cost_usd"] == pytest.approx(
        estimate_cost({"DetectFaces": 50, "DetectLabels": 50})
    )
    assert plan["estimated_seconds"] == pytest.approx(5.0)
    text = invoke("run", str(config), "--dry-run")
    assert text.exit_code == 0
    assert "estimate" in text.stdout and "images eligible:  50" in text.stdout
    assert fake.stats()["calls"] == {}
    assert not (tmp_path / "out").exists()


def test_cost_cap_stops_with_4_and_resumes_with_a_larger_one(
    s3: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    start_fake: StartFake,
    served_job: ServedJob,
) -> None:
    _mixed(s3, "cost-bucket")
    fake = start_fake()
    per_image = estimate_cost({"DetectFaces": 1, "DetectLabels": 1})
    config = served_job(
        fake,
        "s3://cost-bucket/",
        operations=OPS,
        extra=f"[limits]\nconcurrency = 4\nmax_cost_usd = {per_image * 20.5}\n",
    )
    result = invoke("run", str(config))
    assert result.exit_code == 4, result.stderr
    assert "budget" in result.stderr and "resume" in result.stderr
    assert fake.stats()["ok"]["DetectFaces"] == 20
    monkeypatch.setenv("REKBATCH_LIMITS__MAX_COST_USD", "100")
    assert invoke("run", str(config)).exit_code == 0
    assert fake.stats()["ok"]["DetectFaces"] == 50
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert max(Counter((r["key"], r["operation"]) for r in rows).values()) == 1


def test_parquet_outputs_answer_the_readme_queries(
    s3: Any, tmp_path: Path, start_fake: StartFake, served_job: ServedJob
) -> None:
    bucket = upload_samples(s3, "duck-ric")
    people = sample_people()
    ops = OPS + (
        '\n[[operations]]\ntype = "compare_faces"\nreference = "s3://duck-ric/ric_harvey.jpeg"\n'
    )
    out = tmp_path / "out"
    upload = make_bucket(s3, "athena-results")
    fake = start_fake(people=people)
    config = served_job(
        fake,
        f"s3://{bucket}/",
        operations=ops,
        extra=f'[output]\nupload_uri = "s3://{upload}/wheres-ric/"\n',
    )
    result = invoke("run", str(config))
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl(out / "results.jsonl")
    con = duckdb.connect()
    matched = con.execute(EXAMPLE_QUERIES["reference_matched"].format(dir=out)).fetchall()
    assert {key for _, key, _ in matched} == {"ric_harvey.jpeg", "ric.jpg", "ric_crowd1.jpg"}
    crowded = con.execute(EXAMPLE_QUERIES["crowded_images"].format(dir=out)).fetchall()
    expected_crowded = {
        r["key"]
        for r in rows
        if r["operation"] == "detect_faces"
        and r["status"] == "ok"
        and len(r["result"]["FaceDetails"]) > 3
    }
    assert {key for _, key, _ in crowded} == expected_crowded
    assert "ric_crowd1.jpg" in expected_crowded
    labels = con.execute(EXAMPLE_QUERIES["top_labels"].format(dir=out)).fetchall()
    label_images: Counter[str] = Counter()
    for r in rows:
        if r["operation"] == "detect_labels" and r["status"] == "ok":
            label_images.update({label["Name"] for label in r["result"]["Labels"]})
    assert labels and all(label_images[name] == n for name, n in labels)
    # The result files went to S3 for Athena, one folder per table.
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=upload)["Contents"]}
    assert "wheres-ric/results/results.parquet" in keys
    assert "wheres-ric/summary.json" in keys
    body = s3.get_object(Bucket=upload, Key="wheres-ric/summary.json")["Body"].read()
    assert body == (out / "summary.json").read_bytes()


def test_progress_only_on_a_terminal_with_console_logs(
    s3: Any, tmp_path: Path, start_fake: StartFake, served_job: ServedJob
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_wanted("console", Tty()) is True
    assert progress_wanted("json", Tty()) is False
    assert progress_wanted("console", io.StringIO()) is False

    bucket = make_bucket(s3, "quiet-bucket")
    s3.put_object(Bucket=bucket, Key="a.jpg", Body=fake_jpeg(1))
    fake = start_fake()
    config = served_job(fake, f"s3://{bucket}/")
    result = invoke("run", str(config), "--log-format", "console")
    assert result.exit_code == 0
    assert "calls/s" not in result.stderr and "ETA" not in result.stderr


def test_the_command_line_freezes_the_collector_for_the_run_s_work(
    fake: FakeRekognition,
    served_job: ServedJob,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What exists when the work starts (modules, clients, config) stays out of the
    collector's passes until it ends: a throughput measure of the command line's, for its
    own process (BENCHMARKS.md)."""
    changed: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: changed.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: changed.append("unfreeze"))
    result = _run_three_images(fake, served_job, tmp_path)
    assert changed == ["freeze", "unfreeze"]
    assert "records: ok 3" in result.stdout


def test_the_command_line_always_checkpoints(
    fake: FakeRekognition,
    served_job: ServedJob,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Benchmarks that measure a run without fsync build ``RunOptions(checkpoint=False)``
    themselves (benchmarks/run_unchecked.py); no variable turns it off here."""
    durable: list[bool] = []
    real = Writer.__init__

    def writer(self: Writer, *args: Any, **kwargs: Any) -> None:
        durable.append(kwargs["durable"])
        real(self, *args, **kwargs)

    monkeypatch.setattr(Writer, "__init__", writer)
    monkeypatch.setenv("REKBATCH_BENCH_NO_CHECKPOINT", "1")
    result = _run_three_images(fake, served_job, tmp_path)
    assert durable == [True] and "checkpointing off" not in result.stderr
    # the benchmarks' way, on the same job (resumed: nothing new)
    assert run_unchecked.main([str(tmp_path / "job.toml")]) == EXIT_OK
    assert durable == [True, False]


def _run_three_images(fake: FakeRekognition, served_job: ServedJob, tmp_path: Path) -> Any:
    photos = tmp_path / "photos"
    local_images(photos, 3)
    config = served_job(fake, str(photos))
    result = invoke("run", str(config), "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    return result


def test_progress_view_counts_objects_and_records_apart_and_waits_before_an_eta() -> None:
    stats: dict[str, Any] = {
        "calls": {"DetectFaces": 100},
        "listed": 200,
        "listing_complete": True,
        "objects_done": 100,
        "records": {"ok": 90, "failed": 4, "skipped": 6},
        "deduplicated": 3,
        "throttles": {"DetectFaces": 2},
        "retries": {"DetectFaces": 5},
        "limiters": {"DetectFaces": {"rate": 50.0, "in_flight": 7}},
    }
    view = ProgressView(warmup=3.0)

    def shown(now: float) -> str:
        console = Console(file=io.StringIO(), width=120, color_system=None)
        console.print(view.render(stats, now=now))
        return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]

    shown(0.0)
    stats["objects_done"], stats["calls"] = 110, {"DetectFaces": 110}
    early = shown(1.0)
    assert "ETA estimating" in early  # one second of work says little about the rest
    stats["objects_done"], stats["calls"] = 150, {"DetectFaces": 150}
    text = shown(4.0)
    assert "listed 200" in text and "done 150" in text and "copies 3" in text
    assert "ok 90" in text and "failed 4" in text and "skipped 6" in text
    assert "DetectFaces" in text and "50.0" in text
    # 50 objects in 4 s: 12.5 objects/s, and 50 left.
    assert "12.5 objects/s" in text and "ETA 0:00:04" in text
    stats["listing_complete"] = False
    assert "after listing" in shown(5.0)


def test_unexpected_error_exits_1(
    s3: Any, tmp_path: Path, start_fake: StartFake, served_job: ServedJob
) -> None:
    bucket = make_bucket(s3, "tamper-bucket")
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"{i}.jpg", Body=fake_jpeg(i))
    fake = start_fake()
    config = served_job(fake, f"s3://{bucket}/")
    assert invoke("run", str(config)).exit_code == 0
    (tmp_path / "out" / "results.jsonl").write_text("")  # changed behind rekbatch's back
    result = invoke("run", str(config))
    assert result.exit_code == 1
    assert "unexpected error" in result.stderr and "shorter" in result.stderr


def _summary(**statuses: int) -> dict[str, Any]:
    return {
        "counts": {"by_status": statuses, "by_reason": {"too_small": statuses.get("skipped", 0)}},
        "records_this_run": statuses,
        "calls": {"total": 3, "throttles": 1, "retries": 2},
        "elapsed_seconds": 1.5,
        "calls_per_second": 2.0,
        "estimated_cost_usd": 0.003,
        "job_estimated_cost_usd": 0.003,
        "outputs": ["results.jsonl"],
    }


def test_what_is_printed_after_a_run_goes_to_stdout_or_stderr_in_order(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = RunOutcome(
        4,
        _summary(ok=3, skipped=1),
        ["ric: found in 2 of 3 images", "ann: found in 0 of 0 images"],
        "budget: limits.max_images reached",
        notes=["search_faces: Throttled; resume to try it again"],
    )
    lines = after_run(done, out, follow=False)
    assert [err for err, _ in lines] == [False, True, False, True, True]
    assert lines[0][1].startswith("records: ok 3, failed 0, skipped 1\ncalls: 3 in 1.5 s")
    assert lines[1][1] == "rekbatch: search_faces: Throttled; resume to try it again"
    assert lines[2][1] == "ric: found in 2 of 3 images"
    assert lines[3][1].endswith("in 0 of 0 images (no image was analysed)")
    assert lines[4][1] == (
        "stopped at a budget cap (budget: limits.max_images reached); raise it and run "
        f"`rekbatch resume {out}`"
    )

    skipped = RunOutcome(130, _summary(skipped=2), [], "interrupted by SIGINT")
    lines = after_run(skipped, out, follow=True)
    assert lines[1:] == [
        (True, "rekbatch: warning: no image to analyse: every record was skipped (too_small 2)"),
        (True, f"interrupted; resume with: rekbatch resume {out} --follow"),
    ]

    failed = RunOutcome(1, {}, [], None, failure="writer failed: OSError: disk", resume_args=" x")
    assert after_run(failed, out, follow=False) == [
        (
            True,
            f"rekbatch: writer failed: OSError: disk; what finished is kept, resume with: "
            f"rekbatch resume {out} x",
        )
    ]
