"""merge trusts nothing a shard folder says about itself: forged folder names, records of
another shard, a record twice, an edited job.json (its fingerprint, its upload target)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rekbatch.config import Config, load_config
from rekbatch.engine import Job, RunOptions
from rekbatch.engine.shards import Shard, job_file_owns, shard_config
from tests.conftest import make_bucket
from tests.helpers import invoke, local_images, read_csv, read_jsonl, sha256
from tests.support.fake_backend import FakeBackend

BOUND = 30.0
OPS = '[[operations]]\ntype = "detect_faces"\n\n[[operations]]\ntype = "detect_labels"\n'


def _config(tmp_path: Path, extra: str = "") -> Config:
    folder = tmp_path / "photos"
    local_images(folder, 12)
    path = tmp_path / "job.toml"
    path.write_text(
        f'[job]\nname = "sharded"\noutput_dir = {json.dumps(str(tmp_path / "out"))}\n\n'
        f"[source]\nuris = [{json.dumps(str(folder))}]\n\n"
        f"[limits]\nmax_tps = 10000\n\n[output]\nparquet = false\n{extra}\n{OPS}",
        encoding="utf-8",
    )
    return load_config(path, environ={})


def _run_shards(
    cfg: Config, count: int = 2, backend: Callable[[], FakeBackend] = FakeBackend
) -> Path:
    for index in range(count):
        shard = Shard(index, count)
        own = shard_config(cfg, shard)
        options = RunOptions(output_dir=Path(own.job.output_dir), shard=shard, job_config=cfg)

        async def run(own: Config = own, options: RunOptions = options) -> int:
            async with asyncio.timeout(BOUND):
                return (await Job(own, options, backend=backend()).run()).exit_code

        assert asyncio.run(run()) == 0
    return Path(cfg.job.output_dir)


def _shard(out: Path, index: int, count: int = 2) -> Path:
    return out / Shard(index, count).folder


def _merge_fails(out: Path, *, started: bool = True) -> str:
    before = {name: (out / name).exists() for name in ("results.jsonl", "summary.json")}
    result = invoke("merge", str(out))
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    after = {name: (out / name).exists() for name in before}
    if started:
        # Nothing half-merged is left for status, report or Athena to read.
        assert after == {"results.jsonl": False, "summary.json": False}
    else:
        assert after == before  # refused before anything was touched
    return lines[0]


def _owner(out: Path, key: str, count: int = 2) -> int:
    """The shard whose part of the job's split holds ``key`` (source 0, a local folder)."""
    owners = [
        k
        for k in range(count)
        if job_file_owns(json.loads((_shard(out, k, count) / "job.json").read_text()), 0, None, key)
    ]
    assert len(owners) == 1, owners
    return owners[0]


def _keys(out: Path) -> list[tuple[str, str]]:
    return sorted((r["key"], r["operation"]) for r in read_jsonl(out / "results.jsonl"))


def _edit_job(folder: Path, change: Any) -> None:
    path = folder / "job.json"
    body = json.loads(path.read_text())
    change(body)
    path.write_text(json.dumps(body))


