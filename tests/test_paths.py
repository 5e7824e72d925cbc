"""Where a job's paths point, whatever folder a command is run from.

Relative paths in a config file are read from the config file's folder; paths given on the
command line or in the environment from the current folder. A job records absolute paths,
so ``resume DIR`` and ``run CONFIG`` find it and its sources from anywhere, and a config
whose paths point elsewhere than the job recorded is refused (exit 2) instead of starting a
new job that pays again.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rekbatch.config import Config
from rekbatch.engine import Job, RunOptions
from tests.conftest import SAMPLES
from tests.helpers import invoke, read_csv, read_jsonl, sample_people, write_config
from tests.support.configs import Table, operations, toml_tables
from tests.support.fake_rekognition import FakeRekognition
from tests.support.servers import StartFake

IMAGES = 9  # the sample folder's files: 7 photos and 2 that are not images


@pytest.fixture
def fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(people=sample_people())


def _project(tmp_path: Path) -> Path:
    """A folder holding photos (a copy of the samples) and, later, a config beside them."""
    home = tmp_path / "project"
    shutil.copytree(SAMPLES, home / "photos")
    return home


def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    other = tmp_path / "elsewhere"
    other.mkdir(exist_ok=True)
    monkeypatch.chdir(other)
    return other


def _rows(out: Path) -> Counter[tuple[str, str, str]]:
    jsonl = read_jsonl(out / "results.jsonl")
    rows = Counter((r["source"], r["key"], r["operation"]) for r in jsonl)
    csv = Counter((r["source"], r["key"], r["operation"]) for r in read_csv(out / "results.csv"))
    assert rows == csv
    return rows


def _job_file(
    path: Path,
    fake: FakeRekognition,
    output_dir: str | Path,
    *,
    uri: str | Path = "photos",
    operation: str | Table = "detect_labels",
    limits: Table | None = None,
) -> Path:
    """A job config at ``path`` on the samples (``uri``, relative to ``path``'s folder)."""
    tables: dict[str, Any] = {
        "job": {"output_dir": output_dir},
        "source": {"uris": [uri]},
        "aws": {"rekognition_endpoint_url": fake.url},
    }
    if limits is not None:
        tables["limits"] = limits
    return write_config(path, toml_tables(**tables, operations=operations(operation)))


def test_scan_records_absolute_paths_and_resumes_from_any_folder(
    tmp_path: Path, fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _project(tmp_path)
    monkeypatch.chdir(home)
    monkeypatch.setenv("REKBATCH_AWS__REKOGNITION_ENDPOINT_URL", fake.url)
    ref = "photos/ric_harvey.jpeg"
    made = invoke(
        "scan", "photos", "--op", "detect_labels", "--op", f"compare_faces={ref}",
        "--output", "out/scan", "--log-format", "json",
    )  # fmt: skip
    assert made.exit_code == 0, made.stderr
    out = home / "out" / "scan"
    written = tomllib.loads((out / "rekbatch.toml").read_text())
    assert written["source"]["uris"] == [str(home / "photos")]
    assert written["operations"][1]["reference"] == str(home / ref)
    assert written["job"]["output_dir"] == str(out)
    assert {r["source"] for r in read_jsonl(out / "results.jsonl")} == {str(home / "photos")}

    monkeypatch.delenv("REKBATCH_AWS__REKOGNITION_ENDPOINT_URL")
    other = _elsewhere(tmp_path, monkeypatch)
    resumed = invoke("resume", str(out), "--log-format", "json")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"nothing new: {IMAGES * 2} records already done" in resumed.stdout
    rerun = invoke("run", str(out / "rekbatch.toml"), "--log-format", "json")
    assert rerun.exit_code == 0, rerun.stderr
    assert "nothing new" in rerun.stdout
    assert not (other / "out").exists()
    assert max(_rows(out).values()) == 1 and sum(_rows(out).values()) == IMAGES * 2


def test_run_reads_a_configs_relative_paths_from_its_folder(
    tmp_path: Path, fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _project(tmp_path)
    config = _job_file(
        home / "job.toml",
        fake,
        "out/job",
        operation={"type": "compare_faces", "reference": "photos/ric_harvey.jpeg"},
    )
    other = _elsewhere(tmp_path, monkeypatch)
    first = invoke("run", str(config), "--log-format", "json", "--concurrency", "2")
    assert first.exit_code == 0, first.stderr
    assert "compare_faces: reference face found in 3 of 7 images" in first.stdout
    out = home / "out" / "job"
    assert (out / "results.jsonl").is_file() and not (other / "out").exists()
    # From the config's own folder, and from a third one, through a relative path: the same
    # job, nothing called again.
    for where in (home, tmp_path):
        monkeypatch.chdir(where)
        again = invoke("run", str(config.relative_to(where)), "--log-format", "json")
        assert again.exit_code == 0, again.stderr
        assert f"nothing new: {IMAGES} records already done" in again.stdout
    assert sum(_rows(out).values()) == IMAGES
    assert fake.stats()["calls"]["CompareFaces"] == 7


def test_a_config_whose_paths_point_elsewhere_than_the_job_is_refused(
    tmp_path: Path, fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _project(tmp_path)
    out = tmp_path / "results"
    config = _job_file(home / "job.toml", fake, out)
    assert invoke("run", str(config), "--log-format", "json").exit_code == 0
    # The same config copied next to other photos: same output folder, other sources.
    copy = tmp_path / "copy"
    shutil.copytree(SAMPLES, copy / "photos")
    moved = _job_file(copy / "job.toml", fake, out)
    _elsewhere(tmp_path, monkeypatch)
    refused = invoke("run", str(moved), "--log-format", "json")
    assert refused.exit_code == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "source.uris[0]" in lines[0]
    assert str(copy / "photos") in lines[0] and str(home / "photos") in lines[0]
    assert sum(_rows(out).values()) == IMAGES  # nothing new was called


def test_resume_takes_environment_overrides_that_keep_the_job(
    tmp_path: Path,
    fake: FakeRekognition,
    moto_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    start_fake: StartFake,
) -> None:
    home = _project(tmp_path)
    config = _job_file(home / "job.toml", fake, "out", limits={"max_images": 3, "concurrency": 1})
    first = invoke("run", str(config), "--log-format", "json")
    assert first.exit_code == 4, first.stderr  # stopped at the cap, resumable
    out = home / "out"
    done = sum(_rows(out).values())
    assert 0 < done < IMAGES

    # The endpoint moved (a proxy, a new port): the resume goes to the new one, without the
    # cap, from another folder.
    moved = start_fake(people=sample_people())
    _elsewhere(tmp_path, monkeypatch)
    monkeypatch.setenv("REKBATCH_AWS__REKOGNITION_ENDPOINT_URL", moved.url)
    monkeypatch.setenv("REKBATCH_LIMITS__MAX_IMAGES", "1000")
    before = fake.stats()["calls"].get("DetectLabels", 0)
    resumed = invoke("resume", str(out), "--log-format", "json")
    assert resumed.exit_code == 0, resumed.stderr
    assert moved.stats()["calls"].get("DetectLabels", 0) > 0
    assert fake.stats()["calls"].get("DetectLabels", 0) == before
    rows = _rows(out)
    assert sum(rows.values()) == IMAGES and max(rows.values()) == 1


def test_resume_refuses_an_override_that_would_change_the_job(
    tmp_path: Path, fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _project(tmp_path)
    config = _job_file(home / "job.toml", fake, "out", operation="detect_faces")
    assert invoke("run", str(config), "--log-format", "json").exit_code == 0
    for variable, value in (
        ("REKBATCH_SOURCE__INCLUDE", '["*.png"]'),
        ("REKBATCH_BACKEND__KIND", "local"),
        ("REKBATCH_JOB__OUTPUT_DIR", "somewhere-else"),
    ):
        with monkeypatch.context() as env:
            env.setenv(variable, value)
            refused = invoke("resume", str(home / "out"), "--log-format", "json")
        assert refused.exit_code == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and variable in lines[0], lines
    assert not (home / "somewhere-else").exists()


# -- jobs made before paths were recorded absolute ---------------------------------------------


def _legacy_job(home: Path, fake: FakeRekognition, *, output_dir: str, config_path: str) -> Path:
    """A job as rekbatch made it when a config's relative paths were taken from the current
    folder as written (the current folder is ``home``): half of it done."""
    raw = {
        "job": {"output_dir": output_dir},
        "source": {"uris": ["photos"]},
        "aws": {"rekognition_endpoint_url": fake.url},
        "limits": {"max_images": 4, "concurrency": 1},
        "operations": [{"type": "detect_labels"}],
    }
    cfg = Config.model_validate(raw)
    out = home / output_dir
    options = RunOptions(output_dir=Path(output_dir), config_path=config_path)
    outcome = asyncio.run(Job(cfg, options).run())
    assert outcome.exit_code == 4
    assert json.loads((out / "summary.json").read_text())["counts"]["by_status"]["ok"] == 4
    return out


def test_a_job_made_with_relative_paths_resumes_from_its_folder(
    tmp_path: Path, fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _project(tmp_path)
    monkeypatch.chdir(home)
    out = _legacy_job(home, fake, output_dir="out", config_path="job.toml")
    config = _job_file(home / "job.toml", fake, "out")
    again = invoke("run", config.name, "--log-format", "json")
    assert again.exit_code == 0, again.stderr
    rows = _rows(out)
    # Its rows keep naming the source as the job first did.
    assert set(rows) == {("photos", p.name, "detect_labels") for p in SAMPLES.iterdir()}
    assert max(rows.values()) == 1


def test_a_config_whose_job_sits_beside_the_current_folder_is_refused(
    tmp_path: Path, fake: FakeRekognition, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config in a subfolder, its job made when ``out`` meant the current folder's: run
    now, ``out`` is the config folder's, where there is no job. Rather than start a second
    job that pays again, it stops and says where the job is."""
    home = _project(tmp_path)
    (home / "configs").mkdir()
    monkeypatch.chdir(home)
    photos = home / "photos"
    out = _legacy_job(home, fake, output_dir="out/job", config_path="configs/job.toml")
    config = _job_file(home / "configs" / "job.toml", fake, "out/job", uri=photos)
    refused = invoke("run", "configs/job.toml", "--log-format", "json")
    assert refused.exit_code == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(out) in lines[0] and str(home / "configs" / "out" / "job") in lines[0]
    assert not (home / "configs" / "out").exists()
    assert config.is_file()


def test_init_writes_paths_relative_to_the_configs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "clone"
    shutil.copytree(SAMPLES, home / "samples" / "wheres-ric")
    (home / "more").mkdir()
    monkeypatch.chdir(home)
    made = invoke("init", "--offline", "jobs/offline.toml", "--source", "more")
    assert made.exit_code == 0, made.stderr
    written = tomllib.loads((home / "jobs" / "offline.toml").read_text())
    assert written["source"]["uris"] == ["../more"]
    made = invoke("init", "--offline", "jobs/samples.toml")
    assert made.exit_code == 0, made.stderr
    written = tomllib.loads((home / "jobs" / "samples.toml").read_text())
    assert written["source"]["uris"] == ["../samples/wheres-ric"]
    assert written["operations"][0]["reference"] == "../samples/wheres-ric/ric_harvey.jpeg"
    monkeypatch.chdir(tmp_path)
    assert invoke("validate", "clone/jobs/samples.toml").exit_code == 0
