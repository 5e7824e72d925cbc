"""Shards: a disjoint, stable split of the objects; shards as separate processes (the way
Kubernetes Indexed Jobs and AWS Batch array jobs start them), killed and rerun; merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rekbatch.engine.shards import Shard, parse_shard, shard_from_env, shard_of
from rekbatch.errors import ConfigError
from tests.conftest import REPO, make_bucket
from tests.helpers import fake_jpeg, invoke, read_csv, read_jsonl, write_config
from tests.support.configs import job_config
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import put_objects
from tests.support.servers import StartFake

OPS = '[[operations]]\ntype = "detect_faces"\n\n[[operations]]\ntype = "detect_labels"\n'
SHOWS_RIC = {"ric_harvey.jpeg", "ric.jpg", "ric_crowd1.jpg"}


def test_every_object_is_in_exactly_one_shard_and_always_the_same() -> None:
    keys = [f"photos/{i:05d}.jpg" for i in range(4000)]
    for count in (1, 2, 3, 16):
        owners = [[k for k in range(count) if Shard(k, count).owns("b", key)] for key in keys]
        assert all(len(o) == 1 for o in owners)
        sizes = Counter(o[0] for o in owners)
        # A stable hash spreads evenly: no shard is far from 1/N of the objects.
        assert min(sizes.values()) > len(keys) / count * 0.8
    # Stable across processes and Python versions (not ``hash()``): a fixed value.
    assert shard_of("image-demo-lab", "ric.jpg", 16) == shard_of("image-demo-lab", "ric.jpg", 16)
    out = subprocess.run(
        [sys.executable, "-c", "from rekbatch.engine.shards import shard_of;"
         "print(shard_of('image-demo-lab', 'ric.jpg', 1000))"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert int(out.stdout) == shard_of("image-demo-lab", "ric.jpg", 1000)
    # The bucket counts: the same key in two buckets is two objects.
    assert {shard_of(f"b{i}", "k", 64) for i in range(50)} != {shard_of("b0", "k", 64)}


def test_shard_flags_parse_and_refuse_clearly() -> None:
    assert parse_shard("3/16") == Shard(3, 16)
    assert Shard(3, 16).folder == "shard-0003-of-0016"
    assert shard_from_env("AWS_BATCH_JOB_ARRAY_INDEX", 4, {"AWS_BATCH_JOB_ARRAY_INDEX": "2"}) == (
        Shard(2, 4)
    )
    for bad in ("3", "a/b", "-1/4", "4/4", "0/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX is not set"):
        shard_from_env("JOB_COMPLETION_INDEX", 4, {})
    with pytest.raises(ConfigError, match="not a non-negative whole number"):
        shard_from_env("JOB_COMPLETION_INDEX", 4, {"JOB_COMPLETION_INDEX": "two"})


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--shard", "4/4"], {}, "--shard: index 4 is outside 0..3"),
        (["--shard", "x"], {}, "--shard: expected K/N"),
        (["--shards", "4", "--shard-index-env", "JOB_COMPLETION_INDEX"], {}, "is not set"),
        (["--shards", "4", "--shard-index-env", "IDX"], {"IDX": "1.5"}, "whole number"),
        (["--shards", "4", "--shard-index-env", "IDX"], {"IDX": "7"}, "outside 0..3"),
        (["--shards", "4"], {}, "--shards: needs --shard-index-env"),
        (["--shard", "1/4", "--shards", "3"], {}, "disagrees"),
        (["--engine", "ray"], {}, "--engine ray: needs --shards N"),
        (["--ray-address", "auto"], {}, "only with --engine ray"),
    ],
)
def test_bad_shard_flags_are_one_line_and_exit_2(
    flags: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = invoke("run", str(REPO / "configs" / "wheres-ric-local.toml"), *flags)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


# -- shards against moto and the fake, as separate processes --------------------------------


@pytest.fixture
def slow_fake(start_fake: StartFake) -> FakeRekognition:
    """Real latency, so a shard lasts long enough to be killed; a quota high enough for
    four shards at once."""
    return start_fake(
        latency_median_ms=20,
        latency_sigma=0.3,
        quotas={"DetectFaces": 400, "DetectLabels": 400},
        s3_cache=True,
    )


def _fill(s3: Any, bucket: str, images: int) -> set[str]:
    make_bucket(s3, bucket)  # filled in-process: an HTTP put costs ~15 ms
    objects = {f"img/{i:05d}.jpg": fake_jpeg(i) for i in range(images)}
    objects["readme.txt"] = b"not an image"
    put_objects(bucket, objects.items())
    return set(objects)


def _shard_process(config: Path, index: int, count: int, *extra: str) -> subprocess.Popen[str]:
    """A shard as AWS Batch starts one: the same command, the index in the environment."""
    env = {**os.environ, "AWS_BATCH_JOB_ARRAY_INDEX": str(index)}
    return subprocess.Popen(
        [sys.executable, "-m", "rekbatch", "run", str(config), "--shards", str(count),
         "--shard-index-env", "AWS_BATCH_JOB_ARRAY_INDEX", "--log-format", "json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _records(path: Path) -> Counter[tuple[str, str, str]]:
    return Counter((r["key"], r["operation"], r["status"]) for r in read_jsonl(path))


def test_four_shard_processes_killed_and_rerun_merge_to_a_single_runs_answer(
    s3: Any,
    moto_endpoint: str,
    slow_fake: FakeRekognition,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = _fill(s3, "shard-bucket", 240)
    make_bucket(s3, "shard-results")
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        job_config(
            uris=["s3://shard-bucket/"],
            output_dir=out,
            s3_endpoint=moto_endpoint,
            rek_endpoint=slow_fake.url,
            operations=OPS,
            extra="[limits]\nconcurrency = 4\nmax_tps = 400\n\n"
            '[output]\nupload_uri = "s3://shard-results/job/"\nparquet = false\n',
        ),
    )
    procs = {k: _shard_process(config, k, 4) for k in range(4)}
    victim = out / "shard-0002-of-0004" / "results.jsonl"
    deadline = time.monotonic() + 60
    while not (victim.exists() and victim.stat().st_size > 1500):
        assert time.monotonic() < deadline and procs[2].poll() is None, "shard 2 made no rows"
        time.sleep(0.02)
    procs[2].send_signal(signal.SIGKILL)
    procs[2].communicate(timeout=10)
    for k in (0, 1, 3):
        _, err = procs[k].communicate(timeout=120)
        assert procs[k].returncode == 0, err[-2000:]
        # Each shard's ceiling is 1/4 of the job's max_tps.
        started = next(json.loads(x) for x in err.splitlines() if '"run_started"' in x)
        assert started["ceilings"] == {"DetectFaces": 100.0, "DetectLabels": 100.0}

    # A merge now names the shard that is not finished.
    refused = invoke("merge", str(out))
    assert refused.exit_code == 2 and "shard 2/4" in refused.stderr

    # Rerun only index 2: it resumes from its own ledger.
    rerun = _shard_process(config, 2, 4)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err[-2000:]
    assert '"replayed"' in err or '"listing"' in err

    per_shard = [
        {r["key"] for r in read_jsonl(out / f"shard-{k:04d}-of-0004" / "results.jsonl")}
        for k in range(4)
    ]
    assert sum(len(s) for s in per_shard) == len(keys)  # disjoint ...
    assert set().union(*per_shard) == keys  # ... and together all of them

    merged = invoke("merge", str(out))
    assert merged.exit_code == 0, merged.stderr
    records = _records(out / "results.jsonl")
    assert max(records.values()) == 1
    expected = {(k, op) for k in keys for op in ("detect_faces", "detect_labels")}
    assert {(k, op) for k, op, _ in records} == expected
    assert Counter((r["key"], r["operation"]) for r in read_csv(out / "results.csv")) == Counter(
        (k, op) for k, op, _ in records
    )
    # Nothing paid twice beyond the calls in flight of the killed shard (4 workers).
    billed = slow_fake.stats()["billed"]
    assert sum(n - 1 for n in billed.values()) <= 4 * 2

    # A single process over the same bucket gives the same records and counts.
    single = invoke("run", str(config), "--output", str(tmp_path / "single"))
    assert single.exit_code == 0, single.stderr
    assert _records(tmp_path / "single" / "results.jsonl") == records
    one = json.loads((tmp_path / "single" / "summary.json").read_text())
    both = json.loads((out / "summary.json").read_text())
    assert both["counts"] == one["counts"]
    assert [s["shard"] for s in both["shards"]] == [0, 1, 2, 3]

    status = invoke("status", str(out / "shard-0000-of-0004"), "--json")
    assert json.loads(status.stdout)["objects_done"] == len(per_shard[0])
    whole = json.loads(invoke("status", str(out), "--json").stdout)
    assert whole["shards_finished"] == 4 and whole["objects_done"] == len(keys)

    # Each shard uploaded to its own folder; merging from S3 gives the same records and
    # puts the merged files where a single run would have.
    listed = s3.list_objects_v2(Bucket="shard-results", Prefix="job/", Delimiter="/")
    folders = sorted(p["Prefix"] for p in listed.get("CommonPrefixes", []))
    assert [f for f in folders if "shard-" in f] == [
        f"job/shard-{k:04d}-of-0004/" for k in range(4)
    ]
    monkeypatch.setenv("REKBATCH_AWS__S3_ENDPOINT_URL", moto_endpoint)
    remote = invoke("merge", "s3://shard-results/job/", "--output", str(tmp_path / "from-s3"))
    assert remote.exit_code == 0, remote.stderr
    assert _records(tmp_path / "from-s3" / "results.jsonl") == records
    body = s3.get_object(Bucket="shard-results", Key="job/results_jsonl/results.jsonl")["Body"]
    assert sum(1 for _ in body.read().splitlines()) == len(expected)


def test_a_single_shard_equals_a_plain_run(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    keys = _fill(s3, "one-shard", 40)
    fake = start_fake()
    config = write_config(
        tmp_path / "job.toml",
        job_config(
            uris=["s3://one-shard/"],
            output_dir=tmp_path / "out",
            s3_endpoint=moto_endpoint,
            rek_endpoint=fake.url,
            operations=OPS,
            extra="[output]\nparquet = false\n",
        ),
    )
    plain = invoke("run", str(config), "--output", str(tmp_path / "plain"))
    sharded = invoke("run", str(config), "--shard", "0/1")
    assert plain.exit_code == sharded.exit_code == 0, sharded.stderr
    folder = tmp_path / "out" / "shard-0000-of-0001"
    assert _records(folder / "results.jsonl") == _records(tmp_path / "plain" / "results.jsonl")
    assert len(_records(folder / "results.jsonl")) == 2 * len(keys)
    assert invoke("merge", str(tmp_path / "out")).exit_code == 0
    merged = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert merged["counts"] == json.loads((folder / "summary.json").read_text())["counts"]
    # A shard's folder resumes as any job's does (it knows it is shard 0 of 1).
    resumed = invoke("resume", str(folder))
    assert resumed.exit_code == 0, resumed.stderr
    assert _records(folder / "results.jsonl") == _records(tmp_path / "plain" / "results.jsonl")
    # A directory with a job of its own is not merged over.
    (tmp_path / "plain" / "shard-0000-of-0001").symlink_to(folder)
    refused = invoke("merge", str(tmp_path / "plain"))
    assert refused.exit_code == 2 and "holds a job of its own" in refused.stderr
    # The merged directory is not a job to run into.
    again = invoke("run", str(config))
    assert again.exit_code == 2 and "holds the merge of 1 shards" in again.stderr


def test_merge_names_the_shards_that_never_ran(
    s3: Any, moto_endpoint: str, tmp_path: Path, start_fake: StartFake
) -> None:
    _fill(s3, "half-done", 10)
    fake = start_fake()
    config = write_config(
        tmp_path / "job.toml",
        job_config(
            uris=["s3://half-done/"],
            output_dir=tmp_path / "out",
            s3_endpoint=moto_endpoint,
            rek_endpoint=fake.url,
            extra="[output]\nparquet = false\n",
        ),
    )
    assert invoke("run", str(config), "--shard", "1/3").exit_code == 0
    result = invoke("merge", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "shard(s) 0, 2 of 3 missing" in result.stderr
    status = json.loads(invoke("status", str(tmp_path / "out"), "--json").stdout)
    assert status["shards_not_started"] == [0, 2] and status["shards_finished"] == 1


# -- the offline backend on the samples ------------------------------------------------------


def test_three_offline_shards_as_indexed_job_pods_find_ric(tmp_path: Path) -> None:
    """Three processes with JOB_COMPLETION_INDEX 0..2, as a Kubernetes Indexed Job starts
    them; merged: the single run's answer (Ric in exactly the three photos of him)."""
    out = tmp_path / "out"
    command = [
        *(sys.executable, "-m", "rekbatch", "run", "configs/wheres-ric-local.toml"),
        *("--output", str(out), "--shards", "3", "--shard-index-env", "JOB_COMPLETION_INDEX"),
        *("--log-format", "json"),
    ]
    procs = []
    for k in range(3):
        env = {**os.environ, "JOB_COMPLETION_INDEX": str(k)}
        procs.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
    result = invoke("merge", str(out))
    assert result.exit_code == 0, result.stderr
    assert "compare_faces: reference face found in 3 of 7 images" in result.stdout
    answer = json.loads((out / "summary.json").read_text())["compare_faces"]
    assert set(answer["matched_keys"]) == SHOWS_RIC
    assert answer["faces"] == 1
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 9 and len({r["key"] for r in rows}) == 9