def test_a_shard_folder_with_other_digits_is_not_a_shard(tmp_path: Path) -> None:
    """``shard-KKKK-of-NNNN`` in Arabic-Indic digits (which ``int`` reads as 0 and 2) once
    replaced the real shard 0, and its forged record entered the summary."""
    out = _run_shards(_config(tmp_path))
    forged = out / "shard-\u0660\u0660\u0660\u0660-of-\u0660\u0660\u0660\u0662"
    shutil.copytree(_shard(out, 0), forged)
    lines = (forged / "results.jsonl").read_bytes().splitlines(keepends=True)
    row = json.loads(lines[0])
    row["key"] = "forged.png"
    (forged / "results.jsonl").write_bytes(b"".join(lines[1:]) + json.dumps(row).encode() + b"\n")
    trailing = out / (Shard(0, 2).folder + "\n")  # `$` also matched before a newline
    shutil.copytree(forged, trailing)
    result = invoke("merge", str(out))
    assert result.exit_code == 0, result.stderr
    assert len(_keys(out)) == 24 and "forged.png" not in {k for k, _ in _keys(out)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["by_status"] == {"ok": 24}


def test_a_record_of_another_shard_is_refused(tmp_path: Path) -> None:
    out = _run_shards(_config(tmp_path))
    theirs = (_shard(out, 1) / "results.jsonl").read_bytes().splitlines(keepends=True)[0]
    key = json.loads(theirs)["key"]
    assert _owner(out, key) == 1
    with (_shard(out, 0) / "results.jsonl").open("ab") as handle:
        handle.write(theirs)  # the same record in two shards: 10 rows, 7 counted, once
    line = _merge_fails(out)
    assert "shard-0000-of-0002" in line and key in line and "shard 1" in line


def test_a_record_twice_in_one_shard_is_refused(tmp_path: Path) -> None:
    out = _run_shards(_config(tmp_path))
    jsonl = _shard(out, 1) / "results.jsonl"
    first = jsonl.read_bytes().splitlines(keepends=True)[0]
    with jsonl.open("ab") as handle:
        handle.write(first)
    line = _merge_fails(out)
    key = json.loads(first)["key"]
    assert "twice" in line and key in line and "shard-0001-of-0002" in line


def test_the_fingerprint_is_recomputed_not_read(tmp_path: Path) -> None:
    """A shard whose job.json was edited to another job but kept the stored fingerprint."""
    out = _run_shards(_config(tmp_path))

    def other_job(body: dict[str, Any]) -> None:
        body["job_config"]["operations"][1]["min_confidence"] = 99.0

    _edit_job(_shard(out, 1), other_job)
    stored = [json.loads((_shard(out, k) / "job.json").read_text()) for k in (0, 1)]
    assert stored[0]["job_fingerprint"] == stored[1]["job_fingerprint"]
    line = _merge_fails(out)
    assert "different jobs" in line and "shard-0001-of-0002" in line


@pytest.mark.parametrize("edited", [0, 1])
def test_the_upload_target_must_agree_in_every_shard(
    tmp_path: Path, s3: Any, moto_endpoint: str, edited: int
) -> None:
    """An edited upload_uri in one shard's job.json once sent the merged files to another
    bucket (shard 0's, whichever was edited)."""
    good = make_bucket(s3, f"merge-good-{edited}")
    evil = make_bucket(s3, f"merge-evil-{edited}")
    out = _run_shards(_config(tmp_path))

    def upload_to(bucket: str) -> Any:
        def change(body: dict[str, Any]) -> None:
            body["job_config"]["output"]["upload_uri"] = f"s3://{bucket}/results/"
            body["job_config"]["aws"]["s3_endpoint_url"] = moto_endpoint

        return change

    _edit_job(_shard(out, 0), upload_to(good))
    _edit_job(_shard(out, 1), upload_to(good))
    assert invoke("merge", str(out)).exit_code == 0
    uploaded = s3.list_objects_v2(Bucket=good, Prefix="results/").get("KeyCount", 0)
    assert uploaded > 0
    _edit_job(_shard(out, edited), upload_to(evil))
    line = _merge_fails(out, started=False)
    assert "upload" in line and evil in line and good in line
    assert s3.list_objects_v2(Bucket=evil).get("KeyCount", 0) == 0


def test_honest_shards_still_merge_into_one_job(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    out = _run_shards(cfg, count=3)
    result = invoke("merge", str(out))
    assert result.exit_code == 0, result.stderr
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 24
    assert sorted((r["key"], r["operation"]) for r in read_csv(out / "results.csv")) == keys


def test_a_person_match_of_another_shard_is_refused(tmp_path: Path) -> None:
    """search_faces' matches come from each shard's summary.json: one that names an object
    of another shard (Ric "found" where he is not) is refused like a record would be."""
    folder = tmp_path / "photos"
    keys = local_images(folder, 8)
    ric = (folder / keys[0]).read_bytes()
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "ric.png").write_bytes(ric)
    people = {"sha256:" + sha256(ric): ["ric"]}
    ops = (
        '[[operations]]\ntype = "search_faces"\nstrategy = "compare"\n'
        f"people = {{ ric = [{json.dumps(str(refs / 'ric.png'))}] }}\n"
    )
    path = tmp_path / "job.toml"
    path.write_text(
        f'[job]\nname = "people"\noutput_dir = {json.dumps(str(tmp_path / "out"))}\n\n'
        f"[source]\nuris = [{json.dumps(str(folder))}]\n\n"
        f"[limits]\nmax_tps = 10000\n\n[output]\nparquet = false\n\n{ops}",
        encoding="utf-8",
    )
    cfg = load_config(path, environ={})
    out = _run_shards(cfg, backend=lambda: FakeBackend(people=people))
    assert invoke("merge", str(out)).exit_code == 0
    answer = json.loads((out / "summary.json").read_text())["search_faces"]["people"]["ric"]
    assert answer["matched_keys"] == [keys[0]]
    home = _owner(out, keys[0])
    other = next(k for k in keys if _owner(out, k) != home)
    summary_path = _shard(out, home) / "summary.json"
    summary = json.loads(summary_path.read_text())
    matches = summary["search_faces"]["people"]["ric"]["matches"]
    matches.append({**matches[0], "key": other})
    summary_path.write_text(json.dumps(summary))
    line = _merge_fails(out)
    assert "ric" in line and other in line and f"shard {1 - home}" in line


def test_a_shard_that_widens_its_own_part_is_refused(tmp_path: Path) -> None:
    """Ownership comes from each shard's job.json; one that claims the whole listing there
    could slip in a record of an object that belongs to another shard and that no shard
    processed. The parts of all shards must make up the split they all name."""
    out = _run_shards(_config(tmp_path))
    body = json.loads((_shard(out, 0) / "job.json").read_text())
    assert body.get("split") and body.get("parts"), body.keys()

    def widen(job: dict[str, Any]) -> None:
        job["parts"] = [[[None, None, None]] for _ in job["parts"]]

    _edit_job(_shard(out, 0), widen)
    lines = (_shard(out, 0) / "results.jsonl").read_bytes().splitlines(keepends=True)
    row = json.loads(lines[0])
    row["key"] = "~made-up.png"  # after every real key: the real split gives it to the last shard
    with (_shard(out, 0) / "results.jsonl").open("ab") as handle:
        handle.write(json.dumps(row).encode() + b"\n")
    line = _merge_fails(out, started=False)
    assert "shard-0000-of-0002" in line and "split" in line, line


def test_shards_that_name_different_splits_are_refused(tmp_path: Path) -> None:
    out = _run_shards(_config(tmp_path))

    def other(job: dict[str, Any]) -> None:
        job["split"] = "0" * 16

    _edit_job(_shard(out, 1), other)
    line = _merge_fails(out, started=False)
    assert "shard-0001-of-0002" in line and "split" in line, line
