"""The first hour of a new user, through the CLI: validate, plan, init, scan, reruns, help."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAMPLES, make_bucket
from tests.helpers import invoke, sample_people, write_config
from tests.support.configs import toml_tables
from tests.support.fake_rekognition import FakeRekognition
from tests.support.servers import StartFake

REFERENCE = SAMPLES / "ric_harvey.jpeg"


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(people=sample_people())


def _local_config(tmp_path: Path, uri: str | Path, *, ops: str = "", extra: str = "") -> Path:
    ops = ops or '[[operations]]\ntype = "detect_faces"\n'
    tables = toml_tables(
        job={"output_dir": tmp_path / "out"}, source={"uris": [uri]}, backend={"kind": "local"}
    )
    return write_config(tmp_path / "job.toml", f"{tables}\n{extra}\n{ops}")


def _problems(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# -- validate ---------------------------------------------------------------------------------


def test_validate_names_a_missing_folder(tmp_path: Path) -> None:
    config = _local_config(tmp_path, tmp_path / "no-such-folder")
    result = invoke("validate", str(config))
    assert result.exit_code == 2
    (line,) = _problems(result)
    assert line.startswith(f"rekbatch: {config}: source.uris[0]: ")
    assert "no-such-folder does not exist" in line


def test_validate_accepts_a_single_image_file_and_refuses_other_files(tmp_path: Path) -> None:
    good = invoke("validate", str(_local_config(tmp_path, SAMPLES / "ric.jpg")))
    assert good.exit_code == 0, good.stderr
    assert "valid (1 source(s)" in good.stdout
    bad = invoke("validate", str(_local_config(tmp_path, SAMPLES / "notes.txt")))
    assert bad.exit_code == 2
    (line,) = _problems(bad)
    assert "source.uris[0]:" in line and "notes.txt is not a JPEG or PNG image" in line


def test_validate_prints_every_error_one_line_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REKBATCH_LIMITS__CONCURRENCY", "0")
    config = _local_config(
        tmp_path,
        SAMPLES,
        ops='[[operations]]\ntype = "compare_faces"\nreference = "missing-ref.jpg"\n'
        "similarity_treshold = 90\n",
        extra='[aws]\nrekognition_endpoint_url = "localhost:9001"\n',
    )
    result = invoke("validate", str(config))
    assert result.exit_code == 2
    lines = _problems(result)
    assert len(lines) == 4, lines
    assert any(
        "operations[0].similarity_treshold: unknown key; did you mean 'similarity_threshold'?"
        in line
        for line in lines
    )
    # The paths are checked beside the schema's problems, not after them.
    assert any("operations[0].reference:" in ln and "missing-ref.jpg does" in ln for ln in lines)
    assert any(
        line.startswith("rekbatch: environment REKBATCH_LIMITS__CONCURRENCY: limits.concurrency:")
        for line in lines
    )
    assert any(f"{config}: aws.rekognition_endpoint_url: not an http(s)" in line for line in lines)
    # The schema is fixed now; what is left are the paths, every one at once.
    monkeypatch.delenv("REKBATCH_LIMITS__CONCURRENCY")
    text = config.read_text().replace("similarity_treshold", "similarity_threshold")
    text = text.replace('"localhost:9001"', '"http://localhost:9001"')
    config.write_text(text.replace(f'["{SAMPLES}"]', f'["{SAMPLES}", "{tmp_path}/nothing"]'))
    again = _problems(invoke("validate", str(config)))
    assert len(again) == 2, again
    assert "source.uris[1]:" in again[0] and "operations[0].reference:" in again[1]


def test_unknown_section_suggests_the_right_one(tmp_path: Path) -> None:
    config = _local_config(tmp_path, SAMPLES, extra="[limit]\nconcurrency = 2\n")
    (line,) = _problems(invoke("validate", str(config)))
    assert line.endswith("limit: unknown key; did you mean 'limits'?")


def test_validate_online_checks_buckets_objects_and_credentials(
    s3: Any, moto_endpoint: str, fake: FakeRekognition, tmp_path: Path
) -> None:
    make_bucket(s3, "online-ok")
    s3.put_object(Bucket="online-ok", Key="ref.jpg", Body=REFERENCE.read_bytes())
    aws = (
        f'[aws]\nregion = "eu-west-1"\ns3_endpoint_url = "{moto_endpoint}"\n'
        f'rekognition_endpoint_url = "{fake.url}"\n'
    )

    def config(source: str, reference: str) -> Path:
        return write_config(
            tmp_path / "online.toml",
            f'[source]\nuris = ["{source}"]\n\n{aws}\n'
            f'[[operations]]\ntype = "compare_faces"\nreference = "{reference}"\n',
        )

    good = invoke("validate", "--online", str(config("s3://online-ok/", "s3://online-ok/ref.jpg")))
    assert good.exit_code == 0, good.stderr
    assert "buckets and credentials checked" in good.stdout
    offline = invoke("validate", str(config("s3://online-missing/", "s3://online-ok/nope.jpg")))
    assert offline.exit_code == 0  # nothing is asked of S3 without --online
    bad = invoke(
        "validate", "--online", str(config("s3://online-missing/", "s3://online-ok/nope.jpg"))
    )
    assert bad.exit_code == 2
    lines = _problems(bad)
    assert len(lines) == 2, lines
    assert "source.uris[0]: s3://online-missing: bucket or object not found" in lines[0]
    assert "operations[0].reference: s3://online-ok/nope.jpg:" in lines[1]


def test_validate_online_names_refused_credentials(
    s3: Any, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_bucket(s3, "online-creds")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    config = write_config(
        tmp_path / "creds.toml",
        f'[source]\nuris = ["s3://online-creds/"]\n\n[aws]\ns3_endpoint_url = "{moto_endpoint}"\n'
        '[backend]\nkind = "local"\n\n[[operations]]\ntype = "detect_faces"\n',
    )
    result = invoke("validate", "--online", str(config))
    assert result.exit_code == 2
    (line,) = _problems(result)
    assert "source.uris[0]: s3://online-creds: no AWS credentials found" in line


# -- plan on what validate now refuses or accepts ---------------------------------------------


def test_plan_on_a_missing_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    result = invoke("plan", str(_local_config(tmp_path, tmp_path / "gone")))
    assert result.exit_code == 2
    (line,) = _problems(result)
    assert "source.uris[0]:" in line and "gone does not exist" in line


def test_plan_and_validate_on_a_single_file_source(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\noutput_dir = "{tmp_path / "out"}"\n[source]\nuris = ["{SAMPLES / "ric.jpg"}"]\n'
        '[[operations]]\ntype = "detect_labels"\n',
    )
    result = invoke("plan", "--json", str(config))
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["objects_listed"] == 1 and plan["images_eligible"] == 1


# -- init and scan ----------------------------------------------------------------------------


def _in_a_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory laid out as a clone: the sample photos under samples/."""
    home = tmp_path / "clone"
    shutil.copytree(SAMPLES, home / "samples" / "wheres-ric")
    monkeypatch.chdir(home)
    return home


