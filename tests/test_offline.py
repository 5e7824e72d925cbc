"""The offline backend through the CLI: the README's quickstart, S3 sources, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO, SAMPLES
from tests.helpers import (
    invoke,
    read_jsonl,
    upload_samples,
    write_config,
)

SHOWS_RIC = {"ric_harvey.jpeg", "ric.jpg", "ric_crowd1.jpg"}


def test_readme_quickstart_answers_wheres_ric_offline(tmp_path: Path) -> None:
    """The README's first command, minus the install: run from the repository root."""
    readme = (REPO / "README.md").read_text()
    assert "rekbatch run configs/wheres-ric-local.toml" in readme
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rekbatch",
            "run",
            "configs/wheres-ric-local.toml",
            "--output",
            str(out),
            "--log-format",
            "json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compare_faces: reference face found in 3 of 7 images" in proc.stdout
    answer = json.loads((out / "summary.json").read_text())["compare_faces"]
    assert set(answer["matched_keys"]) == SHOWS_RIC
    assert answer["images_compared"] == 7
    crowd = next(m for m in answer["matches"] if m["key"] == "ric_crowd1.jpg")
    box = crowd["bounding_box"]
    assert 0 <= box["Left"] <= 1 and 0 <= box["Top"] <= 1
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert rows["broken.jpg"]["reason"] == "not_image"
    assert rows["notes.txt"]["reason"] == "excluded"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimated_cost_usd"] == 0.0


def test_offline_backend_reads_s3_sources_as_bytes(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    bucket = upload_samples(s3, "offline-ric", prefix="photos/")
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "offline-s3"\noutput_dir = "{tmp_path / "out"}"\n'
        f'[source]\nuris = ["s3://{bucket}/photos/"]\n'
        f'[aws]\nregion = "eu-west-1"\ns3_endpoint_url = "{moto_endpoint}"\n'
        '[backend]\nkind = "local"\n'
        f'[[operations]]\ntype = "compare_faces"\nreference = "{SAMPLES / "ric_harvey.jpeg"}"\n',
    )
    result = invoke("run", str(config))
    assert result.exit_code == 0, result.stderr
    assert "reference face found in 3 of 7 images" in result.stdout
    answer = json.loads((tmp_path / "out" / "summary.json").read_text())["compare_faces"]
    assert {k.rsplit("/", 1)[-1] for k in answer["matched_keys"]} == SHOWS_RIC


def test_operations_the_offline_backend_cannot_do_are_refused(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "job.toml",
        f'[source]\nuris = ["{SAMPLES}"]\n[backend]\nkind = "local"\n'
        '[[operations]]\ntype = "detect_faces"\n[[operations]]\ntype = "detect_labels"\n',
    )
    for command in ("validate", "run"):
        result = invoke(command, str(config))
        assert result.exit_code == 2
        assert "operations[1].type" in result.stderr and "detect_labels" in result.stderr
    assert not (tmp_path / "out").exists()


def test_ctrl_c_on_a_terminal_stops_like_kill_int_and_resumes(tmp_path: Path) -> None:
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group, the pool's
    workers included: the run must stop exactly as with ``kill -INT`` on rekbatch alone."""
    import os
    import shutil
    import signal
    import time

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        for name in ("ric.jpg", "ric_crowd1.jpg", "sample-image1.jpeg"):
            shutil.copy(SAMPLES / name, photos / f"{i}-{name}")
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "job.toml",
        f'[job]\nname = "ctrl-c"\noutput_dir = "{out}"\n\n[source]\nuris = ["{photos}"]\n\n'
        '[backend]\nkind = "local"\n\n[limits]\nconcurrency = 4\n\n'
        f'[[operations]]\ntype = "compare_faces"\nreference = "{SAMPLES / "ric_harvey.jpeg"}"\n',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "rekbatch", "run", str(config), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 120
        results = out / "results.jsonl"
        while not (results.exists() and results.stat().st_size > 0):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no result in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"rekbatch resume {out}" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"].startswith("interrupted")
    first = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    assert 0 < len(first) < 24  # the images in flight finished and were written

    resumed = invoke("resume", str(out))
    assert resumed.exit_code == 0, resumed.stderr
    rows = read_jsonl(out / "results.jsonl")
    assert sorted(r["key"] for r in rows) == sorted(p.name for p in photos.iterdir())
    again = {r["key"]: r for r in rows}
    # What the interrupted run finished is kept as it was, not analysed again.
    assert all(again[key] == row for key, row in first.items())
