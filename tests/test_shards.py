"""Shards: a disjoint, stable split of the objects; shards as separate processes (the way
Kubernetes Indexed Jobs and AWS Batch array jobs start them), killed and rerun; merge."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
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

from rekbatch.config import Config, load_config
from rekbatch.config.model import DetectLabelsOp as LabelsOp
from rekbatch.engine import Job, RunOptions
from rekbatch.engine.shards import (
    JobSplit,
    Shard,
    job_file_owns,
    parse_shard,
    shard_config,
    shard_from_env,
    shard_of,
)
from rekbatch.errors import ConfigError, SetupError
from tests.conftest import REPO, make_bucket
from tests.helpers import fake_jpeg, invoke, read_csv, read_jsonl
from tests.support.configs import write_job
from tests.support.fake_backend import FakeBackend
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import Served, put_objects
from tests.support.servers import ServedJob, StartFake

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


def test_a_single_shard_equals_a_plain_run(
    s3: Any, tmp_path: Path, start_fake: StartFake, served_job: ServedJob
) -> None:
    keys = _fill(s3, "one-shard", 40)
    fake = start_fake()
    config = served_job(
        fake, "s3://one-shard/", operations=OPS, extra="[output]\nparquet = false\n"
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
    s3: Any, tmp_path: Path, start_fake: StartFake, served_job: ServedJob
) -> None:
    _fill(s3, "half-done", 10)
    fake = start_fake()
    config = served_job(fake, "s3://half-done/", extra="[output]\nparquet = false\n")
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


# -- shards that list only their part -------------------------------------------------------


HEX_KEYS = [f"p/{i % 16:x}/{i}.jpg" for i in range(2400)]


def _size_and_etag(i: int) -> tuple[int, str]:
    """Of ``fake_jpeg(i)`` as S3 keeps it (a single-part ETag is the body's MD5)."""
    body = fake_jpeg(i)
    return len(body), hashlib.md5(body).hexdigest()


def _inventory(bucket: str, keys: list[str]) -> tuple[str, str, dict[str, bytes]]:
    """An inventory report of ``keys`` (``fake_jpeg`` bodies) in 8 CSV data files; its URI
    and its bucket."""
    reports = f"{bucket}-inv"
    objects: dict[str, bytes] = {}
    files = []
    for n in range(8):
        rows = io.StringIO()
        for i in range(n, len(keys), 8):
            size, etag = _size_and_etag(i)
            rows.write(f'"{bucket}","{keys[i]}","{size}","{etag}"\n')
        objects[f"data/{n}.csv.gz"] = gzip.compress(rows.getvalue().encode())
        files.append({"key": f"data/{n}.csv.gz", "size": len(objects[f"data/{n}.csv.gz"])})
    manifest = {
        "sourceBucket": bucket,
        "destinationBucket": f"arn:aws:s3:::{reports}",
        "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size, ETag",
        "files": files,
    }
    objects["manifest.json"] = json.dumps(manifest).encode()
    return f"inventory:s3://{reports}/manifest.json", reports, objects


def _key_list(bucket: str, keys: list[str]) -> tuple[str, str, dict[str, bytes]]:
    lines = ["bucket,key,size,etag"]
    for i, key in enumerate(keys):
        size, etag = _size_and_etag(i)
        lines.append(f"{bucket},{key},{size},{etag}")
    body = ("\n".join(lines) + "\n").encode()
    return f"keys:s3://{bucket}-list/keys.csv", f"{bucket}-list", {"keys.csv": body}


@pytest.fixture
def quick_fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(latency_median_ms=5, s3_cache=True)


def _ok_rows(path: Path) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(b'"status":"ok"')


@pytest.mark.parametrize("kind", ["prefix", "inventory", "keys"])
def test_four_shard_processes_list_their_part_killed_rerun_and_merged_to_a_single_run(
    s3: Any, moto_endpoint: str, quick_fake: FakeRekognition, tmp_path: Path, kind: str,
    monkeypatch: pytest.MonkeyPatch, served_job: ServedJob,
) -> None:  # fmt: skip
    """Four shard processes over 2,400 keys (AWS Batch style), one killed half way through
    its calls and run again, then merged: together they list each key about once (each
    listed the whole source before) and the merge holds what a single run does. The prefix
    job uploads, so its split is kept in S3; the others keep it in the output folder."""
    bucket = make_bucket(s3, f"split-{kind}")
    put_objects(bucket, ((k, fake_jpeg(i)) for i, k in enumerate(HEX_KEYS)))
    if kind == "prefix":
        uri, counted = f"s3://{bucket}/", bucket
        results = make_bucket(s3, "split-results")
        upload = f'upload_uri = "s3://{results}/job/"\n'
    else:
        uri, counted, report = (_inventory if kind == "inventory" else _key_list)(bucket, HEX_KEYS)
        put_objects(make_bucket(s3, counted), report.items())
        upload = ""
    out = tmp_path / "out"
    config = served_job(
        quick_fake,
        uri,
        operations='[[operations]]\ntype = "detect_labels"\n',
        extra=f"[limits]\nconcurrency = 2\nmax_tps = 160\n\n[output]\nparquet = false\n{upload}",
        # Every key listed and recorded; a fifth of them called (the rest excluded,
        # recorded as skipped without a call), so the test stays quick.
        source={"sniff": False, "include": ["*0.jpg", "*5.jpg"]},
    )
    served = Served()
    with served.counting():
        procs = {k: _shard_process(config, k, 4) for k in range(4)}
        victim = out / "shard-0002-of-0004" / "results.jsonl"
        deadline = time.monotonic() + 120
        # Killed two thirds of the way through its calls. A rerun lists its part again from
        # its ranges' watermarks, up to the whole part (a quarter of the bucket), so where the
        # kill falls, and how far commits lag behind on a busy machine, moves the total.
        while _ok_rows(victim) < 80:  # of about 120 calls
            assert time.monotonic() < deadline and procs[2].poll() is None, "shard 2 was not killed"
            time.sleep(0.02)
        procs[2].send_signal(signal.SIGKILL)
        procs[2].communicate(timeout=10)
        for k in (0, 1, 3):
            _, err = procs[k].communicate(timeout=120)
            assert procs[k].returncode == 0, err[-2000:]
            # Each shard's ceiling is 1/4 of the job's max_tps.
            started = next(json.loads(x) for x in err.splitlines() if '"run_started"' in x)
            assert started["ceilings"] == {"DetectLabels": 40.0}

        # A merge now names the shard that is not finished.
        refused = invoke("merge", str(out))
        assert refused.exit_code == 2 and "shard 2/4" in refused.stderr

        # Rerun only index 2: it resumes from its own ledger.
        rerun = _shard_process(config, 2, 4)
        _, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err[-2000:]
        assert '"replayed"' in err or '"listing"' in err

    if kind == "prefix":  # keys ListObjectsV2 returned
        listed = served.listed[counted]
    else:  # lines of the data files or of the key list read (its header aside)
        listed = served.lines_under(counted) - (1 if kind == "keys" else 0)
    # Each shard listing the whole source, as before, was about four times the bucket.
    assert listed <= 1.25 * len(HEX_KEYS), listed
    jobs = [json.loads((out / f"shard-{k:04d}-of-0004" / "job.json").read_text()) for k in range(4)]
    if kind == "prefix":
        stored = s3.get_object(Bucket="split-results", Key="job/split.json")["Body"].read()
        split = json.loads(stored)
        assert not (out / "split.json").exists()
    else:
        split = json.loads((out / "split.json").read_text())
    assert split["shards"] == 4 and {job["split"] for job in jobs} == {split["split"]}
    per_shard = [
        {r["key"] for r in read_jsonl(out / f"shard-{k:04d}-of-0004" / "results.jsonl")}
        for k in range(4)
    ]
    assert sum(len(keys) for keys in per_shard) == len(HEX_KEYS)  # disjoint ...
    assert set().union(*per_shard) == set(HEX_KEYS)  # ... and together all of them

    merged = invoke("merge", str(out))
    assert merged.exit_code == 0, merged.stderr
    records = _records(out / "results.jsonl")
    assert max(records.values()) == 1
    assert {(k, op) for k, op, _ in records} == {(k, "detect_labels") for k in HEX_KEYS}
    assert Counter((r["key"], r["operation"]) for r in read_csv(out / "results.csv")) == Counter(
        (k, op) for k, op, _ in records
    )
    # Nothing paid twice beyond the calls in flight of the killed shard (2 workers).
    billed = quick_fake.stats()["billed"]
    assert sum(n - 1 for n in billed.values()) <= 2

    # A single process over the same source gives the same records and counts.
    cfg = load_config(config, environ={})
    single = asyncio.run(
        Job(cfg, RunOptions(output_dir=tmp_path / "single"), backend=FakeBackend()).run()
    )
    assert single.exit_code == 0
    assert _records(tmp_path / "single" / "results.jsonl") == records
    both = json.loads((out / "summary.json").read_text())
    assert both["counts"] == single.summary["counts"]
    assert [s["shard"] for s in both["shards"]] == [0, 1, 2, 3]
    status = invoke("status", str(out / "shard-0000-of-0004"), "--json")
    assert json.loads(status.stdout)["objects_done"] == len(per_shard[0])
    whole = json.loads(invoke("status", str(out), "--json").stdout)
    assert whole["shards_finished"] == 4 and whole["objects_done"] == len(HEX_KEYS)
    if kind != "prefix":
        return
    # Each shard uploaded to its own folder; merging from S3 gives the same records and
    # puts the merged files where a single run would have.
    listed_folders = s3.list_objects_v2(Bucket="split-results", Prefix="job/", Delimiter="/")
    folders = sorted(p["Prefix"] for p in listed_folders.get("CommonPrefixes", []))
    assert [f for f in folders if "shard-" in f] == [
        f"job/shard-{k:04d}-of-0004/" for k in range(4)
    ]
    monkeypatch.setenv("REKBATCH_AWS__S3_ENDPOINT_URL", moto_endpoint)
    remote = invoke("merge", "s3://split-results/job/", "--output", str(tmp_path / "from-s3"))
    assert remote.exit_code == 0, remote.stderr
    assert _records(tmp_path / "from-s3" / "results.jsonl") == records
    body = s3.get_object(Bucket="split-results", Key="job/results_jsonl/results.jsonl")["Body"]
    assert sum(1 for _ in body.read().splitlines()) == len(HEX_KEYS)


def _shard_job(cfg: Config, shard: Shard, backend: FakeBackend) -> Job:
    own = shard_config(cfg, shard)
    options = RunOptions(Path(own.job.output_dir), shard=shard, job_config=cfg)
    return Job(own, options, backend=backend)


def _in_process_config(tmp_path: Path, moto_endpoint: str, uri: str, **settings: Any) -> Config:
    """The loaded config of a job whose shards run in this process on ``FakeBackend``s:
    no Rekognition server (its endpoint is never called) and no Parquet."""
    path = write_job(
        tmp_path / "job.toml",
        uris=[uri],
        output_dir=tmp_path / "out",
        s3_endpoint=moto_endpoint,
        rek_endpoint="http://127.0.0.1:9",
        output={"parquet": False},
        **settings,
    )
    return load_config(path, environ={})


async def test_shards_started_together_divide_once_and_check_the_reference_once(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    keys = _fill(s3, "together", 60)
    reference = tmp_path / "ric.jpg"
    reference.write_bytes(fake_jpeg(10_000))
    people = {f"sha256:{hashlib.sha256(reference.read_bytes()).hexdigest()}": ["ric"]}
    cfg = _in_process_config(
        tmp_path,
        moto_endpoint,
        "s3://together/",
        operations=f'[[operations]]\ntype = "compare_faces"\nreference = "{reference}"\n',
        source={"sniff": False},
    )
    # Slow calls: the others come to the reference while the first shard still checks it.
    backends = [FakeBackend(people=people, latency=1.0) for _ in range(3)]
    jobs = [_shard_job(cfg, Shard(k, 3), backends[k]) for k in range(3)]
    async with asyncio.timeout(120):
        outcomes = await asyncio.gather(*(job.run() for job in jobs))
    assert [o.exit_code for o in outcomes] == [0, 0, 0]
    # One shard divided the bucket and checked the reference; the others took both.
    assert sum(b.calls["DetectFaces"] for b in backends) == 1
    ids = {job.split.id if job.split else None for job in jobs}
    stored = json.loads((tmp_path / "out" / "split.json").read_text())
    assert ids == {stored["split"]}
    assert json.loads((tmp_path / "out" / "split.claim").read_text())["shard"] in (0, 1, 2)
    assert (tmp_path / "out" / "references.json").exists()
    per_shard = [
        {r["key"] for r in read_jsonl(tmp_path / "out" / Shard(k, 3).folder / "results.jsonl")}
        for k in range(3)
    ]
    assert sum(map(len, per_shard)) == len(keys) and set().union(*per_shard) == keys
    # What merge asks of a shard's job.json: does it own this object? Exactly one does.
    bodies = [
        json.loads((tmp_path / "out" / Shard(k, 3).folder / "job.json").read_text())
        for k in range(3)
    ]
    for k, owned in enumerate(per_shard):
        for key in owned:
            owners = [j for j, body in enumerate(bodies) if job_file_owns(body, 0, "together", key)]
            assert owners == [k]


async def test_a_shard_stops_when_the_split_it_finds_is_not_the_one_it_listed_by(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    _fill(s3, "other-split", 30)
    cfg = _in_process_config(tmp_path, moto_endpoint, "s3://other-split/")
    out = tmp_path / "out"
    assert (await _shard_job(cfg, Shard(0, 2), FakeBackend()).run()).exit_code == 0
    path = out / "split.json"
    kept = JobSplit.from_json(path.read_text())

    # Removed: the shard puts back the split it listed by, and carries on.
    path.unlink()
    assert (await _shard_job(cfg, Shard(0, 2), FakeBackend()).run()).exit_code == 0
    assert JobSplit.from_json(path.read_text()).id == kept.id

    # Replaced by another division of the same job: stop, naming both.
    parts = [[list(kept.parts[0][1]), list(kept.parts[0][0])]]
    other = JobSplit(2, kept.fingerprint, parts)
    path.write_text(other.to_json())
    with pytest.raises(SetupError, match=f"split {other.id}, but shard 0/2 has listed by split"):
        await _shard_job(cfg, Shard(0, 2), FakeBackend()).run()

    # Made for another number of shards, or another job: stop before listing anything.
    path.write_text(kept.to_json())
    with pytest.raises(SetupError, match="divides the job into 2 shards, not 3"):
        await _shard_job(cfg, Shard(1, 3), FakeBackend()).run()
    assert not (out / Shard(1, 3).folder / "results.jsonl").exists()
    labels = cfg.model_copy(update={"operations": [LabelsOp(type="detect_labels")]})
    with pytest.raises(SetupError, match="made for another job"):
        await _shard_job(labels, Shard(1, 2), FakeBackend()).run()