def test_init_offline_writes_a_config_that_validates_runs_and_reruns_as_nothing_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _in_a_clone(tmp_path, monkeypatch)
    made = invoke("init", "--offline")
    assert made.exit_code == 0, made.stderr
    config = home / "rekbatch.toml"
    text = config.read_text()
    assert text.count("\n#") >= 5 and 'kind = "local"' in text  # commented, offline
    assert invoke("init", "--offline").exit_code == 2  # never overwrites silently
    checked = invoke("validate", "rekbatch.toml")
    assert checked.exit_code == 0, checked.stderr
    first = invoke("run", "rekbatch.toml", "--log-format", "json")
    assert first.exit_code == 0, first.stderr
    assert "compare_faces: reference face found in 3 of 7 images" in first.stdout
    out = home / "out" / "my-offline-job"
    assert (out / "results.jsonl").is_file() and (out / "summary.json").is_file()
    again = invoke("run", "rekbatch.toml", "--log-format", "json")
    assert again.exit_code == 0, again.stderr
    assert "nothing new: 9 records already done" in again.stdout
    assert "cost: $0.0000 this run" in again.stdout
    # What the output folder holds is not planned again.
    plan = invoke("plan", "rekbatch.toml")
    assert plan.exit_code == 0, plan.stderr
    assert "already done:     9" in plan.stdout and "images eligible:  0" in plan.stdout
    assert "calls " not in plan.stdout


