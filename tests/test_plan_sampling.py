"""``plan`` at scale: parallel listing, sniffing a random sample, done work left out."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rekbatch.commands.plan import margin, render_plan
from rekbatch.config import load_config
from rekbatch.engine import Job, RunOptions
from rekbatch.store.jobdir import ledger_path
from rekbatch.store.ledger import LedgerDB
from tests.conftest import REGION, make_bucket
from tests.helpers import fake_jpeg, invoke, sized_png, write_config
from tests.support.fake_backend import FakeBackend
from tests.support.moto import put_objects

JPEGS, LIARS = 300, 100


def _fill(s3: Any, bucket: str) -> None:
    make_bucket(s3, bucket)
    objects = [(f"img/{i:05d}.jpg", fake_jpeg(i)) for i in range(JPEGS)]
    objects += [
        (f"img/{i:05d}.jpg", b"not a picture " * 9 + bytes([i % 251]))
        for i in range(JPEGS, JPEGS + LIARS)
    ]
    put_objects(bucket, objects)


def _config_text(tmp_path: Path, bucket: str, moto: str) -> str:
    return (
        f'[job]\nname = "plan"\noutput_dir = "{tmp_path / "out"}"\n'
        f'[source]\nuris = ["s3://{bucket}/"]\n'
        f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{moto}"\n'
        '[[operations]]\ntype = "detect_labels"\n'
    )


def test_margin_is_zero_when_everything_was_read() -> None:
    assert margin(30, 100, 100) == 0
    assert margin(0, 0, 10) == 0
    # 95% interval of a half/half split, 400 of 10,000: about ±4.9 points.
    assert 470 <= margin(200, 400, 10_000) <= 490


def test_plan_sniffs_a_sample_and_states_the_margin(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    _fill(s3, "plan-sample")
    config = write_config(
        tmp_path / "job.toml", _config_text(tmp_path, "plan-sample", moto_endpoint)
    )
    result = invoke("plan", str(config), "--json", "--sample", "100")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["objects_listed"] == JPEGS + LIARS
    sample = plan["sample"]
    assert "±" in render_plan(plan) and "a random 100 of 400" in render_plan(plan)
    assert sample == {**sample, "candidates": JPEGS + LIARS, "sniffed": 100, "exact": False}
    jpeg, wrong = plan["eligible_by_type"]["jpeg"], plan["skipped_by_reason"]["not_image"]
    assert jpeg + wrong == JPEGS + LIARS
    spread = sample["margins"]["jpeg"]
    assert 0 < spread < 80 and abs(jpeg - JPEGS) <= spread * 1.5

    exact = json.loads(invoke("plan", str(config), "--json", "--sample", "all").stdout)
    assert exact["sample"]["exact"] and exact["sample"]["margins"] == {}
    assert exact["eligible_by_type"] == {"jpeg": JPEGS}
    assert exact["skipped_by_reason"] == {"not_image": LIARS}

    bad = invoke("plan", str(config), "--sample", "some")
    assert bad.exit_code == 2 and "--sample" in bad.stderr


def test_plan_leaves_out_what_the_output_directory_has_done(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    _fill(s3, "plan-done")
    config = write_config(tmp_path / "job.toml", _config_text(tmp_path, "plan-done", moto_endpoint))
    cfg = load_config(config, environ={})
    capped = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_images": 150})})
    job = Job(capped, RunOptions(output_dir=tmp_path / "out"), backend=FakeBackend())
    assert asyncio.run(job.run()).exit_code == 4
    result = invoke("plan", str(config), "--json", "--sample", "all")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    done = plan["objects_done"]
    assert done >= 150 and plan["objects_left"] == JPEGS + LIARS - done
    assert plan["images_eligible"] + plan["skipped_by_reason"].get("not_image", 0) == (
        JPEGS + LIARS - done
    )
    assert f"{done} done, {JPEGS + LIARS - done} left" in render_plan(plan)


def _mixed(s3: Any, bucket: str) -> set[str]:
    """Objects the listing, the globs, the sizes and the sniffing each rule on; every
    content distinct, so that deduplication plays no part."""
    make_bucket(s3, bucket)
    objects = [(f"photos/{i:03d}.jpg", fake_jpeg(i)) for i in range(20)]
    objects += [(f"photos/ok-{i}.png", sized_png(i, 96, 96)) for i in range(5)]
    # 70 px a side: under DetectLabels' 80, over PPE's 64.
    objects += [(f"photos/small-{i}.png", sized_png(100 + i, 70, 70)) for i in range(4)]
    objects += [(f"photos/tiny-{i}.png", sized_png(200 + i, 40, 40)) for i in range(3)]
    objects += [(f"photos/liar-{i}.jpg", b"not a picture " * 9 + bytes([i])) for i in range(3)]
    objects += [(f"photos/crumb-{i}.jpg", b"crumb" + bytes([i])) for i in range(2)]
    objects += [(f"photos/empty-{i}.png", b"") for i in range(2)]
    objects += [(f"notes/{i}.txt", b"a note " + bytes([i])) for i in range(3)]
    objects += [(f"skip/{i}.jpg", fake_jpeg(300 + i)) for i in range(2)]
    objects += [("photos/big.jpg", fake_jpeg(999, 6 * 1024 * 1024))]  # over 5 MB, under 15
    put_objects(bucket, objects)
    return {key for key, _ in objects}


@pytest.mark.parametrize("image_mode", ["auto", "bytes"])
def test_a_plans_counts_are_what_a_run_does(
    s3: Any, moto_endpoint: str, tmp_path: Path, image_mode: str
) -> None:
    bucket = f"plan-run-{image_mode}"
    keys = _mixed(s3, bucket)
    text = (
        f'[job]\nname = "plan-run"\noutput_dir = "{tmp_path / "out"}"\n'
        f'[source]\nuris = ["s3://{bucket}/"]\nexclude = ["skip/*"]\nconvert = false\n'
        f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{moto_endpoint}"\n'
        f'image_mode = "{image_mode}"\n'
        '[[operations]]\ntype = "detect_labels"\n'
        '[[operations]]\ntype = "detect_protective_equipment"\n'
    )
    config = write_config(tmp_path / "job.toml", text)
    result = invoke("plan", str(config), "--json", "--sample", "all")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)

    backend = FakeBackend()
    cfg = load_config(config, environ={})
    outcome = asyncio.run(Job(cfg, RunOptions(output_dir=tmp_path / "out"), backend=backend).run())
    assert outcome.exit_code == 0
    db = LedgerDB(ledger_path(tmp_path / "out"), readonly=True)
    try:
        rows = db.counts()
    finally:
        db.close()
    sent: Counter[str] = Counter()
    skipped: dict[str, Counter[str]] = {}
    for row in rows:
        if row["status"] == "ok":
            sent[row["operation"]] += row["n"]
        else:
            assert row["status"] == "skipped"
            skipped.setdefault(row["operation"], Counter())[row["reason"]] += row["n"]

    assert plan["calls_by_api"] == dict(backend.calls)
    assert plan["objects_listed"] == len(keys)
    assert plan["sample"]["exact"]
    assert plan["images_by_operation"] == dict(sent)
    assert plan["skipped_by_operation"] == {op: dict(c) for op, c in skipped.items()}
    # What the sizes decide depends on how the images go: by reference up to 15 MB.
    big = "too_large" if image_mode == "bytes" else None
    assert skipped["detect_labels"].get("too_large") == (1 if big else None)
    assert skipped["detect_labels"]["too_small"] == 4 + 3
    assert skipped["detect_protective_equipment"]["too_small"] == 3
    # Bytes that are no picture, whatever their name or size, once sniffed.
    assert skipped["detect_labels"]["not_image"] == 3 + 2
