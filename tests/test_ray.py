"""Ray: shards as Ray tasks (one killed and retried by Ray), and the offline backend's
analysis on a Ray actor pool; both on a local Ray instance."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SAMPLES, make_bucket
from tests.helpers import fake_jpeg, invoke, read_jsonl, write_config
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import put_objects
from tests.support.servers import ServedJob, StartFake

OPS = '[[operations]]\ntype = "detect_faces"\n\n[[operations]]\ntype = "detect_labels"\n'
SHOWS_RIC = {"ric_harvey.jpeg", "ric.jpg", "ric_crowd1.jpg"}


@pytest.fixture
def slow_fake(start_fake: StartFake) -> FakeRekognition:
    return start_fake(
        latency_median_ms=25,
        latency_sigma=0.3,
        quotas={"DetectFaces": 200, "DetectLabels": 200},
        s3_cache=True,
    )


def _running_pid(folder: Path) -> int | None:
    """The pid of the shard's current run, from its ledger, once it has written rows."""
    ledger = folder / ".rekbatch" / "ledger.sqlite"
    jsonl = folder / "results.jsonl"
    if not ledger.exists() or not jsonl.exists() or jsonl.stat().st_size < 1000:
        return None
    try:
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=1)
        try:
            row = db.execute("SELECT pid FROM runs WHERE ended_at IS NULL").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return None if row is None else int(row[0])


def test_ray_engine_runs_the_shards_as_tasks_and_retries_a_killed_one(
    s3: Any, slow_fake: FakeRekognition, tmp_path: Path, served_job: ServedJob
) -> None:
    make_bucket(s3, "ray-bucket")
    keys = {f"img/{i:04d}.jpg" for i in range(160)}
    put_objects("ray-bucket", ((key, fake_jpeg(i)) for i, key in enumerate(sorted(keys))))
    out = tmp_path / "out"
    config = served_job(
        slow_fake,
        "s3://ray-bucket/",
        operations=OPS,
        extra="[limits]\nconcurrency = 2\nmax_tps = 40\n\n[output]\nparquet = false\n",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "rekbatch", "run", str(config), "--engine", "ray", "--shards",
         "4", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    victim = out / "shard-0001-of-0004"
    deadline = time.monotonic() + 120
    pid = None
    try:
        while pid is None:
            assert time.monotonic() < deadline, "shard 1 never started"
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            pid = _running_pid(victim)
            time.sleep(0.05)
        assert pid != proc.pid  # a Ray worker process, not the driver
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]
    assert "records: ok 320" in stdout
    # Ray ran shard 1 again; the retry resumed (two runs in its ledger, the first unended).
    db = sqlite3.connect(f"file:{victim / '.rekbatch' / 'ledger.sqlite'}?mode=ro", uri=True)
    runs = db.execute("SELECT pid, ended_at FROM runs ORDER BY started_at").fetchall()
    db.close()
    assert len(runs) >= 2 and runs[0][0] == pid and runs[0][1] is None
    pairs = Counter((r["key"], r["operation"]) for r in read_jsonl(out / "results.jsonl"))
    assert set(pairs) == {(k, op) for k in keys for op in ("detect_faces", "detect_labels")}
    assert max(pairs.values()) == 1
    billed = slow_fake.stats()["billed"]
    assert sum(n - 1 for n in billed.values()) <= 2 * 2  # the killed shard's calls in flight


def test_offline_backend_on_a_ray_actor_pool_finds_ric(tmp_path: Path) -> None:
    import ray

    config = write_config(
        tmp_path / "job.toml",
        (REPO / "configs" / "wheres-ric-local.toml")
        .read_text()
        .replace('kind = "local"', 'kind = "local"\nexecutor = "ray"')
        .replace("../samples/wheres-ric", str(SAMPLES)),
    )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        result = invoke("run", str(config), "--output", str(tmp_path / "out"))
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.stderr
    assert "compare_faces: reference face found in 3 of 7 images" in result.stdout
    answer = json.loads((tmp_path / "out" / "summary.json").read_text())["compare_faces"]
    assert set(answer["matched_keys"]) == SHOWS_RIC