def test_init_for_aws_is_valid_and_names_a_placeholder_bucket(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "aws.toml"
    made = invoke("init", str(path))
    assert made.exit_code == 0, made.stderr
    text = path.read_text()
    assert 'kind = "aws"' in text and "s3://my-bucket/photos/" in text
    assert "max_cost_usd" in text
    checked = invoke("validate", str(path))
    assert checked.exit_code == 0, checked.stderr


def test_scan_runs_from_flags_and_writes_the_config_it_used(
    tmp_path: Path, fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REKBATCH_AWS__REKOGNITION_ENDPOINT_URL", fake.url)
    out = tmp_path / "scan-out"
    args = ["scan", str(SAMPLES), "--op", "detect_labels", "--op", f"compare_faces={REFERENCE}"]
    result = invoke(*args, "--output", str(out), "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    assert "compare_faces: reference face found in" in result.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 9 * 2  # every object times both operations
    assert {r["operation"] for r in rows} == {"detect_labels", "compare_faces"}
    written = out / "rekbatch.toml"
    assert written.is_file()
    assert invoke("validate", str(written)).exit_code == 0
    # The written config records the endpoint taken from the environment, so resume (and
    # run on that file) find the same job without it.
    monkeypatch.delenv("REKBATCH_AWS__REKOGNITION_ENDPOINT_URL")
    assert fake.url in written.read_text()
    resumed = invoke("resume", str(out), "--log-format", "json")
    assert resumed.exit_code == 0, resumed.stderr
    assert "nothing new: 18 records already done" in resumed.stdout
    rerun = invoke("run", str(written), "--log-format", "json")
    assert rerun.exit_code == 0, rerun.stderr
    assert "nothing new" in rerun.stdout


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there now: connections are refused


def test_scan_against_an_endpoint_never_reached_stops_with_2_naming_the_ways_out(
    tmp_path: Path, fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No call to the endpoint has ever got through: after ``FIRST_CONTACT_SECONDS``
    (shrunk here) the run stops with one line naming the endpoint and the ways out,
    instead of waiting ``unreachable_seconds``. Then, reachable, the same scan does it all
    once."""
    monkeypatch.setattr("rekbatch.calls.retry.FIRST_CONTACT_SECONDS", 1.0)
    closed = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("REKBATCH_AWS__REKOGNITION_ENDPOINT_URL", closed)
    out = tmp_path / "scan-out"
    args = ["scan", str(SAMPLES), "--op", f"compare_faces={REFERENCE}", "--output", str(out)]
    result = invoke(*args)
    assert result.exit_code == 2
    (line,) = [line for line in _problems(result) if line.startswith("rekbatch:")]
    assert line.startswith(f"rekbatch: cannot reach the Rekognition endpoint {closed}")
    for way_out in ("network", "aws.region", "aws.rekognition_endpoint_url", "--offline"):
        assert way_out in line

    monkeypatch.setenv("REKBATCH_AWS__REKOGNITION_ENDPOINT_URL", fake.url)
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and len({r["key"] for r in rows}) == 9


def _costs(stdout: str) -> tuple[float, float]:
    """The printed cost line's (this run, the whole job)."""
    import re

    found = re.search(r"^cost: \$([0-9.]+) this run, \$([0-9.]+) for the whole job", stdout, re.M)
    assert found, stdout
    return float(found.group(1)), float(found.group(2))


def test_this_run_and_the_whole_job_count_the_same_calls(
    tmp_path: Path, fake: FakeRekognition
) -> None:
    """The reference check (a DetectFaces on the reference) is paid for: the first run's
    cost and the job's are the same, and each later run adds its own to the job's."""
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\noutput_dir = "{out}"\n[source]\nuris = ["{SAMPLES}"]\n'
        f'[aws]\nrekognition_endpoint_url = "{fake.url}"\n'
        f'[[operations]]\ntype = "compare_faces"\nreference = "{REFERENCE}"\n'
        '[[operations]]\ntype = "detect_labels"\n',
    )
    first = invoke("run", str(config), "--log-format", "json")
    assert first.exit_code == 0, first.stderr
    this_run, job = _costs(first.stdout)
    calls = fake.stats()["ok"]
    assert calls["DetectFaces"] == 1 and calls["CompareFaces"] == calls["DetectLabels"] == 7
    assert this_run == job == pytest.approx(0.001 * 15)
    again = invoke("run", str(config), "--log-format", "json")
    assert again.exit_code == 0, again.stderr
    this_run, job_after = _costs(again.stdout)
    assert job_after == pytest.approx(job + this_run)


def test_scan_refuses_bad_flags_in_one_line(tmp_path: Path) -> None:
    unknown = invoke("scan", str(SAMPLES), "--op", "detect_lables", "-o", str(tmp_path / "x"))
    assert unknown.exit_code == 2
    assert "did you mean 'detect_labels'?" in unknown.stderr
    bare = invoke("scan", str(SAMPLES), "--op", "compare_faces", "-o", str(tmp_path / "x"))
    assert bare.exit_code == 2 and "needs a reference image" in bare.stderr
    missing = invoke("scan", str(tmp_path / "nowhere"), "--op", "detect_faces", "--offline")
    assert missing.exit_code == 2 and "scan: source.uris[0]:" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_single_image_file_as_a_source_runs(
    tmp_path: Path, fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REKBATCH_AWS__REKOGNITION_ENDPOINT_URL", fake.url)
    out = tmp_path / "single"
    result = invoke("scan", str(SAMPLES / "ric.jpg"), "--op", "detect_faces", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["key"], r["status"]) for r in rows] == [("ric.jpg", "ok")]
    assert rows[0]["result"]["FaceDetails"]


# -- honest endings ---------------------------------------------------------------------------


def test_a_source_without_images_warns_and_exits_0(tmp_path: Path, fake: FakeRekognition) -> None:
    folder = tmp_path / "no-images"
    folder.mkdir()
    (folder / "readme.txt").write_text("no pictures here")
    (folder / "fake.jpg").write_text("not a picture either")
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\noutput_dir = "{tmp_path / "out"}"\n[source]\nuris = ["{folder}"]\n'
        f'[aws]\nrekognition_endpoint_url = "{fake.url}"\n'
        f'[[operations]]\ntype = "compare_faces"\nreference = "{SAMPLES / "ric.jpg"}"\n',
    )
    result = invoke("run", str(config), "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    assert "reference face found" not in result.stdout  # not presented as an answer
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert any("no image to analyse: every record was skipped" in w for w in warnings)
    assert any("compare_faces: reference face found in 0 of 0 images" in w for w in warnings)


def test_an_empty_folder_warns_that_nothing_was_listed(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    config = _local_config(tmp_path, tmp_path / "empty")
    result = invoke("run", str(config), "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    assert "rekbatch: warning: the sources listed no objects" in result.stderr


def test_a_run_failing_before_any_work_removes_only_the_folder_it_created(
    tmp_path: Path, fake: FakeRekognition
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((SAMPLES / "ric.jpg").read_bytes())
    faceless = tmp_path / "faceless.png"
    from tests.helpers import sha256, sized_png

    # The fake sees as many faces in an unknown image as its digest says: take one with none.
    seed = next(i for i in range(100) if int(sha256(sized_png(i))[:2], 16) % 4 == 0)
    faceless.write_bytes(sized_png(seed))

    def config(out: Path) -> Path:
        return write_config(
            tmp_path / "job.toml",
            f'[job]\noutput_dir = "{out}"\n[source]\nuris = ["{folder}"]\n'
            f'[aws]\nrekognition_endpoint_url = "{fake.url}"\n'
            f'[[operations]]\ntype = "compare_faces"\nreference = "{faceless}"\n',
        )

    new = tmp_path / "new-out"
    result = invoke("run", str(config(new)), "--log-format", "json")
    assert result.exit_code == 2 and "no face found" in result.stderr
    assert not new.exists()
    kept = tmp_path / "kept-out"
    kept.mkdir()
    (kept / "mine.txt").write_text("the user's own file")
    result = invoke("run", str(config(kept)), "--log-format", "json")
    assert result.exit_code == 2
    assert (kept / "mine.txt").read_text() == "the user's own file"


# -- plan's numbers ---------------------------------------------------------------------------


def test_plan_offline_is_free_and_timed_on_this_machine(tmp_path: Path) -> None:
    folder = tmp_path / "small"  # the smaller sample photos: the timing analyses them
    folder.mkdir()
    for name in ("ric.jpg", "ric_crowd0.jpg", "sample-image0.jpeg", "sample-image1.jpeg"):
        shutil.copy(SAMPLES / name, folder / name)
    config = _local_config(
        tmp_path,
        folder,
        ops=f'[[operations]]\ntype = "compare_faces"\nreference = "{SAMPLES / "ric.jpg"}"\n',
    )
    from rekbatch.commands.plan import render_plan

    result = invoke("plan", "--json", str(config))
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    text = render_plan(plan)  # what `plan` without --json prints of the same plan
    assert "estimated cost:   $0 (offline backend: nothing is billed)" in text
    assert "estimated time:   " in text and "measured on " in text
    assert plan["estimated_cost_usd"] == 0
    timing = plan["offline_timing"]
    # Two images per worker a run would use: the first of each worker (with the reference's
    # analysis) counts as start-up, the rest give the rate.
    assert timing["images"] == min(4, 2 * timing["workers"])
    assert timing["startup_seconds"] >= timing["pool_start_seconds"] > 0
    assert timing["units_per_second"] > 0
    expected = timing["startup_seconds"] + 4 / timing["units_per_second"]
    assert plan["estimated_seconds"] == pytest.approx(expected, abs=0.1)


@pytest.mark.parametrize(
    ("region", "line"),
    [
        ("eu-west-1", "(list prices for eu-west-1 as of"),
        ("ap-south-1", "no price table for ap-south-1; showing us-east-1"),
    ],
)
def test_plan_prices_the_configured_region_or_says_which_it_shows(
    tmp_path: Path, region: str, line: str
) -> None:
    config = write_config(
        tmp_path / "aws.toml",
        f'[job]\noutput_dir = "{tmp_path / "out"}"\n[source]\nuris = ["{SAMPLES}"]\n'
        f'[aws]\nregion = "{region}"\n[[operations]]\ntype = "detect_labels"\n',
    )
    result = invoke("plan", str(config))
    assert result.exit_code == 0, result.stderr
    assert line in result.stdout
    assert "estimated cost:   $0.01" in result.stdout  # 7 images at $0.001


# -- status -----------------------------------------------------------------------------------


def test_status_shows_the_listing_state_and_no_rate_without_calls(
    tmp_path: Path, fake: FakeRekognition
) -> None:
    from rekbatch.store.jobdir import ledger_path, state_dir
    from rekbatch.store.ledger import LedgerDB
    from rekbatch.store.lock import JobLock
    from tests.helpers import sized_png

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(sized_png(1))
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\noutput_dir = "{out}"\n[source]\nuris = ["{folder}"]\n'
        f'[aws]\nrekognition_endpoint_url = "{fake.url}"\n'
        '[[operations]]\ntype = "detect_labels"\n',
    )
    assert invoke("run", str(config), "--log-format", "json").exit_code == 0
    ran = invoke("status", str(out)).stdout
    assert "(listing complete)" in ran and "rate: " in ran and "(last run, 1 calls)" in ran
    assert invoke("run", str(config), "--log-format", "json").exit_code == 0
    idle = invoke("status", str(out))
    assert "rate: no calls made (last run)" in idle.stdout
    assert json.loads(invoke("status", "--json", str(out)).stdout)["calls_per_second"] is None

    # A run in progress whose listing has ended, before its last objects are finished: the
    # ledger has not marked the source done yet, the run's heartbeat says the listing ended.
    db = LedgerDB(ledger_path(out))
    db.reset_listing([0])
    db.start_run("live", 1)
    lock = JobLock(state_dir(out) / "lock")
    lock.acquire()
    try:
        db.heartbeat("live", {"listing_complete": False, "calls": {}})
        assert "(listing in progress)" in invoke("status", str(out)).stdout
        db.heartbeat("live", {"listing_complete": True, "calls": {}})
        live = invoke("status", str(out)).stdout
        assert "running" in live and "(listing complete)" in live
        assert "rate: no calls made (this run)" in live
    finally:
        lock.release()
        db.close()
    assert "(listing unfinished; resume to go on)" in invoke("status", str(out)).stdout


# -- help and logs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ("run", "run [OPTIONS] CONFIG"),
        ("validate", "validate [OPTIONS] CONFIG"),
        ("plan", "plan [OPTIONS] CONFIG"),
        ("scan", "scan [OPTIONS] URIS..."),
        ("init", "init [OPTIONS] [PATH]"),
        ("report", "report [OPTIONS] DIRECTORY"),
    ],
)
def test_help_reads_normally(command: str, usage: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert usage in text
    assert "<bool>" not in text and "{" not in text.split("Usage:")[1].split("\n")[0]


def test_console_logs_are_key_value_pairs(tmp_path: Path, fake: FakeRekognition) -> None:
    from tests.helpers import sized_png

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(sized_png(1))
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\noutput_dir = "{tmp_path / "out"}"\n[source]\nuris = ["{folder}"]\n'
        f'[aws]\nrekognition_endpoint_url = "{fake.url}"\n'
        '[[operations]]\ntype = "detect_labels"\n[[operations]]\ntype = "detect_faces"\n',
    )
    result = invoke("run", str(config), "--log-format", "console")
    assert result.exit_code == 0, result.stderr
    logs = [line for line in result.stderr.splitlines() if "[info" in line]
    finished = next(line for line in logs if "run_finished" in line)
    assert "by_status.ok=2" in finished
    started = next(line for line in logs if "run_started" in line)
    assert "operations=detect_labels,detect_faces" in started
    assert not any("{'" in line or "['" in line for line in logs), logs
